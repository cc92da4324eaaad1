"""The environment a phase trains in: distribution strategy and chief from TF_CONFIG, mixed precision, and
where a worker writes.
"""

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.core import settings
from kfp_finetune.components.core.fsutil import atomic_directory

if TYPE_CHECKING:  # pragma: no cover
    import keras


log = logging.getLogger("kfp_finetune.train")


@dataclass(frozen=True)
class Cluster:
    """The distribution set-up read from the environment."""

    strategy: Any
    name: str
    is_chief: bool
    worker_index: int
    num_workers: int


def seed_everything(seed: int, determinism: str) -> None:
    """Seed Python, NumPy and TensorFlow; with determinism "ops", also TensorFlow's op determinism.

    "data" (the default) needs nothing more here: the input pipeline keeps its order (components/train/data.py), and
    on a CPU that alone made two runs of one seed give the same weights bit for bit (with the parallel map in any
    order, two runs differed by 1-2 points of validation accuracy). "ops" makes every op deterministic, which GPUs
    need (atomics in cuDNN kernels); it stays on for the rest of the process (TensorFlow has no public way to turn
    it off again), and each pipeline step is a process of its own.
    """
    import keras

    keras.utils.set_random_seed(seed)
    if determinism == "ops":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


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


def to_mixed_precision(model: "keras.Model") -> "keras.Model":
    """Switch Keras to mixed_float16 and return a copy of `model` computing in it (the softmax stays float32)."""
    import keras

    log.info("mixed precision: on (GPU compute capability ≥ 7)")
    keras.mixed_precision.set_global_policy("mixed_float16")
    return with_policy(model, "mixed_float16")


def fit_scope(model: "keras.Model", cluster: Cluster) -> Any:
    """Around `model.fit`: the multi-worker fixes of components/core/compat.py with several workers, else nothing."""
    import contextlib

    from kfp_finetune.components.core import compat

    if cluster.num_workers > 1:
        return compat.multi_worker_fit(model, cluster.strategy)
    return contextlib.nullcontext()


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
