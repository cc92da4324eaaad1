"""Local file helpers: atomic output directories and small JSON writes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kfp_finetune.components.core.errors import UserError


def check_output_dir(target: str | os.PathLike, what: str = "--output") -> Path:
    """Fail early when `target` exists and is not an empty directory."""
    path = Path(target)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} {path} exists and is not a directory; choose a new path")
        if any(path.iterdir()):
            raise UserError(f"{what} {path} exists and is not empty; choose a new path or remove it first")
    return path


def fresh_name(parent: Path, prefix: str) -> Path:
    """`parent/prefix<10 random hex digits>`, a name nothing uses yet; not created. For a temporary folder that a
    cleanup must find even when a signal arrives right after its mkdir: assign the name, then mkdir, inside the
    `try` whose handler removes it (tempfile.mkdtemp returns the name only after its mkdir)."""
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(5)}"
        if not os.path.lexists(candidate):
            return candidate


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, what: str = "--output") -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success move it into place, on failure delete it.

    A step killed half-way therefore leaves nothing at `target` (only a hidden `.name.tmp-*` sibling, which the
    next run ignores). `target` may exist as an empty directory (KFP pre-creates some artifact folders).
    """
    path = check_output_dir(target, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        # The name is chosen before the folder exists and the folder is made inside this `try`: a SIGTERM raised
        # (faults.stops_cleanly) just after the mkdir still finds the name here and removes the folder. With
        # tempfile.mkdtemp before the `try`, a SIGTERM between its mkdir and its return left the folder behind
        # (seen on a loaded machine: a watcher that signals as soon as the folder appears hits that window).
        tmp = fresh_name(path.parent, f".{path.name}.tmp-")
        tmp.mkdir(mode=0o700)
        yield tmp
        if path.exists():
            path.rmdir()
        try:
            os.replace(tmp, path)
        except OSError:  # e.g. a FUSE mount (/gcs on Vertex) that cannot rename directories
            shutil.copytree(tmp, path)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically: a hidden temporary file beside `path`, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename), pretty-printed and sorted for diffable output."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{what}: {path} is not valid JSON ({exc})") from exc


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
