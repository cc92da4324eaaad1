"""registry_store: what must hold at a push destination (a local folder or a gs:// prefix) when runs overlap.

- A version folder is claimed exclusively before anything is written into it. gs://: `<version>/claim.json` created
  with `if_generation_match=0` (GCS answers 412 to the second creator); local: `os.mkdir` of the version folder,
  under an flock on `.<version>.push.lock` held until the push ends, so that a claim whose push was killed (no
  version.json, its lock free) is taken over by the next push of that version instead of blocking it forever.
- LATEST is read together with a token and moved only by compare-and-swap from the value the caller expects.
  gs://: the token is the object's generation and the swap is an upload with `if_generation_match=<generation>`
  (0 when there is no LATEST yet); local: the swap holds an flock on `.LATEST.lock`, re-reads LATEST and replaces it
  (temp file, then rename). Readers never lock: the LATEST file and object are always whole.
- A version that LATEST has named gets `<version>/promoted.json`, so `versions` can tell a version that was pushed
  but never promoted (a lost swap, a failed LATEST write) from a former champion.
- Every read failure (missing permission, a version.json that is not JSON) is a one-line UserError naming the URI.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kfp_finetune.components.core import faults, fsutil, gcs
from kfp_finetune.components.core.errors import UserError

log = logging.getLogger("kfp_finetune.registry")

LATEST_FILE = "LATEST"
VERSION_FILE = "version.json"
CLAIM_FILE = "claim.json"  # gs:// only: the exclusive claim of a version folder
PROMOTED_FILE = "promoted.json"
LOCK_FILE = ".LATEST.lock"  # local only: held while LATEST is compared and swapped
_SWAP_ATTEMPTS = 5


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a gs:// prefix or a local path."""
    return "/".join([base.rstrip("/"), *parts]) if gcs.is_gcs(base) else str(Path(base, *parts))


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _blob(uri: str) -> Any:
    bucket, name = gcs.split_uri(uri)
    return gcs.client().bucket(bucket).blob(name)


# --- reading ---------------------------------------------------------------------------------------------------


def read_text(uri: str, push_to: str) -> str | None:
    """The text of a file or object of the destination; None when it does not exist; a one-line UserError else."""
    if gcs.is_gcs(uri):
        return gcs.read_text_if_exists(uri, what=f"--push-to {push_to}")
    try:
        return Path(uri).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--push-to {push_to}: cannot read {uri} ({_one_line(exc)})") from exc


def parse_record(uri: str, text: str, push_to: str) -> dict[str, Any]:
    """version.json's content as a dict, or a one-line UserError saying what is wrong with it."""
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--push-to {push_to}: {uri} is not valid JSON ({exc}); repair it or delete that version "
                        "folder") from exc
    if not isinstance(record, dict):
        raise UserError(f"--push-to {push_to}: {uri} is not a JSON object; repair it or delete that version folder")
    return record


def read_record(push_to: str, version: str) -> dict[str, Any] | None:
    """`<push_to>/<version>/version.json`, or None when the version is not complete."""
    uri = join(push_to, version, VERSION_FILE)
    text = read_text(uri, push_to)
    return None if text is None else parse_record(uri, text, push_to)


def child_names(push_to: str) -> list[str]:
    """The names of every folder directly under the destination, complete or not."""
    if gcs.is_gcs(push_to):
        bucket, prefix = gcs.split_uri(push_to.rstrip("/"))
        prefix = f"{prefix}/" if prefix else ""
        try:
            pages = gcs.client().list_blobs(bucket, prefix=prefix, delimiter="/")
            for _ in pages:  # the prefixes fill in as the pages are read
                pass
            return sorted(p[len(prefix):].rstrip("/") for p in pages.prefixes)
        except Exception as exc:  # google.api_core errors, connection errors
            raise UserError(f"--push-to {push_to}: cannot list it ({_one_line(exc)})") from exc
    base = Path(push_to)
    try:
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    except OSError as exc:
        raise UserError(f"--push-to {push_to}: cannot list it ({_one_line(exc)})") from exc


@dataclass(frozen=True)
class Latest:
    """What LATEST names (None: no LATEST yet) and, on gs://, the generation it was read at (0: no object)."""

    version: str | None
    generation: int = 0


def read_latest(push_to: str) -> Latest:
    """LATEST with the token a compare-and-swap needs."""
    uri = join(push_to, LATEST_FILE)
    if not gcs.is_gcs(push_to):
        text = read_text(uri, push_to)
        return Latest((text or "").strip() or None)
    from google.api_core.exceptions import NotFound, PreconditionFailed

    blob = _blob(uri)
    try:
        for _ in range(_SWAP_ATTEMPTS):
            try:
                blob.reload()
                generation = int(blob.generation)
                data = blob.download_as_bytes(if_generation_match=generation)
            except NotFound:
                return Latest(None, 0)
            except PreconditionFailed:  # replaced between the two requests: read again
                continue
            return Latest(data.decode("utf-8").strip() or None, generation)
        raise RuntimeError("it changed on every read")
    except UserError:
        raise
    except Exception as exc:  # google.api_core errors, connection errors, bad bytes
        raise UserError(f"--push-to {push_to}: cannot read {uri} ({_one_line(exc)})") from exc


# --- claiming a version folder ---------------------------------------------------------------------------------


def claim(push_to: str, version: str) -> bool:
    """Claim `<push_to>/<version>/` for one push. False when it is taken (claimed by another push, or not empty)."""
    target = join(push_to, version)
    if gcs.is_gcs(push_to):
        from google.api_core.exceptions import PreconditionFailed

        if gcs.list_blobs(target):  # a folder from before claims existed, or a leftover
            return False
        token = uuid.uuid4().hex
        body = json.dumps({"version": version, "claimed": now_utc(), "host": socket.gethostname(),
                           "pid": os.getpid(), "token": token})
        blob = _blob(join(target, CLAIM_FILE))
        try:
            blob.upload_from_string(body, content_type="application/json", if_generation_match=0)
        except PreconditionFailed:
            # Ours after all when a retried request had already created it (the same token), else another push's.
            text = gcs.read_text_if_exists(join(target, CLAIM_FILE), what=f"--push-to {push_to}") or "{}"
            with contextlib.suppress(ValueError, AttributeError):
                return json.loads(text).get("token") == token
            return False
        except Exception as exc:  # google.api_core errors, connection errors
            raise UserError(f"--push-to {push_to}: cannot claim {target} ({_one_line(exc)})") from exc
        return True
    base = Path(push_to)
    try:
        base.mkdir(parents=True, exist_ok=True)
        held = _push_lock(base, version)
        if held is None:
            return False  # a push of this very version is in flight
        try:
            (base / version).mkdir()
        except FileExistsError:
            if not _take_over(base, version, fresh=held[1]):
                _unlock(base, version, held[0])
                return False
        except BaseException:
            _unlock(base, version, held[0])
            raise
        _HELD[str(base / version)] = held[0]
    except OSError as exc:
        raise UserError(f"--push-to {push_to}: cannot create {target} ({_one_line(exc)})") from exc
    return True


# Local claims: the push holds an flock on `.<version>.push.lock` from before it creates the folder until it ends,
# so a folder without version.json whose lock file is there but free was claimed by a push that was killed.
_HELD: dict[str, int] = {}


def _push_lock(base: Path, version: str) -> tuple[int, bool] | None:
    """(fd, whether this call created the lock file) with the lock held, or None when another push holds it."""
    path = base / f".{version}.push.lock"
    try:
        fd, fresh = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        fd, fresh = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd, fresh


def _take_over(base: Path, version: str, fresh: bool) -> bool:
    """Whether an existing claimed folder is ours to reuse: no version.json, and a lock file left by a push that is
    gone (a folder without one predates these locks, or is someone's own: never taken)."""
    folder = base / version
    if fresh or (folder / VERSION_FILE).exists() or not folder.is_dir():
        return False
    for leftover in [*base.glob(f".{version}.tmp-*"), *folder.iterdir()]:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    log.warning("%s: version %s was claimed by a push that was killed before it finished (no %s, its lock free); "
                "taking the claim over", base, version, VERSION_FILE)
    return True


def _unlock(base: Path, version: str, fd: int) -> None:
    with contextlib.suppress(OSError):
        (base / f".{version}.push.lock").unlink()
    os.close(fd)


def release_claim(push_to: str, version: str) -> None:
    """End a local push's hold on its version (no-op on gs://, where claim.json is the claim)."""
    if gcs.is_gcs(push_to):
        return
    fd = _HELD.pop(str(Path(push_to) / version), None)
    if fd is not None:
        _unlock(Path(push_to), version, fd)


# --- LATEST by compare-and-swap --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Swap:
    """The outcome of a compare-and-swap: whether LATEST moved, and what it names now."""

    swapped: bool
    latest: str | None


def swap_latest(push_to: str, expected: str | None, new: str) -> Swap:
    """Point LATEST at `new` only if it still names `expected` (None: no LATEST yet).

    A lost swap (LATEST names something else) returns Swap(False, what it names); a failed write raises a one-line
    UserError with LATEST unchanged.
    """
    if gcs.is_gcs(push_to):
        return _swap_gcs(push_to, expected, new)
    base = Path(push_to)
    with _locked(push_to):
        current = read_latest(push_to).version
        if current != expected:
            return Swap(False, current)
        tmp = base / f".{LATEST_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_text(new + "\n")
            os.replace(tmp, base / LATEST_FILE)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            space = (f": needs {len(new) + 1} B, {faults.human(faults.free_bytes(base))} free"
                     if faults.is_disk_full(exc) else "")
            raise UserError(f"--push-to {push_to}: cannot write {base / LATEST_FILE} ({_one_line(exc)}{space}); "
                            f"LATEST unchanged") from exc
    log.info("LATEST: %s -> %s", expected, new)
    return Swap(True, new)


def _swap_gcs(push_to: str, expected: str | None, new: str) -> Swap:
    from google.api_core.exceptions import PreconditionFailed

    uri = join(push_to, LATEST_FILE)
    for attempt in range(_SWAP_ATTEMPTS):
        current = read_latest(push_to)
        if current.version != expected:
            # After a 412: our own write when a retried request had already gone through.
            return Swap(attempt > 0 and current.version == new, current.version)
        try:
            _blob(uri).upload_from_string(new + "\n", content_type="text/plain",
                                          if_generation_match=current.generation)
        except PreconditionFailed:
            continue  # rewritten since we read it (perhaps with the same name): compare again
        except Exception as exc:  # google.api_core errors (403 ...), connection errors
            raise UserError(f"--push-to {push_to}: cannot write {uri} ({_one_line(exc)})") from exc
        log.info("LATEST: %s -> %s", expected, new)
        return Swap(True, new)
    return Swap(False, read_latest(push_to).version)


@contextlib.contextmanager
def _locked(push_to: str) -> Iterator[None]:
    """An exclusive flock on `<push_to>/.LATEST.lock` (released when the process dies, so it never goes stale)."""
    base = Path(push_to)
    try:
        base.mkdir(parents=True, exist_ok=True)
        fd = os.open(base / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"--push-to {push_to}: cannot open {base / LOCK_FILE} ({_one_line(exc)})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def mark_promoted(push_to: str, version: str, previous: str | None) -> None:
    """Record that LATEST has named `version` (best effort: LATEST has already moved; a failure is a warning)."""
    uri = join(push_to, version, PROMOTED_FILE)
    text = json.dumps({"version": version, "promoted": now_utc(), "previous": previous}) + "\n"
    try:
        if gcs.is_gcs(uri):
            gcs.write_text(uri, text, what=f"--push-to {push_to}")
        else:
            tmp = Path(f"{uri}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text(text)
            os.replace(tmp, uri)
    except (UserError, OSError) as exc:
        log.warning("LATEST names %s, but %s could not be written (%s): once LATEST moves on, `versions` will "
                    "list %s as not promoted", version, uri, _one_line(exc), version)


# --- writing a version ------------------------------------------------------------------------------------------


def upload_version(local_dir: Path, record: Path, push_to: str, target: str, retry_seconds: float) -> None:
    """gs://: upload the version's files, its version.json last; a failure deletes what was written (best effort)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p != local_dir / VERSION_FILE)
    retry = DEFAULT_RETRY.with_timeout(retry_seconds)
    try:
        gcs.upload_many(files, [f"{target}/{p.relative_to(local_dir).as_posix()}" for p in files], retry=retry)
        gcs.upload_many([record], [f"{target}/{VERSION_FILE}"], retry=retry)
    except UserError as exc:
        delete_partial(target, retry)
        raise UserError(f"push to {target} failed, LATEST not changed: {exc}") from exc
    log.info("pushed %d files to %s", len(files) + 1, target)


def place_local(local_dir: Path, record: Path, target: Path) -> None:
    """Local: build the version beside the claimed (empty) folder, then rename it over the claim. A failure (a full
    disk included: one line naming the space needed) deletes the copy and gives the claim back."""
    staging: Path | None = None
    try:
        staging = fsutil.fresh_name(target.parent, f".{target.name}.tmp-")  # named first: see fresh_name
        staging.mkdir(mode=0o700)
        shutil.copytree(local_dir, staging, dirs_exist_ok=True)
        shutil.copy2(record, staging / VERSION_FILE)
        os.replace(staging, target)  # replaces the empty folder that is our claim
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            target.rmdir()  # give the claim back: a failed push leaves nothing
        if faults.is_disk_full(exc):
            raise UserError(f"push to {target} failed, LATEST not changed: no space left on device (needs about "
                            f"{faults.human(faults.tree_bytes(local_dir))}, "
                            f"{faults.human(faults.free_bytes(target.parent))} free there); nothing partial was "
                            "left") from exc
        if isinstance(exc, OSError):
            raise UserError(f"push to {target} failed, LATEST not changed ({_one_line(exc)})") from exc
        raise


def delete_partial(target: str, retry: Any = None) -> None:
    """Best effort: delete a partial version (it may be unreachable too; it stays invisible without version.json).
    `retry`: the push's own retry policy, so that a destination that stopped answering costs the cleanup no more
    than it cost the upload (None: the client's default, up to 120 s)."""
    kwargs = {} if retry is None else {"retry": retry}
    try:
        for blob in gcs.list_blobs(target, retry=retry):
            blob.delete(**kwargs)
        log.info("deleted the partial version %s", target)
    except Exception as exc:  # the destination may be the very thing that failed
        log.warning("could not delete the partial version %s (%s); it has no %s, so nothing uses it",
                    target, exc, VERSION_FILE)
