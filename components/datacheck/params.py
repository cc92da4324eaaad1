"""The data checks' parameters, each defined once: ingest's leakage policy, the drift policy and the drift thresholds.

Same form as every step's parameters (`components.core.params.Param`; `leakage` is defined with ingest's, in
components/ingest/params.py, and re-exported here): the configs (`IngestConfig.leakage`, `DriftConfig`) take their
defaults and checks from here, the CLI options are generated from here (`add_arguments`),
and the KFP components and the pipeline spell them out (KFP reads signatures from the source), held to these
definitions by tests/unit/test_datacheck_params.py. `Param.pipeline` names the pipeline parameter. None of DRIFT is a
training setting (`training=False`: the skip decision does not compare them); LEAKAGE shapes the splits, so it
counts, like val_fraction.

The thresholds' defaults are `dataprofile.drift.DriftThresholds`'s (docs/data-checks.md says how each was measured);
a test holds the two to each other. No TensorFlow here: the pipeline imports this module at compile time.
"""

import math
from typing import Any

from kfp_finetune.components.core.params import Param
from kfp_finetune.components.dataprofile.drift import POLICIES as DRIFT_POLICIES
from kfp_finetune.components.dataprofile.drift import DriftThresholds
from kfp_finetune.components.ingest.params import LEAKAGE  # noqa: F401 (defined with ingest's parameters)

_DEFAULTS = DriftThresholds()


def _share(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


DATA_DRIFT = Param(
    "data_drift", str, "warn",
    "what a drift of this run's data profile against the champion's does: warn (logged, in the report) or refuse "
    "(the run stops before training, nothing is pushed)", choices=DRIFT_POLICIES, recipe=False, pipeline="data_drift",
    training=False)


def _threshold(field: str, typ: type, help: str) -> Param:
    name = f"drift_{field}"
    check, expect = (_share, "a number in [0, 1]") if typ is float else (_count, "an integer ≥ 0")
    return Param(name, typ, getattr(_DEFAULTS, field), help, check, expect, recipe=False, pipeline=name,
                 training=False)


THRESHOLDS: tuple[Param, ...] = (
    _threshold("max_class_share_change", float,
               "largest tolerated change of one class's share, classes present in both (0.10 = 10 points)"),
    _threshold("max_histogram_distance", float,
               "largest tolerated total variation distance of a size, file-size, brightness or contrast histogram"),
    _threshold("max_category_distance", float,
               "largest tolerated total variation distance of the format, colour-mode and grey/colour counts"),
    _threshold("min_new_category_share", float,
               "a format or colour mode absent from the champion's data is drift when it holds this share of images"),
    _threshold("min_resolution_ratio", float,
               "median short side below this fraction of the champion's is a resolution collapse"),
    _threshold("min_short_side", int, "median short side below this many pixels is a collapse whatever the champion"),
    _threshold("min_images", int,
               "class-share, histogram and category checks need this many images on both sides (noise below it)"),
)

DRIFT: tuple[Param, ...] = (DATA_DRIFT, *THRESHOLDS)
DATA_CHECKS: tuple[Param, ...] = (LEAKAGE, *DRIFT)


def thresholds(values: dict[str, Any]) -> DriftThresholds:
    """DriftThresholds from {drift_name: value} (missing ones: the defaults)."""
    return DriftThresholds.from_mapping({p.name: values[p.name] for p in THRESHOLDS if p.name in values})
