"""The tf.data input of both phases: parallel reads, AUTOTUNE decode+resize, an in-memory cache when the split fits,
shuffle, batch, prefetch; and balanced class weights.
"""

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

    from kfp_finetune.components.core.dataset import DatasetInfo

log = logging.getLogger("kfp_finetune.train")


# Decoded float32 images are cached in memory when the split takes at most this many bytes.
MAX_CACHE_BYTES = 4 << 30


def _fits_in_memory(num_examples: int, size: int) -> bool:
    return num_examples * size * size * 3 * 4 <= MAX_CACHE_BYTES


def make_dataset(
    info: "DatasetInfo", split: str, size: int, batch_size: int, *, training: bool, seed: int = 0,
    cache: bool = True, ordered: bool = True,
) -> "tf.data.Dataset":
    """Batches of (float32 pixels [B, size, size, 3] in 0..255, int32 labels) for one split.

    Parallel shard reads, AUTOTUNE decode+resize, `.cache()` of the decoded images when the split fits in memory
    (so every epoch after the first skips JPEG decoding), a full shuffle when training, prefetch. `ordered=False`
    lets the parallel decode hand training examples over in any order (determinism "off").
    """
    import tensorflow as tf

    from kfp_finetune.components.core import dataset

    n = info.require_split(split)
    ds = dataset.read_split(info.path, split, shuffle_files=training, seed=seed)
    ds = ds.map(lambda image, label: (dataset.decode_image(image, size), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered or not training)
    # A known length lets Keras size its epochs: with an unknown one it runs an extra, empty step per epoch that
    # still advances optimizer.iterations (and so the learning-rate schedule).
    ds = ds.apply(tf.data.experimental.assert_cardinality(n))
    if not cache:
        pass  # read once (the feature pass): caching would only copy
    elif _fits_in_memory(n, size):
        ds = ds.cache()
    else:
        log.info("split %s (%d images at %d px) is too large to cache in memory; decoding every epoch", split, n, size)
    if training:
        ds = ds.shuffle(min(n, 16384), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Every worker reads the (small) shards and keeps its share of the batches: FILE sharding would hang
    # multi-worker training whenever there are fewer shards than workers.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def class_weights_from_counts(info: "DatasetInfo") -> dict[int, float] | None:
    """Balanced weights n / (k * n_c) from the train counts in the ingest report; None when they are missing."""
    counts = (info.report.get("counts") or {}).get("train") or {}
    if not counts:
        log.warning("dataset %s: no per-class train counts in its report; training without class weights", info.path)
        return None
    per_class = [int(counts.get(name, 0)) for name in info.class_names]
    total, k = sum(per_class), len(per_class)
    return {i: (total / (k * c) if c else 1.0) for i, c in enumerate(per_class)}


def _split_sizes(info: "DatasetInfo") -> tuple[int, int]:
    return info.require_split("train"), info.require_split("validation")
