"""Fine-tuning defaults that follow the backbone family: one table, read by fine_tune whatever door called it.

A recipe tuned on one backbone can wreck another. MobileNet v1 α=0.25 fine-tunes best with every layer at a peak
learning rate of 1e-3 and BatchNorm statistics adapting; the same recipe took a MobileNetV2 α=0.5 head from 0.903 to
0.786 validation accuracy. So `fine_tune`'s `learning_rate` and `batch_norm` default to "per family": the CLI, the
KFP component and the pipeline all leave them unset (`--learning-rate` absent, 0.0 / "auto" through KFP), and
`fine_tune` fills them in here from the family recorded in the model's model.json (`backbone.family`, the
keras.applications submodule). An explicit value always wins. Families never measured get FALLBACK, the gentle
choice (a low learning rate with BatchNorm in inference mode, as in Keras's transfer-learning guide), which the
fine-tune guard (components/train/guard.py) backs up: a fine-tune that does not improve on its head is not kept.

Each row says what it rests on: docs/fine-tuning.md and bench/results/quality.md have the measurements.
No TensorFlow here: the pipeline and the docs read this table at compile time.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FamilyDefaults:
    """The fine-tune settings a family gets when the caller leaves them unset, and the evidence for them."""

    learning_rate: float
    batch_norm: str
    evidence: str

    def settings(self) -> dict[str, Any]:
        return {"learning_rate": self.learning_rate, "batch_norm": self.batch_norm}


FAMILY_DEFAULTS: Mapping[str, FamilyDefaults] = {
    "mobilenet": FamilyDefaults(
        1e-3, "train",
        "MobileNet v1 α=0.25, flowers, 3 splits × 2 seeds: test 0.853 ± 0.031; lr 1e-4 scored 0.829 (BN frozen) and "
        "0.865 (BN training) on split 0 (bench/results/quality.md)"),
    "mobilenet_v2": FamilyDefaults(
        3e-4, "frozen",
        "MobileNetV2 α=0.5 at 224 px, flowers, 3 splits × 2 seeds: test 0.901 ± 0.026, validation 0.909 ± 0.007; "
        "paired against lr 1e-4 (the previous row) +0.019 ± 0.004 validation, +0.012 ± 0.005 test (6 pairs); "
        "lr 1e-3 with BN training ended below its head in every run, and lr 1e-4 with BN training scored 0.834 "
        "validation against 0.887 (1 pair); re-checked on α=0.35 (3 splits: +0.011 ± 0.012 validation, "
        "+0.008 ± 0.006 test against lr 1e-4) (bench/results/quality.md)"),
}
FALLBACK = FamilyDefaults(
    1e-4, "frozen",
    "not measured on this family: the gentle choice (low learning rate, BatchNorm in inference mode), which held on "
    "MobileNetV2 (lr 1e-4 never ended below its head there); the fine-tune guard keeps the head if it still hurts")

# The settings this table decides, and the value that means "not set: follow the family" at each door.
AUTO = {"learning_rate": None, "batch_norm": "auto"}


def for_family(family: str | None) -> tuple[FamilyDefaults, str]:
    """(the defaults, where they come from: "family mobilenet_v2" or "fallback (family X not measured)")."""
    if family in FAMILY_DEFAULTS:
        return FAMILY_DEFAULTS[family], f"family {family}"
    return FALLBACK, f"fallback (family {family or 'unknown'} not measured)"


def resolve(values: Mapping[str, Any], family: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Fill the unset settings of `values` from the family's row.

    Returns (the effective settings, {setting: where its value came from}): "given" for an explicit value, else
    `for_family`'s source.
    """
    row, source = for_family(family)
    effective, sources = {}, {}
    for name, unset in AUTO.items():
        value = values.get(name, unset)
        if value == unset:
            effective[name], sources[name] = row.settings()[name], source
        else:
            effective[name], sources[name] = value, "given"
    return effective, sources


def backbone_family(meta: Mapping[str, Any]) -> str | None:
    """The family a Model artifact's model.json records (`backbone.family`), or None."""
    return ((meta.get("backbone") or {}).get("family")) or None
