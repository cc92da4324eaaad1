"""gs:// access through google-cloud-storage (never tf.io.gfile: it ignores STORAGE_EMULATOR_HOST).

Bulk transfers go through `transfer_manager` with a thread pool.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.core import settings
from kfp_finetune.components.core.errors import UserError

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
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return storage.Client(project=settings.gcp_project())
    except DefaultCredentialsError:
        raise UserError(NO_CREDENTIALS) from None


NO_CREDENTIALS = ("no Google Cloud credentials for gs:// access: run `gcloud auth application-default login`, or set "
                  "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (on Vertex AI / GKE the job's "
                  "service account is used)")


def list_blobs(uri: str, gcs: storage.Client | None = None, retry: Any = None) -> list[storage.Blob]:
    """Every object under a gs:// prefix (treated as a folder), sorted by name. `retry`: the client's retry policy
    (None: its default, which retries for up to 120 s)."""
    gcs = gcs or client()
    bucket, prefix = split_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    kwargs = {} if retry is None else {"retry": retry}
    try:
        blobs = [b for b in gcs.list_blobs(bucket, prefix=prefix, **kwargs) if not b.name.endswith("/")]
    except Exception as exc:  # google.api_core errors, connection errors
        raise UserError(f"cannot list {uri}: {_short(exc)}") from exc
    return sorted(blobs, key=lambda b: b.name)


def download_many(
    uris: Iterable[str], destinations: Iterable[str | os.PathLike], workers: int = DEFAULT_WORKERS
) -> None:
    """Download gs:// objects to local files in parallel. Raises UserError naming the first failure."""
    uris = list(uris)
    failed = try_download_many(uris, destinations, workers)
    if failed:
        first = min(failed)
        raise UserError(f"cannot download {uris[first]}: {failed[first]}")


def try_download_many(
    uris: Iterable[str], destinations: Iterable[str | os.PathLike], workers: int = DEFAULT_WORKERS
) -> dict[int, str]:
    """Download gs:// objects to local files in parallel; {index: one-line error} for those that failed, whose
    destination files are removed (transfer_manager leaves an empty or partial file behind)."""
    from google.cloud.storage import transfer_manager

    gcs = client()
    by_bucket: dict[str, list[tuple[int, storage.Blob, Path]]] = {}
    failed: dict[int, str] = {}
    for i, (uri, dest) in enumerate(zip(uris, destinations, strict=True)):
        bucket, name = split_uri(uri)
        parts = Path(dest).parts
        if ".." in parts[next((k for k, p in enumerate(parts) if p != ".."), len(parts)):]:
            failed[i] = f"the local destination {dest} climbs out of its folder ('..' in an object name?)"
            continue
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        by_bucket.setdefault(bucket, []).append((i, gcs.bucket(bucket).blob(name), Path(dest)))
    for triples in by_bucket.values():
        results = transfer_manager.download_many(
            [(blob, str(dest)) for _, blob, dest in triples],
            max_workers=workers,
            worker_type=transfer_manager.THREAD,
            raise_exception=False,
        )
        for (i, _, dest), result in zip(triples, results, strict=True):
            if isinstance(result, Exception):
                failed[i] = _short(result)
                dest.unlink(missing_ok=True)
    return failed


def download_tree(uri: str, local_dir: str | os.PathLike, what: str) -> list[Path]:
    """Every object under the gs:// prefix `uri` into `local_dir`, keeping the names below the prefix; UserError
    (naming `what`) when there is none or a name would land outside `local_dir` (`..`, a leading `/`)."""
    from kfp_finetune.components.core import safefiles

    blobs = list_blobs(uri)
    if not blobs:
        raise UserError(f"{what} {uri}: no objects under that prefix")
    bucket, prefix = split_uri(uri.rstrip("/") + "/")
    try:
        dests = [Path(safefiles.join_inside(local_dir, b.name[len(prefix):], f"{what} gs://{bucket}/{b.name}"))
                 for b in blobs]
    except ValueError as exc:
        raise UserError(f"{exc}; refusing to download") from None
    download_many([f"gs://{bucket}/{b.name}" for b in blobs], dests)
    return dests


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


def _on_blob(uri: str, doing: str, call: Any, what: str = "") -> Any:
    """`call(blob)` for the object at `uri`; a UserError "[WHAT: ]cannot DOING URI: ..." on any failure."""
    bucket, name = split_uri(uri)
    gcs = client()  # no credentials: its own one-line UserError
    try:
        return call(gcs.bucket(bucket).blob(name))
    except Exception as exc:  # google.api_core errors, connection errors
        raise UserError(f"{what + ': ' if what else ''}cannot {doing} {uri}: {_short(exc)}") from exc


def _short(exc: Exception) -> str:
    """The first line of an exception's message (google.api_core errors carry the whole response)."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def write_text(uri: str, text: str, what: str = "") -> None:
    _on_blob(uri, "write", lambda blob: blob.upload_from_string(text), what)


def read_text_if_exists(uri: str, what: str = "") -> str | None:
    """The object's text, or None when it does not exist; UserError when it cannot be read."""
    from google.api_core.exceptions import NotFound

    def read(blob: Any) -> str | None:
        try:
            return blob.download_as_text()
        except NotFound:
            return None

    return _on_blob(uri, "read", read, what)


def delete(uri: str) -> None:
    _on_blob(uri, "delete", lambda blob: blob.delete())


def read_text(uri: str) -> str:
    return _on_blob(uri, "read", lambda blob: blob.download_as_text())


def read_bytes(uri: str) -> bytes:
    return _on_blob(uri, "read", lambda blob: blob.download_as_bytes())


def exists(uri: str) -> bool:
    return _on_blob(uri, "reach", lambda blob: blob.exists())
