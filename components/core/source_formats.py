"""The source kinds over the schemes of components.core.sources: a CSV manifest (`ManifestSource`, local or gs://)
and the TFDS catalog (`TfdsSource`). `sources.detect` finds them; nothing else should construct them by prefix.

A manifest for ingest is `path,label` (paths relative to its folder and inside it, or URIs); for predict a list of
files. A TFDS dataset is prepared through TFDS (failing fast offline), then written out as image files under our own
names (label strings never become paths).
"""

from __future__ import annotations  # a Source's `list` method would shadow `list` in its annotations

import csv
import io
import logging
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path

from kfp_finetune.components.core import safefiles
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.sources import Entry, Listing, Source, is_uri, read, skip, stat_refs

log = logging.getLogger(__name__)

# --- a format: the CSV manifest --------------------------------------------------------------------

PREDICT_COLUMNS = ("file", "path", "uri", "image")  # predict's list: the first of these columns, else the first


class ManifestSource(Source):
    """A CSV file (local or gs://). For ingest a `path,label` manifest: paths relative to its folder (and inside
    it), or URIs; for predict a list of files: a `file`/`path`/`uri`/`image` column (or the first column, with no
    header), relative to its folder, absolute, or URIs."""

    kind = "manifest"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.lower().endswith(".csv")

    def text(self, noun: str = "manifest") -> str:
        """The file's text: UTF-8 with or without a BOM; a one-line UserError naming the line of a byte that is not
        UTF-8, or why the file cannot be read."""
        source = self.spec
        if is_uri(source):
            try:
                data = read(source)
            except UserError:
                raise
            except Exception as exc:  # the scheme's client errors, over the size bound
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise UserError(f"cannot read {source}: {first}") from exc
        else:
            path = Path(source)
            if not path.is_file():
                raise UserError(f"{self.what} {source}: {noun} not found; check the path")
            try:
                data = safefiles.read_bytes(path)
            except OSError as exc:
                raise UserError(f"{self.what} {source}: cannot read the {noun} ({exc.strerror or exc})") from exc
        try:
            return safefiles.decode_text(data, f"{self.what} {source}")
        except ValueError as exc:
            raise UserError(str(exc)) from None

    def list(self, staging: Path | None = None) -> Listing:
        source, what = self.spec, self.what
        text = self.text()
        remote = is_uri(source)
        base = posixpath.dirname(source) if remote else str(Path(source).resolve().parent)
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip().lower() for h in reader.fieldnames or []]
        if "path" not in header or "label" not in header:
            raise UserError(
                f"{what} {source}: the manifest needs a 'path,label' header line (found {header or 'none'})"
            )
        reader.fieldnames = header
        entries, skipped, classes = [], [], set()
        for line, row in enumerate(reader, start=2):
            rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not rel or not label:
                raise UserError(f"{what} {source} line {line}: empty path or label; every row needs both")
            if "\n" in label or "\r" in label:
                raise UserError(f"{what} {source} line {line}: a label may not contain a line break")
            if is_uri(rel):
                ref = rel
            elif os.path.isabs(rel) or rel.startswith(("/", "\\")):
                raise UserError(
                    f"{what} {source} line {line}: absolute path {rel!r}; use a path relative to the manifest's folder"
                )
            else:
                if remote:
                    scheme, _, rest = base.partition("://")
                    ref = f"{scheme}://" + posixpath.normpath(posixpath.join(rest, rel))
                    inside = ref.startswith(base.rstrip("/") + "/")
                else:
                    ref = os.path.normpath(os.path.join(base, rel))
                    inside = ref.startswith(base.rstrip(os.sep) + os.sep)
                if not inside:
                    raise UserError(
                        f"{what} {source} line {line}: path {rel!r} escapes the manifest's folder; "
                        "move the file below it or use a gs:// URI"
                    )
            classes.add(label)
            local = None
            if not is_uri(ref):
                found = safefiles.check(ref, base)
                if not found.ok and found.reason != safefiles.MISSING:  # missing: reported when it is read
                    skipped.append(skip(ref, found.reason or "", f"line {line}: {found.detail}"))
                    continue
                local = found.real if found.ok else ref
            entries.append(Entry(ref, label, local))
        return Listing(source, entries, skipped, sorted(classes), {c: f"label {c!r} in {source}" for c in classes})

    def files(self) -> tuple[Iterator[str], int | None]:
        text = self.text("list")
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r and any(c.strip() for c in r)]
        if not rows:
            return iter([]), 0
        header = [c.strip().lower() for c in rows[0]]
        column = next((header.index(c) for c in PREDICT_COLUMNS if c in header), None)
        body = rows[1:] if column is not None else rows
        column = column or 0
        folder = posixpath.dirname(self.spec) if is_uri(self.spec) else None
        out = []
        for row in body:
            name = row[column].strip() if column < len(row) else ""
            if not name:
                continue
            if is_uri(name) or os.path.isabs(name):
                out.append(name)
            else:
                out.append(posixpath.join(folder, name) if folder else str(Path(self.spec).parent / name))
        return iter(out), len(out)

    def fingerprint(self) -> tuple[list[str], int | None]:
        import hashlib

        entries = self.list().entries
        lines = [f"manifest\t{hashlib.sha256(self.text().encode()).hexdigest()}"]
        stats = stat_refs([e.ref for e in entries])
        for e in entries:
            st = stats[e.ref]
            lines.append(st.line(e.ref) if st is not None else f"{e.ref}\tmissing")
        return lines, len(entries)


# --- a catalog: TFDS ---------------------------------------------------------------------------------------------


class TfdsSource(Source):
    """`tfds:NAME[:VERSION]`: prepared through TFDS (`tfds_listing`), written out as image files."""

    kind = "tfds"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.startswith("tfds:")

    def list(self, staging: Path | None = None) -> Listing:
        if staging is None:
            raise ValueError("a tfds: source is written out to a staging folder; pass one")
        return tfds_listing(self.spec, staging)

    def fingerprint(self) -> tuple[list[str], int | None]:
        return [self.spec], None  # a published TFDS version does not change


# --- TFDS preparation ---

TFDS_PROBE_URL = "https://storage.googleapis.com/"
TFDS_PROBE_TIMEOUT_S = 8.0


def network_reachable(url: str, timeout: float) -> str | None:
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


def tfds_listing(spec: str, staging: Path) -> Listing:
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
        why = network_reachable(TFDS_PROBE_URL, TFDS_PROBE_TIMEOUT_S)
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
            entries.append(Entry(f"{spec}/{split}/{i}", names[int(example[label_key])], str(path)))
    return Listing(spec, entries, [], sorted(set(names)), {c: f"{spec} label {c!r}" for c in names})
