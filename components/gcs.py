"""gs:// access through google-cloud-storage (never tf.io.gfile: it ignores STORAGE_EMULATOR_HOST).

Bulk transfers go through `transfer_manager` with a thread pool.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components import settings
from components.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from google.cloud import storage

DEFAULT_WORKERS = 16


def is_gcs(uri: str) -> bool:
    return str(uri).startswith("gs://")


def split_uri(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
    if not is_gcs(uri):
        raise UserError(f"{uri!r} is not a gs:// URI")
    rest = uri[len("gs://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UserError(f"{uri!r} has no bucket name; expected gs://BUCKET/PATH")
    return bucket, prefix


def client() -> storage.Client:
    """A storage client; anonymous against an emulator (STORAGE_EMULATOR_HOST), default credentials otherwise."""
    from google.cloud import storage

    if settings.storage_emulator_host():
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=settings.gcp_project() or "test", credentials=AnonymousCredentials())
    return storage.Client(project=settings.gcp_project())


def list_blobs(uri: str, gcs: storage.Client | None = None) -> list[storage.Blob]:
    """Every object under a gs:// prefix (treated as a folder), sorted by name."""
    gcs = gcs or client()
    bucket, prefix = split_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    try:
        blobs = [b for b in gcs.list_blobs(bucket, prefix=prefix) if not b.name.endswith("/")]
    except Exception as exc:  # google.api_core errors, connection errors
        raise UserError(f"cannot list {uri}: {exc}") from exc
    return sorted(blobs, key=lambda b: b.name)


def download_many(
    uris: Iterable[str], destinations: Iterable[str | os.PathLike], workers: int = DEFAULT_WORKERS
) -> None:
    """Download gs:// objects to local files in parallel. Raises UserError naming the first failure."""
    from google.cloud.storage import transfer_manager

    gcs = client()
    by_bucket: dict[str, list[tuple[storage.Blob, Path]]] = {}
    for uri, dest in zip(uris, destinations, strict=True):
        bucket, name = split_uri(uri)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        by_bucket.setdefault(bucket, []).append((gcs.bucket(bucket).blob(name), Path(dest)))
    for bucket, pairs in by_bucket.items():
        results = transfer_manager.download_many(
            [(blob, str(dest)) for blob, dest in pairs],
            max_workers=workers,
            worker_type=transfer_manager.THREAD,
            raise_exception=False,
        )
        for (blob, _), result in zip(pairs, results, strict=True):
            if isinstance(result, Exception):
                raise UserError(f"cannot download gs://{bucket}/{blob.name}: {result}")


def download_file(uri: str, dest: str | os.PathLike) -> Path:
    download_many([uri], [dest], workers=1)
    return Path(dest)


def upload_many(
    files: Iterable[str | os.PathLike], uris: Iterable[str], workers: int = DEFAULT_WORKERS, retry: Any = None
) -> None:
    """Upload local files to gs:// URIs in parallel. Raises UserError naming the first failure.

    `retry`: a google.api_core Retry for each upload (default: the library's, which retries for up to 120 s).
    """
    from google.cloud.storage import transfer_manager

    gcs = client()
    by_bucket: dict[str, list[tuple[Path, storage.Blob]]] = {}
    for src, uri in zip(files, uris, strict=True):
        bucket, name = split_uri(uri)
        by_bucket.setdefault(bucket, []).append((Path(src), gcs.bucket(bucket).blob(name)))
    for bucket, pairs in by_bucket.items():
        results = transfer_manager.upload_many(
            [(str(src), blob) for src, blob in pairs],
            upload_kwargs={"retry": retry} if retry is not None else None,
            max_workers=workers,
            worker_type=transfer_manager.THREAD,
            raise_exception=False,
        )
        for (_, blob), result in zip(pairs, results, strict=True):
            if isinstance(result, Exception):
                raise UserError(f"cannot upload to gs://{bucket}/{blob.name}: {result}")


def upload_directory(
    local_dir: str | os.PathLike, uri: str, workers: int = DEFAULT_WORKERS, retry: Any = None
) -> list[str]:
    """Upload every file under `local_dir` below the gs:// prefix `uri`; returns the object URIs written."""
    root = Path(local_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    base = uri.rstrip("/")
    uris = [f"{base}/{p.relative_to(root).as_posix()}" for p in files]
    upload_many(files, uris, workers, retry=retry)
    return uris


def _on_blob(uri: str, doing: str, call: Any) -> Any:
    """`call(blob)` for the object at `uri`; a UserError "cannot DOING URI: ..." on any failure."""
    bucket, name = split_uri(uri)
    try:
        return call(client().bucket(bucket).blob(name))
    except Exception as exc:  # google.api_core errors, connection errors
        raise UserError(f"cannot {doing} {uri}: {exc}") from exc


def write_text(uri: str, text: str) -> None:
    _on_blob(uri, "write", lambda blob: blob.upload_from_string(text))


def read_text(uri: str) -> str:
    return _on_blob(uri, "read", lambda blob: blob.download_as_text())


def exists(uri: str) -> bool:
    return _on_blob(uri, "reach", lambda blob: blob.exists())
