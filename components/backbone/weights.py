"""Where a backbone's weights file comes from: the Keras cache, the mirror (KFP_FINETUNE_WEIGHTS_MIRROR, a folder
or gs:// prefix) or the public URL for ImageNet weights, or a user's URI; each checked against Keras's hash and the
user's sha256. `components.backbone.step` answers keras.applications' requests for weights files with these.
"""

import hashlib
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.components.core import gcs, settings
from kfp_finetune.components.core.errors import UserError

log = logging.getLogger("kfp_finetune.components.backbone.step")

URL_TIMEOUT_S = 10.0  # per network operation; offline DNS/connect failures come back well within 30 s
# Families whose ImageNet file name depends on the input size; the conv weights of one size fit every size.
SIZE_DEPENDENT_FILES = re.compile(r"^(mobilenet_.+?_)(\d{2,3})((?:_tf)?(?:_no_top)?\.h5)$")
SIZE_VARIANTS = (224, 192, 160, 128, 96)


@dataclass
class WeightsFile:
    path: Path
    source: str  # cache | mirror | url | uri
    file: str
    uri: str
    sha256: str
    verified: bool
    note: str | None = None


def _digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324  (md5 only to compare with Keras's own hashes)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _check(path: Path, where: str, keras_hash: str | None, user_sha256: str | None) -> tuple[str, bool, str]:
    """Verify `path` against Keras's hash (md5 or sha256, told apart by length) and --weights-sha256.

    Returns (sha256, verified, how). A --weights-sha256 mismatch raises UserError; a Keras-hash mismatch raises
    `_KerasHashMismatch` (the caller decides: skip a stale cache entry, or fail).
    """
    sha256, md5 = _digests(path)
    how = []
    if user_sha256 is not None:
        if sha256 != user_sha256:
            raise UserError(
                f"--weights-sha256 mismatch for {where}: expected {user_sha256}, the file has {sha256}; "
                "check the file or the hash"
            )
        how.append("--weights-sha256")
    if keras_hash:
        expected = keras_hash.lower()
        actual = sha256 if len(expected) == 64 else md5
        if actual != expected:
            raise _KerasHashMismatch(f"{where} does not match Keras's known hash {expected} (it has {actual})")
        how.append(f"Keras's {'sha256' if len(expected) == 64 else 'md5'}")
    return sha256, bool(how), " and ".join(how)


class _KerasHashMismatch(UserError):
    pass


def _resolve_host(url: str, timeout: float) -> None:
    """Fail within `timeout` when the URL's host name cannot be resolved (urlopen's timeout does not cover DNS).

    Skipped behind a proxy, where the proxy resolves names.
    """
    import socket
    import threading
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    if not parsed.hostname or urllib.request.getproxies().get(parsed.scheme):
        return
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(parsed.hostname, parsed.port or 443)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise urllib.error.URLError(f"DNS lookup of {parsed.hostname} took over {timeout:g} s")
    if outcome[0] is not None:
        raise urllib.error.URLError(outcome[0])


def _download_url(url: str, dest: Path, timeout: float = URL_TIMEOUT_S) -> None:
    """Download `url` to `dest` (via a temp file beside it) with a progress bar; UserError when unreachable."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        _resolve_host(url, timeout)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:  # noqa: S310
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        tmp.replace(dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot download {url}: {reason}") from exc


def _fetch_gcs(uri: str, dest: Path) -> bool:
    """Download a gs:// object to `dest`; False when it does not exist, UserError when GCS cannot be reached."""
    bucket, name = gcs.split_uri(uri)
    try:
        blob = gcs.client().bucket(bucket).blob(name)
        if not blob.exists():
            return False
    except Exception as exc:  # google.api_core / auth / connection errors
        raise UserError(f"cannot reach {uri}: {exc}") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    gcs.download_file(uri, tmp)
    tmp.replace(dest)
    return True


def _candidates(fname: str, family: str) -> list[str]:
    """The requested file first, then (MobileNet v1/v2) the same alpha's files for other input sizes."""
    names = [fname]
    match = SIZE_DEPENDENT_FILES.match(fname)
    if match and family in ("mobilenet", "mobilenet_v2"):
        names += [f"{match[1]}{s}{match[3]}" for s in SIZE_VARIANTS if str(s) != match[2]]
    return names


def resolve_imagenet(
    fname: str, origin: str, keras_hash: str | None, family: str, user_sha256: str | None
) -> WeightsFile:
    """Find Keras's file `fname`: the Keras cache, then the mirror, then `origin`; UserError when nowhere."""
    cache = settings.keras_cache_dir()
    mirror = settings.weights_mirror()
    names = _candidates(fname, family)

    def found(path: Path, source: str, name: str, uri: str) -> WeightsFile | None:
        # Keras's hash belongs to the requested file only; a size variant is checked by sha256 alone (if given).
        expected = keras_hash if name == fname else None
        try:
            sha256, verified, how = _check(path, uri, expected, user_sha256)
        except _KerasHashMismatch as exc:
            if source == "cache":
                log.warning("ignoring the cached %s: %s", name, exc)
                return None
            raise
        note = None
        if name != fname:
            note = (
                f"Keras names {fname} for this input size; {name} (same architecture, trained at another input "
                "size) was used: the conv weights are identical in shape and serve any size"
            )
        if how:
            note = f"{note + '; ' if note else ''}verified by {how}"
        return WeightsFile(path, source, name, uri, sha256, verified, note)

    for name in names:
        path = cache / name
        if path.is_file() and (hit := found(path, "cache", name, str(path))):
            return hit
        if mirror:
            if gcs.is_gcs(mirror):
                uri = f"{mirror.rstrip('/')}/{name}"
                if _fetch_gcs(uri, cache / f".mirror-{name}"):
                    hit = found(cache / f".mirror-{name}", "mirror", name, uri)
                    if hit:
                        (cache / f".mirror-{name}").replace(path)
                        hit.path = path
                        return hit
            else:
                local = Path(mirror).expanduser() / name
                if local.is_file() and (hit := found(local, "mirror", name, str(local))):
                    return hit
    start = time.monotonic()
    try:
        log.info("downloading %s from %s", fname, origin)
        _download_url(origin, cache / fname)
    except UserError as exc:
        others = f" (or the same alpha's file for another input size: {', '.join(names[1:])})" if names[1:] else ""
        places = [f"the Keras cache {cache}"]
        places.append(f"the mirror {mirror}" if mirror else "no mirror (KFP_FINETUNE_WEIGHTS_MIRROR is not set)")
        raise UserError(
            f"no ImageNet weights file {fname}{others}: looked in {', '.join(places)}, then the public URL "
            f"({exc}; gave up after {time.monotonic() - start:.1f} s). Set KFP_FINETUNE_WEIGHTS_MIRROR to a "
            f"local folder or gs:// prefix holding {fname}, or use --weights none or a weights file URI"
        ) from exc
    hit = found(cache / fname, "url", fname, origin)
    assert hit is not None  # a mismatch from "url" raises
    return hit


def _answer_get_file(handler: Callable[..., str]) -> Any:
    """While building, answer keras.applications' requests for weights files with `handler` instead of Keras's
    downloader (which has no timeout, no mirror and no sha256 check of ours): components/core/compat.py's patch."""
    from kfp_finetune.components.core import compat

    return compat.keras_get_file(handler)


def resolve_uri(uri: str, workdir: Path, user_sha256: str | None) -> WeightsFile:
    """A weights file given as a local path, file://, gs:// or http(s):// URI, copied locally when remote."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if gcs.is_gcs(uri):
        local = workdir / name
        if not _fetch_gcs(uri, local):
            raise UserError(f"--weights {uri}: no such object")
    elif re.match(r"^https?://", uri):
        local = workdir / name
        _download_url(uri, local)
    else:
        local = Path(uri.removeprefix("file://")).expanduser()
        if not local.is_file():
            raise UserError(f"--weights {uri}: no such file")
    sha256, verified, how = _check(local, uri, None, user_sha256)
    return WeightsFile(local, "uri", name, uri, sha256, verified, f"verified by {how}" if how else None)
