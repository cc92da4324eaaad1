"""The compiled pipeline under kfp.local with `data_drift=refuse`: a run whose images became 64 px grey thumbnails
stops at the `data drift` step, in one line, before any training step starts, and nothing is pushed."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from kfp_finetune.components.dataprofile import PROFILE_FILE
from kfp_finetune.components.ingest.step import IngestConfig, profile_source
from kfp_finetune.pipelines.cli import main

pytest.importorskip("kfp_finetune.components.backbone.step")

CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
FAST = ["--param", "head_epochs=1", "--param", "fine_tune_epochs=1", "--param", "image_size=64",
        "--param", "batch_size=16", "--param", "min_accuracy=0.0", "--param", "backbone=mobilenet",
        "--param", "backbone_alpha=0.25"]


def photos(flowers: Path, root: Path, start: int, thumb: bool) -> Path:
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for photo in sorted((flowers / name).glob("*.jpg"))[start:start + 50]:
            if thumb:
                with Image.open(photo) as im:
                    im.convert("L").resize((96, 64)).save(root / name / photo.name, "JPEG", quality=85)
            else:
                shutil.copy(photo, root / name / photo.name)
    return root


@pytest.mark.slow  # kfp.local runs fingerprint, ingest, backbone and the drift step: 7-15 s
def test_refused_drift_stops_the_run_before_training(flowers_dir, weights_mirror, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))
    # The champion: a version (pushed by hand) whose data were 250 ordinary photos.
    push_to = tmp_path / "registry"
    version = push_to / "20260101000000000"
    version.mkdir(parents=True)
    profile, _ = profile_source(IngestConfig(source=str(photos(flowers_dir, tmp_path / "before", 0, False)),
                                             output=str(tmp_path / "unused")))
    (version / PROFILE_FILE).write_text(profile.dumps())
    (version / "version.json").write_text(json.dumps({"version": version.name, "created": "2026-01-01T00:00:00Z",
                                                      "data_fingerprint": "old", "settings": {}}))
    (push_to / "LATEST").write_text(version.name + "\n")

    source = photos(flowers_dir, tmp_path / "now", 50, True)
    code = main(["run", "--source", str(source), "--output", str(tmp_path / "run"), "--param",
                 f"push_to={push_to}", "--param", "data_drift=refuse", *FAST])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code != 0
    assert "data drift: refuse: resolution collapsed: median short side" in text
    final = captured.err.strip().splitlines()[-1]  # the operator's last line names the step and the reason
    assert final.startswith("kfp-finetune: error: step data-drift failed: data drift: refuse: resolution collapsed")
    assert sorted(p.name for p in push_to.iterdir()) == sorted(["LATEST", version.name])  # nothing pushed
    assert (push_to / "LATEST").read_text().strip() == version.name
    for name in ("train-head", "fine-tune", "evaluate", "export"):
        assert not list((tmp_path / "run").rglob(f"*{name}*")), f"{name} ran"
