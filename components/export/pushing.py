"""export's push: stage the export with the Model artifact and version.json, and hand it to the registry.

components/registry/registry.py holds the primitives (exclusive claim, version.json last, LATEST by compare-and-swap).
What this module adds is what export knows: the lineage, the champion the evaluation compared against, and the
re-run after a kill. A push is idempotent for one model and one champion: when a killed attempt already left a
complete version of this very model (same model.keras SHA-256, evaluated against the same champion) that LATEST never
named, the re-run promotes that version (by the same compare-and-swap) instead of pushing a copy.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.core import faults, settings
from kfp_finetune.components.core.fsutil import file_sha256, write_json

if TYPE_CHECKING:  # pragma: no cover
    from kfp_finetune.components.export.step import ExportConfig
    from kfp_finetune.components.registry import registry

log = logging.getLogger("kfp_finetune.export")


def lineage(meta: dict[str, Any], evaluation: dict[str, Any] | None, pipeline_job: str | None) -> dict[str, Any]:
    """Where a pushed version came from: data source, backbone weights, package version, image, pipeline run."""
    from kfp_finetune.components import __version__

    weights = (meta.get("backbone") or {}).get("weights") or {}
    return {
        "source": (evaluation or {}).get("data_source") or meta.get("data_source"),
        "backbone": (meta.get("backbone") or {}).get("name"),
        "weights_source": weights.get("source"),
        "weights_sha256": weights.get("sha256"),
        "kfp_finetune_version": __version__,
        "image": settings.component_image(),
        "pipeline_job": pipeline_job or None,
    }


def push_version(config: ExportConfig, meta: dict[str, Any], evaluation: dict[str, Any] | None,
                 model_sha: str, tflite: dict[str, Any] | None = None) -> registry.Pushed:
    """Stage the export + the Model artifact + version.json; push it (named at push time unless --run-id names it;
    LATEST moves only from the champion the evaluation compared against)."""
    from kfp_finetune.components.export import tflite_export
    from kfp_finetune.components.ingest.fingerprint import canonical_settings
    from kfp_finetune.components.registry import registry

    # One staging folder per --output, beside it: a re-run after a SIGKILL removes what the killed attempt left.
    staging = Path(config.output).parent / f".{Path(config.output).name}.push"
    shutil.rmtree(staging, ignore_errors=True)
    expect = registry.evaluated_champion(evaluation, config.push_to)
    earlier = _pushed_by_an_earlier_attempt(config, model_sha, expect)
    if earlier is not None:
        return earlier
    metrics = (evaluation or {}).get("metrics") or {}
    record = {
        "version": config.run_id,  # the registry sets the name it claims
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "model_sha256": model_sha,
        "class_names": list(meta.get("class_names") or []),
        "metrics": {k: metrics.get(k) for k in ("accuracy", "macro_f1", "num_examples") if k in metrics},
        "data_fingerprint": config.fingerprint or (evaluation or {}).get("data_fingerprint")
        or meta.get("data_fingerprint"),
        "settings": canonical_settings(config.settings or {}),
        "champion_before": ((evaluation or {}).get("champion") or {}).get("version"),
        "lineage": lineage(meta, evaluation, config.pipeline_job),
    }
    needed = 2 * faults.tree_bytes(config.output)
    with faults.resource_errors(staging, "staging the push beside --output", needed), _fresh(staging):
        stage = staging / "version"
        shutil.copytree(config.output, stage)
        tflite_export.prune(stage, tflite)  # only the .tflite files that passed max_tflite_drop go with the version
        (stage / registry.MODEL_DIR).mkdir()
        for name in ("model.keras", "model.json"):
            shutil.copy2(Path(config.model) / name, stage / registry.MODEL_DIR / name)
        write_json(stage / "data_fingerprint.json", {"data_fingerprint": record["data_fingerprint"],
                                                    "source": record["lineage"]["source"]})
        from kfp_finetune.components.datacheck.step import copy_profile

        copy_profile(config.dataset or (evaluation or {}).get("dataset"), stage)  # the next run's drift baseline
        write_json(stage / registry.VERSION_FILE, record)
        return registry.push(stage, config.push_to, config.run_id, expect=expect)


@contextlib.contextmanager
def _fresh(folder: Path) -> Iterator[None]:
    """An empty `folder` for the block, deleted afterwards whatever happens."""
    folder.mkdir(parents=True)
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pushed_by_an_earlier_attempt(config: ExportConfig, model_sha: str, expect: Any) -> registry.Pushed | None:
    """A complete, never-promoted version of this model evaluated against the same champion (a killed attempt got
    that far): promote it by compare-and-swap and return it; None when there is none."""
    from kfp_finetune.components.registry import registry, store

    if expect is registry.CURRENT:
        return None  # not evaluated against this destination: nothing ties an earlier version to this run
    for version in reversed(registry.list_versions(config.push_to)):
        record = version.record
        if (record.get("model_sha256") != model_sha or version.promoted is not False
                or record.get("expected_latest") != expect
                or (config.run_id is not None and version.version != config.run_id)):
            continue
        swap = store.swap_latest(config.push_to, expect, version.version)
        if not swap.swapped:
            return None  # LATEST moved meanwhile: push as usual (registry.push reports "not promoted")
        store.mark_promoted(config.push_to, version.version, expect)
        log.info("version %s of this model was already pushed by an earlier attempt; promoted it", version.version)
        return registry.Pushed(version.uri, version.version, True, expect, version.version)
    return None


def duplicate_of_champion(config: ExportConfig) -> str:
    """Why this model must not be pushed again ('' when it may): the champion has the same model.keras SHA-256."""
    from kfp_finetune.components.registry import registry

    champion = registry.resolve_champion(config.push_to)
    if champion is None:
        return ""
    sha = file_sha256(Path(config.model) / "model.keras")
    if champion.record.get("model_sha256") == sha:
        return f"the champion {champion.version} at {config.push_to} is this very model (model.keras {sha[:12]})"
    return ""
