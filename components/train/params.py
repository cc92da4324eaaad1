"""The training parameters, each defined once: name, type, default, help and validation.

Every door derives from these definitions or is held to them by tests/unit/test_parameter_parity.py:

- `HeadConfig` / `FineTuneConfig` (components/train/config.py) take their defaults and checks from here;
- the `train-head` / `fine-tune` subcommands are generated from here (`add_arguments`);
- the KFP components `train_head_op` / `fine_tune_op` must spell their signatures out (KFP reads them from the
  source), so the parity test checks their names, types and defaults against these definitions, and their bodies
  hand every argument on with `HeadConfig.from_step(...)`;
- the pipeline's parameters (`Param.pipeline` names them) are checked the same way, and wired with
  `step_arguments(...)`, so no parameter is dropped on the way;
- recipes (compare/recipes.py) are overrides of `Param.recipe` parameters over these defaults, and the compare
  mode's `recipe` component outputs every one of them for each phase.

No TensorFlow here: the pipeline imports this module at compile time. docs/architecture.md says how to add one.
"""

from collections.abc import Iterable, Mapping
from typing import Any

from kfp_finetune.components.core.params import (  # noqa: F401 (re-exported: the training parameters' toolkit)
    Check,
    Param,
    add_arguments,
    by_name,
    config_kwargs,
    defaults,
    from_step,
    int_at_least,
    positive,
    step_arguments,
)
from kfp_finetune.components.core.params import fraction as _fraction
from kfp_finetune.components.core.params import int_at_least as _int_at_least
from kfp_finetune.components.core.params import non_negative as _non_negative
from kfp_finetune.components.core.params import positive as _positive
from kfp_finetune.components.core.params import ratio as _ratio

BATCH_NORM_MODES = ("auto", "frozen", "train")
CLASS_WEIGHT_MODES = ("auto", "none")
CACHE_FEATURE_MODES = ("auto", "on", "off")


def _lr_ratio(v: Any) -> bool:
    """In (0, 1]."""
    return _ratio(v) and v > 0


def _strength(v: Any) -> bool:
    """In (0, 0.5]: RandomZoom's factor must stay above -1, and past 0.5 the photos stop looking like photos."""
    return _ratio(v) and 0 < v <= 0.5


def _epochs(default: int, pipeline: str, help: str) -> Param:
    # epochs=0: train_head writes the untrained classifier; fine_tune passes the model through (head-only recipes).
    return Param("epochs", int, default, help, _int_at_least(0), "an integer ≥ 0", pipeline=pipeline)


def _learning_rate(pipeline: str, help: str) -> Param:
    return Param("learning_rate", float, 1e-3, help, _positive, "a number > 0", pipeline=pipeline)


BATCH_SIZE = Param("batch_size", int, 32, "global batch size", _int_at_least(1), "an integer ≥ 1", recipe=False,
                   pipeline="batch_size")
LABEL_SMOOTHING = Param("label_smoothing", float, 0.1,
                        "mix the one-hot targets with the uniform distribution by this much (0 = off)",
                        _fraction, "in [0, 1)", pipeline="label_smoothing")
SEED = Param("seed", int, 0, "random seed", _int_at_least(0), "an integer ≥ 0", recipe=False, pipeline="seed")
DETERMINISM_MODES = ("off", "data", "ops")
DETERMINISM = Param("determinism", str, "data",
                    "reproducible training. data: seeded, ordered input (the same seed and data give the same model "
                    "on the same CPU, at no measured cost); ops: also TensorFlow's op determinism (for accelerators; "
                    "~1.7x slower BatchNorm-training epochs on CPU); off: parallel input in any order "
                    "(docs/fine-tuning.md)", choices=DETERMINISM_MODES, recipe=False, pipeline="determinism")



def _checkpoint_dir(pipeline: str | None) -> Param:
    return Param("checkpoint_dir", str, None,
                 "folder (local, /gcs/... or gs://) where the step saves its training state, every epoch and on "
                 "SIGTERM, and from which a re-run with the same arguments resumes, mid-epoch (default: "
                 "$AIP_CHECKPOINT_DIR when set; docs/operations.md, Preemption)",
                 optional=True, recipe=False, pipeline=pipeline, training=False)


# Both phases take the pipeline's checkpoint_dir and checkpoint_every_steps (each phase keeps its state in its own
# sub-folder, <phase>-<digest of its arguments>).
CHECKPOINT_EVERY_STEPS = Param(
    "checkpoint_every_steps", int, 0,
    "with a checkpoint folder, also save the training state every N training steps, so that a hard kill loses at "
    "most N steps (0: at the end of each epoch only)", _int_at_least(0), "an integer ≥ 0",
    recipe=False, pipeline="checkpoint_every_steps", training=False)

HEAD: tuple[Param, ...] = (
    _epochs(5, "head_epochs", "training epochs; 0 writes the untrained classifier (fine_tune then trains everything)"),
    _learning_rate("head_learning_rate", "Adam learning rate"),
    BATCH_SIZE,
    Param("dropout", float, 0.2, "dropout rate before the dense head", _fraction, "in [0, 1)", pipeline="dropout"),
    Param("augment", bool, True, "random flip/rotation/zoom/contrast inside the model, active in training only",
          pipeline="augment"),
    Param("augment_strength", float, 0.1,
          "the augmentation's rotation (fraction of a full turn either way), zoom and contrast factor; the flip is "
          "always on (0.1: rotation up to ±36°, zoom and contrast factors in [0.9, 1.1])", _strength, "in (0, 0.5]",
          pipeline="augment_strength"),
    Param("class_weights", str, "auto", "auto: balanced weights from the train split's counts; none: unweighted",
          choices=CLASS_WEIGHT_MODES, pipeline="class_weights"),
    Param("cache_features", str, "auto",
          "run the frozen backbone once and train the head on its features (auto: when augment is off)",
          choices=CACHE_FEATURE_MODES, recipe=False),
    LABEL_SMOOTHING,
    SEED,
    DETERMINISM,
    _checkpoint_dir(pipeline="checkpoint_dir"),
    CHECKPOINT_EVERY_STEPS,
)

FINE_TUNE: tuple[Param, ...] = (
    Param("unfreeze_top", int, None, "unfreeze the top N backbone layers (neither this nor unfreeze_from: all)",
          _int_at_least(1), "an integer ≥ 1", optional=True, pipeline="unfreeze_top"),
    Param("unfreeze_from", str, None, "unfreeze every backbone layer from this one up", optional=True,
          pipeline="unfreeze_from"),
    _epochs(10, "fine_tune_epochs", "maximum epochs (early stopping may end sooner); 0 passes the model through"),
    Param("learning_rate", float, None,
          "peak learning rate (AdamW, linear warmup then cosine decay); unset: the backbone family's "
          "(components/train/family.py: 1e-3 for MobileNet v1, 3e-4 for MobileNetV2, 1e-4 for unmeasured families)",
          _positive, "a number > 0", optional=True, pipeline="fine_tune_learning_rate"),
    Param("warmup_epochs", int, 1, "epochs of linear warmup from 0", _int_at_least(0), "an integer ≥ 0",
          pipeline="warmup_epochs"),
    BATCH_SIZE,
    Param("batch_norm", str, "auto",
          "train: BN statistics adapt to the new data; frozen: BN layers keep their ImageNet statistics (inference "
          "mode); auto: the backbone family's (train for MobileNet v1, frozen for MobileNetV2 and unmeasured "
          "families; docs/fine-tuning.md)", choices=BATCH_NORM_MODES, pipeline="batch_norm"),
    Param("ema_momentum", float, 0.0,
          "keep an exponential moving average of the weights with this momentum (e.g. 0.99); validation, the guard "
          "and the output then use the averaged weights (0: off)", _fraction, "in [0, 1)", pipeline="ema_momentum"),
    Param("layer_lr_ratio", float, 1.0,
          "discriminative learning rates: the first backbone layer trains at this fraction of the peak rate, the "
          "top layer and the head at the full rate, the layers between geometrically by position (fastai's "
          "slice(lr/100, lr) is 0.01); 1: one rate for every layer", _lr_ratio, "in (0, 1]",
          pipeline="layer_lr_ratio"),
    Param("mixup_alpha", float, 0.0,
          "MixUp: mix each training batch with a shuffled copy of itself, pixels and targets, by λ ~ Beta(α, α) "
          "(e.g. 0.2; 0: off; components/train/mixing.py)", _non_negative, "a number ≥ 0", pipeline="mixup_alpha"),
    Param("cutmix_alpha", float, 0.0,
          "CutMix: paste a box of a shuffled copy of each training batch, of area 1-λ, λ ~ Beta(α, α), the targets "
          "mixed by area (e.g. 1.0; 0: off); with mixup_alpha too, each batch takes one of the two at random",
          _non_negative, "a number ≥ 0", pipeline="cutmix_alpha"),
    Param("early_stopping_patience", int, 0,
          "stop after this many epochs without val_loss gain and keep the best; 0: off, the cosine schedule runs "
          "to its end", _int_at_least(0), "an integer ≥ 0, 0 to disable", pipeline="early_stopping_patience"),
    _checkpoint_dir(pipeline="checkpoint_dir"),
    CHECKPOINT_EVERY_STEPS,
    LABEL_SMOOTHING,
    SEED,
    DETERMINISM,
)

PHASES: dict[str, tuple[Param, ...]] = {"train_head": HEAD, "fine_tune": FINE_TUNE}


def recipe_params(params: Iterable[Param]) -> tuple[Param, ...]:
    return tuple(p for p in params if p.recipe)



def branch_outputs() -> list[tuple[str, Param, str]]:
    """(phase, parameter, output name) of every recipe setting: the outputs of the compare mode's `recipe` component.

    An output is named after the parameter's pipeline parameter, with the phase as prefix when both phases have it
    (head_label_smoothing, fine_tune_label_smoothing).
    """
    names = {phase: {p.pipeline for p in recipe_params(ps)} for phase, ps in PHASES.items()}
    shared = names["train_head"] & names["fine_tune"]
    prefix = {"train_head": "head_", "fine_tune": "fine_tune_"}
    return [
        (phase, p, prefix[phase] + str(p.pipeline) if p.pipeline in shared else str(p.pipeline))
        for phase, ps in PHASES.items()
        for p in recipe_params(ps)
    ]


def branch_arguments(phase: str, recipe_outputs: Mapping[str, Any], pipeline_values: Mapping[str, Any]) -> dict:
    """A compare branch's component arguments: the recipe's settings, and the run's ones from the pipeline."""
    out = {p.name: recipe_outputs[name] for ph, p, name in branch_outputs() if ph == phase}
    out.update({p.name: pipeline_values[p.pipeline] for p in PHASES[phase] if not p.recipe and p.pipeline})
    return out
