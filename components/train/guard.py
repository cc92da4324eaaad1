"""The fine-tune guard: fine_tune never returns a model that is worse on validation than the model it started from.

Before the first step, fine_tune measures its starting model (the train_head output: "epoch 0") on the validation
split. During training the guard keeps, in memory, the weights of the best epoch so far. After training the model
that would be returned is measured again; if it is worse than the start, the guard puts back the best epoch that
beat the start or, when none did, the starting weights, and says so in the log, in model.json
(`training.fine_tune.guard`), and through evaluate in evaluation.json and the report.

"Worse" compares validation accuracy first and, on equal accuracy, validation loss (a 150-image validation split
moves in steps of 0.7 points, so ties are common). Every recipe goes through it, compare-mode branches included,
because it lives in fine_tune itself. A run resumed from a checkpoint measures the same start (the input model is
measured before the checkpoint is restored), and the checkpoint carries the best epoch so far (its score and, when it
beat the start, its weights; components/train/preempt.py).
"""

import logging
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("kfp_finetune.train")

KEPT_FINAL, KEPT_BEST, KEPT_START = "final", "best_epoch", "start"


@dataclass(frozen=True)
class Score:
    """Validation accuracy and loss of one model."""

    accuracy: float
    loss: float

    def better_than(self, other: "Score") -> bool:
        """Strictly better: higher accuracy, or the same accuracy and a lower loss."""
        if self.accuracy != other.accuracy:
            return self.accuracy > other.accuracy
        return self.loss < other.loss

    @classmethod
    def from_logs(cls, logs: dict[str, Any], prefix: str = "val_") -> "Score":
        return cls(float(logs[f"{prefix}accuracy"]), float(logs[f"{prefix}loss"]))


@dataclass(frozen=True)
class Decision:
    """What the guard kept, with the scores it decided on (written to model.json as `guard`)."""

    kept: str  # KEPT_FINAL, KEPT_BEST or KEPT_START
    start: Score
    final: Score
    best_epoch: int | None  # 1-based epoch of the best validation score during training (None: no epoch ran)
    best: Score | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(start: Score, final: Score, best_epoch: int | None, best: Score | None) -> Decision:
    """Keep the final model unless it is worse than the start; then the best epoch if it beat the start, else the
    start."""
    if not start.better_than(final):
        msg = (f"fine-tune kept its final model: validation accuracy {final.accuracy:.4f} (loss {final.loss:.4f}) "
               f"against {start.accuracy:.4f} (loss {start.loss:.4f}) before fine-tuning")
        return Decision(KEPT_FINAL, start, final, best_epoch, best, msg)
    if best is not None and best_epoch is not None and best.better_than(start):
        msg = (f"fine-tune ended below its start (validation accuracy {final.accuracy:.4f} against "
               f"{start.accuracy:.4f}): kept epoch {best_epoch}, validation accuracy {best.accuracy:.4f}")
        return Decision(KEPT_BEST, start, final, best_epoch, best, msg)
    msg = (f"fine-tune did not improve on the head: kept the head (validation accuracy {start.accuracy:.4f}, "
           f"loss {start.loss:.4f}; fine-tuning ended at {final.accuracy:.4f}, loss {final.loss:.4f})")
    return Decision(KEPT_START, start, final, best_epoch, best, msg)


def averaged_weights(model: Any) -> list[Any]:
    """`model.get_weights()` with each trainable variable replaced by its moving average (an optimizer with
    `use_ema=True`): the weights that validation scored under keras.callbacks.SwapEMAWeights."""
    optimizer = model.optimizer
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # mixed precision's LossScaleOptimizer
    average = {id(v): a for v, a in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average,
                                        strict=True)}
    return [average.get(id(v), v).numpy() for v in model.weights]


def best_epoch_keeper(start: Score, start_weights: list[Any], averaged: bool = False) -> Any:
    """A Keras callback keeping the weights of the best epoch (by validation score) that beats `start`.

    `averaged`: the optimizer keeps a moving average of the weights and validation scores it (SwapEMAWeights), so
    the average is what an epoch's score belongs to, and what is kept.
    """
    import keras

    class BestEpoch(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best: Score | None = None
            self.best_epoch: int | None = None
            self.best_weights: list[Any] | None = None
            self.start_weights = start_weights

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            if "val_accuracy" not in logs or "val_loss" not in logs:
                return
            score = Score.from_logs(logs)
            if self.best is None or score.better_than(self.best):
                self.best, self.best_epoch = score, epoch + 1
                # Only an epoch that beats the start can be kept, so only then is a copy worth its memory.
                keep = score.better_than(start)
                self.best_weights = (averaged_weights(self.model) if averaged else self.model.get_weights()) \
                    if keep else None

    return BestEpoch()


def measure(model: Any, val_ds: Any) -> Score:
    """The model's validation accuracy and loss (the compiled loss, as fit reports val_loss)."""
    logs = model.evaluate(val_ds, verbose=0, return_dict=True)
    return Score.from_logs(logs, prefix="")


def apply(model: Any, val_ds: Any, start: Score, keeper: Any) -> Decision:
    """Measure the trained model, decide, and put the kept weights back into `model`."""
    final = measure(model, val_ds)
    decision = decide(start, final, keeper.best_epoch, keeper.best)
    if decision.kept == KEPT_BEST:  # the best epoch beat the start, so its weights were kept
        model.set_weights(keeper.best_weights)
    elif decision.kept == KEPT_START:
        model.set_weights(keeper.start_weights)
    (log.info if decision.kept == KEPT_FINAL else log.warning)("%s", decision.message)
    return decision
