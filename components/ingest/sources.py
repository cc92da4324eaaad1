"""Where the ingest step's images come from: a class-per-folder tree, gs://bucket/prefix with that layout, a CSV
manifest (`path,label`) or a TFDS dataset (`tfds:NAME[:VERSION]`), listed as entries (what the report shows, the
label, the local file to read) and skipped files, with gs:// objects downloaded to a staging folder.

Only regular files inside the source root (after `realpath`) are listed for reading (components.core.safefiles):
a symlink that leads out (to a file or a folder), a device, a FIFO or a socket is skipped with its reason, and a
symlinked folder outside the root is neither walked nor a class. Manifest rows follow the same rule.

Split out of step.py (which builds the dataset from a listing); `fingerprint.py` and the Beam
ingest reuse the same listing rules.
"""

import csv
import io
import logging
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from kfp_finetune.components.core import gcs, imagecheck, safefiles
from kfp_finetune.components.core.errors import UserError

log = logging.getLogger(__name__)

# Skip reasons of the listing (components.ingest.step adds missing / duplicate / label_conflict; imagecheck the rest).
HIDDEN = "hidden"
NOT_IMAGE = "not_image"
OUTSIDE_CLASS = "outside_class_folder"
OUTSIDE_SOURCE = safefiles.OUTSIDE_SOURCE
NOT_REGULAR = safefiles.NOT_REGULAR
DOWNLOAD_FAILED = "download_failed"

TFDS_PROBE_URL = "https://storage.googleapis.com/"
TFDS_PROBE_TIMEOUT_S = 8.0


@dataclass
class _Entry:
    ref: str  # what the report shows: a local path or a gs:// URI
    label: str
    local: str | None = None  # the local file to read (None until a gs:// object is downloaded)
    error: str = ""  # why a gs:// object could not be downloaded (after its retry)


@dataclass
class _Listing:
    source: str
    entries: list[_Entry]
    skipped: list[dict[str, str]]
    class_names: list[str]  # every class seen, including ones that end up with no valid image
    class_refs: dict[str, str] = field(default_factory=dict)  # class -> where it came from, for error messages


def _skip(path: str, reason: str, detail: str = "") -> dict[str, str]:
    return {"path": path, "reason": reason, "detail": detail}


def _classify(rel_parts: tuple[str, ...]) -> str | None:
    """The skip reason for a file at `rel_parts` below the source root, or None when it is a candidate image."""
    if any(part in (".", "..") for part in rel_parts):  # an object name that would climb out of its folder
        return OUTSIDE_SOURCE
    if any(part.startswith(".") for part in rel_parts):
        return HIDDEN
    if len(rel_parts) < 2:
        return OUTSIDE_CLASS
    if not imagecheck.is_image_name(rel_parts[-1]):
        return NOT_IMAGE
    return None


def _list_folder(root: Path, source: str) -> _Listing:
    if not root.exists():
        raise UserError(f"--source {source}: no such directory; check the path")
    if not root.is_dir():
        raise UserError(f"--source {source} is not a directory (for a manifest, name it *.csv)")
    base = safefiles.real_root(root)
    entries, skipped = [], []
    classes = sorted(p.name for p in root.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and safefiles.inside(os.path.realpath(p), base))
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop: do not walk the same folder twice
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in sorted(dirnames) if _folder_inside(os.path.join(dirpath, d), base, skipped)]
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).parts
            reason = _classify(rel)
            found = safefiles.check(path, base) if not reason else None
            if reason:
                skipped.append(_skip(str(path), reason))
            elif found is not None and not found.ok and found.reason != safefiles.MISSING:
                skipped.append(_skip(str(path), found.reason or "", found.detail))
            else:  # a dangling symlink stays a candidate: reading it reports it missing
                entries.append(_Entry(str(path), rel[0], found.real if found and found.ok else str(path)))
    skipped.sort(key=lambda s: (s["path"], s["reason"]))
    return _Listing(source, entries, skipped, classes, {c: str(root / c) for c in classes})


def _folder_inside(path: str, base: str, skipped: list[dict[str, str]]) -> bool:
    """Whether to walk the folder `path`; a (symlinked) folder that resolves outside `base` is skipped."""
    real = os.path.realpath(path)
    if safefiles.inside(real, base):
        return True
    skipped.append(_skip(path, OUTSIDE_SOURCE, f"a folder that resolves to {real}, outside {base}; not read"))
    return False


def _list_gcs(uri: str) -> _Listing:
    base = uri.rstrip("/")
    blobs = gcs.list_blobs(base)
    bucket, prefix = gcs.split_uri(base)
    prefix = f"{prefix}/" if prefix else ""
    entries, skipped, classes = [], [], set()
    for blob in blobs:
        rel = tuple(p for p in blob.name[len(prefix) :].split("/") if p)
        ref = f"gs://{bucket}/{blob.name}"
        reason = _classify(rel)
        if len(rel) >= 2 and not rel[0].startswith("."):
            classes.add(rel[0])
        if reason:
            skipped.append(_skip(ref, reason))
        else:
            entries.append(_Entry(ref, rel[0]))
    return _Listing(uri, entries, skipped, sorted(classes), {c: f"{base}/{c}" for c in classes})


def _read_manifest(source: str) -> _Listing:
    """A CSV with a `path,label` header; paths relative to the manifest's folder, or gs:// URIs."""
    text = read_manifest_text(source)
    base = posixpath.dirname(source) if gcs.is_gcs(source) else str(Path(source).resolve().parent)
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if "path" not in header or "label" not in header:
        raise UserError(f"--source {source}: the manifest needs a 'path,label' header line (found {header or 'none'})")
    reader.fieldnames = header
    entries, skipped, classes = [], [], set()
    for line, row in enumerate(reader, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or not label:
            raise UserError(f"--source {source} line {line}: empty path or label; every row needs both")
        if "\n" in label or "\r" in label:
            raise UserError(f"--source {source} line {line}: a label may not contain a line break")
        if gcs.is_gcs(rel):
            ref = rel
        elif os.path.isabs(rel) or rel.startswith(("/", "\\")):
            raise UserError(
                f"--source {source} line {line}: absolute path {rel!r}; use a path relative to the manifest's folder"
            )
        else:
            if gcs.is_gcs(base):
                ref = "gs://" + posixpath.normpath(posixpath.join(base[len("gs://") :], rel))
                inside = ref.startswith(base.rstrip("/") + "/")
            else:
                ref = os.path.normpath(os.path.join(base, rel))
                inside = ref.startswith(base.rstrip(os.sep) + os.sep)
            if not inside:
                raise UserError(
                    f"--source {source} line {line}: path {rel!r} escapes the manifest's folder; "
                    "move the file below it or use a gs:// URI"
                )
        classes.add(label)
        local = None
        if not gcs.is_gcs(ref):
            found = safefiles.check(ref, base)
            if not found.ok and found.reason != safefiles.MISSING:  # missing: reported when it is read
                skipped.append(_skip(ref, found.reason or "", f"line {line}: {found.detail}"))
                continue
            local = found.real if found.ok else ref
        entries.append(_Entry(ref, label, local))
    return _Listing(source, entries, skipped, sorted(classes), {c: f"label {c!r} in {source}" for c in classes})


def read_manifest_text(source: str) -> str:
    """A manifest's text (local or gs://): UTF-8 with or without a BOM; a one-line UserError naming the line of a
    byte that is not UTF-8, or why the file cannot be read."""
    if gcs.is_gcs(source):
        data = gcs.read_bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"--source {source}: manifest not found; check the path")
        try:
            data = safefiles.read_bytes(path)
        except OSError as exc:
            raise UserError(f"--source {source}: cannot read the manifest ({exc.strerror or exc})") from exc
    try:
        return safefiles.decode_text(data, f"--source {source}")
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _network_reachable(url: str, timeout: float) -> str | None:
    """None when `url` answers within `timeout` seconds (DNS included); else why not."""
    import threading
    import urllib.error
    import urllib.request

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # the server answered
        except Exception as exc:  # URLError, socket timeouts, DNS failures
            outcome.append(str(getattr(exc, "reason", exc)) or type(exc).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 2)
    return outcome[0] if outcome else f"no answer within {timeout:.0f} s"


def _from_tfds(spec: str, staging: Path) -> _Listing:
    """`tfds:NAME[:VERSION]`: prepare through TFDS (fails fast offline), then write its images as a class folder."""
    parts = spec[len("tfds:") :].split(":")
    if not parts[0] or len(parts) > 2:
        raise UserError(f"--source {spec}: expected tfds:NAME or tfds:NAME:VERSION")
    name = parts[0] if len(parts) == 1 else f"{parts[0]}:{parts[1]}"
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, try_gcs=False)
    except Exception as exc:  # DatasetNotFoundError, bad version, ...
        raise UserError(f"--source {spec}: TFDS has no dataset {name!r} ({str(exc).splitlines()[0]})") from exc
    if not builder.is_prepared():
        why = _network_reachable(TFDS_PROBE_URL, TFDS_PROBE_TIMEOUT_S)
        if why:
            raise UserError(
                f"--source {spec}: {name} is not prepared in {builder.data_dir} and the network is unreachable "
                f"({why}); run once where it is online (or copy the prepared dataset there), or ingest a folder"
            )
        log.info("preparing %s through TFDS in %s", name, builder.data_dir)
        try:
            builder.download_and_prepare()
        except Exception as exc:
            raise UserError(f"--source {spec}: TFDS could not prepare {name}: {exc}") from exc
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    features = builder.info.features
    if image_key not in features or label_key not in features or not hasattr(features[label_key], "names"):
        raise UserError(f"--source {spec}: {name} is not an image classification dataset (no image/label features)")
    names = features[label_key].names
    root = staging / "tfds"
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    log.info("reading %s from TFDS (%s)", name, ", ".join(builder.info.splits))
    for split in builder.info.splits:
        ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
        for i, example in enumerate(tfds.as_numpy(ds)):
            path = root / f"{len(entries):09d}"  # our own names: label strings never become paths
            path.write_bytes(example[image_key])
            entries.append(_Entry(f"{spec}/{split}/{i}", names[int(example[label_key])], str(path)))
    return _Listing(spec, entries, [], sorted(set(names)), {c: f"{spec} label {c!r}" for c in names})


def _collect(source: str, staging: Path) -> _Listing:
    if source.startswith("tfds:"):
        listing = _from_tfds(source, staging)
    elif source.lower().endswith(".csv"):
        listing = _read_manifest(source)
    elif gcs.is_gcs(source):
        listing = _list_gcs(source)
    else:
        listing = _list_folder(Path(source).expanduser(), source)
    if not listing.entries:
        raise UserError(
            f"--source {source}: no image files found ({len(listing.skipped)} other files); expected one folder of "
            "JPEG/PNG/... images per class"
        )
    remote = [e for e in listing.entries if e.local is None]
    if remote:
        downloads = staging / "gcs"
        dests = [str(downloads / f"{i:08d}{Path(e.ref).suffix.lower()}") for i, e in enumerate(remote)]
        log.info("downloading %d objects from gs:// in parallel", len(remote))
        _download(remote, dests)
    return listing


def _download(entries: list[_Entry], dests: list[str]) -> None:
    """Parallel download (transfer_manager); the objects that fail are retried once, and those that fail again keep
    `local` unset with the error in `error` (ingest reports them as download_failed)."""
    failed = gcs.try_download_many([e.ref for e in entries], dests)
    if failed:
        first = min(failed)
        log.warning("%d of %d downloads failed (first: %s: %s); retrying those once", len(failed), len(entries),
                    entries[first].ref, failed[first])
        again = sorted(failed)
        still = gcs.try_download_many([entries[i].ref for i in again], [dests[i] for i in again], workers=4)
        failed = {again[j]: error for j, error in still.items()}
        if failed:
            log.warning("%d downloads failed again after the retry; reported as %s", len(failed), DOWNLOAD_FAILED)
    for i, (entry, dest) in enumerate(zip(entries, dests, strict=True)):
        entry.local = None if i in failed else dest
        entry.error = failed.get(i, "")
