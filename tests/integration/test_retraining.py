"""Scheduled retraining, played as an operator runs it: one season of weekly `kfp-finetune run`s against one push
destination (local folder and gs:// on the emulator), and KFP's cache following the data under kfp.local."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kfp_finetune.pipelines.cli import main
from tests.imagegen import write_class_folder

pytest.importorskip("kfp_finetune.components.backbone.step")

CLASSES = ("circle", "square", "stripes")
# Tiny and quick: 48-pixel images, one epoch per phase, MobileNet 0.25 at 64 pixels (the mirror's weights).
FAST = ["--param", "head_epochs=1", "--param", "fine_tune_epochs=1", "--param", "image_size=64",
        "--param", "batch_size=16", "--param", "min_accuracy=0.5"]


def summary_of(out: str) -> dict[str, str]:
    summary = out[out.index("kfp-finetune run: summary"):]
    values = {}
    for line in summary.splitlines()[1:]:
        parts = line.split(None, 1)
        if len(parts) == 2:
            values[parts[0]] = parts[1].strip()
    return values


def split_hashes(dataset_dir: Path) -> set[str]:
    from kfp_finetune.components.core import dataset

    return {hashlib.sha256(image.numpy()).hexdigest() for image, _ in dataset.read_split(dataset_dir, "test")}


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


class Season:
    """Runs `kfp-finetune run` once a 'week' against the same push destination, as a schedule would."""

    def __init__(self, tmp_path: Path, source: str, push_to: str, capsys: pytest.CaptureFixture) -> None:
        self.tmp, self.source, self.push_to, self.capsys = tmp_path, source, push_to, capsys

    def run(self, week: str, *params: str) -> dict[str, str]:
        argv = ["run", "--source", self.source, "--output", str(self.tmp / week), "--param",
                f"push_to={self.push_to}", *FAST]
        for p in params:
            argv += ["--param", p]
        code = main(argv)
        out = self.capsys.readouterr().out
        assert code == 0, out[-5000:]
        return summary_of(out)

    def evaluation(self, summary: dict[str, str]) -> dict:
        return json.loads((Path(summary["evaluation"]) / "evaluation.json").read_text())

    def dataset(self, week: str) -> Path:
        return only(list((self.tmp / week / "pipeline_root").glob("*/ingest/dataset")))

    def versions(self) -> list[str]:
        from kfp_finetune.components.registry import registry

        return [v.version for v in registry.list_versions(self.push_to)]

    def latest(self) -> str | None:
        from kfp_finetune.components.registry import registry

        return registry.read_latest(self.push_to)


def add_images(data: Path, staging: Path, classes: tuple[str, ...] = CLASSES, per_class: int = 8, seed: int = 1,
               prefix: str = "w") -> Path:
    """New, distinct images under new names (what a week's new photos look like); returns the folder of new files."""
    fresh = write_class_folder(staging, classes=classes, per_class=per_class, size=48, seed=seed)
    for f in sorted(fresh.rglob("*.jpg")):
        f.rename(f.with_name(f"{prefix}{seed}_{f.name}"))
    for f in sorted(fresh.rglob("*.jpg")):
        (data / f.parent.name).mkdir(exist_ok=True)
        shutil.copy2(f, data / f.parent.name / f.name)
    return fresh


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five weekly runs, four of them training: 3-4 min on an idle 2-core machine
@pytest.mark.parametrize("backend", ["local", "gcs"])
def test_one_season_of_scheduled_retraining(backend, tmp_path, weights_mirror, monkeypatch, capsys, request):
    """Weeks 1-3 and 5 and the rollback run on both backends (where the data and the registry live matters: the
    fingerprint, ingest of new files, the champion read from push_to, pushes, LATEST, rollback). Week 4, the broken
    recipe the fine-tune guard and evaluate refuse, is the same computation whatever the storage, and its registry
    side is only "nothing pushed, LATEST read back unchanged": it runs once, in the gs:// season (one training run
    fewer in CI's slow stage)."""
    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))
    data = write_class_folder(tmp_path / "data", classes=CLASSES, per_class=20, size=48, seed=0)
    if backend == "gcs":
        bucket = request.getfixturevalue("gcs_bucket")
        upload = request.getfixturevalue("gcs_upload")
        source = upload(bucket, data, "flowers")
        push_to = f"gs://{bucket.name}/models/flowers"

        def publish(fresh: Path) -> None:  # the week's new photos land in the bucket
            upload(bucket, fresh, "flowers")
    else:
        source, push_to = str(data), str(tmp_path / "models" / "flowers")

        def publish(fresh: Path) -> None:
            pass
    season = Season(tmp_path, source, push_to, capsys)

    # Week 1, data v1: no champion yet; blessed on thresholds; version 1 pushed.
    w1 = season.run("week1")
    assert w1["status"] == "no champion yet" and w1["blessed"] == "True", w1
    ev1 = season.evaluation(w1)
    assert ev1["champion"]["status"] == "no champion yet" and "no champion yet" in ev1["champion"]["reason"]
    assert len(season.versions()) == 1 and season.latest() == season.versions()[0]
    v1 = season.latest()

    # Week 2, unchanged data: stops after the fingerprint step; nothing trained, no new version.
    w2 = season.run("week2")
    assert w2["status"] == "no new data", w2
    assert "(nothing trained: no new data)" in w2["export"]
    assert not list((tmp_path / "week2" / "pipeline_root").glob("*/ingest"))
    assert not list((tmp_path / "week2" / "pipeline_root").glob("*/train-head"))
    assert season.versions() == [v1] and season.latest() == v1

    # Week 3, v1 plus new images: ingest again; every v1 test image still in test; compared with v1 on the new split.
    publish(add_images(data, tmp_path / "new3", seed=3))
    w3 = season.run("week3")
    assert w3["status"] == "new data", w3
    old_test, new_test = split_hashes(season.dataset("week1")), split_hashes(season.dataset("week3"))
    # No test image of last week moved to this week's training set, but for a near-duplicate of a new image that
    # the leakage rule (leakage=move) put into one split with it: those are named in the report.
    moved = set(json.loads((season.dataset("week3") / "ingest_report.json").read_text())["leakage"]["moves"])
    assert old_test and old_test - moved <= new_test
    ev3 = season.evaluation(w3)
    assert ev3["champion"]["status"] == "compared" and ev3["champion"]["version"] == v1
    assert ev3["baseline"]["metrics"]["num_examples"] == ev3["metrics"]["num_examples"] == len(new_test)
    not_worse = ev3["metrics"]["accuracy"] + 1e-9 >= ev3["baseline"]["metrics"]["accuracy"]
    assert ev3["blessed"] == (not_worse and ev3["metrics"]["accuracy"] >= 0.5), ev3["blessing"]
    if ev3["blessed"]:
        assert len(season.versions()) == 2 and season.latest() == season.versions()[-1] != v1
    else:
        assert season.versions() == [v1] and season.latest() == v1
    champion3 = season.latest()

    # Week 4, a broken recipe on the same data (no head phase, fine-tune at lr 10): trained (settings changed); the
    # fine-tune guard can only hand back the untrained head or a wrecked epoch, so it is not blessed, LATEST stays,
    # and the evaluation names the champion, the reason and what the guard kept.
    if backend == "gcs":
        before = season.versions()
        w4 = season.run("week4", "head_epochs=0", "fine_tune_learning_rate=10")
        assert w4["status"] == "settings changed" and w4["blessed"] == "False", w4
        ev4 = season.evaluation(w4)
        assert ev4["fine_tune_guard"]["kept"] in ("start", "best_epoch"), ev4["fine_tune_guard"]
        assert ev4["champion"]["version"] == champion3 and ev4["champion"]["decision"].startswith(
            "challenger refused")
        assert ev4["blessing"]["reasons"]
        assert season.versions() == before and season.latest() == champion3

    # Week 5, a new class folder: no comparison; the policy (bless on thresholds) decides, the reason is written.
    publish(add_images(data, tmp_path / "new5", classes=("checker",), per_class=20, seed=5))
    w5 = season.run("week5")
    assert w5["status"] == "new data", w5
    ev5 = season.evaluation(w5)
    assert ev5["champion"]["status"] == "class set changed" and ev5["champion"]["policy"] == "bless"
    assert "checker" in ev5["champion"]["reason"] and ev5["baseline"] is None
    assert ev5["blessed"] == (ev5["metrics"]["accuracy"] >= 0.5)
    if ev5["blessed"]:
        assert season.latest() == season.versions()[-1] != champion3
    assert len(season.versions()) >= 2, "the season needs two versions to roll back between"

    # Rollback: LATEST back on the version before.
    versions, current = season.versions(), season.latest()
    assert main(["rollback", "--push-to", push_to]) == 0
    assert season.latest() == versions[versions.index(current) - 1]
    assert main(["versions", "--push-to", push_to]) == 0
    listing = capsys.readouterr().out
    assert f"* {season.latest()}" in listing and all(v in listing for v in versions)


@pytest.mark.slow
def test_ingest_cache_follows_the_data_under_kfp_local(tmp_path, caplog):
    """Unchanged data: ingest is a cache hit; changed data under the same path: ingest runs again."""
    import logging

    from kfp import dsl

    from kfp_finetune.components.ingest.fingerprint import fingerprint_op
    from kfp_finetune.components.ingest.step import ingest_op
    from kfp_finetune.pipelines._kfp_local import init_local

    @dsl.pipeline(name="fingerprint-ingest")
    def fingerprint_then_ingest(source: str) -> dsl.Dataset:
        fp = fingerprint_op(source=source).set_caching_options(False)
        return ingest_op(source=source, fingerprint=fp.outputs["fingerprint"]).set_caching_options(True).output

    data = write_class_folder(tmp_path / "data", per_class=6, size=16)
    init_local(str(tmp_path / "root"), enable_caching=True)
    caplog.set_level(logging.INFO)

    first = fingerprint_then_ingest(source=str(data)).output
    caplog.clear()
    second = fingerprint_then_ingest(source=str(data)).output
    assert "cache hit" in caplog.text and second.uri == first.uri

    add_images(data, tmp_path / "new", per_class=2, seed=9)
    caplog.clear()
    third = fingerprint_then_ingest(source=str(data)).output
    assert "cache hit" not in caplog.text and third.uri != first.uri  # ingest is the only cacheable task
    counts = [json.loads((Path(d.uri) / "ingest_report.json").read_text())["num_image_files"] for d in (first, third)]
    assert counts == [18, 24]
