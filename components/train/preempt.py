"""Preemption-safe training: a SIGTERM handler around each training phase, and checkpoints of the exact position.

Spot VMs, GKE node drains and Vertex AI preemption send SIGTERM, then SIGKILL about 30 s later. While a phase
trains, SIGTERM lets the current batch finish, saves the training state (with a checkpoint folder), logs one line
("preempted: ... state saved at epoch E, step S ...") and ends the process with status 75 (`EXIT_PREEMPTED`,
EX_TEMPFAIL: try again), so that the orchestrator retries. A retry with the same arguments finds the state and
resumes at that step of that epoch ("resumed from epoch E, step S"). Without a checkpoint folder SIGTERM still
ends the step with one line and status 75: nothing is saved, the retry starts over.

What a checkpoint holds (enough for the resumed run to train exactly the batches the uninterrupted one would have):
- every model variable (weights, BatchNorm statistics, and the seed-generator states of the augmentation and
  dropout layers), every optimizer variable (moments, and the iteration count that drives the learning-rate
  schedule), and the running sums of the epoch's training metrics;
- the position: the epoch in progress and the number of its batches trained. The data order of an epoch is a
  function of (seed, epoch) (components/train/data.py), so the resumed run reads that epoch's batches in the same
  order and passes over the ones already trained without training on them;
- the history so far, the fine-tune guard's best epoch (score and weights) and early stopping's state.

Why not keras.callbacks.BackupAndRestore (Keras 3.15): it saves every N steps (`save_freq=N`) but resumes at the
start of the recorded epoch, training its first batches twice; after a resume it records the epoch as 0 until the
first epoch ends; it keeps neither the metrics' running sums nor any other callback's state; and it overwrites
`latest.weights.h5` in place (`double_checkpoint` keeps a copy of the previous file, but a kill between the
weights and the metadata leaves new weights with an old position).

Writes are atomic: each checkpoint is built in a hidden temporary folder beside the others, renamed to
`ckpt-NNNNNN` (a new name every time), and only then named in `training_metadata.json` (replaced atomically; the
same name and `epoch`/`batch` keys as BackupAndRestore's). The two newest complete checkpoints are kept, and a
reader takes the newest that loads, so a kill at any moment leaves the previous checkpoint usable. On gs://
(AIP_CHECKPOINT_DIR on Vertex) the objects are written first, the pointer last.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.faults import EXIT_TERMINATED, Terminated
from kfp_finetune.components.train.checkpoint import FORMAT, POINTER, CheckpointStore  # noqa: F401 (POINTER: public)

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import numpy as np

log = logging.getLogger("kfp_finetune.train")

EXIT_PREEMPTED = EXIT_TERMINATED  # 75, os.EX_TEMPFAIL: the exit status of every step that SIGTERM stops


class Preempted(Terminated):
    """SIGTERM ended training: the steps' common `Terminated` (a SystemExit with status 75, components/core/faults.py),
    raised once the state is saved, so that a CLI or KFP step exits for a retry without a traceback. Callers from
    Python can catch it (`except SystemExit`) like any exit."""


@dataclass(frozen=True)
class Position:
    """Where training stands: `step` batches of the 0-based `epoch` are trained (step 0: the epoch has not begun)."""

    epoch: int
    step: int

    def describe(self) -> str:
        return f"epoch {self.epoch + 1}, step {self.step}"


# --- during training ------------------------------------------------------------------------------------------------


class Preemption:
    """One training phase's SIGTERM handling, checkpoints and resume.

    Use as a context manager around the phase (the previous SIGTERM handler is put back on the way out, whatever
    happens); `epoch` feeds components/train/data.py's per-epoch order; before `fit`: `attach(...)`, then
    `resume(...)` and `wrap(model)`; `callback()` goes last in fit's callbacks; `finished()` once the output is
    written.
    """

    def __init__(self, phase: str, checkpoint: str | None, every_steps: int, epochs: int) -> None:
        import tensorflow as tf

        self.phase = phase
        self.store = CheckpointStore(checkpoint) if checkpoint else None
        self.every_steps = every_steps
        self.epochs = epochs
        # Read by the training input each time an epoch's iterator starts (components/train/data.py).
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{phase}_input_epoch")
        self.requested = False  # SIGTERM seen
        self.in_fit = False
        self.position = Position(0, 0)  # of the state in the model now
        self.saved: Position | None = None  # of the newest checkpoint (this run's or the one resumed from)
        self.resumed: Position | None = None
        self.steps_run = 0  # optimizer steps taken by this run
        self.save_seconds: list[float] = []
        self.model: Any = None
        self.steps_per_epoch = 0
        self.history: dict[str, list[float]] = {}
        self.keeper: Any = None
        self.early_stopping: Any = None
        self._skip = 0  # batches of the resumed epoch still to pass over
        self._skipped_call = False
        self._resume_metrics: list[np.ndarray] | None = None
        self._epoch_end_metrics: list[np.ndarray] = []
        self._early_stopping_state: dict[str, Any] | None = None
        self._since_save = 0
        self._previous: Any = None
        self._installed = False
        self._fit_started = False
        self.done = False

    # -- the signal handler --

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        else:  # signal handlers can only be set from the main thread (a notebook's worker thread, a server)
            log.debug("%s: not the main thread; SIGTERM is not handled", self.phase)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.requested:
            return
        if self.done:  # the output is written: finish normally rather than fail a step that succeeded
            log.info("SIGTERM after %s wrote its output: finishing", self.phase)
            return
        self.requested = True
        if not self.in_fit:  # nothing half-done to save: stop now (atomic outputs clean up on the way out)
            raise self._preempted("after training, while writing the output" if self._fit_started
                                  else "before training started")

    def _preempted(self, where: str = "") -> Preempted:
        if self.store is None:
            message = (f"preempted (SIGTERM) {where or 'at ' + self.position.describe()} of {self.phase}: no "
                       f"checkpoint_dir set, nothing saved; exiting with status {EXIT_PREEMPTED} (a retry starts "
                       f"over; set checkpoint_dir to resume)")
        elif self.saved is None:
            message = (f"preempted (SIGTERM) {where} of {self.phase}: no state to save yet; exiting with status "
                       f"{EXIT_PREEMPTED} (a retry starts afresh)")
        else:
            message = (f"preempted (SIGTERM){' ' + where if where else ''}: {self.phase} state saved at "
                       f"{self.saved.describe()}/{self.steps_per_epoch} in {self.store.uri}; exiting with status "
                       f"{EXIT_PREEMPTED}, a retry with the same arguments resumes there")
        log.warning("%s", message)
        return Preempted(message)

    # -- before fit --

    def attach(self, model: keras.Model, steps_per_epoch: int, history: dict[str, list[float]], *,
               keeper: Any = None, early_stopping: Any = None) -> None:
        self.model, self.steps_per_epoch, self.history = model, steps_per_epoch, history
        self.keeper, self.early_stopping = keeper, early_stopping

    def resume(self) -> Position | None:
        """Load the newest checkpoint into the attached model and callbacks; None when starting afresh.

        The model's optimizer and compiled metrics have their variables already (components/train/model.py builds
        them at compile), so the optimizer's state and the epoch's running sums can be put back.
        """
        if self.store is None:
            return None
        loaded = self.store.load()
        if loaded is None:
            every = f"every {self.every_steps} steps and " if self.every_steps else ""
            log.info("%s checkpoints %severy epoch (and on SIGTERM) to %s", self.phase, every, self.store.uri)
            return None
        name, arrays, state = loaded
        if state.get("phase") != self.phase or state.get("steps_per_epoch") != self.steps_per_epoch:
            # The same arguments over other data (a folder refilled between attempts): its position means nothing.
            log.warning("checkpoint %s/%s was written by %s with %s steps per epoch, this run has %d in %s: not "
                        "resumed, starting afresh", self.store.uri, name, state.get("phase"),
                        state.get("steps_per_epoch"), self.steps_per_epoch, self.phase)
            return None
        model = self.model
        optimizer = model.optimizer
        _assign(model.variables, arrays["model"], f"{self.store.uri}/{name}", "model")
        _assign(optimizer.variables, arrays["optimizer"], f"{self.store.uri}/{name}", "optimizer")
        position = Position(**state["position"])
        self.history.clear()
        self.history.update({k: list(v) for k, v in state["history"].items()})
        if self.keeper is not None and state.get("keeper"):
            from kfp_finetune.components.train.guard import Score

            best = state["keeper"]["best"]
            self.keeper.best = Score(**best) if best else None
            self.keeper.best_epoch = state["keeper"]["best_epoch"]
            self.keeper.best_weights = arrays["keeper"] or None
        if self.early_stopping is not None and state.get("early_stopping"):
            self._early_stopping_state = {**state["early_stopping"], "best_weights": arrays["early_stopping"] or None}
        if arrays["metrics"] and len(_metric_variables(model)) == len(arrays["metrics"]):
            self._resume_metrics = arrays["metrics"]
        elif arrays["metrics"]:
            log.warning("checkpoint %s: the model's metrics differ; the resumed epoch's training loss and accuracy "
                        "count only the batches after the resume", name)
        self.position = self.saved = self.resumed = position
        log.info("resuming %s from %s/%s: resumed from %s/%d (%d of %d epochs done)", self.phase, self.store.uri,
                 name, position.describe(), self.steps_per_epoch, position.epoch, self.epochs)
        return position

    def wrap(self, model: keras.Model) -> None:
        """Let fit pass over the resumed epoch's first batches without training on them (same step numbers)."""
        model.make_train_function()
        train = model.train_function
        per_call = int(getattr(model, "steps_per_execution", 1) or 1)

        def train_function(iterator: Any) -> Any:
            if self._skip > 0:
                for _ in range(min(per_call, self._skip)):
                    next(iterator)
                self._skip -= min(per_call, self._skip)
                self._skipped_call = True
                return model.get_metrics_result()
            self._skipped_call = False
            return train(iterator)

        model.train_function = train_function

    # -- saving --

    def save(self, position: Position, metrics: list[np.ndarray], reason: str) -> None:
        """Write a checkpoint of the model's state now, which is at `position`."""
        if self.store is None:
            return
        started = time.perf_counter()
        model = self.model
        keeper, stopper = self.keeper, self.early_stopping
        arrays = {
            "model": [v.numpy() for v in model.variables],
            "optimizer": [v.numpy() for v in model.optimizer.variables],
            "metrics": metrics,
            "keeper": list(keeper.best_weights) if keeper is not None and keeper.best_weights is not None else [],
            "early_stopping": (list(stopper.best_weights)
                               if stopper is not None and stopper.best_weights is not None else []),
        }
        state: dict[str, Any] = {
            "format": FORMAT, "phase": self.phase, "reason": reason, "position": asdict(position),
            "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "history": self.history,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if keeper is not None:
            state["keeper"] = {"best": asdict(keeper.best) if keeper.best is not None else None,
                               "best_epoch": keeper.best_epoch}
        if stopper is not None:
            state["early_stopping"] = {k: _plain(getattr(stopper, k, None))
                                       for k in ("wait", "best", "best_epoch", "stopped_epoch")}
        self.store.save(arrays, state)
        self.saved = position
        self._since_save = 0
        self.save_seconds.append(time.perf_counter() - started)
        log.debug("%s checkpoint at %s (%s) in %.2fs", self.phase, position.describe(), reason,
                  self.save_seconds[-1])

    def finished(self) -> None:
        """The phase's output is written: its checkpoints are no longer needed."""
        self.done = True
        if self.store is not None:
            self.store.clear()

    def summary(self) -> dict[str, Any]:
        """What model.json records about checkpoints and resume."""
        saves = self.save_seconds
        return {"resumed_from_epoch": self.resumed.epoch if self.resumed else 0,
                "resumed_from_step": self.resumed.step if self.resumed else 0,
                "steps_run": self.steps_run, "checkpoints_written": len(saves),
                "checkpoint_seconds_mean": round(sum(saves) / len(saves), 4) if saves else None}

    # -- the Keras callback (last in fit's list: the history and the guard have seen the epoch before it saves) --

    def callback(self) -> keras.callbacks.Callback:
        import keras

        outer = self

        class PreemptionCallback(keras.callbacks.Callback):
            def on_train_begin(self, logs: dict | None = None) -> None:
                outer.in_fit = outer._fit_started = True
                state = outer._early_stopping_state
                if state is not None and outer.early_stopping is not None:
                    for key, value in state.items():
                        setattr(outer.early_stopping, key, value)

            def on_train_end(self, logs: dict | None = None) -> None:
                outer.in_fit = False

            def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
                outer.epoch.assign(epoch)
                outer.position = Position(epoch, 0)
                resumed = outer.resumed
                if resumed is not None and epoch == resumed.epoch and resumed.step:
                    outer._skip = resumed.step
                    outer.position = resumed
                    if outer._resume_metrics is not None:
                        _assign(_metric_variables(self.model), outer._resume_metrics, "checkpoint", "metrics")
                        outer._resume_metrics = None

            def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
                if outer._skipped_call:
                    outer._skipped_call = False
                    if outer.requested:  # still passing over trained batches: the checkpoint is where we are
                        raise outer._preempted("while resuming")
                    return
                step = min(batch + 1, outer.steps_per_epoch)
                done = step - outer.position.step
                outer.steps_run += done
                outer._since_save += done
                outer.position = Position(outer.position.epoch, step)
                at_end = step >= outer.steps_per_epoch
                if at_end:  # for a SIGTERM during validation: fit reads these before validating
                    outer._epoch_end_metrics = _metric_values(self.model)
                if outer.requested:
                    outer.save(outer.position, outer._epoch_end_metrics if at_end else _metric_values(self.model),
                               "sigterm")
                    raise outer._preempted()
                if outer.every_steps and outer._since_save >= outer.every_steps and not at_end:
                    outer.save(outer.position, _metric_values(self.model), "steps")
                    if outer.requested:  # SIGTERM came while saving: this is the state to resume from
                        raise outer._preempted()

            def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
                if outer.requested and outer.in_fit:  # validation of an epoch whose batches are all trained
                    outer.save(outer.position, outer._epoch_end_metrics, "sigterm")
                    raise outer._preempted("during validation")

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                outer.position = Position(epoch + 1, 0)
                outer.save(outer.position, [], "epoch")
                if outer.requested:
                    raise outer._preempted()

        return PreemptionCallback()


def _metric_variables(model: keras.Model) -> list[Any]:
    return [v for m in model.metrics for v in m.variables]


def _metric_values(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy() for v in _metric_variables(model)]


def _assign(variables: list[Any], values: list[np.ndarray], where: str, what: str) -> None:
    if len(variables) != len(values):
        raise UserError(f"checkpoint {where} holds {len(values)} {what} variables, this run has {len(variables)}: "
                        f"it was written for another model; delete it to start afresh")
    for variable, value in zip(variables, values, strict=True):
        if tuple(variable.shape) != tuple(value.shape):
            raise UserError(f"checkpoint {where}: {what} variable {variable.path} has shape {tuple(value.shape)}, "
                            f"this run's {tuple(variable.shape)}; delete it to start afresh")
        variable.assign(value)


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of an EarlyStopping attribute (numbers may be NumPy scalars)."""
    try:
        return float(value) if value is not None and not isinstance(value, int | bool) else value
    except (TypeError, ValueError):
        return None
