"""Callbacks and history: one log line per epoch (keeping the history), TensorBoard, and the checkpoint folder per
set of arguments. A resumed run gets its earlier epochs' history from the checkpoint (components/train/preempt.py).
"""

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kfp_finetune.components.core import settings
from kfp_finetune.components.train.config import FineTuneConfig, HeadConfig
from kfp_finetune.components.train.distribute import Cluster

log = logging.getLogger("kfp_finetune.train")


def _format_logs(logs: dict[str, Any]) -> str:
    return " ".join(f"{k}={float(v):.4g}" for k, v in sorted(logs.items()))


def _epoch_logger(
    phase: str, epochs: int, history: dict[str, list[float]], seconds: list[float] | None = None,
) -> Any:
    """A callback logging one line per epoch and appending its logs to `history`."""
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
            log.info("%s epoch %d/%d (%.1fs): %s", phase, epoch + 1, epochs, elapsed, _format_logs(logs))

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


def _final_metrics(history: dict[str, list[float]]) -> dict[str, float]:
    return {k: v[-1] for k, v in history.items() if v}


# Settings that do not change what is trained: a retry may change them and still resume.
_NOT_IN_CHECKPOINT_KEY = ("checkpoint_dir", "checkpoint_every_steps")


def _checkpoint_subdir(config: "FineTuneConfig | HeadConfig", root: str, cluster: Cluster,
                       phase: str = "fine_tune") -> str:
    """A folder per (phase, arguments, worker): the same command resumes; a different one never picks up a stale
    state."""
    key = {k: v for k, v in asdict(config).items() if k not in _NOT_IN_CHECKPOINT_KEY}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    sub = f"{root.rstrip('/')}/{phase}-{digest}"
    return sub if cluster.is_chief else f"{sub}/worker-{cluster.worker_index}"


def epochs_run(history: dict[str, list[float]], initial_epoch: int) -> int:
    """Epochs this run trained: the history holds the resumed epochs too."""
    return len(history.get("loss", [])) - initial_epoch
