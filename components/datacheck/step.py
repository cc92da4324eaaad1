"""drift: this run's data profile against a baseline's (the champion's), before any training.

    kfp-finetune drift --dataset A [--against B | --champion-from PUSH_TO] [--data-drift warn|refuse] [--output DIR]

A and B are Dataset artifacts (folders holding data_profile.json, written by ingest), pushed versions (which hold
the profile of the data they were trained on), data_profile.json files, or gs:// URIs of any of these. In the
pipeline the baseline is the champion: the version `push_to/LATEST` names (the same resolution evaluate uses).

Why a step of its own, between ingest and the training steps: it needs only two small JSON files, so it takes a
second; with `data_drift=refuse` a drifted run stops here, before any training time is spent, and nothing is
pushed. With `warn` the verdict travels on to evaluate, whose report shows it.

Outcomes (one log line each, `DriftResult.message()`):
- no baseline (no push_to, no champion yet, or a champion pushed before profiles existed): "data drift: no
  baseline: drift not checked (...)"; passes;
- pass / warn: the findings, if any; passes;
- refuse: `DataDriftRefused` (a UserError: one line naming what moved and by how much, exit code 2).
"""

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from kfp_finetune.components.core import gcs, settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import atomic_directory, check_output_dir, write_json
from kfp_finetune.components.datacheck.params import DATA_DRIFT, DRIFT, THRESHOLDS, thresholds
from kfp_finetune.components.dataprofile import PROFILE_FILE, DriftResult, Profile, compare
from kfp_finetune.components.train.params import add_arguments, config_kwargs

log = logging.getLogger("kfp_finetune.drift")

DRIFT_FILE = "drift.json"


class DataDriftRefused(UserError):
    """The data drifted and the policy is refuse: the one-line message says what moved and by how much."""


def read_profile(ref: str, what: str, *, required: bool = True) -> Profile | None:
    """The profile at `ref`: a data_profile.json file, or a folder / gs:// prefix holding one (a Dataset artifact or
    a pushed version). None when absent and not `required`; UserError (one line naming `what`) otherwise."""
    ref = str(ref).strip()
    if gcs.is_gcs(ref):
        uri = ref if ref.endswith(".json") else f"{ref.rstrip('/')}/{PROFILE_FILE}"
        text = gcs.read_text_if_exists(uri, what)
    else:
        path = Path(ref).expanduser()
        path = path / PROFILE_FILE if path.is_dir() else path
        text = path.read_text(encoding="utf-8") if path.is_file() else None
        uri = str(path)
    if text is None:
        if required:
            raise UserError(f"{what} {ref}: no {PROFILE_FILE} there; give a Dataset written by ingest, a pushed "
                            f"version, or a {PROFILE_FILE} file")
        return None
    try:
        return Profile.loads(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{what} {uri}: not a readable data profile ({exc})") from None


def champion_profile(push_to: str) -> tuple[Profile | None, str]:
    """(the champion's profile or None, a few words saying which baseline it is or why there is none)."""
    from kfp_finetune.components.registry import registry

    champion = registry.resolve_champion(push_to)
    if champion is None:
        return None, f"no champion yet at {push_to}"
    text = registry.read_file(champion, PROFILE_FILE)
    if text is None:
        return None, f"champion {champion.version} has no {PROFILE_FILE} (pushed before data profiles)"
    try:
        return Profile.loads(text), f"champion {champion.version}"
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"champion {champion.version}'s {PROFILE_FILE} is not comparable ({exc})"


def copy_profile(dataset: str | None, target: Path) -> bool:
    """Copy a Dataset's data_profile.json into `target` (export: into the version it pushes, so that the next run's
    drift check compares with it); False, with a warning, when the Dataset has none."""
    import shutil

    found = Path(dataset) / PROFILE_FILE if dataset else None
    if found is not None and found.is_file():
        shutil.copy2(found, Path(target) / PROFILE_FILE)
        return True
    log.warning("no %s in the dataset %s: the version goes without a data profile (the next run's drift check "
                "will have no baseline)", PROFILE_FILE, dataset)
    return False


@dataclass(frozen=True)
class DriftConfig:
    """drift's inputs: `dataset` (this run's), and the baseline: `against` (explicit) or `champion_from` (a push
    destination: its LATEST version's profile); neither: no baseline. `output`: a folder for drift.json (optional).
    The policy and thresholds: datacheck/params.py."""

    dataset: str
    against: str | None = None
    champion_from: str | None = None
    output: str | None = None
    data_drift: str = DATA_DRIFT.default
    drift_max_class_share_change: float = THRESHOLDS[0].default
    drift_max_histogram_distance: float = THRESHOLDS[1].default
    drift_max_category_distance: float = THRESHOLDS[2].default
    drift_min_new_category_share: float = THRESHOLDS[3].default
    drift_min_resolution_ratio: float = THRESHOLDS[4].default
    drift_min_short_side: int = THRESHOLDS[5].default
    drift_min_images: int = THRESHOLDS[6].default

    def __post_init__(self) -> None:
        if not str(self.dataset or "").strip():
            raise UserError("--dataset is required: a Dataset written by ingest, or a data_profile.json")
        for name in ("against", "champion_from", "output"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                object.__setattr__(self, name, None)
        if self.against and self.champion_from:
            raise UserError("--against and --champion-from both name a baseline; give one")
        for p in DRIFT:
            value = getattr(self, p.name)
            if p.type is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, p.name, float(value))  # KFP and JSON may hand 1 for 1.0
            p.validate(getattr(self, p.name))


class DriftCheck(NamedTuple):
    result: DriftResult
    baseline: str  # which baseline, or why there is none
    line: str  # the one line logged


def check_drift(config: DriftConfig) -> DriftCheck:
    """Compare the profiles; write drift.json to `config.output` when given; raise DataDriftRefused on refuse."""
    current = read_profile(config.dataset, "--dataset")
    if config.against:
        baseline, which = read_profile(config.against, "--against"), str(config.against)
    elif config.champion_from:
        baseline, which = champion_profile(config.champion_from)
    else:
        baseline, which = None, "no --against and no push_to"
    limits = thresholds({p.name: getattr(config, p.name) for p in THRESHOLDS})
    result = compare(current, baseline, limits, config.data_drift)
    if baseline is None:
        line = f"data drift: no baseline: drift not checked ({which})"
    else:
        line = f"{result.message()} (against {which})"
    if config.output:
        check_output_dir(config.output)
        with atomic_directory(config.output) as tmp:
            write_json(tmp / DRIFT_FILE, {**result.to_json(), "baseline": which, "line": line,
                                          "thresholds": {p.name: getattr(config, p.name) for p in THRESHOLDS}})
    if result.refused:
        raise DataDriftRefused(line)
    (log.warning if result.verdict == "warn" else log.info)("%s", line)
    return DriftCheck(result, which, line)


# --- CLI -----------------------------------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "drift", help="compare two data profiles (datasets, pushed versions or data_profile.json files)",
        description="Compare the data profile of --dataset with --against (or the champion under --champion-from): "
                    "class shares, image size / format / colour-mode distributions, resolution. Prints one line; "
                    "exit code 2 when the policy is refuse and the data drifted (docs/data-checks.md).")
    p.add_argument("--dataset", required=True, metavar="A", help="a Dataset folder, pushed version or profile file")
    p.add_argument("--against", default=None, metavar="B", help="the baseline: a Dataset, version or profile file")
    p.add_argument("--champion-from", default=None, metavar="PUSH_TO",
                   help="the baseline is the champion (LATEST) under this push destination")
    p.add_argument("--output", default=None, metavar="DIR", help="also write DIR/drift.json")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON after the line")
    add_arguments(p, DRIFT)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    checked = check_drift(DriftConfig(dataset=args.dataset, against=args.against, champion_from=args.champion_from,
                                      output=args.output, **config_kwargs(DRIFT, args)))
    print(checked.line)
    if args.json:
        print(json.dumps(checked.result.to_json(), indent=1, sort_keys=True))
    return 0


# --- KFP component -------------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def drift_op(
    dataset: Input[Dataset],
    drift: Output[Artifact],
    push_to: str = "",
    data_drift: str = "warn",
    drift_max_class_share_change: float = 0.1,
    drift_max_histogram_distance: float = 0.25,
    drift_max_category_distance: float = 0.25,
    drift_min_new_category_share: float = 0.01,
    drift_min_resolution_ratio: float = 0.5,
    drift_min_short_side: int = 32,
    drift_min_images: int = 200,
) -> NamedTuple("DriftOutputs", [("verdict", str), ("result", str)]):
    """Compare the Dataset's data profile with the champion's (push_to/LATEST); stop the run on refused drift.

    Args:
        dataset: Dataset artifact written by ingest (holds data_profile.json).
        drift: Output Artifact: a directory holding drift.json (verdict, findings, every distance measured).
        push_to: The push destination whose LATEST version is the champion; "" or no champion: no baseline, pass.
        data_drift: "warn" (log it, show it in the report) or "refuse" (fail this step: nothing trains or is pushed).
        drift_max_class_share_change: Largest tolerated change of one class's share (0.10 = 10 points).
        drift_max_histogram_distance: Largest tolerated total variation distance of a size, file-size, brightness
            or contrast histogram.
        drift_max_category_distance: Largest tolerated total variation distance of the format, colour-mode and
            grey/colour counts.
        drift_min_new_category_share: A format or colour mode new to the data is drift from this share of images.
        drift_min_resolution_ratio: Median short side below this fraction of the champion's is a collapse.
        drift_min_short_side: Median short side below this many pixels is a collapse whatever the champion.
        drift_min_images: The distribution checks need this many images on both sides.

    Returns:
        verdict: pass, warn (or the step fails on refuse).
        result: drift.json's content as JSON text, for evaluate's report.
    """
    import json
    from collections import namedtuple

    from kfp_finetune.components.datacheck.step import DRIFT_FILE, DriftConfig, check_drift

    checked = check_drift(DriftConfig(
        dataset=dataset.path, champion_from=push_to or None, output=drift.path, data_drift=data_drift,
        drift_max_class_share_change=drift_max_class_share_change,
        drift_max_histogram_distance=drift_max_histogram_distance,
        drift_max_category_distance=drift_max_category_distance,
        drift_min_new_category_share=drift_min_new_category_share,
        drift_min_resolution_ratio=drift_min_resolution_ratio, drift_min_short_side=drift_min_short_side,
        drift_min_images=drift_min_images,
    ))
    drift.metadata.update({"verdict": checked.result.verdict, "line": checked.line, "baseline": checked.baseline})
    with open(f"{drift.path}/{DRIFT_FILE}", encoding="utf-8") as f:
        text = json.dumps(json.load(f), sort_keys=True)
    outputs = namedtuple("DriftOutputs", ["verdict", "result"])
    return outputs(checked.result.verdict, text)


