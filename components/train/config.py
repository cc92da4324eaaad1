"""Training configuration: the typed, validated inputs of train_head and fine_tune, and what a phase returns."""

from dataclasses import dataclass, field, make_dataclass
from typing import Any

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.train.params import (  # noqa: F401 (the modes are re-exported)
    BATCH_NORM_MODES,
    CACHE_FEATURE_MODES,
    CLASS_WEIGHT_MODES,
    FINE_TUNE,
    HEAD,
    Param,
    from_step,
)


def _fields(params: tuple[Param, ...]) -> list[tuple[str, Any, Any]]:
    return [(p.name, (p.type | None) if p.optional else p.type, field(default=p.default)) for p in params]


def _check(config: Any, params: tuple[Param, ...], paths: tuple[str, ...]) -> None:
    for name in paths:
        if not str(getattr(config, name) or "").strip():
            raise UserError(f"--{name} is required")
    for p in params:
        p.validate(getattr(config, p.name))


# The fields after the paths are generated from the definitions in components/train/params.py, in their order.
_HeadFields = make_dataclass("_HeadFields", [("dataset", str), ("backbone", str), ("output", str), *_fields(HEAD)],
                             frozen=True)
_FineTuneFields = make_dataclass("_FineTuneFields",
                                 [("dataset", str), ("model", str), ("output", str), *_fields(FINE_TUNE)], frozen=True)


@dataclass(frozen=True)
class HeadConfig(_HeadFields):
    """train_head's inputs: `dataset` (a Dataset artifact dir), `backbone` (a Model artifact from `backbone`),
    `output`, and the parameters of `params.HEAD` (epochs, learning_rate, batch_size, dropout, augment,
    class_weights, cache_features, label_smoothing, seed).

    `epochs=0` writes the untrained classifier (zero-initialised head) so that fine_tune trains everything from the
    start. `label_smoothing` mixes each one-hot target with the uniform distribution (labels stay sparse on disk).
    """

    def __post_init__(self) -> None:
        _check(self, HEAD, ("dataset", "backbone", "output"))
        if self.cache_features == "on" and self.augment:
            raise UserError("--cache-features on needs --no-augment (augmentation must see pixels every epoch)")

    @classmethod
    def from_step(cls, **arguments: Any) -> "HeadConfig":
        """From a KFP component's arguments (paths and every `params.HEAD` argument; 0 / "" mean None)."""
        return cls(dataset=arguments["dataset"], backbone=arguments["backbone"], output=arguments["output"],
                   **from_step(HEAD, arguments))

    @property
    def use_feature_cache(self) -> bool:
        return self.cache_features == "on" or (self.cache_features == "auto" and not self.augment)


@dataclass(frozen=True)
class FineTuneConfig(_FineTuneFields):
    """fine_tune's inputs: `dataset`, `model` (a Model artifact from train_head), `output`, and the parameters of
    `params.FINE_TUNE`. Neither unfreeze option: all layers train. `epochs=0`: no fine-tuning, the model passes
    through unchanged (head-only recipes in the compare mode).
    """

    def __post_init__(self) -> None:
        _check(self, FINE_TUNE, ("dataset", "model", "output"))
        if self.unfreeze_top is not None and self.unfreeze_from:
            raise UserError("give either --unfreeze-top or --unfreeze-from, not both")

    @classmethod
    def from_step(cls, **arguments: Any) -> "FineTuneConfig":
        """From a KFP component's arguments (paths and every `params.FINE_TUNE` argument; 0 / "" mean None)."""
        return cls(dataset=arguments["dataset"], model=arguments["model"], output=arguments["output"],
                   **from_step(FINE_TUNE, arguments))


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
    guard: dict[str, Any] | None = None  # fine_tune: what the guard kept (components/train/guard.py)

    def artifact_metadata(self) -> dict[str, Any]:
        """What the KFP components copy into their output Model artifact's metadata."""
        extra = {"guard_kept": self.guard["kept"], "guard": self.guard["message"]} if self.guard else {}
        return {"phase": self.phase, "class_names": self.class_names,
                **{k: float(v) for k, v in self.metrics.items()}, **extra}
