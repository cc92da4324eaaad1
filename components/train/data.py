"""The tf.data input of both phases: parallel reads, AUTOTUNE decode+resize, an in-memory cache when the split fits,
shuffle, batch, prefetch; and balanced class weights.
"""

import logging
import math
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
    cache: bool = True, ordered: bool = True, epoch: "tf.Variable | None" = None,
) -> "tf.data.Dataset":
    """Batches of (float32 pixels [B, size, size, 3] in 0..255, int32 labels) for one split.

    Parallel shard reads, AUTOTUNE decode+resize, `.cache()` of the decoded images when the split fits in memory
    (so every epoch after the first skips JPEG decoding), a full shuffle when training, prefetch. `ordered=False`
    lets the parallel decode hand training examples over in any order (determinism "off").

    `epoch` (training only; components/train/preempt.py sets it at each epoch's start): each epoch's order is a
    function of (seed, epoch) alone, so that a run resumed at epoch E in a new process sees the batches the
    uninterrupted run saw in epoch E (a shuffle reshuffling at each iteration depends on how many iterators the
    process has made).
    """
    import tensorflow as tf

    from kfp_finetune.components.core import dataset

    n = info.require_split(split)
    if training and epoch is not None:
        return _by_epoch(info, split, n, size, batch_size, seed, epoch, cache=cache, ordered=ordered)
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


def _epoch_seed(seed: int, epoch: "tf.Variable") -> "tf.Tensor":
    """The shuffle seed of the current epoch: read from `epoch` when an epoch's iterator starts."""
    import tensorflow as tf

    return tf.constant(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def _shuffle_by(ds: "tf.data.Dataset", buffer: int, seed: "tf.Tensor") -> "tf.data.Dataset":
    """`ds.shuffle` with a seed tensor, inside a tf.data function.

    tf.data's seed helper compares (graph seed, op seed) with (0, 0) in Python, which fails on a tensor op seed when
    the graph seed is 0 (`tf.random.set_seed(0)`, i.e. --seed 0). Without a graph seed it takes TF's default one;
    the op seed already holds the run's seed.
    """
    import tensorflow as tf

    graph = tf.compat.v1.get_default_graph()  # the dataset function's own graph
    saved = graph.seed
    graph.seed = None
    try:
        return ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
    finally:
        graph.seed = saved


def shuffled_by_epoch(
    examples: "tf.data.Dataset", n: int, batch_size: int, seed: int, epoch: "tf.Variable",
) -> "tf.data.Dataset":
    """`examples` (a dataset that reads the same elements in the same order at every iteration, e.g. a cache)
    shuffled with a seed of (seed, epoch), batched; its cardinality is known (Keras sizes its epochs by it)."""
    import tensorflow as tf

    def one_epoch(_: "tf.Tensor") -> "tf.data.Dataset":
        return _shuffle_by(examples, min(n, 16384), _epoch_seed(seed, epoch))

    ds = tf.data.Dataset.from_tensors(0).flat_map(one_epoch).batch(batch_size)
    return ds.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size))).prefetch(tf.data.AUTOTUNE)


def _by_epoch(
    info: "DatasetInfo", split: str, n: int, size: int, batch_size: int, seed: int, epoch: "tf.Variable", *,
    cache: bool, ordered: bool,
) -> "tf.data.Dataset":
    """make_dataset's training input whose order depends on (seed, epoch) only (see make_dataset)."""
    import tensorflow as tf

    from kfp_finetune.components.core import dataset

    def decode(image: "tf.Tensor", label: "tf.Tensor") -> tuple:
        return dataset.decode_image(image, size), label

    if cache and _fits_in_memory(n, size):
        # Shards in a fixed order into the cache; each epoch shuffles the cached images with its own seed.
        examples = dataset.read_split(info.path, split, shuffle_files=False)
        examples = examples.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
        examples = examples.apply(tf.data.experimental.assert_cardinality(n)).cache()
        ds = shuffled_by_epoch(examples, n, batch_size, seed, epoch)
    else:
        if cache:
            log.info("split %s (%d images at %d px) is too large to cache in memory; decoding every epoch",
                     split, n, size)
        files = dataset.split_files(info.path, split)

        def one_epoch(_: "tf.Tensor") -> "tf.data.Dataset":
            epoch_seed = _epoch_seed(seed, epoch)
            shards = _shuffle_by(tf.data.Dataset.from_tensor_slices(files), len(files), epoch_seed)
            records = shards.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
            images = records.map(dataset.parse_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
            images = images.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
            return _shuffle_by(images, min(n, 16384), epoch_seed)

        ds = tf.data.Dataset.from_tensors(0).flat_map(one_epoch).batch(batch_size)
        ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size))).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
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
