"""The ingest step on the real flowers photos: CLI, TFDS loading, gs:// (emulator) and manifest sources, the KFP
component, added broken files, and the offline tfds: source."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from kfp_finetune.components.core.dataset import SPLITS, read_split
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.ingest.step import IngestConfig, ingest
from kfp_finetune.pipelines.cli import main as cli_main


def records(out: Path) -> dict[str, list[tuple[bytes, int]]]:
    return {
        split: sorted((bytes(img), int(label)) for img, label in read_split(out, split).as_numpy_iterator())
        for split in SPLITS
    }


def test_flowers_cli_gives_80_10_10_loadable_by_tfds(flowers_dir, tmp_path):
    import tensorflow_datasets as tfds

    out = tmp_path / "flowers"
    assert cli_main(["ingest", "--source", str(flowers_dir), "--output", str(out)]) == 0
    report = json.loads((out / "ingest_report.json").read_text())
    # 1,500 photos, one of which is a byte-identical copy of another sunflower: kept once and reported.
    assert report["num_image_files"] == 1500
    assert [s["reason"] for s in report["skipped"] if s["reason"] not in ("outside_class_folder",)] == ["duplicate"]
    n = report["num_examples"]
    assert sum(n.values()) == 1499
    assert 0.77 < n["train"] / 1499 < 0.83 and 0.07 < n["validation"] / 1499 < 0.13 and 0.07 < n["test"] / 1499 < 0.13

    builder = tfds.builder_from_directory(str(out))
    assert builder.info.features["label"].names == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert {s: builder.info.splits[s].num_examples for s in SPLITS} == n
    counted = sum(1 for _ in builder.as_dataset(split="test", as_supervised=True))
    assert counted == n["test"]


def test_gcs_and_manifest_sources_give_the_same_dataset_as_the_folder(mini_flowers, gcs_bucket, gcs_upload, tmp_path):
    folder, from_gcs, from_manifest, from_gcs_manifest = (tmp_path / n for n in ("f", "g", "m", "gm"))
    ingest(IngestConfig(source=str(mini_flowers), output=str(folder)))
    uri = gcs_upload(gcs_bucket, mini_flowers, "data/flowers")
    ingest(IngestConfig(source=uri, output=str(from_gcs)))

    images = sorted(p for p in mini_flowers.rglob("*.jpg"))
    local_csv = tmp_path / "local.csv"
    shutil.copytree(mini_flowers, tmp_path / "images")
    local_csv.write_text("path,label\n" + "".join(
        f"images/{p.parent.name}/{p.name},{p.parent.name}\n" for p in images))
    ingest(IngestConfig(source=str(local_csv), output=str(from_manifest)))

    from kfp_finetune.components.core import gcs

    # A manifest on gs:// mixing paths relative to its folder and absolute gs:// URIs (written after the folder
    # ingest above, which would otherwise list it as a stray file).
    gcs.write_text(f"{uri}/all.csv", "path,label\n" + "".join(
        f"{uri}/{p.parent.name}/{p.name},{p.parent.name}\n" if i % 2 else f"{p.parent.name}/{p.name},{p.parent.name}\n"
        for i, p in enumerate(images)))
    ingest(IngestConfig(source=f"{uri}/all.csv", output=str(from_gcs_manifest)))
    gcs.write_text(f"{uri}/bad.csv", "path,label\ndaisy/../../x.jpg,daisy\n")
    with pytest.raises(UserError, match="escapes the manifest's folder"):
        ingest(IngestConfig(source=f"{uri}/bad.csv", output=str(tmp_path / "bad")))

    expected = records(folder)
    assert sum(len(v) for v in expected.values()) == 100
    for other in (from_gcs, from_manifest, from_gcs_manifest):
        assert records(other) == expected, other
    with pytest.raises(UserError, match="no image files found"):
        ingest(IngestConfig(source=f"gs://{gcs_bucket.name}/nothing/here", output=str(tmp_path / "empty")))
    assert not (tmp_path / "empty").exists()
    gcs_report = json.loads((from_gcs / "ingest_report.json").read_text())
    assert gcs_report["skipped"] == [
        {"path": f"{uri}/ATTRIBUTION.txt", "reason": "outside_class_folder", "detail": ""}]


def test_flowers_with_broken_odd_and_duplicate_files_added(mini_flowers, image_factory, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(mini_flowers, src)
    f = image_factory
    f.root = src
    odd = {"bmp": "a.bmp", "gif": "a.gif", "webp": "a.webp", "tiff": "a.tif", "cmyk_jpeg": "cmyk.jpg",
           "png16": "grey16.png", "palette_png": "palette.png", "rgba_png": "rgba.png"}
    for kind, name in odd.items():
        f.make(kind, f"tulips/odd/{name}")
    for kind, name in (("truncated_jpeg", "t.jpg"), ("corrupt", "c.jpg"), ("empty", "e.jpg"), ("bomb", "b.png")):
        f.make(kind, f"roses/{name}")
    daisy = sorted((src / "daisy").glob("*.jpg"))
    shutil.copy(daisy[0], src / "daisy" / "dup.jpg")
    shutil.copy(daisy[1], src / "roses" / "conflict.jpg")
    (src / "daisy" / "notes.txt").write_text("x")

    out = tmp_path / "ds"
    assert cli_main(["ingest", "--source", str(src), "--output", str(out), "--max-corrupt-fraction", "0.05"]) == 0
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["skipped_counts"] == {"corrupt": 3, "too_large": 1, "duplicate": 1, "label_conflict": 2,
                                        "not_image": 1, "outside_class_folder": 1}
    assert sum(report["num_examples"].values()) == 100 - 1 + 8  # the conflicting daisy leaves; 8 converted join
    assert report["converted"] == 8
    tulips = report["class_names"].index("tulips")
    assert sum(1 for items in records(out).values() for _, label in items if label == tulips) == 28

    # The same folder under the default 1% limit: 4 unusable files of 114 image files is too many.
    out2 = tmp_path / "ds2"
    assert cli_main(["ingest", "--source", str(src), "--output", str(out2)]) == 2
    assert not out2.exists()


def test_kfp_component_writes_the_dataset_and_metadata(mini_flowers, tmp_path, monkeypatch):
    from kfp import local

    from kfp_finetune.components.ingest.step import ingest_op

    # The component runs `python3` in a subprocess: make it this interpreter, with this checkout importable.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    task = ingest_op(source=str(mini_flowers), seed=1)
    dataset = task.outputs["dataset"]
    assert dataset.metadata["class_names"] == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert sum(dataset.metadata["num_examples"].values()) == 100
    assert (Path(dataset.path) / "dataset_info.json").is_file()


def test_tfds_source_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    if tfds.builder("tf_flowers", try_gcs=False).is_prepared():
        pytest.skip("tf_flowers is already prepared in the TFDS data dir; nothing to download")
    # Offline for this test even on a connected machine: every HTTP(S) request goes to a closed local port.
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    start = time.monotonic()
    with pytest.raises(UserError, match="tf_flowers is not prepared .* network is unreachable"):
        ingest(IngestConfig(source="tfds:tf_flowers", output=str(tmp_path / "ds")))
    assert time.monotonic() - start < 30
    assert not (tmp_path / "ds").exists()


def test_tfds_source_reads_a_prepared_dataset(synthetic_folder, tmp_path):
    """tfds:NAME from a TFDS data dir (no network): our own output, placed where TFDS looks, re-ingests the same."""
    import subprocess

    data_dir = tmp_path / "tfds_data"
    first = data_dir / "images" / "1.0.0"
    ingest(IngestConfig(source=str(synthetic_folder), output=str(first)))
    (first / "ingest_report.json").unlink()  # not part of a TFDS dataset
    out = tmp_path / "again"
    env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-m", "kfp_finetune.pipelines", "ingest", "--source", "tfds:images:1.0.0",
                           "--output", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["class_names"] == ["circle", "square", "stripes"] and report["skipped"] == []
    # Same bytes, same labels, same splits: the split is a function of the content hash and the seed only.
    assert records(out) == records(first)


def _still_running(procs: list) -> list:
    import psutil

    running = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def test_killed_ingest_leaves_nothing_at_the_output(flowers_dir, tmp_path):
    import signal
    import subprocess

    import psutil

    out = tmp_path / "ds"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "kfp_finetune.pipelines", "ingest", "--source", str(flowers_dir),
                             "--output", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    helpers: list = []
    while proc.poll() is None and time.monotonic() < deadline:
        # Kill it mid-write: the temp folder exists and the decode pool is up.
        if list(tmp_path.glob(".ds.tmp-*")):
            helpers = psutil.Process(proc.pid).children(recursive=True)
            if helpers:
                break
        time.sleep(0.005)
    assert proc.poll() is None, "ingest finished before it could be killed"
    assert helpers, "the decode pool never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The pool's processes notice their parent is gone. One that exited but is still a zombie counts as gone: once
    # orphaned, only its new parent (PID 1 or a subreaper, which in some containers never reaps) can clear it, and
    # psutil.wait_procs would wait the whole timeout for it.
    deadline = time.monotonic() + 20
    while (alive := _still_running(helpers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    described = [(p.pid, p.ppid(), " ".join(p.cmdline())[:200]) for p in alive if p.is_running()]
    for p in alive:
        p.kill()
    assert not alive, f"worker processes outlived the killed ingest: {described}"
    assert not out.exists()
    # The next run ignores the leftover hidden temp folder and succeeds.
    assert cli_main(["ingest", "--source", str(flowers_dir), "--output", str(out)]) == 0
    assert (out / "dataset_info.json").is_file()
