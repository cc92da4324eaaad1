"""Training configuration: the typed, validated inputs of train_head and fine_tune, and what a phase returns."""

import math
from dataclasses import dataclass, field

from components.errors import UserError

BATCH_NORM_MODES = ("frozen", "train")


CLASS_WEIGHT_MODES = ("auto", "none")


CACHE_FEATURE_MODES = ("auto", "on", "off")


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
