"""Fine-tuning recipes: named, complete settings for backbone → train_head → fine_tune.

A recipe is everything that decides *how* a model is trained, apart from the data, the backbone's name and the seed:
the backbone's initial weights and input size, and per phase its overrides of the training parameters' defaults
(components/train/params.py: the parameters with `recipe=True`), or no fine-tune phase at all (head-only). The
`default` recipe overrides nothing. `bench/quality.py` measures every recipe here on the flowers benchmark; `default`
is the one that study picked (docs/fine-tuning.md has the table and the reasoning): its settings are the defaults.

A KFP component takes a recipe by name (`Recipe.from_name`) or as JSON (`Recipe.from_json(recipe.to_json())`).
No TensorFlow here: the pipeline imports this module at compile time.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.train import params

WEIGHT_CHOICES = ("imagenet", "none")
DEFAULT_RECIPE = "default"


def _overrides(phase: str, overrides: Mapping[str, Any] | None, recipe: str) -> Mapping[str, Any] | None:
    """Checked, read-only overrides of one phase (names a recipe may set, values the definitions accept)."""
    if overrides is None:
        return None
    allowed = params.by_name(params.recipe_params(params.PHASES[phase]))
    for name, value in overrides.items():
        if name not in allowed:
            raise UserError(f"recipe {recipe!r}: {phase} has no recipe setting {name!r}; it has {', '.join(allowed)}")
        allowed[name].validate(value)
    return MappingProxyType(dict(overrides))


@dataclass(frozen=True)
class Recipe:
    """One way to train: backbone weights and input size, and per phase the overrides of the training defaults.

    `fine_tune=None`: head-only (the fine-tune step passes the head model through).
    """

    name: str
    description: str
    weights: str = "imagenet"
    image_size: int | None = None
    head: Mapping[str, Any] = field(default_factory=dict)
    fine_tune: Mapping[str, Any] | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_CHOICES:
            raise UserError(f"recipe {self.name!r}: weights must be one of {WEIGHT_CHOICES} (got {self.weights!r})")
        object.__setattr__(self, "head", _overrides("train_head", self.head, self.name))
        object.__setattr__(self, "fine_tune", _overrides("fine_tune", self.fine_tune, self.name))
        if self.head_kwargs()["epochs"] == 0 and self.fine_tune is None:
            raise UserError(f"recipe {self.name!r}: a head with 0 epochs needs a fine_tune phase to train anything")

    def __hash__(self) -> int:
        return hash(self.to_json())

    # --- keyword arguments for the step configs -------------------------------------------------------------

    def backbone_kwargs(self) -> dict[str, Any]:
        """BackboneConfig keyword arguments (besides name/output/alpha): weights and image_size."""
        return {"weights": self.weights, "image_size": self.image_size}

    def head_kwargs(self) -> dict[str, Any]:
        """HeadConfig keyword arguments: every recipe setting, the defaults with this recipe's overrides (add
        dataset, backbone, output and the run's settings: seed, batch_size...)."""
        return {**params.defaults(params.HEAD, recipe_only=True), **self.head}

    def fine_tune_kwargs(self) -> dict[str, Any] | None:
        """FineTuneConfig keyword arguments like `head_kwargs`, or None for a head-only recipe."""
        if self.fine_tune is None:
            return None
        return {**params.defaults(params.FINE_TUNE, recipe_only=True), **self.fine_tune}

    @property
    def head_only(self) -> bool:
        return self.fine_tune is None

    # --- serialisation ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The effective settings (defaults included), so that a dict describes the same training forever."""
        return {"name": self.name, "description": self.description, "weights": self.weights,
                "image_size": self.image_size, "head": self.head_kwargs(), "fine_tune": self.fine_tune_kwargs()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        try:
            unknown = sorted(set(data) - {f.name for f in fields(cls)})
            if unknown:
                raise TypeError(f"unknown key(s) {', '.join(unknown)}")
            tune = data.get("fine_tune", {})
            head = dict(data.get("head") or {})
            return cls(**{**data, "head": head, "fine_tune": None if tune is None else dict(tune)})
        except TypeError as exc:
            raise UserError(f"recipe JSON does not describe a Recipe: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"recipe JSON is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise UserError("recipe JSON must be an object")
        return cls.from_dict(data)

    @classmethod
    def from_name(cls, name: str) -> "Recipe":
        """The recipe called `name` in RECIPES (a UserError listing the names otherwise)."""
        return get(name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()


# The study's baseline rows trained without augmentation and label smoothing, and fine-tuned at lr 1e-4 with
# BatchNorm frozen unless they say otherwise; the default adds both regularisers and fine-tunes at 1e-3 with BN
# training (docs/fine-tuning.md).
PLAIN_HEAD: Mapping[str, Any] = MappingProxyType({"augment": False, "label_smoothing": 0.0})
PLAIN_FINE_TUNE: Mapping[str, Any] = MappingProxyType({"label_smoothing": 0.0})

# Two-phase recipes: 5 head epochs on the frozen backbone, then 10 epochs of AdamW with one warm-up epoch and cosine
# decay over every backbone layer (no early stopping: the cosine schedule ends at 0, and on a 150-image validation
# set early stopping with patience 3 stopped a lr-1e-3 run at epoch 4 and restored epoch 1, test 0.75 instead of
# ~0.88; bench/results/quality.md). "From the start" recipes skip the head phase (epochs=0: the head starts at zero)
# and train everything in fine_tune. There is no from-scratch recipe: on 1,000 photos, 10 epochs from random init sat
# at chance (0.199 test), and a schedule long enough to say anything (hundreds of epochs) is not one anybody should
# run through this pipeline; a weights="none" Recipe still works (tests, other data).
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="head_only",
            description="ImageNet backbone frozen; only a new dense head trains (10 epochs, lr 1e-3)",
            head={**PLAIN_HEAD, "epochs": 10},
            fine_tune=None,
        ),
        Recipe(
            name="two_phase_bn_frozen",
            description="head 5 epochs, then all layers at lr 1e-4 with BatchNorm frozen (inference mode)",
            head=PLAIN_HEAD,
            fine_tune={**PLAIN_FINE_TUNE, "learning_rate": 1e-4, "batch_norm": "frozen"},
        ),
        Recipe(
            name="two_phase_bn_train",
            description="head 5 epochs, then all layers at lr 1e-4 with BatchNorm statistics adapting",
            head=PLAIN_HEAD,
            fine_tune={**PLAIN_FINE_TUNE, "learning_rate": 1e-4, "batch_norm": "train"},
        ),
        Recipe(
            name="all_trainable",
            description="ImageNet init, everything trainable from the start (lr 1e-3, BN training)",
            head={**PLAIN_HEAD, "epochs": 0},
            fine_tune={**PLAIN_FINE_TUNE, "learning_rate": 1e-3, "batch_norm": "train"},
        ),
        Recipe(
            name=DEFAULT_RECIPE,
            description="the project's default: head 5 epochs, then all layers with the backbone family's peak lr "
                        "and BatchNorm policy (components/train/family.py); augmentation and label smoothing 0.1 in "
                        "both phases; the guard keeps the head if fine-tuning does not beat it",
        ),
    )
}


def get(name: str) -> Recipe:
    """The recipe called `name`; a UserError naming the known recipes otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise UserError(f"--recipe {name!r} is not a known recipe; pick one of: {', '.join(RECIPES)}") from None


def default_recipe() -> Recipe:
    return RECIPES[DEFAULT_RECIPE]
