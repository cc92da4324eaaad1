"""registry: versions pushed under a destination (a local folder or a gs:// prefix), the champion, rollback.

    kfp-finetune versions --push-to DEST
    kfp-finetune rollback --push-to DEST [--to VERSION]

Layout of a destination:

    DEST/LATEST                   the champion's version name (one line)
    DEST/<version>/               a complete champion:
        saved_model.pb, variables/  the serving SavedModel (export)
        model.json, export.json     its metadata
        evaluation.json             the evaluation that blessed it
        data_fingerprint.json       the data fingerprint and source
        model/model.keras           the Model artifact it was exported from (a baseline for the next run)
        model/model.json
        version.json                version, created, data fingerprint, training settings, lineage; WRITTEN LAST

A version is complete when its version.json exists. A push writes version.json after every other file and only then
moves LATEST, so a push that fails part-way leaves a folder without version.json: `versions`, champion resolution and
rollback never see it, and the push tries to delete what it wrote. Local pushes are a rename of a finished folder.
LATEST is one object (gs://) or a file replaced by rename (local): moving it is atomic.
"""

import argparse
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from components import gcs
from components.errors import UserError
from components.fsutil import read_json

log = logging.getLogger("kfp_finetune.registry")

LATEST_FILE = "LATEST"
VERSION_FILE = "version.json"
MODEL_DIR = "model"
# How long one file upload of a push keeps retrying transient errors (the library's default is 120 s).
PUSH_RETRY_SECONDS = 60.0


@dataclass
class Version:
    """One complete pushed version: its name, URI, and version.json."""

    version: str
    uri: str
    record: dict[str, Any]

    @property
    def model_uri(self) -> str:
        return f"{self.uri.rstrip('/')}/{MODEL_DIR}"


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if gcs.is_gcs(base) else str(Path(base, *parts))


def check_destination(push_to: str) -> None:
    """Fail now, before any training, when `push_to` cannot be written (no credentials, no bucket, read-only)."""
    probe = f".kfp-finetune-probe-{uuid.uuid4().hex[:12]}"
    if gcs.is_gcs(push_to):
        gcs.split_uri(push_to)
        uri = _join(push_to, probe)
        gcs.write_text(uri, "probe\n", what="--push-to")
        gcs.delete(uri)
        return
    base = Path(push_to)
    try:
        base.mkdir(parents=True, exist_ok=True)
        (base / probe).write_text("probe\n")
        (base / probe).unlink()
    except OSError as exc:
        raise UserError(f"--push-to {push_to} is not writable ({exc.strerror or exc}); choose a folder you can "
                        "write to") from exc


# --- reading -----------------------------------------------------------------------------------------------------


def read_latest(push_to: str) -> str | None:
    """The version LATEST names under a push destination, or None when nothing was pushed yet."""
    if gcs.is_gcs(push_to):
        text = gcs.read_text_if_exists(_join(push_to, LATEST_FILE), what="--push-to")
        return (text or "").strip() or None
    file = Path(push_to) / LATEST_FILE
    return (file.read_text().strip() or None) if file.is_file() else None


def _read_record(push_to: str, version: str) -> dict[str, Any] | None:
    uri = _join(push_to, version, VERSION_FILE)
    if gcs.is_gcs(push_to):
        import json

        text = gcs.read_text_if_exists(uri, what="--push-to")
        return json.loads(text) if text else None
    return read_json(uri, "--push-to") if Path(uri).is_file() else None


def list_versions(push_to: str) -> list[Version]:
    """Every complete version under `push_to`, oldest first (by creation time, then name)."""
    found: list[Version] = []
    if gcs.is_gcs(push_to):
        import json

        bucket, prefix = gcs.split_uri(push_to.rstrip("/"))
        prefix = f"{prefix}/" if prefix else ""
        records = [b for b in gcs.list_blobs(push_to)
                   if b.name.endswith("/" + VERSION_FILE) and b.name[len(prefix):].count("/") == 1]
        for blob in records:
            version = blob.name[len(prefix):].split("/")[0]
            found.append(Version(version, f"gs://{bucket}/{prefix}{version}", json.loads(blob.download_as_text())))
    else:
        base = Path(push_to)
        if base.is_dir():
            for child in base.iterdir():
                if child.is_dir() and not child.name.startswith(".") and (child / VERSION_FILE).is_file():
                    found.append(Version(child.name, str(child), read_json(child / VERSION_FILE, "--push-to")))
    return sorted(found, key=lambda v: (str(v.record.get("created", "")), v.version))


def resolve_champion(push_to: str) -> Version | None:
    """The version LATEST names, when it is complete; None when nothing was pushed yet."""
    latest = read_latest(push_to)
    if latest is None:
        return None
    record = _read_record(push_to, latest)
    if record is None:
        log.warning("%s: LATEST names %s, which is not a complete version (no %s); treating as no champion",
                    push_to, latest, VERSION_FILE)
        return None
    return Version(latest, _join(push_to, latest), record)


def fetch_model(version: Version, staging: str | os.PathLike) -> str:
    """A local folder holding the version's Model artifact (model.keras + model.json)."""
    if not gcs.is_gcs(version.uri):
        return version.model_uri
    blobs = gcs.list_blobs(version.model_uri)
    bucket, prefix = gcs.split_uri(version.model_uri.rstrip("/") + "/")
    names = [b.name for b in blobs]
    if not names:
        raise UserError(f"champion {version.uri}: no {MODEL_DIR}/ folder")
    gcs.download_many([f"gs://{bucket}/{n}" for n in names], [Path(staging) / n[len(prefix):] for n in names])
    return str(staging)


def read_file(version: Version, name: str) -> str | None:
    uri = _join(version.uri, name)
    if gcs.is_gcs(uri):
        return gcs.read_text_if_exists(uri, what="--push-to")
    return Path(uri).read_text() if Path(uri).is_file() else None


# --- writing -----------------------------------------------------------------------------------------------------


def new_version(run_id: str | None = None) -> str:
    """The run id, or the UTC time in milliseconds as digits (TF Serving wants numeric, increasing versions)."""
    if run_id:
        return run_id
    now = datetime.now(UTC)
    return now.strftime("%Y%m%d%H%M%S") + f"{now.microsecond // 1000:03d}"


def _write_latest(push_to: str, version: str) -> None:
    if gcs.is_gcs(push_to):
        gcs.write_text(_join(push_to, LATEST_FILE), version + "\n", what="--push-to")
    else:
        base = Path(push_to)
        tmp = base / f".{LATEST_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(version + "\n")
        os.replace(tmp, base / LATEST_FILE)
    log.info("LATEST -> %s", version)


def push(local_dir: str | os.PathLike, push_to: str, version: str, retry_seconds: float = PUSH_RETRY_SECONDS) -> str:
    """Copy `local_dir` to `<push_to>/<version>/` (its version.json last), then point LATEST at it.

    Returns the version URI. A failure raises UserError with LATEST unchanged; the partial version is deleted
    where possible, and without its version.json it is invisible to `versions`, the champion and rollback.
    """
    local_dir = Path(local_dir)
    if not (local_dir / VERSION_FILE).is_file():
        raise UserError(f"{local_dir}: no {VERSION_FILE}; a pushed version needs one (export writes it)")
    if gcs.is_gcs(push_to):
        from google.cloud.storage.retry import DEFAULT_RETRY

        target = _join(push_to, version)
        if gcs.list_blobs(target):
            raise UserError(f"--push-to: {target} already exists; give another --run-id")
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p != local_dir / VERSION_FILE)
        retry = DEFAULT_RETRY.with_timeout(retry_seconds)
        try:
            gcs.upload_many(files, [f"{target}/{p.relative_to(local_dir).as_posix()}" for p in files], retry=retry)
            gcs.upload_many([local_dir / VERSION_FILE], [f"{target}/{VERSION_FILE}"], retry=retry)
        except UserError as exc:
            _cleanup_gcs(target)
            raise UserError(f"push to {target} failed, LATEST not changed: {exc}") from exc
        log.info("pushed %d files to %s", len(files) + 1, target)
    else:
        base = Path(push_to)
        target_path = base / version
        if target_path.exists():
            raise UserError(f"--push-to: {target_path} already exists; give another --run-id")
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=base))
        try:
            shutil.copytree(local_dir, staging, dirs_exist_ok=True)
            os.replace(staging, target_path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        target = str(target_path)
    _write_latest(push_to, version)
    return target


def _cleanup_gcs(target: str) -> None:
    """Best effort: delete a partial version (it may be unreachable too; it stays invisible without version.json)."""
    try:
        for blob in gcs.list_blobs(target):
            blob.delete()
        log.info("deleted the partial version %s", target)
    except Exception as exc:  # the destination may be the very thing that failed
        log.warning("could not delete the partial version %s (%s); it has no %s, so nothing uses it",
                    target, exc, VERSION_FILE)


def rollback(push_to: str, to: str | None = None) -> tuple[str | None, str]:
    """Point LATEST at `to` (default: the complete version before the current one). Returns (old, new)."""
    versions = list_versions(push_to)
    if not versions:
        raise UserError(f"--push-to {push_to}: no complete versions to roll back to")
    names = [v.version for v in versions]
    current = read_latest(push_to)
    if to is None:
        if current not in names:
            raise UserError(f"--push-to {push_to}: LATEST ({current}) is not a complete version; name one with --to "
                            f"(versions: {', '.join(names)})")
        i = names.index(current)
        if i == 0:
            raise UserError(f"--push-to {push_to}: {current} is the oldest version; nothing before it to roll back to")
        to = names[i - 1]
    elif to not in names:
        raise UserError(f"--to {to}: not a complete version under {push_to} (versions: {', '.join(names)})")
    _write_latest(push_to, to)
    return current, to


# --- CLI -----------------------------------------------------------------------------------------------------------


def version_rows(push_to: str) -> list[dict[str, Any]]:
    latest = read_latest(push_to)
    rows = []
    for v in list_versions(push_to):
        metrics = v.record.get("metrics") or {}
        rows.append({"version": v.version, "created": v.record.get("created", ""),
                     "accuracy": metrics.get("accuracy"), "fingerprint": str(v.record.get("data_fingerprint", "")),
                     "classes": len(v.record.get("class_names") or []), "latest": v.version == latest})
    return rows


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("versions", help="list the versions pushed to a destination and which one is LATEST",
                              description="List every complete version under a push destination (local or gs://): "
                                          "date, test accuracy, data fingerprint; * marks LATEST.")
    p.add_argument("--push-to", required=True, help="the push destination (local folder or gs:// prefix)")
    p.set_defaults(func=_versions_cli)
    r = subparsers.add_parser("rollback", help="point LATEST at an earlier version (atomic)",
                              description="Move LATEST to VERSION, or to the version before the current one.")
    r.add_argument("--push-to", required=True, help="the push destination (local folder or gs:// prefix)")
    r.add_argument("--to", default=None, metavar="VERSION", help="the version to make LATEST (default: the previous)")
    r.set_defaults(func=_rollback_cli)


def _versions_cli(args: argparse.Namespace) -> int:
    rows = version_rows(args.push_to)
    if not rows:
        print(f"no versions under {args.push_to}")
        return 0
    print(f"  {'version':<24} {'created':<21} {'accuracy':>8}  {'classes':>7}  fingerprint")
    for row in rows:
        acc = f"{row['accuracy']:.4f}" if isinstance(row["accuracy"], int | float) else "-"
        print(f"{'*' if row['latest'] else ' '} {row['version']:<24} {row['created']:<21} {acc:>8}  "
              f"{row['classes']:>7}  {row['fingerprint'][:16]}")
    return 0


def _rollback_cli(args: argparse.Namespace) -> int:
    old, new = rollback(args.push_to, args.to)
    print(f"LATEST: {old} -> {new}")
    return 0


# --- KFP component: the "no new data" branch -------------------------------------------------------------------

from kfp import dsl  # noqa: E402 (the component below; the functions above need no KFP)

from components import settings  # noqa: E402


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def no_new_data_op(
    push_to: str,
    status: str,
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
    evaluation: dsl.Output[dsl.Artifact],
    model: dsl.Output[dsl.Model],
    comparison: dsl.Output[dsl.Markdown],
) -> NamedTuple("NoNewDataOutputs", [("blessed", bool), ("accuracy", float), ("winner_recipe", str)]):
    """The run's outputs when the data and settings equal the champion's: the champion itself, nothing trained.

    Args:
        push_to: The push destination whose LATEST is the champion.
        status: The fingerprint step's status ("no new data").
        metrics: Output Metrics: the champion's test accuracy and `no_new_data` = 1.
        report: Output HTML: one page saying that nothing was trained, and which version stays the champion.
        evaluation: Output Artifact: the champion's evaluation.json.
        model: Output Model: the champion's Model artifact (model.keras + model.json).
        comparison: Output Markdown: the same message (for the compare mode's output).

    Returns:
        blessed: False (nothing new was blessed).
        accuracy: The champion's test accuracy.
        winner_recipe: "" (no recipe was trained).
    """
    import html
    import json
    import os
    from collections import namedtuple

    from components import registry

    champion = registry.resolve_champion(push_to)
    if champion is None:  # the fingerprint step saw one a moment ago
        raise RuntimeError(f"{push_to}: the champion disappeared between the fingerprint step and now")
    os.makedirs(model.path, exist_ok=True)
    if push_to.startswith("gs://"):
        registry.fetch_model(champion, model.path)
    else:
        import shutil

        shutil.copytree(champion.model_uri, model.path, dirs_exist_ok=True)
    os.makedirs(evaluation.path, exist_ok=True)
    text = registry.read_file(champion, "evaluation.json") or "{}"
    with open(os.path.join(evaluation.path, "evaluation.json"), "w") as fh:
        fh.write(text)
    accuracy = float((json.loads(text).get("metrics") or {}).get("accuracy") or 0.0)
    message = (f"{status}: data and training settings equal those of champion {champion.version} at {push_to}; "
               "nothing was trained or pushed (set force_retrain to retrain anyway).")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(status)}</title></head><body>"
            f"<h1>{html.escape(status)}</h1><p>{html.escape(message)}</p>"
            f"<p>Champion test accuracy: {accuracy:.4f}</p></body></html>")
    with open(report.path, "w", encoding="utf-8") as fh:
        fh.write(page)
    with open(os.path.join(evaluation.path, "report.html"), "w", encoding="utf-8") as fh:
        fh.write(page)
    with open(comparison.path, "w", encoding="utf-8") as fh:
        fh.write(f"**{status}**: {message}\n")
    metrics.log_metric("no_new_data", 1.0)
    metrics.log_metric("accuracy", accuracy)
    for artifact in (model, evaluation, report):
        artifact.metadata.update({"status": status, "champion_version": champion.version})
    print(message)
    outputs = namedtuple("NoNewDataOutputs", ["blessed", "accuracy", "winner_recipe"])
    return outputs(False, accuracy, "")
