"""predict's inputs and outputs: listing the files (folder, gs:// prefix, CSV list: `Source.files()` of
components.core.sources), reading (`sources.read`) and checking each one on worker threads (header check, decode,
imagecheck's full decode for what TensorFlow cannot read), and writing the rows (.jsonl / .csv via a temporary file,
gs:// uploaded when complete).

Local files are read under components.core.safefiles' rule: regular files only (a device, FIFO or socket gets the row
`not_regular_file: ...`), at most `safefiles.MAX_FILE_BYTES`, and inside the input folder after `realpath` (a symlink
leading out: `outside_source: ...`); a file named by a CSV row must resolve inside the folder its name gives.

Split out of components/predict/step.py (the model, the predict loop, the CLI and the component), which re-exports
`list_inputs`, `Item`, `load_item`, `read_item`, `iter_items` and `RowWriter`.
"""

import csv
import io
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from kfp_finetune.components.core import gcs, safefiles, sources

# --- the inputs (components.core.sources: the folder, gs:// and CSV-list rules) -------------------------------------


def input_root(source: str) -> str | None:
    """The folder every local file of `source` must resolve inside (a folder input: itself, after realpath); None for
    a CSV list or gs:// (a listed file must then resolve inside its own folder)."""
    return sources.detect(source, "--input").input_root()


def list_inputs(source: str) -> tuple[Iterator[str], int | None]:
    """(the files to predict, their count when known up front)."""
    return sources.detect(source, "--input").files()


# --- reading and decoding one file (worker threads) ------------------------------------------------------------


class Item(NamedTuple):
    file: str
    data: Any = None  # decoded pixels [S, S, 3] float32, or encoded bytes for a bytes-only model
    skip_reason: str | None = None


def _read(file: str, gcs_client: Any, root: str | None) -> bytes:
    """The bytes of `file`; safefiles.UnsafeFile when a local file breaks the rule (see the module docstring)."""
    if root is None and not sources.is_uri(file):
        root = os.path.realpath(os.path.dirname(os.path.abspath(file)))
    return sources.read(file, root, gcs_client)


def _header_problem(data: bytes) -> str | None:
    """Cheap checks before a full decode: empty, not an image Pillow knows, over the pixel limit."""
    import warnings

    from PIL import Image

    from kfp_finetune.components.core import imagecheck

    if not data:
        return f"{imagecheck.CORRUPT}: empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:
        return f"{imagecheck.TOO_LARGE}: {exc}"
    except Exception as exc:  # Pillow raises many kinds on bad headers
        return f"{imagecheck.CORRUPT}: cannot decode: {imagecheck.exception_text(exc)}"
    if width * height > imagecheck.MAX_PIXELS:
        return (f"{imagecheck.TOO_LARGE}: {width}x{height} pixels is over the {imagecheck.MAX_PIXELS:,}-pixel "
                "limit (decompression bomb?)")
    return None


def _full_check(data: bytes) -> tuple[bytes | None, str | None]:
    """imagecheck's full decode of bytes already read: (RGB JPEG/PNG bytes, None) or (None, reason)."""
    from kfp_finetune.components.core import imagecheck

    result = imagecheck.decode_bytes(data)
    if not result.ok:
        return None, f"{result.reason}: {result.detail}" if result.detail else str(result.reason)
    return result.data, None


def _read_checked(file: str, gcs_client: Any = None, root: str | None = None) -> tuple[bytes, Item | None]:
    """The file's bytes, or a skipped Item when it cannot be read or its header is not an image's."""
    from kfp_finetune.components.core import imagecheck

    try:
        data = _read(file, gcs_client, root)
    except safefiles.UnsafeFile as exc:
        kind = imagecheck.UNREADABLE if exc.reason == safefiles.MISSING else exc.reason
        return b"", Item(file, skip_reason=f"{kind}: {exc.detail}"[:300])
    except Exception as exc:  # OSError locally, google.api_core errors for gs://
        return b"", Item(file, skip_reason=f"{imagecheck.UNREADABLE}: {type(exc).__name__}: {exc}"[:300])
    problem = _header_problem(data)
    return data, (Item(file, skip_reason=problem) if problem else None)


def load_item(file: str, size: int, want_bytes: bool, gcs_client: Any = None, root: str | None = None) -> Item:
    """Read, check and decode one file; never raises for a bad file (the Item carries the reason)."""
    import numpy as np
    import tensorflow as tf

    from kfp_finetune.components.core import imagecheck
    from kfp_finetune.components.core.dataset import decode_image

    data, skipped = _read_checked(file, gcs_client, root)
    if skipped is not None:
        return skipped
    for attempt in range(2):
        try:
            pixels = decode_image(tf.constant(data), size)
            return Item(file, data=data if want_bytes else np.asarray(pixels))
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            if attempt:
                return Item(file, skip_reason=f"{imagecheck.CORRUPT}: TensorFlow cannot decode it")
            converted, reason = _full_check(data)
            if reason:
                return Item(file, skip_reason=reason)
            data = converted
    raise AssertionError("unreachable")


# Formats tf.io.decode_image reads itself; others (TIFF, WebP, ...) are converted by imagecheck in the thread.
TF_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP"})


def read_item(file: str, gcs_client: Any = None, root: str | None = None) -> Item:
    """Read one file and check its header; `data` = bytes TensorFlow can decode (converted when needed)."""
    data, skipped = _read_checked(file, gcs_client, root)
    if skipped is not None:
        return skipped
    if _format(data) not in TF_FORMATS:
        converted, reason = _full_check(data)
        return Item(file, skip_reason=reason) if reason else Item(file, data=converted)
    return Item(file, data=data)


def _format(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except Exception:  # checked by _header_problem already
        return None


def iter_items(files: Iterator[str], size: int, want_bytes: bool, workers: int, window: int,
               decode: bool = True, root: str | None = None) -> Iterator[Item]:
    """load_item (or read_item when not `decode`) over `files` on a thread pool, in input order, with at most
    `window` files in flight; `root`: see `input_root`."""
    gcs_client = None
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="predict-read") as pool:
        for file in files:
            if gcs_client is None and gcs.is_gcs(file):
                gcs_client = gcs.client()
            pending.append(pool.submit(load_item, file, size, want_bytes, gcs_client, root) if decode
                           else pool.submit(read_item, file, gcs_client, root))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --- output ----------------------------------------------------------------------------------------------------


class RowWriter:
    """Rows to a .jsonl or .csv file, via a temporary file renamed (or uploaded, for gs://) on `close`."""

    def __init__(self, output: str, top_k: int) -> None:
        self.output, self.top_k = output, top_k
        self.csv = Path(output).suffix.lower() == ".csv"
        if gcs.is_gcs(output):
            self._dir = tempfile.mkdtemp(prefix="predict-")
            self.local = Path(self._dir) / Path(output).name
        else:
            self._dir = None
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            self.local = Path(output)
        self.tmp = self.local.with_name(f".{self.local.name}.part")
        self._f = open(self.tmp, "w", newline="")
        if self.csv:
            self._csv = csv.writer(self._f)
            head = ["file"]
            for i in range(1, top_k + 1):
                head += [f"class_{i}", f"probability_{i}"]
            self._csv.writerow([*head, "skip_reason"])

    def write(self, file: str, classes: list[str], probabilities: list[float], skip_reason: str | None) -> None:
        if self.csv:
            row: list[Any] = [file]
            for i in range(self.top_k):
                row += [classes[i], f"{probabilities[i]:.6f}"] if i < len(classes) else ["", ""]
            self._csv.writerow([*row, skip_reason or ""])
        else:
            self._f.write(json.dumps({"file": file, "classes": classes,
                                      "probabilities": [round(p, 6) for p in probabilities],
                                      "skip_reason": skip_reason}) + "\n")

    def close(self) -> None:
        self._f.close()
        os.replace(self.tmp, self.local)
        if self._dir is not None:
            gcs.upload_many([self.local], [self.output])
            shutil.rmtree(self._dir, ignore_errors=True)

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

