"""Where data comes from: one `Source` per kind, found by `detect(spec)`, used by ingest (both runners), fingerprint
and predict. The kinds, in the order `detect` tries them (`kinds()`):

- `tfds:NAME[:VERSION]` (`TfdsSource`): a TFDS catalog dataset, prepared by TFDS and written out as image files;
- `*.csv` (`ManifestSource`), local or gs://: for ingest a `path,label` manifest, for predict a list of files
  (these two in components.core.source_formats);
- `gs://bucket/prefix` (`GcsSource`): a class-per-folder tree of objects (predict: every image object below it);
- anything else (`FolderSource`): a local class-per-folder tree (predict: every image file below it).

What a source gives:
- `list(staging)`: the labelled listing (`Listing`: entries with the reference the report shows, the label and the
  local file to read; skip records; the classes seen), by the one set of naming rules (`classify`);
- `files()`: the files predict reads (no labels), with their count when known up front;
- `fingerprint()`: one line per listed file from a cheap stat (`Stat`: size and a version), nothing downloaded;
- `read(ref)`, `stat_refs(refs)`: the bytes and stats of single files of a scheme (local paths, gs:// objects).

A new scheme (S3, HTTP, Azure) is one class here (`claims`, `owns`, `list`, `files`, `read_ref`, `stat_refs`)
registered in `kinds()` and `SCHEMES`, plus its client next to `components/core/gcs.py`. Nothing outside this module
branches on a source's prefix to list it.

Only regular files inside the source root (after `realpath`) are listed for reading (components.core.safefiles):
a symlink that leads out (to a file or a folder), a device, a FIFO or a socket is skipped with its reason, and a
symlinked folder outside the root is neither walked nor a class. Manifest rows follow the same rule.
"""

from __future__ import annotations  # a Source's `list` method would shadow `list` in its annotations

import logging
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from kfp_finetune.components.core import gcs, imagecheck, safefiles
from kfp_finetune.components.core.errors import UserError

log = logging.getLogger(__name__)

# Skip reasons of the listing (ingest adds missing / duplicate / label_conflict; imagecheck the rest).
HIDDEN = "hidden"
NOT_IMAGE = "not_image"
OUTSIDE_CLASS = "outside_class_folder"
OUTSIDE_SOURCE = safefiles.OUTSIDE_SOURCE
NOT_REGULAR = safefiles.NOT_REGULAR
DOWNLOAD_FAILED = "download_failed"


class Stat(NamedTuple):
    """A file's size and version, as cheap as the scheme gives them: (mtime_ns,) locally; (generation, crc32c,
    md5) for gs:// objects, from the listing."""

    size: int
    version: tuple[str, ...]

    def line(self, name: str) -> str:
        """The fingerprint's line for this file (its digest format: never change it)."""
        return "\t".join([name, str(self.size), *self.version])


@dataclass
class Entry:
    ref: str  # what the report shows: a local path or a gs:// URI
    label: str
    local: str | None = None  # the local file to read (None until a gs:// object is downloaded)
    error: str = ""  # why a gs:// object could not be downloaded (after its retry)
    stat: Stat | None = None  # when the listing gave it for free (gs://)


@dataclass
class Listing:
    source: str
    entries: list[Entry]
    skipped: list[dict[str, str]]
    class_names: list[str]  # every class seen, including ones that end up with no valid image
    class_refs: dict[str, str] = field(default_factory=dict)  # class -> where it came from, for error messages


def skip(path: str, reason: str, detail: str = "") -> dict[str, str]:
    return {"path": path, "reason": reason, "detail": detail}


def classify(rel_parts: tuple[str, ...]) -> str | None:
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


def class_of(rel_parts: tuple[str, ...]) -> str | None:
    """The class a file at `rel_parts` names (its first folder), even when the file itself is skipped."""
    return rel_parts[0] if len(rel_parts) >= 2 and not rel_parts[0].startswith(".") else None


def no_images_message(spec: str, others: int, what: str = "--source") -> str:
    return (f"{what} {spec}: no image files found ({others} other files); expected one folder of "
            "JPEG/PNG/... images per class")


class Source:
    """One kind of source at `spec`; `what` names it in errors (the option it came from)."""

    kind: ClassVar[str] = ""

    def __init__(self, spec: str, what: str = "--source") -> None:
        self.spec, self.what = spec, what

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    @classmethod
    def claims(cls, spec: str) -> bool:
        """Whether `spec` names a source of this kind (`detect` asks the kinds in order)."""
        raise NotImplementedError

    def list(self, staging: Path | None = None) -> Listing:
        """The labelled listing; `staging`: a folder for what must be written out first (TFDS)."""
        raise NotImplementedError

    def files(self) -> tuple[Iterator[str], int | None]:
        """The files predict reads, in order, and their count when known up front."""
        raise UserError(f"{self.what} {self.spec}: give a folder, a gs:// prefix or a .csv list")

    def fingerprint(self) -> tuple[list[str], int | None]:
        """One line per listed file (`Stat.line`) and how many (None: not counted), without downloading."""
        raise NotImplementedError

    def input_root(self) -> str | None:
        """The folder every local file read for predict must resolve inside (None: each file's own folder)."""
        return None


# --- schemes: single files ------------------------------------------------------------------------------------


class FolderSource(Source):
    """A local folder; also the scheme of every local path (`owns`, `read_ref`, `stat_refs`)."""

    kind = "folder"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return True  # the last resort

    @staticmethod
    def owns(ref: str) -> bool:
        return True

    @staticmethod
    def read_ref(ref: str, root: str | None = None, client: Any = None) -> bytes:
        return safefiles.read_bytes(ref, root)

    @staticmethod
    def stat_refs(refs: list[str]) -> dict[str, Stat | None]:
        out: dict[str, Stat | None] = {}
        for ref in refs:
            if os.path.isfile(ref):
                st = os.stat(ref)
                out[ref] = Stat(st.st_size, (str(st.st_mtime_ns),))
            else:
                out[ref] = None
        return out

    @property
    def root(self) -> Path:
        return Path(self.spec).expanduser()

    def list(self, staging: Path | None = None) -> Listing:
        root, source = self.root, self.spec
        if not root.exists():
            raise UserError(f"{self.what} {source}: no such directory; check the path")
        if not root.is_dir():
            raise UserError(f"{self.what} {source} is not a directory (for a manifest, name it *.csv)")
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
            # Path arithmetic once per folder, not per file (the files' strings are what Path would give).
            folder = Path(dirpath)
            rel_dir, prefix = folder.relative_to(root).parts, str(folder)
            real_dir = os.path.realpath(dirpath)
            for name in sorted(filenames):
                path = name if prefix == "." else os.path.join(prefix, name)  # str(folder / name)
                rel = (*rel_dir, name)
                reason = classify(rel)
                found = _check_file(path, real_dir, name, base) if not reason else None
                if reason:
                    skipped.append(skip(path, reason))
                elif found is not None and not found.ok and found.reason != safefiles.MISSING:
                    skipped.append(skip(path, found.reason or "", found.detail))
                else:  # a dangling symlink stays a candidate: reading it reports it missing
                    entries.append(Entry(path, rel[0], found.real if found and found.ok else path))
        skipped.sort(key=lambda s: (s["path"], s["reason"]))
        return Listing(source, entries, skipped, classes, {c: str(root / c) for c in classes})

    def files(self) -> tuple[Iterator[str], int | None]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                       if imagecheck.is_image_name(f) and not f.startswith("."))
        return iter(out), len(out)

    def fingerprint(self) -> tuple[list[str], int | None]:
        root = self.root
        entries = self.list().entries
        lines = []
        for e in entries:
            st = os.stat(e.ref)
            lines.append(Stat(st.st_size, (str(st.st_mtime_ns),)).line(Path(e.ref).relative_to(root).as_posix()))
        return lines, len(lines)

    def input_root(self) -> str | None:
        return safefiles.real_root(self.root)


def _check_file(path: str, real_dir: str, name: str, base: str) -> safefiles.FileCheck:
    """`safefiles.check(path, base)` for a file listed in a folder whose real path is `real_dir`: a file that is not
    a symlink resolves to `real_dir/name`, so one lstat replaces realpath's walk over every component of the path
    (measured: 0.3 s -> 0.1 s to list 15,000 photos); a symlink gets the full check."""
    try:
        st = os.lstat(path)
    except OSError:
        return safefiles.check(path, base)
    if stat.S_ISLNK(st.st_mode) or not safefiles.inside(real_dir, base):
        return safefiles.check(path, base)
    return safefiles.check_stat(os.path.join(real_dir, name), st)


def _folder_inside(path: str, base: str, skipped: list[dict[str, str]]) -> bool:
    """Whether to walk the folder `path`; a (symlinked) folder that resolves outside `base` is skipped."""
    real = os.path.realpath(path)
    if safefiles.inside(real, base):
        return True
    skipped.append(skip(path, OUTSIDE_SOURCE, f"a folder that resolves to {real}, outside {base}; not read"))
    return False


class GcsSource(Source):
    """gs://bucket/prefix (google-cloud-storage; never tf.io.gfile); also the scheme of every gs:// URI."""

    kind = "gcs"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return gcs.is_gcs(spec)

    @staticmethod
    def owns(ref: str) -> bool:
        return gcs.is_gcs(ref)

    @staticmethod
    def read_ref(ref: str, root: str | None = None, client: Any = None) -> bytes:
        bucket, name = gcs.split_uri(ref)
        limit = safefiles.MAX_FILE_BYTES  # the local files' bound: at most limit + 1 bytes are ever fetched
        data = (client or gcs.client()).bucket(bucket).blob(name).download_as_bytes(start=0, end=limit)
        if len(data) > limit:
            raise safefiles.UnsafeFile(safefiles.TOO_LARGE, f"over the {limit:,}-byte limit")
        return data

    @staticmethod
    def stat_refs(refs: list[str]) -> dict[str, Stat | None]:
        """One listing per folder, not one request per object."""
        by_folder: dict[str, list[str]] = {}
        for ref in refs:
            by_folder.setdefault(posixpath.dirname(ref), []).append(ref)
        out: dict[str, Stat | None] = {}
        for folder, named in sorted(by_folder.items()):
            bucket, _ = gcs.split_uri(folder)
            found = {f"gs://{bucket}/{b.name}": b for b in gcs.list_blobs(folder)}
            out.update({ref: _blob_stat(found[ref]) if ref in found else None for ref in named})
        return out

    @property
    def base(self) -> str:
        return self.spec.rstrip("/")

    @property
    def root(self) -> str:
        """What every object URI of this source starts with (Beam matches `root + '**'`)."""
        return self.base + "/"

    def place(self, uri: str) -> tuple[tuple[str, ...], str | None] | None:
        """(the parts of `uri` below the prefix, its skip reason or None); None when it is not below the prefix."""
        if not uri.startswith(self.root):
            return None
        rel = tuple(p for p in uri[len(self.root):].split("/") if p)
        return rel, classify(rel)

    def list(self, staging: Path | None = None) -> Listing:
        bucket, _ = gcs.split_uri(self.base)
        entries, skipped, classes = [], [], set()
        for blob in gcs.list_blobs(self.base):
            ref = f"gs://{bucket}/{blob.name}"
            rel, reason = self.place(ref) or ((), OUTSIDE_SOURCE)
            if class_of(rel):
                classes.add(rel[0])
            if reason:
                skipped.append(skip(ref, reason))
            else:
                entries.append(Entry(ref, rel[0], stat=_blob_stat(blob)))
        return Listing(self.spec, entries, skipped, sorted(classes), {c: f"{self.base}/{c}" for c in classes})

    def files(self) -> tuple[Iterator[str], int | None]:
        return self._objects(), None

    def _objects(self) -> Iterator[str]:
        """Image objects under the prefix, page by page (never the whole listing in memory)."""
        bucket, name = gcs.split_uri(self.spec)
        if name and not name.endswith("/"):
            name += "/"
        try:
            for blob in gcs.client().list_blobs(bucket, prefix=name, page_size=1000):
                if not blob.name.endswith("/") and imagecheck.is_image_name(blob.name):
                    yield f"gs://{bucket}/{blob.name}"
        except UserError:
            raise
        except Exception as exc:  # google.api_core / connection errors
            raise UserError(f"{self.what} {self.spec}: cannot list ({exc})") from exc

    def fingerprint(self) -> tuple[list[str], int | None]:
        lines = []
        for e in self.list().entries:
            rel, _ = self.place(e.ref) or ((), None)
            lines.append((e.stat or Stat(0, ())).line("/".join(rel)))
        return lines, len(lines)


def _blob_stat(blob: Any) -> Stat:
    return Stat(blob.size, (str(blob.generation), str(blob.crc32c or ""), str(blob.md5_hash or "")))


SCHEMES: tuple[Any, ...] = (GcsSource, FolderSource)  # the scheme of a single reference: the first that owns it


def scheme_of(ref: str) -> Any:
    return next(s for s in SCHEMES if s.owns(ref))


def is_uri(ref: str) -> bool:
    """Whether `ref` names a remote object (a URI of a scheme other than the local one)."""
    return scheme_of(ref) is not FolderSource


def read(ref: str, root: str | None = None, client: Any = None) -> bytes:
    """The bytes of one file of any scheme, at most safefiles.MAX_FILE_BYTES (safefiles.UnsafeFile beyond, or for a
    local file that breaks safefiles' rule; `root`: the folder it must resolve inside); `client`: the scheme's
    client to reuse."""
    return scheme_of(ref).read_ref(ref, root, client)


def stat_refs(refs: list[str]) -> dict[str, Stat | None]:
    """{ref: Stat, or None when it is not there} for references of any scheme."""
    by_scheme: dict[Any, list[str]] = {}
    for ref in refs:
        by_scheme.setdefault(scheme_of(ref), []).append(ref)
    out: dict[str, Stat | None] = {}
    for scheme, named in by_scheme.items():
        out.update(scheme.stat_refs(named))
    return out


def kinds() -> tuple[type[Source], ...]:
    """The kinds `detect` asks, in order (the formats and catalogs live in components.core.source_formats)."""
    from kfp_finetune.components.core.source_formats import ManifestSource, TfdsSource

    return (TfdsSource, ManifestSource, GcsSource, FolderSource)


def detect(spec: str, what: str = "--source") -> Source:
    """The source that `spec` names: the first of `kinds()` that claims it."""
    spec = str(spec)
    return next(kind for kind in kinds() if kind.claims(spec))(spec, what)


def collect(spec: str, staging: Path, what: str = "--source") -> Listing:
    """`detect(spec).list(staging)` with every remote entry downloaded below `staging` (in parallel); UserError when
    nothing is an image."""
    listing = detect(spec, what).list(staging)
    if not listing.entries:
        raise UserError(no_images_message(spec, len(listing.skipped), what))
    remote = [e for e in listing.entries if e.local is None]
    if remote:
        downloads = staging / "gcs"
        dests = [str(downloads / f"{i:08d}{Path(e.ref).suffix.lower()}") for i, e in enumerate(remote)]
        log.info("downloading %d objects from gs:// in parallel", len(remote))
        _download(remote, dests)
    return listing


def _download(entries: list[Entry], dests: list[str]) -> None:
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
