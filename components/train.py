"""train_head and fine_tune: one training loop serving both transfer-learning phases.

train_head
    Loads the `feature_extractor` built by `kfp-finetune backbone`, freezes it, and puts a new head on top:
    pixels -> [augment] -> feature_extractor -> Dropout `dropout` -> Dense softmax `head` (model `classifier`).
    With augmentation off (the `auto` default of `--cache-features`), the frozen backbone runs once over train
    and validation and the head trains on those cached features: a frozen backbone yields the same features
    every epoch, so running it every epoch (what plain Keras does) costs ~10x for nothing. The saved model is the
    full pixels -> probabilities classifier all the same, because the head-only model shares its layers.

fine_tune
    Loads a train_head (or fine_tune) model in safe mode, unfreezes the top N layers of the nested `backbone`
    (or all from a named layer), and trains at a low learning rate with AdamW, linear warmup then cosine decay.
    BatchNormalization follows `--batch-norm`: `frozen` sets each BN layer `trainable=False` one by one, which in
    Keras 3 makes it run in inference mode even though `fit()` passes `training=True` down (keras#20285): the
    moving statistics then never move, and the pretrained features survive the small fine-tuning set.

Both phases: a tf.data pipeline (parallel reads, AUTOTUNE decode+resize, an in-memory cache when the split fits,
shuffle, batch, prefetch); a distribution strategy picked from the environment; one log line per epoch;
TensorBoard logs; history of every phase in model.json. fine_tune can checkpoint every epoch and resume.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import settings
from components.errors import UserError
from components.fsutil import atomic_directory, check_output_dir

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import tensorflow as tf

    from components.dataset import DatasetInfo

log = logging.getLogger("kfp_finetune.train")

BATCH_NORM_MODES = ("frozen", "train")
CLASS_WEIGHT_MODES = ("auto", "none")
CACHE_FEATURE_MODES = ("auto", "on", "off")
# Decoded float32 images are cached in memory when the split takes at most this many bytes.
MAX_CACHE_BYTES = 4 << 30
HISTORY_FILE = "history.json"


# --- configuration ---------------------------------------------------------------------------------------------


def _check_common(
    epochs: int, learning_rate: float, batch_size: int, seed: int, label_smoothing: float, min_epochs: int = 1,
) -> None:
    if not isinstance(epochs, int) or epochs < min_epochs:
        raise UserError(f"--epochs must be an integer ≥ {min_epochs} (got {epochs!r})")
    if not (isinstance(label_smoothing, int | float) and 0.0 <= label_smoothing < 1.0):
        raise UserError(f"--label-smoothing must be in [0, 1) (got {label_smoothing!r})")
    if not (isinstance(learning_rate, int | float) and math.isfinite(learning_rate) and learning_rate > 0):
        raise UserError(f"--learning-rate must be a number > 0 (got {learning_rate!r})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be an integer ≥ 1 (got {batch_size!r})")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed must be an integer ≥ 0 (got {seed!r})")


@dataclass(frozen=True)
class HeadConfig:
    """train_head's inputs. `dataset`: a Dataset artifact dir; `backbone`: a Model artifact from `backbone`.

    `epochs=0` writes the untrained classifier (zero-initialised head) so that fine_tune trains everything from the
    start. `label_smoothing` mixes each one-hot target with the uniform distribution (labels stay sparse on disk).
    """

    dataset: str
    backbone: str
    output: str
    epochs: int = 5
    learning_rate: float = 1e-3
    batch_size: int = 32
    dropout: float = 0.2
    augment: bool = True
    class_weights: str = "auto"
    cache_features: str = "auto"
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dataset", "backbone", "output"):
            if not str(getattr(self, name) or "").strip():
                raise UserError(f"--{name} is required")
        _check_common(self.epochs, self.learning_rate, self.batch_size, self.seed, self.label_smoothing,
                      min_epochs=0)
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise UserError(f"--dropout must be in [0, 1) (got {self.dropout!r})")
        if self.class_weights not in CLASS_WEIGHT_MODES:
            raise UserError(f"--class-weights must be one of {CLASS_WEIGHT_MODES} (got {self.class_weights!r})")
        if self.cache_features not in CACHE_FEATURE_MODES:
            raise UserError(f"--cache-features must be one of {CACHE_FEATURE_MODES} (got {self.cache_features!r})")
        if self.cache_features == "on" and self.augment:
            raise UserError("--cache-features on needs --no-augment (augmentation must see pixels every epoch)")

    @property
    def use_feature_cache(self) -> bool:
        return self.cache_features == "on" or (self.cache_features == "auto" and not self.augment)


@dataclass(frozen=True)
class FineTuneConfig:
    """fine_tune's inputs. `model`: a Model artifact from train_head. Neither unfreeze option: all layers train."""

    dataset: str
    model: str
    output: str
    unfreeze_top: int | None = None
    unfreeze_from: str | None = None
    epochs: int = 10
    learning_rate: float = 1e-3
    warmup_epochs: int = 1
    batch_size: int = 32
    batch_norm: str = "train"
    early_stopping_patience: int = 0
    checkpoint_dir: str | None = None
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dataset", "model", "output"):
            if not str(getattr(self, name) or "").strip():
                raise UserError(f"--{name} is required")
        # epochs=0: no fine-tuning, the model passes through unchanged (head-only recipes in the compare mode).
        _check_common(self.epochs, self.learning_rate, self.batch_size, self.seed, self.label_smoothing, min_epochs=0)
        if self.unfreeze_top is not None and self.unfreeze_from:
            raise UserError("give either --unfreeze-top or --unfreeze-from, not both")
        if self.unfreeze_top is not None and (not isinstance(self.unfreeze_top, int) or self.unfreeze_top < 1):
            raise UserError(f"--unfreeze-top must be an integer ≥ 1 (got {self.unfreeze_top!r})")
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise UserError(f"--warmup-epochs must be an integer ≥ 0 (got {self.warmup_epochs!r})")
        if self.batch_norm not in BATCH_NORM_MODES:
            raise UserError(f"--batch-norm must be one of {BATCH_NORM_MODES} (got {self.batch_norm!r})")
        if not isinstance(self.early_stopping_patience, int) or self.early_stopping_patience < 0:
            raise UserError(
                f"--early-stopping-patience must be an integer ≥ 0, 0 to disable (got {self.early_stopping_patience!r})"
            )


@dataclass
class TrainResult:
    """What a training phase did. `output` is "" on a non-chief worker (it writes nothing)."""

    phase: str
    output: str
    class_names: list[str]
    history: dict[str, list[float]]
    epochs_run: int
    initial_epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    trainable_layers: list[str] = field(default_factory=list)
    feature_cache: bool = False
    strategy: str = "default"
    replicas: int = 1
    seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)


# --- environment: strategy, chief, mixed precision -------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """The distribution set-up read from the environment."""

    strategy: Any
    name: str
    is_chief: bool
    worker_index: int
    num_workers: int


def _cluster_from_env() -> tuple[int, bool, int]:
    """(number of workers, is this task the chief, this task's index) from TF_CONFIG."""
    config = settings.tf_config()
    cluster = config.get("cluster") or {}
    task = config.get("task") or {}
    workers = len(cluster.get("worker") or []) + len(cluster.get("chief") or [])
    task_type, index = task.get("type", "worker"), int(task.get("index", 0))
    has_chief = bool(cluster.get("chief"))
    is_chief = task_type == "chief" or (task_type == "worker" and index == 0 and not has_chief)
    return workers, is_chief, (index + (1 if has_chief and task_type == "worker" else 0))


def pick_strategy() -> Cluster:
    """MultiWorkerMirroredStrategy when TF_CONFIG names several workers, MirroredStrategy with >1 GPU, else default.

    Must run before any other TensorFlow op (MultiWorkerMirroredStrategy's requirement).
    """
    import tensorflow as tf

    workers, is_chief, index = _cluster_from_env()
    if workers > 1:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        name = "MultiWorkerMirroredStrategy"
    elif len(tf.config.list_physical_devices("GPU")) > 1:
        strategy = tf.distribute.MirroredStrategy()
        name = "MirroredStrategy"
    else:
        strategy = tf.distribute.get_strategy()
        name = "default"
        is_chief, index, workers = True, 0, 1
    log.info("strategy %s: %d replica(s), %d worker(s), this task is %s",
             name, strategy.num_replicas_in_sync, max(workers, 1), "the chief" if is_chief else f"worker {index}")
    return Cluster(strategy, name, is_chief, index, max(workers, 1))


def mixed_precision_wanted() -> bool:
    """`auto` mixed precision: on when every visible GPU has compute capability ≥ 7 (tensor cores)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return False
    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        if tuple(capability) < (7, 0):
            return False
    return True


def with_policy(model: "keras.Model", policy: str) -> "keras.Model":
    """A copy of `model` (nested models included) whose layers compute in `policy`; the softmax stays float32.

    Weights are copied over; trainable flags come along in each layer's config.
    """
    import keras

    def clone(layer: "keras.layers.Layer") -> "keras.layers.Layer":
        config = layer.get_config()
        if "dtype" in config and not isinstance(layer, keras.layers.InputLayer) and layer.name != "head":
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def patch_symbolic_build(model: "keras.Model", strategy: Any) -> None:
    """Work around keras#20329 on `model` (several workers only).

    Keras 3's `fit()` first builds the model symbolically from one batch, reducing that batch's (x, y, weight)
    tuple with `strategy.reduce` as if it were one tensor; with several workers the values are PerReplica and the
    reduce fails ("unsupported type PerReplica"). Build from this worker's local values instead; every worker
    does the same, so variables are created in the same order everywhere.
    """
    import tensorflow as tf

    def local(value: Any) -> Any:
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator: Any = None, data_batch: Any = None) -> None:
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(local, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build
    _patch_reduce_per_replica()


def _patch_reduce_per_replica() -> None:
    """Work around tensorflow#72388: with several workers Keras 3 reduces each scalar log with
    `strategy.reduce("MEAN", v, axis=0)`, which fails on 0-d values. Reduce those over replicas only."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica
    if getattr(original, "_kfp_finetune_patched", False):
        return

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            def mean(v: Any) -> Any:
                if isinstance(v, tf.distribute.DistributedValues):
                    rank = strategy.experimental_local_results(v)[0].shape.rank
                    return strategy.reduce("MEAN", v, axis=None if rank == 0 else 0)
                return v

            return tf.nest.map_structure(mean, values)
        return original(values, strategy, reduction)

    reduce_per_replica._kfp_finetune_patched = True
    trainer.reduce_per_replica = reduce_per_replica


# --- input pipeline ----------------------------------------------------------------------------------------------


def _fits_in_memory(num_examples: int, size: int) -> bool:
    return num_examples * size * size * 3 * 4 <= MAX_CACHE_BYTES


def make_dataset(
    info: "DatasetInfo", split: str, size: int, batch_size: int, *, training: bool, seed: int = 0,
    cache: bool = True,
) -> "tf.data.Dataset":
    """Batches of (float32 pixels [B, size, size, 3] in 0..255, int32 labels) for one split.

    Parallel shard reads, AUTOTUNE decode+resize, `.cache()` of the decoded images when the split fits in memory
    (so every epoch after the first skips JPEG decoding), a full shuffle when training, prefetch.
    """
    import tensorflow as tf

    from components import dataset

    n = info.require_split(split)
    ds = dataset.read_split(info.path, split, shuffle_files=training, seed=seed)
    ds = ds.map(lambda image, label: (dataset.decode_image(image, size), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
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


# --- callbacks ---------------------------------------------------------------------------------------------------


def _fmt(logs: dict[str, Any]) -> str:
    return " ".join(f"{k}={float(v):.4g}" for k, v in sorted(logs.items()))


def _epoch_logger(
    phase: str, epochs: int, history_file: Path | None, history: dict[str, list[float]],
    seconds: list[float] | None = None,
) -> Any:
    """A callback logging one line per epoch and keeping the history (persisted to `history_file` for resume)."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = dict(logs or {})
            elapsed = time.perf_counter() - self._start
            if seconds is not None:
                seconds.append(elapsed)
            optimizer = self.model.optimizer
            if optimizer is not None:
                logs.setdefault("learning_rate", float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
            for key, value in logs.items():
                history.setdefault(key, []).append(float(value))
            # Resumed runs keep every list the same length as the epochs done.
            if history_file is not None:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = history_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(history))
                os.replace(tmp, history_file)
            log.info("%s epoch %d/%d (%.1fs): %s", phase, epoch + 1, epochs, elapsed, _fmt(logs))

    return EpochLogger()


def _verbose() -> int:
    """Keras's progress bar only when a person is watching."""
    return 1 if sys.stdout.isatty() else 0


def _tensorboard(phase: str, output_tmp: Path, is_chief: bool) -> list[Any]:
    """[a TensorBoard callback], or [] when the `tensorboard` package (which tf.summary needs) is absent."""
    import importlib.util

    import keras

    if importlib.util.find_spec("tensorboard") is None:
        log.warning("TensorBoard logs off: the `tensorboard` package is not installed (pip install tensorboard)")
        return []
    root = settings.vertex_tensorboard_dir() if is_chief else None
    log_dir = f"{root.rstrip('/')}/{phase}" if root else str(output_tmp / "tensorboard" / phase)
    return [keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False, profile_batch=0)]


# --- model helpers -----------------------------------------------------------------------------------------------


def sparse_crossentropy(label_smoothing: float = 0.0) -> Any:
    """Cross-entropy on sparse integer labels, with optional label smoothing.

    Keras's SparseCategoricalCrossentropy has no `label_smoothing`; with smoothing the labels are one-hot encoded
    inside the loss (the dataset keeps sparse labels, so `class_weight` still indexes them).
    """
    import keras

    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()
    return _smoothed_loss_class()(label_smoothing=float(label_smoothing))


def _smoothed_loss_class() -> type:
    import keras

    registered = keras.saving.get_registered_object("kfp_finetune>SparseCategoricalCrossentropyWithSmoothing")
    if registered is not None:
        return registered

    @keras.saving.register_keras_serializable(package="kfp_finetune")
    class SparseCategoricalCrossentropyWithSmoothing(keras.losses.Loss):
        def __init__(self, label_smoothing: float = 0.0, name: str = "sparse_categorical_crossentropy_ls",
                     **kwargs: Any) -> None:
            super().__init__(name=name, **kwargs)
            self.label_smoothing = label_smoothing

        def call(self, y_true: Any, y_pred: Any) -> Any:
            ops = keras.ops
            labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
            one_hot = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=y_pred.dtype)
            return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "label_smoothing": self.label_smoothing}

    return SparseCategoricalCrossentropyWithSmoothing


def _compile(model: "keras.Model", optimizer: Any, steps_per_execution: int = 1, label_smoothing: float = 0.0) -> None:
    import keras

    model.compile(
        optimizer=optimizer,
        loss=sparse_crossentropy(label_smoothing),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        steps_per_execution=steps_per_execution,
    )


def trainable_layer_names(model: "keras.Model") -> list[str]:
    """Names (nested as `outer/inner`) of the layers whose weights train, in model order."""
    import keras

    names: list[str] = []

    def walk(layer: "keras.layers.Layer", prefix: str) -> None:
        if isinstance(layer, keras.Model):
            for sub in layer.layers:
                walk(sub, f"{prefix}{layer.name}/" if layer is not model else prefix)
        elif layer.trainable and layer.trainable_weights:
            names.append(prefix + layer.name)

    walk(model, "")
    return names


def _feature_extractor(model: "keras.Model", what: str) -> "keras.Model":
    try:
        return model.get_layer("feature_extractor")
    except ValueError as exc:
        raise UserError(f"{what}: the model has no `feature_extractor` layer; pass the output of train-head") from exc


def _input_size(model: "keras.Model") -> int:
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[1] and shape[1] == shape[2]):
        raise UserError(f"model {model.name}: expected a square image input [None, S, S, 3], got {shape}")
    return int(shape[1])


def _split_sizes(info: "DatasetInfo") -> tuple[int, int]:
    return info.require_split("train"), info.require_split("validation")


@dataclass
class _Run:
    """What one phase's training loop needs beyond the model."""

    phase: str
    epochs: int
    seed: int
    batch_size: int
    class_weight: dict[int, float] | None
    callbacks: list[Any]
    history: dict[str, list[float]]


def _output_scope(output: str, cluster: Cluster) -> Any:
    """The chief builds the output atomically; other workers build into a throwaway temp dir."""
    import contextlib

    if cluster.is_chief:
        return atomic_directory(output)

    @contextlib.contextmanager
    def throwaway() -> Any:
        tmp = Path(tempfile.mkdtemp(prefix=f"kfp-finetune-worker{cluster.worker_index}-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return throwaway()


def _final_metrics(history: dict[str, list[float]]) -> dict[str, float]:
    return {k: v[-1] for k, v in history.items() if v}


# --- train_head --------------------------------------------------------------------------------------------------


def _augmentation(seed: int) -> "keras.Sequential":
    """Flip, rotation, zoom, contrast: Keras preprocessing layers that act only when training=True."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, seed=seed + 1),
            keras.layers.RandomZoom(0.1, seed=seed + 2),
            keras.layers.RandomContrast(0.1, value_range=(0, 255), seed=seed + 3),
        ],
        name="augment",
    )


def build_classifier(
    extractor: "keras.Model", num_classes: int, dropout: float, augment: bool, seed: int = 0,
) -> "keras.Model":
    """pixels -> [augment] -> feature_extractor (frozen) -> Dropout `dropout` -> Dense softmax `head`.

    The head starts at zero, so the untrained classifier predicts the uniform distribution (loss ln k). A random
    (Glorot) head on these un-normalised pooled features (ReLU6 outputs, L2 norm ~25 for MobileNet) starts with
    logits of standard deviation ~2 and a loss of 3-4 on 5 classes, which Adam at 1e-3 needs dozens of steps to
    undo: on a 100-photo set (3 steps an epoch) the head was still worse than chance after 2 epochs.
    """
    import keras

    extractor.trainable = False
    size = _input_size(extractor)
    inputs = keras.Input(shape=(size, size, 3), name="pixels")
    x = _augmentation(seed)(inputs) if augment else inputs
    x = extractor(x, training=False)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", kernel_initializer="zeros",
                                 name="head")(x)
    return keras.Model(inputs, outputs, name="classifier")


def _extract_features(extractor: "keras.Model", datasets: dict[str, "tf.data.Dataset"]) -> dict[str, tuple]:
    """One forward pass of the frozen extractor over each dataset: {name: (features [N, D], labels [N])}.

    One tf.function with a batch-polymorphic signature serves every split and the short last batches, so the
    backbone is traced once (each extra trace of MobileNet costs about a second here).
    """
    import tensorflow as tf
    from tqdm import tqdm

    size = _input_size(extractor)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def forward(x: "tf.Tensor") -> "tf.Tensor":
        return extractor(x, training=False)

    out = {}
    for name, ds in datasets.items():
        feats, labels = [], []
        for x, y in tqdm(ds, desc=f"features {name}", unit="batch", disable=None, leave=False):
            feats.append(forward(x))
            labels.append(y)
        out[name] = (tf.concat(feats, 0), tf.concat(labels, 0))
    return out


def train_head(config: HeadConfig) -> TrainResult:
    """Train a new classification head on the frozen backbone; write a Model artifact to `config.output`."""
    from components import dataset, modelio

    started = time.perf_counter()
    info = dataset.load_info(config.dataset)
    _split_sizes(info)
    check_output_dir(config.output)
    cluster = pick_strategy()

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    mixed = mixed_precision_wanted()
    with cluster.strategy.scope():
        extractor, backbone_meta = modelio.load_model(config.backbone)
        if extractor.name != "feature_extractor":
            raise UserError(f"--backbone {config.backbone}: expected the output of `kfp-finetune backbone` "
                            f"(a model named feature_extractor), got a model named {extractor.name!r}")
        size = _input_size(extractor)
        if mixed:
            log.info("mixed precision: on (GPU compute capability ≥ 7)")
            keras.mixed_precision.set_global_policy("mixed_float16")
            extractor = with_policy(extractor, "mixed_float16")
        model = build_classifier(extractor, info.num_classes, config.dropout, config.augment, config.seed)
        _compile(model, keras.optimizers.Adam(config.learning_rate), label_smoothing=config.label_smoothing)
        if cluster.num_workers > 1:
            patch_symbolic_build(model, cluster.strategy)

    use_cache = config.use_feature_cache and cluster.num_workers == 1 and config.epochs > 0
    if config.use_feature_cache and cluster.num_workers > 1:
        log.info("feature cache off: not supported with several workers; the backbone runs every epoch")
    class_weight = class_weights_from_counts(info) if config.class_weights == "auto" else None
    history: dict[str, list[float]] = {}

    with _output_scope(config.output, cluster) as tmp:
        epoch_seconds: list[float] = []
        callbacks = [_epoch_logger("train_head", config.epochs, None, history, epoch_seconds),
                     *_tensorboard("train_head", tmp, cluster.is_chief)]
        log.info("train_head: %d classes, %d train / %d validation images at %d px, %d epochs, feature cache %s",
                 info.num_classes, info.num_examples["train"], info.num_examples["validation"], size, config.epochs,
                 "on" if use_cache else "off")
        if config.epochs == 0:
            log.info("train_head: --epochs 0: writing the untrained classifier (fine_tune trains it)")
        elif use_cache:
            # The backbone is frozen and no augmentation changes its input: its features are the same every
            # epoch. Compute them once (train read in a fixed order) and train only dropout+dense on them.
            features = _extract_features(extractor, {
                split: make_dataset(info, split, size, config.batch_size, training=False, cache=False)
                for split in ("train", "validation")})
            (train_x, train_y), (val_x, val_y) = features["train"], features["validation"]
            with cluster.strategy.scope():
                feats = keras.Input(shape=train_x.shape[1:], name="features")
                head_only = keras.Model(feats, model.get_layer("head")(model.get_layer("dropout")(feats)),
                                        name="head_only")
                # Head steps on feature vectors take microseconds: run many per call so that Keras's per-step
                # Python overhead does not dominate (it was ~30% of the whole train_head on flowers).
                _compile(head_only, keras.optimizers.Adam(config.learning_rate), steps_per_execution=32,
                         label_smoothing=config.label_smoothing)
            n = int(train_x.shape[0])
            train_ds = (tf.data.Dataset.from_tensor_slices((train_x, train_y))
                        .shuffle(n, seed=config.seed).batch(config.batch_size).prefetch(tf.data.AUTOTUNE))
            val_ds = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(config.batch_size)
            head_only.fit(train_ds, validation_data=val_ds, epochs=config.epochs, class_weight=class_weight,
                          callbacks=callbacks, verbose=_verbose(), shuffle=False)
        else:
            train_ds = make_dataset(info, "train", size, config.batch_size, training=True, seed=config.seed)
            val_ds = make_dataset(info, "validation", size, config.batch_size, training=False)
            model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, class_weight=class_weight,
                      callbacks=callbacks, verbose=_verbose(), shuffle=False)

        result = TrainResult(
            phase="train_head", output=config.output if cluster.is_chief else "", class_names=list(info.class_names),
            history=history, epochs_run=len(history.get("loss", [])), metrics=_final_metrics(history),
            trainable_layers=trainable_layer_names(model), feature_cache=use_cache, strategy=cluster.name,
            replicas=cluster.strategy.num_replicas_in_sync, epoch_seconds=epoch_seconds,
        )
        meta = {k: v for k, v in backbone_meta.items() if k not in ("history", "training", "trainable_layers")}
        meta.update(
            phase="train_head",
            class_names=list(info.class_names),
            trainable_layers=result.trainable_layers,
            history={"train_head": history},
            training={"train_head": {**asdict(config), "feature_cache": use_cache, "class_weight": class_weight,
                                     "strategy": cluster.name, "replicas": result.replicas,
                                     "mixed_precision": mixed, "dataset_examples": info.num_examples}},
        )
        result.seconds = time.perf_counter() - started
        meta["training"]["train_head"]["seconds"] = round(result.seconds, 2)
        meta.update(data_fingerprint=info.report.get("data_fingerprint"), data_source=info.report.get("source"))
        _save(model, meta, tmp, mixed)
    log.info("train_head done in %.1fs: %s%s", result.seconds, _fmt(result.metrics),
             f" -> {config.output}" if cluster.is_chief else " (not the chief: nothing written)")
    return result


def _save(model: "keras.Model", meta: dict[str, Any], directory: Path, mixed: bool) -> None:
    """Save the model in float32 (the policy evaluation and serving on CPUs want)."""
    import keras

    from components import modelio

    if mixed:
        keras.mixed_precision.set_global_policy("float32")
        model = with_policy(model, "float32")
    modelio.save_model(model, meta, directory)


# --- fine_tune ---------------------------------------------------------------------------------------------------


def unfreeze(model: "keras.Model", unfreeze_top: int | None, unfreeze_from: str | None, batch_norm: str) -> list[str]:
    """Make the top of the nested `backbone` trainable (the rest frozen) and apply the BN policy.

    Returns the names of the backbone layers made trainable.
    """
    import keras

    extractor = _feature_extractor(model, "--model")
    try:
        backbone = extractor.get_layer("backbone")
    except ValueError as exc:
        raise UserError("--model: the feature_extractor has no nested `backbone` model") from exc
    layers = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    if unfreeze_from:
        names = [layer.name for layer in layers]
        if unfreeze_from not in names:
            raise UserError(f"--unfreeze-from {unfreeze_from!r} is not a layer of the backbone; its layers are: "
                            + ", ".join(names))
        start = names.index(unfreeze_from)
    elif unfreeze_top is not None:
        if unfreeze_top > len(layers):
            raise UserError(f"--unfreeze-top {unfreeze_top} is out of range: the backbone has {len(layers)} layers")
        start = len(layers) - unfreeze_top
    else:
        start = 0
    # Keras 3: setting trainable on a container sets it on every sublayer, so open the containers first.
    model.trainable = True
    extractor.trainable = True
    backbone.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= start
    if batch_norm == "frozen":
        for layer in backbone._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return [layer.name for layer in layers[start:]]


def _checkpoint_subdir(config: FineTuneConfig, root: str, cluster: Cluster) -> str:
    """A folder per (arguments, worker): the same command resumes; a different one never picks up a stale state."""
    key = {k: v for k, v in asdict(config).items() if k != "checkpoint_dir"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    sub = f"{root.rstrip('/')}/fine_tune-{digest}"
    return sub if cluster.is_chief else f"{sub}/worker-{cluster.worker_index}"


def _read_history(path: str, initial_epoch: int) -> dict[str, list[float]]:
    import tensorflow as tf

    file = f"{path}/{HISTORY_FILE}"
    if initial_epoch <= 0 or not tf.io.gfile.exists(file):
        return {}
    with tf.io.gfile.GFile(file) as f:
        history = json.loads(f.read())
    return {k: v[:initial_epoch] for k, v in history.items()}


def _history_writer(path: str) -> Any:
    """Persist history beside the checkpoint (local paths directly, gs:// via tf.io.gfile on Vertex)."""
    return Path(path) / HISTORY_FILE if "://" not in path else None


def _pass_through(config: FineTuneConfig) -> TrainResult:
    """fine_tune with epochs=0: copy the train_head model to the output as it is."""
    import shutil

    from components import modelio

    meta = modelio.read_meta(config.model)
    with atomic_directory(config.output) as tmp:
        shutil.copytree(config.model, tmp, dirs_exist_ok=True)
    log.info("fine_tune: epochs=0, the model passes through unchanged to %s", config.output)
    return TrainResult(phase=str(meta.get("phase", "train_head")), output=str(config.output),
                       class_names=list(meta.get("class_names") or []), history={}, epochs_run=0)


def fine_tune(config: FineTuneConfig) -> TrainResult:
    """Unfreeze the top of the backbone and train at a low learning rate; write a Model artifact.

    With `epochs=0` nothing trains: the input model is copied to the output unchanged (phase stays train_head).
    """
    from components import dataset, modelio

    if config.epochs == 0:
        return _pass_through(config)
    started = time.perf_counter()
    info = dataset.load_info(config.dataset)
    n_train, _ = _split_sizes(info)
    check_output_dir(config.output)
    checkpoint_root = config.checkpoint_dir or settings.vertex_checkpoint_dir()
    cluster = pick_strategy()

    import keras

    keras.utils.set_random_seed(config.seed)
    mixed = mixed_precision_wanted()
    with cluster.strategy.scope():
        model, meta = modelio.load_model(config.model)
        _feature_extractor(model, f"--model {config.model}")
        if meta.get("class_names") is not None and list(meta["class_names"]) != list(info.class_names):
            raise UserError(f"class names differ: the dataset has {list(info.class_names)}, the model "
                            f"{config.model} was trained on {list(meta['class_names'])}; use the same dataset")
        if model.output_shape[-1] != info.num_classes:
            raise UserError(f"--model outputs {model.output_shape[-1]} classes, the dataset has {info.num_classes}")
        unfrozen = unfreeze(model, config.unfreeze_top, config.unfreeze_from, config.batch_norm)
        if mixed:
            log.info("mixed precision: on (GPU compute capability ≥ 7)")
            keras.mixed_precision.set_global_policy("mixed_float16")
            model = with_policy(model, "mixed_float16")
        size = _input_size(model)
        steps_per_epoch = math.ceil(n_train / config.batch_size)
        warmup = config.warmup_epochs * steps_per_epoch
        total = config.epochs * steps_per_epoch
        if warmup:
            schedule = keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=max(1, total - warmup), warmup_target=config.learning_rate, warmup_steps=warmup)
        else:
            schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=max(1, total))
        _compile(model, keras.optimizers.AdamW(learning_rate=schedule), label_smoothing=config.label_smoothing)
        if cluster.num_workers > 1:
            patch_symbolic_build(model, cluster.strategy)

    head_training = (meta.get("training") or {}).get("train_head") or {}
    class_weight = class_weights_from_counts(info) if head_training.get("class_weights", "auto") == "auto" else None
    history: dict[str, list[float]] = {}
    backup = None
    initial_epoch = 0
    ckpt = _checkpoint_subdir(config, checkpoint_root, cluster) if checkpoint_root else None
    if ckpt:
        backup = keras.callbacks.BackupAndRestore(ckpt, save_freq="epoch", double_checkpoint=True)
        backup.set_model(model)
        backup.on_train_begin()  # restores weights, optimizer state (and so the LR schedule) and the epoch
        initial_epoch = int(getattr(model, "_initial_epoch", 0) or 0)
        history.update(_read_history(ckpt, initial_epoch))
        if initial_epoch:
            log.info("resuming fine_tune from %s at epoch %d/%d", ckpt, initial_epoch + 1, config.epochs)
        else:
            log.info("fine_tune checkpoints every epoch to %s", ckpt)

    epoch_seconds: list[float] = []
    with _output_scope(config.output, cluster) as tmp:
        callbacks: list[Any] = [
            _epoch_logger("fine_tune", config.epochs, _history_writer(ckpt) if ckpt else None, history, epoch_seconds),
            *_tensorboard("fine_tune", tmp, cluster.is_chief),
        ]
        if config.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True))
        if backup is not None:
            callbacks.append(backup)  # after the logger: the history is on disk before the epoch counts as done
        log.info("fine_tune: top %d of %d backbone layers unfrozen, batch norm %s, lr %.3g (warmup %d epochs), "
                 "%d epochs", len(unfrozen), _backbone_size(model), config.batch_norm,
                 config.learning_rate, config.warmup_epochs, config.epochs)
        train_ds = make_dataset(info, "train", size, config.batch_size, training=True, seed=config.seed)
        val_ds = make_dataset(info, "validation", size, config.batch_size, training=False)
        model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                  class_weight=class_weight, callbacks=callbacks, verbose=_verbose(), shuffle=False)

        result = TrainResult(
            phase="fine_tune", output=config.output if cluster.is_chief else "", class_names=list(info.class_names),
            history=history, epochs_run=len(history.get("loss", [])) - initial_epoch, initial_epoch=initial_epoch,
            metrics=_final_metrics(history), trainable_layers=trainable_layer_names(model), strategy=cluster.name,
            replicas=cluster.strategy.num_replicas_in_sync, epoch_seconds=epoch_seconds,
        )
        out_meta = dict(meta)
        out_meta.update(
            phase="fine_tune",
            class_names=list(info.class_names),
            trainable_layers=result.trainable_layers,
            history={**(meta.get("history") or {}), "fine_tune": history},
            training={**(meta.get("training") or {}), "fine_tune": {
                **asdict(config), "unfrozen_layers": len(unfrozen), "class_weight": class_weight,
                "strategy": cluster.name, "replicas": result.replicas, "mixed_precision": mixed,
                "resumed_from_epoch": initial_epoch, "dataset_examples": info.num_examples}},
        )
        result.seconds = time.perf_counter() - started
        out_meta["training"]["fine_tune"]["seconds"] = round(result.seconds, 2)
        out_meta.update(data_fingerprint=info.report.get("data_fingerprint"), data_source=info.report.get("source"))
        _save(model, out_meta, tmp, mixed)
    log.info("fine_tune done in %.1fs: %s%s", result.seconds, _fmt(result.metrics),
             f" -> {config.output}" if cluster.is_chief else " (not the chief: nothing written)")
    return result


def _backbone_size(model: "keras.Model") -> int:
    import keras

    backbone = model.get_layer("feature_extractor").get_layer("backbone")
    return sum(1 for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer))


# --- CLI ---------------------------------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    head = subparsers.add_parser(
        "train-head", help="train a new classification head on the frozen backbone",
        description="Train dropout + dense softmax on top of a frozen backbone (output of `backbone`).",
    )
    head.add_argument("--dataset", required=True, help="Dataset artifact directory (output of `ingest`)")
    head.add_argument("--backbone", required=True, help="Model artifact directory (output of `backbone`)")
    head.add_argument("--output", required=True, help="new directory for the Model artifact")
    head.add_argument("--epochs", type=int, default=5,
                      help="0 writes the untrained classifier, for recipes that train everything in fine-tune")
    head.add_argument("--learning-rate", type=float, default=1e-3)
    head.add_argument("--batch-size", type=int, default=32)
    head.add_argument("--dropout", type=float, default=0.2)
    head.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                      help="flip/rotation/zoom/contrast layers inside the model, active in training only")
    head.add_argument("--class-weights", choices=CLASS_WEIGHT_MODES, default="auto",
                      help="auto: balanced weights from the train split's counts")
    head.add_argument("--cache-features", choices=CACHE_FEATURE_MODES, default="auto",
                      help="run the frozen backbone once and train the head on its features (auto: when no augment)")
    head.add_argument("--label-smoothing", type=float, default=0.1,
                      help="mix the one-hot targets with the uniform distribution by this much (e.g. 0.1)")
    head.add_argument("--seed", type=int, default=0)
    head.set_defaults(func=_run_head)

    tune = subparsers.add_parser(
        "fine-tune", help="unfreeze the top of the backbone and train at a low learning rate",
        description="Fine-tune a train-head model: AdamW, linear warmup then cosine decay, early stopping.",
    )
    tune.add_argument("--dataset", required=True, help="Dataset artifact directory (output of `ingest`)")
    tune.add_argument("--model", required=True, help="Model artifact directory (output of `train-head`)")
    tune.add_argument("--output", required=True, help="new directory for the Model artifact")
    which = tune.add_mutually_exclusive_group()
    which.add_argument("--unfreeze-top", type=int, default=None, help="unfreeze the top N backbone layers")
    which.add_argument("--unfreeze-from", default=None, metavar="LAYER",
                       help="unfreeze every backbone layer from LAYER up (default: all layers)")
    tune.add_argument("--epochs", type=int, default=10)
    tune.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    tune.add_argument("--warmup-epochs", type=int, default=1)
    tune.add_argument("--batch-size", type=int, default=32)
    tune.add_argument("--batch-norm", choices=BATCH_NORM_MODES, default="train",
                      help="train: BN statistics adapt to the new data (the study's best, docs/fine-tuning.md); "
                           "frozen: BN layers keep their ImageNet statistics")
    tune.add_argument("--early-stopping-patience", type=int, default=0,
                      help="stop after this many epochs without val_loss gain and keep the best; 0 (default): off, "
                           "the cosine schedule runs to its end")
    tune.add_argument("--checkpoint-dir", default=None,
                      help="save state every epoch and resume from it (default: $AIP_CHECKPOINT_DIR when set)")
    tune.add_argument("--label-smoothing", type=float, default=0.1,
                      help="mix the one-hot targets with the uniform distribution by this much (e.g. 0.1)")
    tune.add_argument("--seed", type=int, default=0)
    tune.set_defaults(func=_run_fine_tune)


def _run_head(args: argparse.Namespace) -> int:
    train_head(HeadConfig(
        dataset=args.dataset, backbone=args.backbone, output=args.output, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size, dropout=args.dropout, augment=args.augment,
        class_weights=args.class_weights, cache_features=args.cache_features,
        label_smoothing=args.label_smoothing, seed=args.seed,
    ))
    return 0


def _run_fine_tune(args: argparse.Namespace) -> int:
    fine_tune(FineTuneConfig(
        dataset=args.dataset, model=args.model, output=args.output, unfreeze_top=args.unfreeze_top,
        unfreeze_from=args.unfreeze_from, epochs=args.epochs, learning_rate=args.learning_rate,
        warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, batch_norm=args.batch_norm,
        early_stopping_patience=args.early_stopping_patience, checkpoint_dir=args.checkpoint_dir,
        label_smoothing=args.label_smoothing, seed=args.seed,
    ))
    return 0


# --- KFP components ----------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def train_head_op(
    dataset: Input[Dataset],
    backbone: Input[Model],
    model: Output[Model],
    epochs: int = 5,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    dropout: float = 0.2,
    augment: bool = True,
    class_weights: str = "auto",
    cache_features: str = "auto",
    label_smoothing: float = 0.1,
    seed: int = 0,
) -> None:
    """Train a classification head (dropout + dense softmax) on the frozen backbone.

    Args:
        dataset: Dataset artifact written by ingest (TFDS-format directory).
        backbone: Model artifact written by backbone (the frozen feature extractor).
        model: Output Model artifact: the full pixels -> probabilities classifier and model.json.
        epochs: Training epochs; 0 writes the untrained classifier (fine_tune then trains everything).
        learning_rate: Adam learning rate.
        batch_size: Global batch size.
        dropout: Dropout rate before the dense head.
        augment: Random flip/rotation/zoom/contrast inside the model, active in training only.
        class_weights: "auto" (balanced, from the train counts) or "none".
        cache_features: "auto" (on when augment is off), "on" or "off": run the backbone once and train on features.
        label_smoothing: Mix the one-hot targets with the uniform distribution by this much (0 = off).
        seed: Random seed.
    """
    from components.train import HeadConfig, train_head

    result = train_head(HeadConfig(
        dataset=dataset.path, backbone=backbone.path, output=model.path, epochs=epochs,
        learning_rate=learning_rate, batch_size=batch_size, dropout=dropout, augment=augment,
        class_weights=class_weights, cache_features=cache_features, label_smoothing=label_smoothing, seed=seed,
    ))
    model.metadata["phase"] = result.phase
    model.metadata["class_names"] = result.class_names
    model.metadata.update({k: float(v) for k, v in result.metrics.items()})


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def fine_tune_op(
    dataset: Input[Dataset],
    model: Input[Model],
    tuned_model: Output[Model],
    unfreeze_top: int = 0,
    unfreeze_from: str = "",
    epochs: int = 10,
    learning_rate: float = 1e-3,
    warmup_epochs: int = 1,
    batch_size: int = 32,
    batch_norm: str = "train",
    early_stopping_patience: int = 0,
    checkpoint_dir: str = "",
    label_smoothing: float = 0.1,
    seed: int = 0,
) -> None:
    """Fine-tune a train_head model: unfreeze the top of the backbone, AdamW with warmup + cosine decay.

    Args:
        dataset: Dataset artifact written by ingest.
        model: Model artifact written by train_head.
        tuned_model: Output Model artifact (full classifier and model.json with both phases' history).
        unfreeze_top: Unfreeze the top N backbone layers; 0 with unfreeze_from "" unfreezes all.
        unfreeze_from: Unfreeze every backbone layer from this one up; "" for none.
        epochs: Maximum epochs (early stopping may end sooner).
        learning_rate: Peak learning rate after warmup.
        warmup_epochs: Epochs of linear warmup from 0.
        batch_size: Global batch size.
        batch_norm: "train" (BN statistics adapt; the default, see docs/fine-tuning.md) or "frozen".
        early_stopping_patience: Epochs without val_loss improvement before stopping; 0 (default) disables.
        checkpoint_dir: Where to save state every epoch for resume; "" uses $AIP_CHECKPOINT_DIR when set.
        label_smoothing: Mix the one-hot targets with the uniform distribution by this much (0 = off).
        seed: Random seed.
    """
    from components.train import FineTuneConfig, fine_tune

    result = fine_tune(FineTuneConfig(
        dataset=dataset.path, model=model.path, output=tuned_model.path, unfreeze_top=unfreeze_top or None,
        unfreeze_from=unfreeze_from or None, epochs=epochs, learning_rate=learning_rate, warmup_epochs=warmup_epochs,
        batch_size=batch_size, batch_norm=batch_norm, early_stopping_patience=early_stopping_patience,
        checkpoint_dir=checkpoint_dir or None, label_smoothing=label_smoothing, seed=seed,
    ))
    tuned_model.metadata["phase"] = result.phase
    tuned_model.metadata["class_names"] = result.class_names
    tuned_model.metadata.update({k: float(v) for k, v in result.metrics.items()})
