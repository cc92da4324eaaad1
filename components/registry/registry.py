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
        data_profile.json           the data profile of the Dataset it was trained on (the next drift baseline)
        model/model.keras           the Model artifact it was exported from (a baseline for the next run)
        model/model.json
        version.json                version, created, data fingerprint, training settings, lineage, and
                                    expected_latest (the LATEST this push was allowed to replace); WRITTEN LAST
        claim.json                  gs:// only: the exclusive claim of the folder, written FIRST
        promoted.json               written once LATEST has named this version

A push claims its version folder exclusively (components.registry.store), so two pushes never mix their files: the
second one gets a one-line error naming the version. Without --run-id the version name is taken at push time: the
UTC time in milliseconds, and above every numeric version already there, so later pushes get higher numbers.

A version is complete when its version.json exists. A push writes version.json after every other file and only then
moves LATEST, by compare-and-swap from the LATEST it expects: the champion its evaluation compared against (or,
without one, the LATEST it saw when it started). When LATEST has moved meanwhile (another run promoted, an operator
rolled back), the version is kept but not promoted, and the push says so in one line naming both versions. When the
LATEST write itself fails, the complete version stays, LATEST is unchanged and the push fails; `versions` lists such
versions as "not promoted" and `rollback --to VERSION` promotes one (by the same swap). A push that fails before
version.json leaves a folder `versions`, champion resolution and rollback never see, and tries to delete it.
"""

import argparse
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from kfp_finetune.components.core import gcs
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import read_json
from kfp_finetune.components.registry import store
from kfp_finetune.components.registry.store import CLAIM_FILE, LATEST_FILE, LOCK_FILE, PROMOTED_FILE, VERSION_FILE  # noqa: F401

log = logging.getLogger("kfp_finetune.registry")

MODEL_DIR = "model"
# How long one file upload of a push keeps retrying transient errors (the library's default is 120 s).
PUSH_RETRY_SECONDS = 60.0
# How many version names a push without --run-id tries when others claim them first.
NAME_ATTEMPTS = 50


class _Current:
    """The `expect` of a push that was not evaluated against this destination: the LATEST seen when it starts."""

    def __repr__(self) -> str:
        return "CURRENT"


CURRENT = _Current()


@dataclass
class Version:
    """One complete pushed version: its name, URI, version.json, and whether LATEST ever named it.

    `promoted` is None for versions pushed before promotion was recorded (unknown).
    """

    version: str
    uri: str
    record: dict[str, Any]
    promoted: bool | None = None

    @property
    def model_uri(self) -> str:
        return f"{self.uri.rstrip('/')}/{MODEL_DIR}"


_join = store.join
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


# --- reading (every failure is one line: components.registry.store) ---------------------------------------------


def read_latest(push_to: str) -> str | None:
    """The version LATEST names under a push destination, or None when nothing was pushed yet."""
    return store.read_latest(push_to).version


def _promoted(record: dict[str, Any], marked: bool) -> bool | None:
    if marked:
        return True
    return False if "expected_latest" in record else None  # a push without the field never recorded promotion


def list_versions(push_to: str) -> list[Version]:
    """Every complete version under `push_to`, oldest first (by creation time, then name)."""
    found: list[Version] = []
    if gcs.is_gcs(push_to):
        bucket, prefix = gcs.split_uri(push_to.rstrip("/"))
        prefix = f"{prefix}/" if prefix else ""
        names = [b.name[len(prefix):] for b in gcs.list_blobs(push_to)]
        marked = {n.split("/")[0] for n in names if n.count("/") == 1 and n.endswith("/" + PROMOTED_FILE)}
        for name in names:
            if name.count("/") == 1 and name.endswith("/" + VERSION_FILE):
                version = name.split("/")[0]
                record = store.read_record(push_to, version)
                if record is not None:
                    found.append(Version(version, f"gs://{bucket}/{prefix}{version}", record,
                                         _promoted(record, version in marked)))
    else:
        for version in store.child_names(push_to):
            if version.startswith("."):
                continue
            record = store.read_record(push_to, version)
            if record is not None:
                folder = Path(push_to) / version
                found.append(Version(version, str(folder), record,
                                     _promoted(record, (folder / PROMOTED_FILE).is_file())))
    return sorted(found, key=lambda v: (str(v.record.get("created", "")), v.version))


def resolve_champion(push_to: str) -> Version | None:
    """The version LATEST names, when it is complete; None when nothing was pushed yet."""
    latest = read_latest(push_to)
    if latest is None:
        return None
    record = store.read_record(push_to, latest)
    if record is None:
        log.warning("%s: LATEST names %s, which is not a complete version (no %s); treating as no champion",
                    push_to, latest, VERSION_FILE)
        return None
    return Version(latest, _join(push_to, latest), record, True)


def fetch_model(version: Version, staging: str | os.PathLike) -> str:
    """A local folder holding the version's Model artifact (model.keras + model.json). Every failure (missing
    folder, 403, a name that would leave `staging`, a full disk) is one UserError naming the version and its URI."""
    if not gcs.is_gcs(version.uri):
        if not (Path(version.model_uri) / "model.keras").is_file():
            raise UserError(f"version {version.version} at {version.uri}: {version.model_uri} has no model.keras; "
                            "that version cannot serve as a baseline (push it again or roll back past it)")
        return version.model_uri
    try:
        gcs.download_tree(version.model_uri, staging, f"version {version.version}:")
    except UserError as exc:
        raise UserError(f"version {version.version} at {version.uri}: cannot fetch its {MODEL_DIR}/ folder "
                        f"({exc})") from exc
    return str(staging)


def read_file(version: Version, name: str) -> str | None:
    return store.read_text(_join(version.uri, name), version.uri)


# --- writing -----------------------------------------------------------------------------------------------------


def new_version(run_id: str | None = None) -> str:
    """The run id, or the UTC time in milliseconds as digits (TF Serving wants numeric, increasing versions)."""
    if run_id:
        return run_id
    now = datetime.now(UTC)
    return now.strftime("%Y%m%d%H%M%S") + f"{now.microsecond // 1000:03d}"


def _names_to_try(push_to: str) -> Iterator[str]:
    """Numeric names from now on, each above every numeric version already there (claimed or complete)."""
    highest = max((int(n) for n in store.child_names(push_to) if n.isascii() and n.isdigit()), default=0)
    first = max(int(new_version()), highest + 1)
    return (str(first + i) for i in range(NAME_ATTEMPTS))


def same_destination(a: str, b: str) -> bool:
    if gcs.is_gcs(a) or gcs.is_gcs(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def evaluated_champion(evaluation: dict[str, Any] | None, push_to: str) -> Any:
    """The LATEST `evaluation` compared against at `push_to` (None: none yet), or CURRENT when it did not look there.

    evaluation.json's `champion` section records it: `version` for a compared champion (or one whose classes
    changed), `latest` for "no champion yet" (what LATEST named then, usually nothing).
    """
    champion = (evaluation or {}).get("champion") or {}
    if not champion.get("push_to") or not same_destination(str(champion["push_to"]), push_to):
        return CURRENT
    if champion.get("version"):
        return str(champion["version"])
    if champion.get("status") == "no champion yet":
        return champion.get("latest")
    return CURRENT


@dataclass
class Pushed:
    """Where a push went, and whether LATEST moved to it (`message` says why not)."""

    uri: str
    version: str
    promoted: bool
    expected: str | None
    latest: str | None
    message: str = ""


def push(local_dir: str | os.PathLike, push_to: str, version: str | None = None, expect: Any = CURRENT,
         retry_seconds: float = PUSH_RETRY_SECONDS) -> Pushed:
    """Copy `local_dir` to `<push_to>/<version>/` (claimed first, its version.json last), then swap LATEST to it.

    `version`: the folder name (a run id), or None for a numeric name taken now, above every one there.
    `expect`: the LATEST this version may replace (the champion its evaluation compared against; None: no LATEST),
    or CURRENT for whatever LATEST names as the push starts. If LATEST names something else by then, the version is
    kept but not promoted (Pushed.promoted False, a warning naming both). A failure before version.json raises
    UserError and deletes the partial version where possible; a failed LATEST write raises UserError too, with the
    complete version kept (listed as not promoted) and LATEST unchanged.
    """
    local_dir = Path(local_dir)
    if not (local_dir / VERSION_FILE).is_file():
        raise UserError(f"{local_dir}: no {VERSION_FILE}; a pushed version needs one (export writes it)")
    record = read_json(local_dir / VERSION_FILE, f"{local_dir}")
    if expect is CURRENT:
        expect = read_latest(push_to)
    version = _claim(push_to, version)
    try:
        target = _join(push_to, version)
        record.update(version=version, expected_latest=expect)
        with tempfile.TemporaryDirectory(prefix=".version-json-") as tmp:
            store_record = Path(tmp) / VERSION_FILE
            store_record.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
            if gcs.is_gcs(push_to):
                store.upload_version(local_dir, store_record, push_to, target, retry_seconds)
            else:
                store.place_local(local_dir, store_record, Path(target))
        try:
            swap = store.swap_latest(push_to, expect, version)
        except UserError as exc:
            raise UserError(f"version {version} is complete at {target} but LATEST was not moved ({exc}); LATEST still "
                            f"names {read_latest_quietly(push_to)}; `versions` lists {version} as not promoted and "
                            f"`kfp-finetune rollback --push-to {push_to} --to {version}` promotes it") from exc
        if swap.swapped:
            store.mark_promoted(push_to, version, expect)
            return Pushed(target, version, True, expect, version)
        message = (f"version {version} was pushed to {push_to} but not promoted: LATEST moved from {expect} (the "
                   f"champion this run was compared against) to {swap.latest} meanwhile; "
                   f"`kfp-finetune rollback --push-to {push_to} --to {version}` promotes it")
        log.warning("%s", message)
        return Pushed(target, version, False, expect, swap.latest, message)
    finally:
        store.release_claim(push_to, version)


def read_latest_quietly(push_to: str) -> str:
    try:
        return str(read_latest(push_to))
    except UserError:
        return "(unreadable)"


def _claim(push_to: str, version: str | None) -> str:
    if version is not None:
        if not store.claim(push_to, version):
            raise UserError(f"--push-to {push_to}: version {version} already exists there (pushed, or claimed by a "
                            "push in flight); give another --run-id")
        return version
    for name in _names_to_try(push_to):
        if store.claim(push_to, name):
            return name
    raise UserError(f"--push-to {push_to}: {NAME_ATTEMPTS} version names in a row were taken by other pushes; "
                    "push again")


def rollback(push_to: str, to: str | None = None) -> tuple[str | None, str]:
    """Point LATEST at `to` (default: the last promoted version before the current one). Returns (old, new).

    The move is a compare-and-swap from the LATEST read here: if a push or another rollback moves LATEST meanwhile,
    nothing changes and a UserError says so.
    """
    versions = list_versions(push_to)
    if not versions:
        raise UserError(f"--push-to {push_to}: no complete versions to roll back to")
    names = [v.version for v in versions]
    current = read_latest(push_to)
    if to is None:
        if current not in names:
            raise UserError(f"--push-to {push_to}: LATEST ({current}) is not a complete version; name one with --to "
                            f"(versions: {', '.join(names)})")
        earlier = versions[:names.index(current)]
        promoted = [v.version for v in earlier if v.promoted is not False]  # skip versions LATEST never named
        if not promoted:
            raise UserError(f"--push-to {push_to}: {current} is the oldest version{' ever promoted' if earlier else ''}"
                            "; nothing before it to roll back to (name one with --to)")
        to = promoted[-1]
    elif to not in names:
        raise UserError(f"--to {to}: not a complete version under {push_to} (versions: {', '.join(names)})")
    swap = store.swap_latest(push_to, current, to)
    if not swap.swapped:
        raise UserError(f"--push-to {push_to}: LATEST moved from {current} to {swap.latest} while rolling back; "
                        "nothing changed; look at `kfp-finetune versions` and roll back again if still wanted")
    store.mark_promoted(push_to, to, current)
    return current, to


# --- CLI -----------------------------------------------------------------------------------------------------------


def status_of(version: Version, latest: str | None) -> str:
    """'LATEST', 'promoted' (a former champion), 'not promoted' (pushed, never LATEST), or '-' (not recorded)."""
    if version.version == latest:
        return "LATEST"
    return {True: "promoted", False: "not promoted", None: "-"}[version.promoted]


def version_rows(push_to: str) -> list[dict[str, Any]]:
    latest = read_latest(push_to)
    rows = []
    for v in list_versions(push_to):
        metrics = v.record.get("metrics") or {}
        rows.append({"version": v.version, "created": v.record.get("created", ""),
                     "accuracy": metrics.get("accuracy"), "fingerprint": str(v.record.get("data_fingerprint", "")),
                     "classes": len(v.record.get("class_names") or []), "latest": v.version == latest,
                     "status": status_of(v, latest)})
    return rows


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("versions", help="list the versions pushed to a destination and which one is LATEST",
                              description="List every complete version under a push destination (local or gs://): "
                                          "date, test accuracy, status, data fingerprint; * marks LATEST. Status "
                                          "'not promoted': pushed, but LATEST never named it (it moved meanwhile, "
                                          "or the LATEST write failed); `rollback --to` promotes it.")
    p.add_argument("--push-to", required=True, help="the push destination (local folder or gs:// prefix)")
    p.set_defaults(func=_versions_cli)
    r = subparsers.add_parser("rollback", help="point LATEST at an earlier version (compare-and-swap)",
                              description="Move LATEST to VERSION, or to the last promoted version before the "
                                          "current one. Nothing changes when LATEST moves while this runs.")
    r.add_argument("--push-to", required=True, help="the push destination (local folder or gs:// prefix)")
    r.add_argument("--to", default=None, metavar="VERSION", help="the version to make LATEST (default: the previous)")
    r.set_defaults(func=_rollback_cli)


def _versions_cli(args: argparse.Namespace) -> int:
    rows = version_rows(args.push_to)
    if not rows:
        print(f"no versions under {args.push_to}")
        return 0
    print(f"  {'version':<24} {'created':<21} {'accuracy':>8}  {'classes':>7}  {'status':<12}  fingerprint")
    for row in rows:
        acc = f"{row['accuracy']:.4f}" if isinstance(row["accuracy"], int | float) else "-"
        print(f"{'*' if row['latest'] else ' '} {row['version']:<24} {row['created']:<21} {acc:>8}  "
              f"{row['classes']:>7}  {row['status']:<12}  {row['fingerprint'][:16]}")
    return 0


def _rollback_cli(args: argparse.Namespace) -> int:
    old, new = rollback(args.push_to, args.to)
    print(f"LATEST: {old} -> {new}")
    return 0


# --- KFP component: the "no new data" branch -------------------------------------------------------------------

from kfp import dsl  # noqa: E402 (the component below; the functions above need no KFP)

from kfp_finetune.components.core import settings  # noqa: E402


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

    from kfp_finetune.components.registry import registry

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
