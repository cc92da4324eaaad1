"""fingerprint: a cheap, stable digest of a data source, listed without downloading it.

    kfp-finetune fingerprint --source SRC [--output FILE.json] [--push-to DEST] [--force-retrain]

What goes into the digest, one line per image file ingest would read, sorted:
- gs://bucket/prefix: object name, size, generation, crc32c and md5 as the listing reports them (no download);
- a local class-per-folder tree: relative path, size and modification time (nanoseconds);
- a CSV manifest: the manifest's own bytes, then each file it names (local: size + mtime; gs://: as above);
- tfds:NAME[:VERSION]: the name itself (a published TFDS version does not change).
The same files with the same contents give the same fingerprint on every machine; a file added, removed, renamed or
rewritten changes it. Files ingest skips by name (hidden files, files outside class folders, non-image extensions)
do not count, nor what it never reads (components.core.safefiles: symlinks leading out of the source, devices, FIFOs,
sockets); a symlinked folder outside the source is not walked.

In the pipeline this is the first step. Its fingerprint is an input of `ingest`, so KFP's cache key changes exactly
when the data does. With `push_to`, it also compares the fingerprint and the training settings with the champion's
(`push_to/LATEST`): when both are equal, the run's status is "no new data" and nothing is trained or pushed.
"""

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kfp import dsl

from kfp_finetune.components.core import settings, sources
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import write_json

log = logging.getLogger(__name__)

STATUS_TRAIN = "new data"
STATUS_NO_NEW_DATA = "no new data"
STATUS_FORCED = "retrain forced"
STATUS_SETTINGS_CHANGED = "settings changed"
STATUS_FIRST = "no champion yet"


@dataclass
class Fingerprint:
    """The digest of a source: `fingerprint` (hex SHA-256 over the sorted lines), and what went into it."""

    source: str
    kind: str  # folder | gcs | manifest | tfds
    fingerprint: str
    num_images: int
    lines: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "fingerprint": self.fingerprint,
                "num_images": self.num_images}


def _digest(kind: str, lines: list[str]) -> str:
    h = hashlib.sha256(f"kfp-finetune-fingerprint-v1 {kind}\n".encode())
    for line in sorted(lines):
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def fingerprint_source(source: str) -> Fingerprint:
    """List `source` (nothing is downloaded) and digest what was listed (`components.core.sources`: each kind's
    `fingerprint()` lines)."""
    source = str(source or "").strip()
    if not source:
        raise UserError("--source is empty; give a folder, gs://bucket/prefix, a .csv manifest or tfds:NAME")
    kind = sources.detect(source)
    lines, count = kind.fingerprint()
    if count is None:  # a catalog name (tfds:): its version does not change, nothing is listed
        return Fingerprint(source, kind.kind, _digest(kind.kind, lines), 0, lines)
    if not count:
        raise UserError(f"--source {source}: no image files found; check the path (one sub-folder per class)")
    result = Fingerprint(source, kind.kind, _digest(kind.kind, lines), count, lines)
    log.info("fingerprint of %s: %s (%d images)", source, result.fingerprint[:16], count)
    return result


# --- the skip decision -----------------------------------------------------------------------------------------


def canonical_settings(values: dict[str, Any]) -> dict[str, str]:
    """Training settings as strings that compare equal across backends (kfp.local hands ints over as '3.0')."""
    out = {}
    for key, value in sorted((values or {}).items()):
        text = str(value).strip()
        if text.lower() in ("true", "false"):
            text = text.lower()
        else:
            try:
                number = float(text)
                text = repr(int(number)) if number.is_integer() else repr(number)
            except ValueError:
                pass
        out[str(key)] = text
    return out


@dataclass
class Decision:
    """Whether this run trains: `status` (one of the STATUS_* strings), why, and the champion it compared with."""

    status: str
    reason: str
    champion_version: str = ""
    champion_uri: str = ""

    @property
    def train(self) -> bool:
        return self.status != STATUS_NO_NEW_DATA


# Training settings added after champions were recorded, with the value (canonical) that trains as before they
# existed: an upgrade alone does not retrain on unchanged data.
ADDED_LATER = {"ema_momentum": "0", "layer_lr_ratio": "1", "mixup_alpha": "0", "cutmix_alpha": "0",
               "augment_strength": "0.1"}


def decide(fp: Fingerprint, push_to: str | None, training_settings: dict[str, Any] | None = None,
           force_retrain: bool = False) -> Decision:
    """Compare `fp` and the settings with the champion at `push_to` (its LATEST version)."""
    from kfp_finetune.components.registry import registry

    if not push_to:
        return Decision(STATUS_TRAIN, "no push_to: every run trains")
    champion = registry.resolve_champion(push_to)
    if champion is None:
        return Decision(STATUS_FIRST, f"{push_to} has no champion yet (no LATEST)")
    same_data = champion.record.get("data_fingerprint") == fp.fingerprint
    wanted = canonical_settings(training_settings or {})
    had = canonical_settings(champion.record.get("settings") or {})
    for key, value in ADDED_LATER.items():  # a champion recorded before the setting existed trained as it says
        for side in (wanted, had):
            side.setdefault(key, value)
    changed = sorted(k for k in set(wanted) | set(had) if wanted.get(k) != had.get(k))
    info = dict(champion_version=champion.version, champion_uri=champion.uri)
    if force_retrain:
        return Decision(STATUS_FORCED, "force_retrain is set", **info)
    if not same_data:
        return Decision(STATUS_TRAIN, f"data changed since champion {champion.version} "
                                      f"({str(champion.record.get('data_fingerprint'))[:12]} -> "
                                      f"{fp.fingerprint[:12]})", **info)
    if changed:
        return Decision(STATUS_SETTINGS_CHANGED, f"same data as champion {champion.version} but settings changed: "
                                                 + ", ".join(changed), **info)
    return Decision(STATUS_NO_NEW_DATA, f"data and settings equal champion {champion.version}'s; nothing to train",
                    **info)


# --- CLI -------------------------------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from kfp_finetune.components.core.params import add_arguments
    from kfp_finetune.components.ingest.params import FINGERPRINT

    p = subparsers.add_parser(
        "fingerprint", help="a stable digest of a data source, listed without downloading; new data or not",
        description="List a source (folder, gs:// prefix, CSV manifest, tfds:NAME) without downloading it and print "
                    "its fingerprint and image count. With --push-to, say whether it differs from the champion's.",
    )
    p.add_argument("--output", default=None, help="write the result as JSON to this file")
    p.add_argument("--settings", default=None, metavar="JSON",
                   help="training settings (a JSON object) to compare with the champion's")
    add_arguments(p, FINGERPRINT)  # --source, --push-to, --force-retrain
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    try:
        wanted = json.loads(args.settings) if args.settings else {}
    except json.JSONDecodeError as exc:
        raise UserError(f"--settings is not a JSON object ({exc})") from exc
    if args.push_to:
        from kfp_finetune.components.registry import registry

        registry.check_destination(args.push_to)
    fp = fingerprint_source(args.source)
    out = fp.to_json()
    if args.push_to:
        decision = decide(fp, args.push_to, wanted, args.force_retrain)
        out.update(status=decision.status, reason=decision.reason, champion=decision.champion_version)
    if args.output:
        write_json(args.output, out)
    print(json.dumps(out, indent=2, sort_keys=True))  # the command's result, for people and scripts
    return 0


# --- KFP component ---------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def fingerprint_op(
    source: str,
    fingerprint_file: dsl.Output[dsl.Artifact],
    push_to: str = "",
    training_settings: dict = {},  # noqa: B006 (KFP reads the default from the signature)
    force_retrain: bool = False,
) -> NamedTuple("FingerprintOutputs", [("fingerprint", str), ("num_images", int), ("status", str),
                                       ("champion", str)]):
    """List the source without downloading it, digest it, and decide whether this run has anything to train.

    Args:
        source: the images (folder, gs://bucket/prefix, CSV manifest or tfds:NAME), as ingest reads them.
        fingerprint_file: Output Artifact: one JSON object (source, kind, fingerprint, image count, status, reason).
        push_to: the push destination; when set, its writability is checked now (before any training) and its
            champion (LATEST) decides whether the data is new.
        training_settings: the run's training settings; a change retrains even on unchanged data.
        force_retrain: train even when data and settings equal the champion's.

    Returns:
        fingerprint: hex SHA-256 of the listing (an input of ingest, so KFP's cache follows the data).
        num_images: how many image files the source lists.
        status: "no new data" (the run stops here), or why it trains ("new data", "no champion yet", ...).
        champion: the champion's version ("" when none).
    """
    from collections import namedtuple

    from kfp_finetune.components.core.fsutil import write_json
    from kfp_finetune.components.ingest.fingerprint import decide, fingerprint_source

    if push_to:
        from kfp_finetune.components.registry import registry

        registry.check_destination(push_to)
    fp = fingerprint_source(source)
    decision = decide(fp, push_to or None, training_settings, force_retrain)
    write_json(fingerprint_file.path, {**fp.to_json(), "status": decision.status, "reason": decision.reason,
                                       "champion": decision.champion_version})
    fingerprint_file.metadata.update({"fingerprint": fp.fingerprint, "num_images": fp.num_images,
                                      "status": decision.status, "reason": decision.reason})
    print(f"fingerprint {fp.fingerprint[:16]} ({fp.num_images} images): {decision.status}: {decision.reason}")
    outputs = namedtuple("FingerprintOutputs", ["fingerprint", "num_images", "status", "champion"])
    return outputs(fp.fingerprint, fp.num_images, decision.status, decision.champion_version)
