"""The shared plumbing: atomic directories, the CLI's error handling, and gs:// I/O against the emulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfp_finetune.components.core import gcs
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import atomic_directory


def test_atomic_directory_moves_into_place(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_accepts_empty_and_refuses_non_empty(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "empty" / "f").exists()
    with pytest.raises(UserError, match="not empty"), atomic_directory(tmp_path / "empty"):
        pass


def test_gcs_round_trip_on_emulator(gcs_bucket, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "x.bin").write_bytes(b"\x00\x01" * 1000)
    (src / "y.txt").write_text("hello")
    uris = gcs.upload_directory(src, f"gs://{gcs_bucket.name}/pre")
    assert sorted(uris) == [f"gs://{gcs_bucket.name}/pre/a/b/x.bin", f"gs://{gcs_bucket.name}/pre/y.txt"]
    listed = [b.name for b in gcs.list_blobs(f"gs://{gcs_bucket.name}/pre")]
    assert listed == ["pre/a/b/x.bin", "pre/y.txt"]
    dests = [tmp_path / "dst" / Path(u).name for u in uris]
    gcs.download_many(uris, dests)
    assert dests[0].read_bytes() == b"\x00\x01" * 1000
    assert gcs.read_text(f"gs://{gcs_bucket.name}/pre/y.txt") == "hello"


def test_gcs_missing_object_is_a_user_error(gcs_bucket, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot download"):
        gcs.download_file(f"gs://{gcs_bucket.name}/nope", tmp_path / "nope")


def test_cli_reports_user_errors_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from kfp_finetune.pipelines import cli

    code = cli.main(["train-head", "--dataset", "d", "--backbone", "b", "--output", "o", "--epochs", "-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith("kfp-finetune: error: --epochs must be an integer ≥ 0 (got -1)"), err
