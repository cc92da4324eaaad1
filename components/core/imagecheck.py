"""Per-file work of the ingest step, run in worker processes: hash a file, decode it, convert it if needed.

The decode check: every image is decoded by Pillow (`im.load()`); a file that fails is refused as corrupt. When the
bytes are stored as they are and they are JPEG, the pixels themselves are not needed at full size, so libjpeg decodes
them at a reduced scale (`Image.draft`: DCT scaling, 1/2 to 1/8): the entropy decoding of every coefficient of every
block still runs (it is sequential: a block's end is only found by decoding it), only the inverse DCT and the
colour conversion are smaller. So it refuses exactly what the full decode refuses: truncated data, a bad marker in
the entropy-coded data (tests/unit/test_imagecheck_draft.py). As with the full decode, libjpeg only warns about
bytes that decode to wrong coefficients (a flipped bit, garbage without a 0xFF): Pillow accepts those images, with
or without the reduction. Images that are converted or resized are decoded in full (their pixels are stored).

Kept apart from `components.ingest.step` so that worker processes import only the standard library, numpy and Pillow
(not kfp), which keeps their start-up cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.components.core import safefiles

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff"}
)
# Pillow's own decompression-bomb threshold (~89.5 megapixels); anything above is skipped, not decoded.
MAX_PIXELS = 89_478_485
# Formats whose bytes are stored unchanged (when the mode is one tf.io.decode_image reads as RGB unaided).
KEEP_FORMATS = frozenset({"JPEG", "PNG"})
KEEP_MODES = frozenset({"RGB", "L"})
# Converted images from lossy sources become JPEG, the rest PNG.
LOSSY_FORMATS = frozenset({"JPEG", "MPO", "WEBP"})
JPEG_QUALITY = 95
READ_CHUNK = 1 << 20

# Skip reasons (also the keys of `skipped_counts` in ingest_report.json).
CORRUPT = "corrupt"
TOO_LARGE = "too_large"
UNREADABLE = "unreadable"
BAD_REASONS = frozenset({CORRUPT, TOO_LARGE, UNREADABLE})


_DIE_WITH_PARENT_ARMED = False
_AT_FORK_REGISTERED = False
_FORK_PARENT: int | None = None  # set in a parent just before each fork (once registered): the child's real parent


def _set_pdeathsig() -> None:
    """Linux: the kernel sends SIGKILL to this process when the thread that forked it ends."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _before_fork_in_parent() -> None:
    global _FORK_PARENT
    _FORK_PARENT = os.getpid()


def _after_fork_in_child() -> None:
    if _DIE_WITH_PARENT_ARMED:
        _set_pdeathsig()
        if os.getppid() != _FORK_PARENT:  # the parent died before the line above: no signal will come
            os._exit(1)


@contextlib.contextmanager
def children_die_with_parent() -> Iterator[None]:
    """Processes forked inside the block get PR_SET_PDEATHSIG in the child right after the fork, before any Python
    code of theirs runs (`os.register_at_fork`): a pool worker that is still starting up when its parent is killed
    (a CI run saw one outlive a SIGKILLed ingest) dies with it too. Forks outside the block are untouched."""
    import sys

    global _DIE_WITH_PARENT_ARMED, _AT_FORK_REGISTERED
    if not sys.platform.startswith("linux"):
        yield
        return
    if not _AT_FORK_REGISTERED:
        os.register_at_fork(before=_before_fork_in_parent, after_in_child=_after_fork_in_child)
        _AT_FORK_REGISTERED = True
    _DIE_WITH_PARENT_ARMED = True
    try:
        yield
    finally:
        _DIE_WITH_PARENT_ARMED = False


def die_with_parent() -> None:
    """Pool initializer: end this worker when the process that started it dies.

    A killed ingest (SIGKILL) cannot shut its pool down, and forked workers keep a copy of the task pipe's write end,
    so they would wait on it forever. On Linux the kernel sends SIGKILL to the worker when its parent goes
    (PR_SET_PDEATHSIG); the check after it covers a parent that died before the call.
    """
    import signal
    import sys

    # A forked worker inherits the parent's Python SIGTERM handler (components/core/faults.py): put the default back,
    # so that a SIGTERM sent to the whole group ends the worker while the parent cleans up.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not sys.platform.startswith("linux"):
        return
    # The process that forked this one, as recorded before the fork: os.getppid() here would already name the new
    # parent (PID 1 or a subreaper) if the ingest was killed while this worker was starting, and the watchdog below
    # would then wait for that one (a killed-ingest test saw such a worker outlive its parent by 20 s).
    parent = _FORK_PARENT if _FORK_PARENT is not None else os.getppid()
    _set_pdeathsig()
    if os.getppid() != parent:
        os._exit(1)
    # PR_SET_PDEATHSIG fires when the *thread* that forked the worker ends (and not at all across some container
    # runtimes' PID namespaces): a watchdog thread also ends the worker once it has been re-parented.
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class FileHash:
    sha256: str | None
    size: int
    error: str | None = None
    reason: str | None = None  # safefiles' reason when the file was refused (not_regular_file, too_large, ...)


@dataclass(frozen=True)
class ImageResult:
    """The outcome of decoding one file: the bytes to store, or why it was rejected."""

    ok: bool
    data: bytes | None = None
    format: str | None = None  # JPEG or PNG (what `data` holds)
    width: int = 0
    height: int = 0
    converted: bool = False  # re-encoded from another format or mode
    resized: bool = False
    reason: str | None = None
    detail: str = ""
    stats: Any = None  # what `inspect` returned for the decoded image (ingest: dataprofile.ImageStats), or None


def hash_file(path: str) -> FileHash:
    """SHA-256 of a regular file within safefiles' size bound (a FIFO or device swapped in is refused, not read)."""
    return read_and_hash(path)[0]


def read_and_hash(path: str) -> tuple[FileHash, bytes | None]:
    """`hash_file` and the bytes it hashed (None when the file was refused or could not be read)."""
    try:
        data = safefiles.read_bytes(path)
    except safefiles.UnsafeFile as exc:
        return FileHash(None, 0, exc.detail, exc.reason), None
    except OSError as exc:
        return FileHash(None, 0, _os_error(exc)), None
    return hash_bytes(data), data


def _os_error(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def exception_text(exc: BaseException) -> str:
    """An exception's message without object addresses (Pillow says "cannot identify image file <_io.BytesIO object
    at 0x7f...>"): skip reasons must be the same on every run."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    return text or type(exc).__name__


def hash_bytes(data: bytes) -> FileHash:
    """`hash_file` on bytes already read."""
    return FileHash(hashlib.sha256(data).hexdigest(), len(data))


def hash_batch(paths: list[str]) -> list[FileHash]:
    return [hash_file(p) for p in paths]


def _to_rgb(im):  # noqa: ANN001, ANN202  (PIL.Image.Image in, PIL.Image.Image out)
    """Any Pillow mode -> 8-bit RGB; transparency is composited onto white; 16/32-bit grey is scaled, not clipped."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha or (mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


# inspect(data, image, (width, height)): a hook called on the loaded source image (see decode_bytes). It may carry
# `draft_side` (pixels), the smallest side it needs: then kept JPEG bytes are decoded at the largest libjpeg DCT scale
# (1/2, 1/4, 1/8) that leaves both sides at least that long, and `image` is that reduced image.
Inspect = Callable[[bytes, Any, tuple[int, int]], Any]


def decode_image(path: str, max_side: int | None = None, inspect: Inspect | None = None) -> ImageResult:
    """Decode `path` (the decode check); return its bytes unchanged when they are RGB/grey JPEG or PNG within
    `max_side`, otherwise RGB JPEG/PNG bytes re-encoded from the fully decoded pixels. `inspect(data, image, size)`,
    when given, is called on the loaded source image (before any conversion; reduced by DCT scaling to about
    `inspect.draft_side` when kept JPEG bytes, see Inspect) with the source's (width, height), and its result is
    the ImageResult's `stats`."""
    try:
        data = safefiles.read_bytes(path)
    except safefiles.UnsafeFile as exc:
        return ImageResult(False, reason=exc.reason, detail=exc.detail)
    except OSError as exc:
        return ImageResult(False, reason=UNREADABLE, detail=_os_error(exc))
    return decode_bytes(data, max_side, inspect)


def decode_bytes(data: bytes, max_side: int | None = None, inspect: Inspect | None = None) -> ImageResult:
    """`decode_image` on bytes already read (the Beam ingest reads them through Beam's filesystems): the one
    implementation of the decode check, conversion and resizing for every runner. `inspect`: see decode_image (a
    module-level function, so that it pickles by reference to pool workers)."""
    from PIL import Image

    if not data:
        return ImageResult(False, reason=CORRUPT, detail="empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    return ImageResult(
                        False, reason=TOO_LARGE, width=width, height=height,
                        detail=f"{width}x{height} pixels is over the {MAX_PIXELS:,}-pixel limit (decompression bomb?)",
                    )
                fmt = im.format
                too_big = bool(max_side) and max(width, height) > max_side
                keep = fmt in KEEP_FORMATS and im.mode in KEEP_MODES and not too_big
                if keep and fmt == "JPEG":  # no pixels needed at full size: a reduced decode (see module docstring)
                    side = getattr(inspect, "draft_side", 1)
                    im.draft(im.mode, (side, side))
                im.load()  # the decode: truncated and corrupt files fail here
                stats = inspect(data, im, (width, height)) if inspect is not None else None
                if keep:
                    return ImageResult(True, data=data, format=fmt, width=width, height=height, stats=stats)
                rgb = _to_rgb(im)
    except Image.DecompressionBombError as exc:
        return ImageResult(False, reason=TOO_LARGE, detail=str(exc))
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        return ImageResult(False, reason=CORRUPT, detail=f"cannot decode: {exception_text(exc)}")
    if too_big:
        scale = max_side / max(width, height)
        rgb = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    out_format = "JPEG" if fmt in LOSSY_FORMATS else "PNG"
    buf = io.BytesIO()
    if out_format == "JPEG":
        rgb.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        rgb.save(buf, "PNG")
    converted = not (fmt in KEEP_FORMATS and im.mode in KEEP_MODES)
    return ImageResult(
        True, data=buf.getvalue(), format=out_format, width=rgb.width, height=rgb.height,
        converted=converted, resized=too_big, stats=stats,
    )


def decode_batch(paths: list[str], max_side: int | None, inspect: Inspect | None = None) -> list[ImageResult]:
    return [decode_image(p, max_side, inspect) for p in paths]
