"""Fine-tuning recipes: named, complete settings for backbone → train_head → fine_tune.

A recipe is everything that decides *how* a model is trained, apart from the data, the backbone's name and the seed:
the backbone's initial weights and input size, the head phase's settings, and the fine-tune phase's settings (None
for head-only). `bench/quality.py` measures every recipe here on the flowers benchmark; `default` is the one that
study picked (docs/fine-tuning.md has the table and the reasoning), and the pipeline's parameter defaults mirror it.

A KFP component takes a recipe by name (`Recipe.from_name`) or as JSON (`Recipe.from_json(recipe.to_json())`).
No TensorFlow here: the pipeline imports this module at compile time.
"""

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from components.errors import UserError

WEIGHT_CHOICES = ("imagenet", "none")
DEFAULT_RECIPE = "default"


@dataclass(frozen=True)
class HeadSettings:
    """train_head's settings (HeadConfig's fields other than dataset/backbone/output/seed).

    `epochs=0` builds the untrained classifier (random head) so that fine_tune trains everything from the start.
    """

    epochs: int = 5
    learning_rate: float = 1e-3
    dropout: float = 0.2
    augment: bool = False
    label_smoothing: float = 0.0
    class_weights: str = "auto"
    batch_size: int = 32


@dataclass(frozen=True)
class FineTuneSettings:
    """fine_tune's settings (FineTuneConfig's fields other than dataset/model/output/seed/checkpoint_dir).

    `unfreeze_top=None` with `unfreeze_from=None` makes every backbone layer trainable. No early stopping: the
    cosine schedule ends at 0, and on a 150-image validation set early stopping (patience 3 on val_loss) stopped a
    lr-1e-3 run at epoch 4 and restored epoch 1 (test 0.75 instead of ~0.88; bench/results/quality.md).
    """

    epochs: int = 10
    learning_rate: float = 1e-4
    warmup_epochs: int = 1
    unfreeze_top: int | None = None
    unfreeze_from: str | None = None
    batch_norm: str = "frozen"
    label_smoothing: float = 0.0
    early_stopping_patience: int = 0
    batch_size: int = 32


@dataclass(frozen=True)
class Recipe:
    """One way to train: backbone weights and input size, the head phase, and the fine-tune phase (or None)."""

    name: str
    description: str
    weights: str = "imagenet"
    image_size: int | None = None
    head: HeadSettings = HeadSettings()
    fine_tune: FineTuneSettings | None = FineTuneSettings()

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_CHOICES:
            raise UserError(f"recipe {self.name!r}: weights must be one of {WEIGHT_CHOICES} (got {self.weights!r})")
        if self.head.epochs == 0 and self.fine_tune is None:
            raise UserError(f"recipe {self.name!r}: a head with 0 epochs needs a fine_tune phase to train anything")

    # --- keyword arguments for the step configs -------------------------------------------------------------

    def backbone_kwargs(self) -> dict[str, Any]:
        """BackboneConfig keyword arguments (besides name/output/alpha): weights and image_size."""
        return {"weights": self.weights, "image_size": self.image_size}

    def head_kwargs(self) -> dict[str, Any]:
        """HeadConfig keyword arguments (add dataset, backbone, output, seed)."""
        return asdict(self.head)

    def fine_tune_kwargs(self) -> dict[str, Any] | None:
        """FineTuneConfig keyword arguments (add dataset, model, output, seed), or None for a head-only recipe."""
        return None if self.fine_tune is None else asdict(self.fine_tune)

    @property
    def head_only(self) -> bool:
        return self.fine_tune is None

    # --- serialisation ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        try:
            head = HeadSettings(**data.get("head") or {})
            tune = data.get("fine_tune")
            fine = None if tune is None else FineTuneSettings(**tune)
            top = {f.name: data[f.name] for f in fields(cls) if f.name in data and f.name not in ("head", "fine_tune")}
            return cls(**top, head=head, fine_tune=fine)
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


# The study's recipes. Two-phase recipes: 5 head epochs on the frozen backbone, then 10 epochs of AdamW with one
# warm-up epoch and cosine decay over every backbone layer (no early stopping). "From the start" recipes skip the
# head phase (epochs=0: the head starts at zero) and train everything in fine_tune.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="scratch",
            description="random init, everything trainable from the start (lr 1e-3, BN training)",
            weights="none",
            head=HeadSettings(epochs=0),
            fine_tune=FineTuneSettings(learning_rate=1e-3, batch_norm="train"),
        ),
        Recipe(
            name="head_only",
            description="ImageNet backbone frozen; only a new dense head trains (10 epochs, lr 1e-3)",
            head=HeadSettings(epochs=10),
            fine_tune=None,
        ),
        Recipe(
            name="two_phase_bn_frozen",
            description="head 5 epochs, then all layers at lr 1e-4 with BatchNorm frozen (inference mode)",
            fine_tune=FineTuneSettings(learning_rate=1e-4, batch_norm="frozen"),
        ),
        Recipe(
            name="two_phase_bn_train",
            description="head 5 epochs, then all layers at lr 1e-4 with BatchNorm statistics adapting",
            fine_tune=FineTuneSettings(learning_rate=1e-4, batch_norm="train"),
        ),
        Recipe(
            name="all_trainable",
            description="ImageNet init, everything trainable from the start (lr 1e-3, BN training)",
            head=HeadSettings(epochs=0),
            fine_tune=FineTuneSettings(learning_rate=1e-3, batch_norm="train"),
        ),
        Recipe(
            name=DEFAULT_RECIPE,
            description="the project's default: head 5 epochs, then all layers at lr 1e-3 with BatchNorm training; "
                        "augmentation and label smoothing 0.1 in both phases",
            head=HeadSettings(augment=True, label_smoothing=0.1),
            fine_tune=FineTuneSettings(learning_rate=1e-3, batch_norm="train", label_smoothing=0.1),
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
