"""The checkpoint folder of a training phase: atomic, numbered checkpoints (local, a /gcs/ mount, or gs://).

Each checkpoint is built in a hidden temporary folder beside the others, renamed to `ckpt-NNNNNN` (a new name every
time), and only then named in `training_metadata.json` (replaced atomically). The two newest complete checkpoints
are kept, and a reader takes the newest that loads, so a kill at any moment leaves the previous checkpoint usable.
On gs:// the objects are written first, the pointer last. What a checkpoint holds, and when it is written, is
components/train/preempt.py's business.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.core import gcs
from kfp_finetune.components.core.fsutil import atomic_directory

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

log = logging.getLogger("kfp_finetune.train")

POINTER = "training_metadata.json"
ARRAYS = "state.npz"
STATE = "state.json"
FORMAT = "kfp-finetune-checkpoint/1"
KEEP = 2  # complete checkpoints kept: the newest, and the one before in case the newest cannot be read
_NAME = re.compile(r"^ckpt-(\d{6,})$")


class CheckpointStore:
    """Atomic checkpoints in one folder (local, a /gcs/ mount, or gs://): `ckpt-NNNNNN/{state.npz,state.json}`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.remote = gcs.is_gcs(self.uri)
        self._serial: int | None = None

    def _listing(self) -> dict[str, set[str]]:
        """{checkpoint name: the file names it holds}, hidden temporary folders excluded."""
        found: dict[str, set[str]] = {}
        if self.remote:
            prefix = gcs.split_uri(self.uri + "/")[1]
            for blob in gcs.list_blobs(self.uri + "/"):
                parts = blob.name[len(prefix):].split("/")
                if len(parts) == 2 and _NAME.match(parts[0]):
                    found.setdefault(parts[0], set()).add(parts[1])
            return found
        root = Path(self.uri)
        if root.is_dir():
            for entry in root.iterdir():
                if _NAME.match(entry.name) and entry.is_dir():
                    found[entry.name] = {p.name for p in entry.iterdir()}
        return found

    def complete(self) -> list[str]:
        """Names of the checkpoints holding both files, newest first."""
        listing = self._listing()
        return sorted((n for n, files in listing.items() if {ARRAYS, STATE} <= files), reverse=True)

    def save(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> str:
        """Write one checkpoint atomically and point `training_metadata.json` at it; returns its name."""
        if self._serial is None:
            self._serial = max((int(_NAME.match(n).group(1)) for n in self._listing()), default=0)  # type: ignore
        self._serial += 1
        name = f"ckpt-{self._serial:06d}"
        position = state["position"]
        pointer = json.dumps({"epoch": position["epoch"], "batch": position["step"], "checkpoint": name,
                              "format": FORMAT})
        if self.remote:
            with tempfile.TemporaryDirectory(prefix="kfp-finetune-ckpt-") as tmp:
                _write_files(Path(tmp), arrays, state)
                gcs.upload_many([Path(tmp) / ARRAYS, Path(tmp) / STATE],
                                [f"{self.uri}/{name}/{ARRAYS}", f"{self.uri}/{name}/{STATE}"])
            gcs.write_text(f"{self.uri}/{POINTER}", pointer)
        else:
            root = Path(self.uri)
            # A hidden `.ckpt-NNNNNN.tmp-*` sibling renamed into place (copied on a FUSE mount that cannot rename
            # folders); the pointer still moves last.
            with atomic_directory(root / name, "checkpoint") as tmp:
                _write_files(tmp, arrays, state)
            _atomic_write(root / POINTER, pointer.encode())
            _fsync_dir(root)
        self._prune(keep=name)
        return name

    def _prune(self, keep: str) -> None:
        """Delete all but the KEEP newest complete checkpoints (and leftovers of killed writes)."""
        complete = self.complete()
        old = set(self._listing()) - set(complete[:KEEP]) - {keep}
        if self.remote:
            for blob in gcs.list_blobs(self.uri + "/"):
                if blob.name.split("/")[-2] in old:
                    blob.delete()
            return
        root = Path(self.uri)
        for name in old:
            shutil.rmtree(root / name, ignore_errors=True)
        for entry in root.glob(".ckpt-*.tmp-*"):
            if entry.is_dir() and time.time() - entry.stat().st_mtime > 60:  # not a write in progress elsewhere
                shutil.rmtree(entry, ignore_errors=True)

    def load(self) -> tuple[str, dict[str, list[np.ndarray]], dict[str, Any]] | None:
        """The newest checkpoint that reads back: (name, arrays by group, state); None when there is none."""
        names = self.complete()
        for name in names:
            try:
                arrays, state = self._read(name)
            except Exception as exc:  # noqa: BLE001 (a truncated or corrupt file: try the one before)
                log.warning("checkpoint %s/%s cannot be read (%s: %s); trying the one before", self.uri, name,
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                continue
            if state.get("format") != FORMAT:
                log.warning("checkpoint %s/%s has format %r, not %r; ignored", self.uri, name, state.get("format"),
                            FORMAT)
                continue
            return name, arrays, state
        if names:
            log.warning("no readable checkpoint in %s: starting afresh", self.uri)
        return None

    def _read(self, name: str) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
        import numpy as np

        if self.remote:
            state = json.loads(gcs.read_text(f"{self.uri}/{name}/{STATE}"))
            data = gcs.read_bytes(f"{self.uri}/{name}/{ARRAYS}")
        else:
            state = json.loads((Path(self.uri) / name / STATE).read_text())
            data = (Path(self.uri) / name / ARRAYS).read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            flat = {key: npz[key] for key in npz.files}
        arrays: dict[str, list[np.ndarray]] = {}
        for group, count in state["arrays"].items():
            arrays[group] = [flat[f"{group}/{i:05d}"] for i in range(count)]
        return arrays, state

    def clear(self) -> None:
        """Delete the folder's checkpoints (the phase's output is written: nothing left to resume)."""
        if self.remote:
            for blob in gcs.list_blobs(self.uri + "/"):
                blob.delete()
        else:
            shutil.rmtree(self.uri, ignore_errors=True)


def _write_files(folder: Path, arrays: dict[str, Any], state: dict[str, Any]) -> None:
    import numpy as np

    flat = {f"{group}/{i:05d}": np.asarray(a) for group, values in arrays.items() for i, a in enumerate(values)}
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    _atomic_write(folder / ARRAYS, buffer.getvalue(), replace=False)
    state = {**state, "arrays": {group: len(values) for group, values in arrays.items()}}
    _atomic_write(folder / STATE, json.dumps(state).encode(), replace=False)  # last: the folder is complete


def _atomic_write(path: Path, data: bytes, replace: bool = True) -> None:
    """Write `data` to `path` and flush it to disk (through a temporary file and a rename when `replace`)."""
    target = path.with_name(f".{path.name}.tmp") if replace else path
    with open(target, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if replace:
        os.replace(target, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
