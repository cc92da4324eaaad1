"""registry: complete versions, LATEST, versions/rollback (local and gs://), invisible partial pushes."""

import json
import os
import threading
import time
from pathlib import Path

import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.registry import registry
from kfp_finetune.pipelines.cli import main
from tests.conftest import Emulator


def make_version_dir(tmp_path: Path, name: str, accuracy: float = 0.9, fingerprint: str = "f" * 64,
                     big_files: int = 0) -> Path:
    """A folder as export stages it: some files, model/, and version.json."""
    folder = tmp_path / "staged" / name
    (folder / registry.MODEL_DIR).mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(os.urandom(256))
    (folder / registry.MODEL_DIR / "model.keras").write_bytes(os.urandom(128))
    (folder / registry.MODEL_DIR / "model.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    (folder / "evaluation.json").write_text(json.dumps({"metrics": {"accuracy": accuracy}}))
    for i in range(big_files):
        (folder / "variables").mkdir(exist_ok=True)
        (folder / "variables" / f"shard-{i}.bin").write_bytes(os.urandom(8 << 20))
    # One clock reading for the seconds and the fraction: read apart, a second could tick between them and a later
    # version be stamped older (rollback then found v2 "the oldest version", once in CI).
    now = time.time_ns()
    created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}Z"
    (folder / registry.VERSION_FILE).write_text(json.dumps({
        "version": name, "created": created,
        "metrics": {"accuracy": accuracy}, "data_fingerprint": fingerprint, "class_names": ["a", "b"]}))
    return folder


def test_local_versions_latest_and_rollback(tmp_path, capsys):
    dest = str(tmp_path / "reg")
    assert registry.read_latest(dest) is None and registry.resolve_champion(dest) is None
    for i, acc in ((1, 0.8), (2, 0.85), (3, 0.9)):
        registry.push(make_version_dir(tmp_path, f"v{i}", acc), dest, f"v{i}")
    # A partial folder (no version.json) and a hidden staging folder: invisible.
    (Path(dest) / "v9-partial" / "variables").mkdir(parents=True)
    (Path(dest) / ".v8.tmp-x").mkdir()
    assert [v.version for v in registry.list_versions(dest)] == ["v1", "v2", "v3"]
    assert registry.resolve_champion(dest).version == "v3"

    assert main(["versions", "--push-to", dest]) == 0
    out = capsys.readouterr().out
    assert "* v3" in out and "0.9000" in out and "v9-partial" not in out and "ffffffffffffffff" in out

    assert main(["rollback", "--push-to", dest]) == 0
    assert "LATEST: v3 -> v2" in capsys.readouterr().out
    assert registry.read_latest(dest) == "v2"
    assert registry.rollback(dest) == ("v2", "v1")
    with pytest.raises(UserError, match="oldest version"):
        registry.rollback(dest)
    assert registry.rollback(dest, to="v3") == ("v1", "v3")
    with pytest.raises(UserError, match="not a complete version"):
        registry.rollback(dest, to="v9-partial")
    # No temp leftovers: only the lock file that LATEST's compare-and-swap holds.
    assert sorted(p.name for p in Path(dest).iterdir() if p.name.startswith(".LATEST")) == [registry.LOCK_FILE]
    with pytest.raises(UserError, match="already exists"):
        registry.push(make_version_dir(tmp_path / "again", "v1"), dest, "v1")


def test_a_push_needs_version_json(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    with pytest.raises(UserError, match="version.json"):
        registry.push(folder, str(tmp_path / "reg"), "v1")


def test_latest_naming_an_incomplete_version_is_no_champion(tmp_path):
    dest = tmp_path / "reg"
    (dest / "old").mkdir(parents=True)
    (dest / registry.LATEST_FILE).write_text("old\n")
    assert registry.resolve_champion(str(dest)) is None
    with pytest.raises(UserError, match="no complete versions"):
        registry.rollback(str(dest))


def test_gcs_versions_and_rollback(tmp_path, gcs_bucket, capsys):
    dest = f"gs://{gcs_bucket.name}/models/flowers"
    for i in (1, 2):
        registry.push(make_version_dir(tmp_path, f"v{i}", 0.7 + i / 10), dest, f"v{i}")
    assert registry.read_latest(dest) == "v2"
    champion = registry.resolve_champion(dest)
    assert champion.version == "v2" and champion.uri == f"{dest}/v2"
    staged = registry.fetch_model(champion, tmp_path / "fetched")
    assert (Path(staged) / "model.keras").is_file()
    assert main(["versions", "--push-to", dest]) == 0
    assert "* v2" in capsys.readouterr().out
    assert main(["rollback", "--push-to", dest, "--to", "v1"]) == 0
    assert registry.read_latest(dest) == "v1"
    registry.check_destination(dest)  # writable; the probe object is gone again
    assert not [b for b in gcs_bucket.list_blobs() if "probe" in b.name]


@pytest.mark.slow  # ~25 s: the emulator is stopped and restarted mid-transfer, waiting out the push's 3 s retries
def test_emulator_stopped_mid_push_leaves_nothing_visible(tmp_path, monkeypatch):
    from kfp_finetune.components.core import gcs

    emulator = Emulator(storage=tmp_path / "gcs")  # on disk: it survives a stop
    emulator.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
        gcs.client().create_bucket("registry")
        dest = "gs://registry/models"
        registry.push(make_version_dir(tmp_path, "v1"), dest, "v1")
        big = make_version_dir(tmp_path, "v2", big_files=8)
        total = sum(1 for p in big.rglob("*") if p.is_file())
        seen: list[int] = []

        def stop_when_some_uploaded() -> None:
            watcher = gcs.client()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                n = sum(1 for _ in watcher.list_blobs("registry", prefix="models/v2/"))
                if n:
                    seen.append(n)
                    emulator.stop()
                    return
                time.sleep(0.02)

        thread = threading.Thread(target=stop_when_some_uploaded)
        thread.start()
        with pytest.raises(UserError, match="LATEST not changed"):
            registry.push(big, dest, "v2", retry_seconds=3)
        thread.join()
        assert seen and seen[0] < total, "the emulator must stop part-way through the upload"

        emulator.start()  # same port, same disk storage
        assert registry.read_latest(dest) == "v1"
        leftovers = gcs.list_blobs(f"{dest}/v2")
        assert not any(b.name.endswith(registry.VERSION_FILE) for b in leftovers)  # never completed
        assert [v.version for v in registry.list_versions(dest)] == ["v1"]  # the partial version is invisible
        assert registry.resolve_champion(dest).version == "v1"
        with pytest.raises(UserError, match="oldest version"):
            registry.rollback(dest)  # nothing to roll back to: v2 does not count
    finally:
        emulator.stop()
