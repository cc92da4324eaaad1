"""fingerprint: stable digests of folders, gs:// prefixes and manifests; the skip decision; credential errors."""

import json
import os
import shutil
from pathlib import Path

import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.ingest.fingerprint import (
    STATUS_FIRST,
    STATUS_FORCED,
    STATUS_NO_NEW_DATA,
    STATUS_SETTINGS_CHANGED,
    STATUS_TRAIN,
    canonical_settings,
    decide,
    fingerprint_source,
)
from kfp_finetune.components.registry import registry
from kfp_finetune.pipelines.cli import main
from tests.imagegen import write_class_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_class_folder(tmp_path / "data", per_class=4, size=16)


def test_folder_fingerprint_is_stable_and_follows_the_images(folder, tmp_path):
    first = fingerprint_source(str(folder))
    assert first.kind == "folder" and first.num_images == 12 and len(first.fingerprint) == 64
    assert fingerprint_source(str(folder)).fingerprint == first.fingerprint
    # What ingest skips by name does not count.
    (folder / "README.txt").write_text("notes")
    (folder / "circle" / ".hidden.jpg").write_bytes(b"x")
    (folder / "circle" / "notes.txt").write_text("x")
    assert fingerprint_source(str(folder)).fingerprint == first.fingerprint
    # A new image, a rewritten image, a removed image: each changes it.
    extra = folder / "circle" / "extra.jpg"
    shutil.copy(folder / "square" / sorted(os.listdir(folder / "square"))[0], extra)
    grown = fingerprint_source(str(folder))
    assert grown.num_images == 13 and grown.fingerprint != first.fingerprint
    extra.unlink()
    assert fingerprint_source(str(folder)).fingerprint == first.fingerprint
    victim = folder / "square" / sorted(os.listdir(folder / "square"))[0]
    os.utime(victim, ns=(1, 1))
    assert fingerprint_source(str(folder)).fingerprint != first.fingerprint


def test_manifest_fingerprint_covers_the_manifest_and_its_files(folder):
    rows = ["path,label"] + [f"{p.relative_to(folder).as_posix()},{p.parent.name}"
                             for p in sorted(folder.rglob("*.jpg"))]
    manifest = folder / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    first = fingerprint_source(str(manifest))
    assert first.kind == "manifest" and first.num_images == 12
    os.utime(sorted(folder.rglob("*.jpg"))[0], ns=(5, 5))  # a named file changed
    second = fingerprint_source(str(manifest))
    assert second.fingerprint != first.fingerprint
    manifest.write_text("\n".join(rows[:-1]) + "\n")  # the manifest changed
    assert fingerprint_source(str(manifest)).fingerprint not in (first.fingerprint, second.fingerprint)


def test_gcs_fingerprint_from_the_listing(folder, gcs_bucket, gcs_upload):
    uri = gcs_upload(gcs_bucket, folder, "flowers")
    first = fingerprint_source(uri)
    assert first.kind == "gcs" and first.num_images == 12
    assert all(len(line.split("\t")) == 5 for line in first.lines)  # name, size, generation, crc32c, md5
    assert fingerprint_source(uri + "/").fingerprint == first.fingerprint
    gcs_bucket.blob("flowers/circle/new.jpg").upload_from_filename(str(sorted(folder.rglob("*.jpg"))[0]))
    assert fingerprint_source(uri).num_images == 13
    assert fingerprint_source(uri).fingerprint != first.fingerprint


def test_empty_source_is_one_clear_error(tmp_path):
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(UserError, match="no image files"):
        fingerprint_source(str(tmp_path / "empty"))


def test_canonical_settings_compare_across_backends():
    assert canonical_settings({"a": "16.0", "b": 16, "c": "0.001", "d": "True", "e": ""}) == \
        canonical_settings({"a": 16, "b": "16", "c": 0.001, "d": True, "e": ""})
    assert canonical_settings({"lr": "10.0"}) != canonical_settings({"lr": 0.001})


def _fake_version(dest: Path, version: str, fingerprint: str, settings: dict) -> None:
    folder = dest / version
    folder.mkdir(parents=True)
    (folder / registry.VERSION_FILE).write_text(json.dumps({
        "version": version, "created": "2026-01-01T00:00:00Z", "data_fingerprint": fingerprint,
        "settings": canonical_settings(settings)}))
    (dest / registry.LATEST_FILE).write_text(version + "\n")


def test_decide_against_the_champion(folder, tmp_path):
    fp = fingerprint_source(str(folder))
    dest = tmp_path / "reg"
    settings = {"head_epochs": 5, "fine_tune_learning_rate": 0.001}
    assert decide(fp, None, settings).status == STATUS_TRAIN
    assert decide(fp, str(dest), settings).status == STATUS_FIRST
    _fake_version(dest, "1", fp.fingerprint, settings)
    same = decide(fp, str(dest), {"head_epochs": "5.0", "fine_tune_learning_rate": "0.001"})
    assert same.status == STATUS_NO_NEW_DATA and not same.train and same.champion_version == "1"
    assert decide(fp, str(dest), settings, force_retrain=True).status == STATUS_FORCED
    changed = decide(fp, str(dest), {**settings, "fine_tune_learning_rate": 10})
    assert changed.status == STATUS_SETTINGS_CHANGED and "fine_tune_learning_rate" in changed.reason
    # A setting the champion predates (ema_momentum) at its old behaviour is no change; any other value is one.
    assert decide(fp, str(dest), {**settings, "ema_momentum": 0.0}).status == STATUS_NO_NEW_DATA
    averaged = decide(fp, str(dest), {**settings, "ema_momentum": 0.99})
    assert averaged.status == STATUS_SETTINGS_CHANGED and "ema_momentum" in averaged.reason
    assert decide(fp, str(dest), {**settings, "augment_strength": 0.1}).status == STATUS_NO_NEW_DATA
    stronger = decide(fp, str(dest), {**settings, "augment_strength": 0.2})
    assert stronger.status == STATUS_SETTINGS_CHANGED and "augment_strength" in stronger.reason
    assert decide(fp, str(dest), {**settings, "layer_lr_ratio": 1.0}).status == STATUS_NO_NEW_DATA
    discriminative = decide(fp, str(dest), {**settings, "layer_lr_ratio": 0.01})
    assert discriminative.status == STATUS_SETTINGS_CHANGED and "layer_lr_ratio" in discriminative.reason
    (folder / "circle" / "more.jpg").write_bytes((folder / "square").glob("*.jpg").__next__().read_bytes())
    assert decide(fingerprint_source(str(folder)), str(dest), settings).status == STATUS_TRAIN


def test_cli_prints_fingerprint_and_status(folder, tmp_path, capsys):
    out_file = tmp_path / "fp.json"
    assert main(["fingerprint", "--source", str(folder), "--output", str(out_file),
                 "--push-to", str(tmp_path / "reg")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_file.read_text())
    assert printed["num_images"] == 12 and printed["status"] == STATUS_FIRST


@pytest.mark.parametrize("argv", [
    ["ingest", "--source", "gs://some-bucket/flowers", "--output", "OUT"],
    ["fingerprint", "--source", "gs://some-bucket/flowers"],
    ["versions", "--push-to", "gs://some-bucket/models"],
    ["fingerprint", "--source", "SRC", "--push-to", "gs://some-bucket/models"],
])
def test_gs_without_credentials_is_one_line(argv, folder, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("SRC", str(folder)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "no Google Cloud credentials" in err and "gcloud auth application-default login" in err


def test_unwritable_push_to_is_reported_before_anything_else(folder, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["fingerprint", "--source", str(folder), "--push-to", str(blocker / "models")]) == 2
    err = capsys.readouterr().err
    assert "--push-to" in err and "not writable" in err


def test_missing_bucket_is_reported(folder, gcs_emulator, capsys):
    assert main(["fingerprint", "--source", str(folder), "--push-to", "gs://no-such-bucket-12/models"]) == 2
    err = capsys.readouterr().err
    assert "--push-to" in err and "no-such-bucket-12" in err and len(err.strip().splitlines()) == 1


# --- the digest format is pinned: existing datasets' fingerprints must never change --------------------------------
# (a changed digest makes the scheduled retraining retrain everything once). The expected digests are recomputed
# here from the documented lines, independently of how the source is listed.


def _expected(kind: str, lines: list[str]) -> str:
    import hashlib

    h = hashlib.sha256(f"kfp-finetune-fingerprint-v1 {kind}\n".encode())
    for line in sorted(lines):
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def _stat(name: str, path: Path) -> str:
    st = os.stat(path)
    return f"{name}\t{st.st_size}\t{st.st_mtime_ns}"


def test_digests_keep_their_format(folder, gcs_bucket, gcs_upload):
    import hashlib

    (folder / "README.txt").write_text("notes")  # skipped by name: not in the digest
    images = sorted(folder.rglob("*.jpg"))
    assert fingerprint_source(str(folder)).fingerprint == _expected(
        "folder", [_stat(p.relative_to(folder).as_posix(), p) for p in images])

    uri = gcs_upload(gcs_bucket, folder, "flowers")
    blobs = {b.name: b for b in gcs_bucket.list_blobs(prefix="flowers/")}
    gcs_lines = [f"{p.relative_to(folder).as_posix()}\t{b.size}\t{b.generation}\t{b.crc32c or ''}\t{b.md5_hash or ''}"
                 for p in images for b in [blobs["flowers/" + p.relative_to(folder).as_posix()]]]
    assert fingerprint_source(uri).fingerprint == _expected("gcs", gcs_lines)

    remote = images[0].relative_to(folder).as_posix()
    gone = f"gs://{gcs_bucket.name}/flowers/circle/not-there.jpg"
    rows = ["path,label", f"gs://{gcs_bucket.name}/flowers/{remote},circle", f"{gone},circle"]
    rows += [f"{p.relative_to(folder).as_posix()},{p.parent.name}" for p in images[1:]]
    rows.append("circle/gone.jpg,circle")
    text = "\n".join(rows) + "\n"
    manifest = folder / "labels.csv"
    manifest.write_text(text)
    b = blobs[f"flowers/{remote}"]
    lines = [f"manifest\t{hashlib.sha256(text.encode()).hexdigest()}",
             f"gs://{gcs_bucket.name}/flowers/{remote}\t{b.size}\t{b.generation}\t{b.crc32c or ''}\t{b.md5_hash or ''}",
             f"{gone}\tmissing", f"{folder / 'circle' / 'gone.jpg'}\tmissing"]
    lines += [_stat(str(p), p) for p in images[1:]]
    got = fingerprint_source(str(manifest))
    assert got.num_images == 14 and sorted(got.lines) == sorted(lines)
    assert got.fingerprint == _expected("manifest", lines)
    assert fingerprint_source("tfds:mnist").fingerprint == _expected("tfds", ["tfds:mnist"])
