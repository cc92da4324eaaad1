"""Blessing: the rules that decide whether evaluate blesses a model, and which baseline (champion) it is compared with.

`bless` turns the measured numbers into every rule with its numbers, whether it passed, and the reasons when not;
`resolve_baseline` picks the baseline (an explicit Model, the champion `push_to/LATEST` names, or none) and writes
evaluation.json's `champion` section; `baseline_dir` makes a local Model folder of it. evaluate uses them.
"""

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kfp_finetune.components.evaluate.step import EvaluateConfig

log = logging.getLogger("kfp_finetune.evaluate")

# Accuracies are ratios of counts; compare with a little slack so 0.8 - 0.1 does not fail 0.7 by rounding.
EPSILON = 1e-9
NO_BASELINE = "none"  # baseline_model value that turns the comparison off


def bless(
    accuracy: float, min_accuracy: float, baseline_accuracy: float | None = None, max_regression: float = 0.0,
    recalls: dict[str, float] | None = None, baseline_recalls: dict[str, float] | None = None,
    max_class_regression: float = 1.0, refuse: str | None = None, ece: float | None = None, max_ece: float = 1.0,
) -> dict[str, Any]:
    """The blessing decision: every rule with its numbers, whether it passed, and the reasons when not.

    `refuse`: a reason that refuses the model whatever its numbers (the class-change policy "refuse").
    `ece`, `max_ece`: the expected calibration error of the served (calibrated) probabilities and its ceiling; the
    rule applies only when `max_ece` < 1 (off by default)."""
    rules = [{
        "rule": "accuracy >= min_accuracy",
        "accuracy": accuracy,
        "min_accuracy": min_accuracy,
        "passed": accuracy + EPSILON >= min_accuracy,
        "detail": f"accuracy {accuracy:.4f} vs min_accuracy {min_accuracy:.4f}",
    }]
    if baseline_accuracy is not None:
        floor = baseline_accuracy - max_regression
        rules.append({
            "rule": "accuracy >= baseline_accuracy - max_regression",
            "accuracy": accuracy,
            "baseline_accuracy": baseline_accuracy,
            "max_regression": max_regression,
            "passed": accuracy + EPSILON >= floor,
            "detail": f"accuracy {accuracy:.4f} vs baseline {baseline_accuracy:.4f} - {max_regression:.4f} "
                      f"= {floor:.4f}",
        })
    if baseline_recalls is not None and recalls is not None and max_class_regression < 1.0:
        for name in sorted(baseline_recalls):
            now, before = recalls.get(name, 0.0), baseline_recalls[name]
            rules.append({
                "rule": "class recall >= baseline recall - max_class_regression",
                "class": name, "recall": now, "baseline_recall": before,
                "max_class_regression": max_class_regression,
                "passed": now + EPSILON >= before - max_class_regression,
                "detail": f"class {name}: recall {now:.4f} vs baseline {before:.4f} - {max_class_regression:.4f}",
            })
    if ece is not None and max_ece < 1.0:
        rules.append({
            "rule": "ece <= max_ece", "ece": ece, "max_ece": max_ece, "passed": ece <= max_ece + EPSILON,
            "detail": f"expected calibration error {ece:.4f} vs max_ece {max_ece:.4f}",
        })
    if refuse:
        rules.append({"rule": "class_change policy", "passed": False, "detail": refuse})
    reasons = [f"failed {r['rule']}: {r['detail']}" for r in rules if not r["passed"]]
    return {"blessed": not reasons, "rules": rules, "reasons": reasons}


def resolve_baseline(config: "EvaluateConfig") -> tuple[str | None, dict[str, Any]]:
    """(the baseline to measure, or None; the `champion` section of evaluation.json)."""
    explicit = config.baseline_model
    if explicit and explicit.strip().lower() == NO_BASELINE:
        return None, {"status": "off", "reason": "baseline_model is 'none': no comparison"}
    if explicit:
        return explicit, {"status": "compared", "uri": explicit, "version": None,
                          "reason": "baseline_model named explicitly"}
    if not config.champion_from:
        return None, {"status": "off", "reason": "no baseline_model and no push_to: no comparison"}
    from kfp_finetune.components.registry import registry

    champion = registry.resolve_champion(config.champion_from)
    if champion is None:
        return None, {"status": "no champion yet", "push_to": config.champion_from,
                      "latest": registry.read_latest(config.champion_from),  # export swaps LATEST from this
                      "reason": f"no champion yet at {config.champion_from} (no LATEST): blessed on thresholds alone"}
    return champion.uri, {"status": "compared", "uri": champion.uri, "version": champion.version,
                          "push_to": config.champion_from, "reason": f"champion {champion.version} (LATEST)",
                          "data_fingerprint": champion.record.get("data_fingerprint")}


def baseline_dir(uri: str, staging: Path) -> str:
    """A local Model artifact folder for a baseline: a Model dir, a gs:// prefix, or a pushed version folder."""
    from kfp_finetune.components.core import gcs
    from kfp_finetune.components.registry import registry

    if gcs.is_gcs(uri):
        if gcs.list_blobs(f"{uri.rstrip('/')}/{registry.MODEL_DIR}"):
            uri = f"{uri.rstrip('/')}/{registry.MODEL_DIR}"
        return local_model_dir(uri, staging)
    if (Path(uri) / registry.MODEL_DIR / "model.keras").is_file():
        return str(Path(uri) / registry.MODEL_DIR)
    return uri




def local_model_dir(uri: str, staging: Path) -> str:
    """A gs:// Model artifact downloaded into `staging`; a local path as is."""
    from kfp_finetune.components.core import gcs

    if not gcs.is_gcs(uri):
        return uri
    files = gcs.download_tree(uri, staging, "--baseline-model")
    log.info("downloaded baseline %s (%d files)", uri, len(files))
    return str(staging)
