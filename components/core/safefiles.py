"""The one rule for reading files a source hands us (ingest, fingerprint, predict): only regular files under the
source root after `realpath`, no bigger than `MAX_FILE_BYTES`; and manifests read as UTF-8 with or without a BOM.

A folder someone else fills can hold anything: a symlink `x.jpg -> /etc/shadow` or to `/dev/zero` (read forever), a
FIFO named `.jpg` (open blocks until a writer comes), a socket, a symlinked folder pointing outside. `check` says
which of these a path is without opening it; `read_bytes` opens non-blocking, re-checks the opened file (a swap
between the check and the open changes nothing) and reads at most the bound. Standard library only: ingest's worker
processes import this module.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

# Skip reasons (keys of ingest_report.json's skipped_counts, prefixes of predict's skip_reason).
OUTSIDE_SOURCE = "outside_source"  # a symlink (or a name) that leads out of the source root
NOT_REGULAR = "not_regular_file"  # a device, FIFO, socket (or a folder named like an image)
TOO_LARGE = "too_large"  # the same key as imagecheck's pixel-count limit
MISSING = "missing"  # nothing there (a dangling symlink, a file removed after listing)

# No image a classifier trains on comes near this; a bigger file is skipped rather than read into memory.
MAX_FILE_BYTES = 256 << 20


@dataclass(frozen=True)
class FileCheck:
    """`ok`: the file may be read at `real`; otherwise `reason` (one of the constants above) and `detail`."""

    real: str
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def inside(path: str, root: str) -> bool:
    """Whether `path` is `root` or below it (both already real, absolute paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def real_root(root: str | os.PathLike) -> str:
    return os.path.realpath(root)


def check(path: str | os.PathLike, root: str | None = None, max_bytes: int = MAX_FILE_BYTES) -> FileCheck:
    """Whether `path` may be read: it resolves (symlinks followed) to a regular file of at most `max_bytes`, inside
    `root` (a `real_root`) when one is given. Never opens the file."""
    real = os.path.realpath(path)
    if root is not None and not inside(real, root):
        return FileCheck(real, OUTSIDE_SOURCE, f"resolves to {real}, outside {root}")
    try:
        st = os.stat(real)
    except OSError as exc:
        return FileCheck(real, MISSING, f"{type(exc).__name__}: {exc.strerror or exc}")
    return check_stat(real, st, max_bytes)


def check_stat(real: str, st: os.stat_result, max_bytes: int = MAX_FILE_BYTES) -> FileCheck:
    """`check`'s verdict from a stat already taken of the file at the real path `real` (symlinks followed)."""
    if not stat.S_ISREG(st.st_mode):
        return FileCheck(real, NOT_REGULAR, f"{file_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        return FileCheck(real, TOO_LARGE, f"{st.st_size:,} bytes is over the {max_bytes:,}-byte limit")
    return FileCheck(real)


class UnsafeFile(OSError):
    """`read_bytes` refused a file; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_bytes(path: str | os.PathLike, root: str | None = None, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path` under the rules of `check`; UnsafeFile when they forbid it, OSError when it cannot be read.

    Opened with O_NONBLOCK (a FIFO swapped in after `check` does not block the open), then fstat'ed: what is read is
    what was checked, and at most `max_bytes` + 1 bytes are ever read.

    Without a `root` there is no containment to check: one stat (symlinks followed) says whether the path is a
    regular file within the bound before it is opened (a device is never opened: opening some has effects), instead
    of the realpath walk over every component (measured: a third of the time to read a small photo). Anything else,
    or a failed open, goes through `check` for the same verdict and detail as before."""
    if root is None:
        try:
            fast = check_stat(os.fspath(path), os.stat(path), max_bytes).ok
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)) if fast else -1
        except OSError:
            fd = -1  # the slow path below gives the verdict
        if fd >= 0:
            try:
                return _read_checked(fd, os.fspath(path), max_bytes)
            finally:
                os.close(fd)
    found = check(path, root, max_bytes)
    if not found.ok:
        raise UnsafeFile(found.reason or "", found.detail)
    fd = os.open(found.real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        return _read_checked(fd, found.real, max_bytes)
    finally:
        os.close(fd)


def _read_checked(fd: int, real: str, max_bytes: int) -> bytes:
    st = os.fstat(fd)
    opened = check_stat(real, st, max_bytes)
    if not opened.ok:
        raise UnsafeFile(opened.reason or "", opened.detail)
    # The first read asks for the size fstat gave plus one byte: a regular file returns less only at its end, so
    # the usual file takes one read (asking for 1 MiB each time cost a 1 MiB allocation per small photo, measured
    # 40 % of the read's time on the flowers photos). A file that grew since the fstat is read on in 1 MiB chunks.
    chunks, size, want = [], 0, st.st_size + 1
    while size <= max_bytes:
        ask = min(want, max_bytes + 1 - size)
        chunk = os.read(fd, ask)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if len(chunk) < ask:
            break
        want = 1 << 20
    if size > max_bytes:  # it grew after the fstat
        raise UnsafeFile(TOO_LARGE, f"over the {max_bytes:,}-byte limit")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def decode_text(data: bytes, what: str) -> str:
    """UTF-8 text with or without a BOM. ValueError naming `what`'s line and column when a byte is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(f"{what} line {line}: byte 0x{data[exc.start]:02x} at column {column} is not UTF-8; "
                         "save the file as UTF-8") from None


def read_text(path: str | os.PathLike, what: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A manifest / list file as text (`read_bytes` + `decode_text`); ValueError or OSError on failure."""
    return decode_text(read_bytes(path, None, max_bytes), what)


def join_inside(root: str | os.PathLike, name: str, what: str) -> str:
    """`root/name` for a name that comes from outside (an object name, a manifest row); ValueError when it would
    leave `root` (`..`, an absolute name, a name starting with `/`)."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or os.path.isabs(name) or any(p in (".", "..") for p in parts) or not name:
        raise ValueError(f"{what}: name {name!r} would leave {root}")
    return os.path.join(os.fspath(root), *[p for p in parts if p])
