"""The whole pipeline, run locally through kfp.local exactly as `kfp-finetune run` does, on real photos."""

import json
from pathlib import Path

import pytest

from kfp_finetune.pipelines.cli import main

pytest.importorskip("kfp_finetune.components.backbone.step")

FAST = ["--param", "head_epochs=2", "--param", "fine_tune_epochs=1", "--param", "image_size=128",
        "--param", "batch_size=16"]


def summary_value(out: str, key: str) -> str:
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] == key:
            return parts[1].strip()
    raise AssertionError(f"{key} not in the summary:\n{out}")


@pytest.mark.slow
def test_whole_pipeline_on_flowers(flowers_dir, weights_mirror, tmp_path, monkeypatch, capsys):
    """`kfp-finetune run --source flowers` with the mirror: every step, blessed, exported, well above chance."""
    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))
    out_dir = tmp_path / "run"
    code = main(["run", "--source", str(flowers_dir), "--output", str(out_dir), "--param", "head_epochs=3",
                 "--param", "fine_tune_epochs=1", "--param", "min_accuracy=0.4"])
    out = capsys.readouterr().out
    assert code == 0, out[-5000:]
    summary = out[out.index("kfp-finetune run: summary"):]
    accuracy = float(summary_value(summary, "accuracy"))
    assert accuracy > 0.4, summary  # 5 classes: chance is 0.2
    assert summary_value(summary, "blessed") == "True"
    model = Path(summary_value(summary, "model"))
    meta = json.loads((model / "model.json").read_text())
    assert meta["phase"] == "fine_tune"
    assert meta["backbone"]["weights"]["source"] != "random-fallback"
    report = Path(summary_value(summary, "report"))
    assert report.is_file() and "<html" in report.read_text()[:2000].lower()
    export = Path(summary_value(summary, "export"))
    assert any(export.rglob("saved_model.pb"))
    assert "WARNING" not in summary


def test_a_failing_step_is_named_and_the_exit_code_is_not_zero(tmp_path, weights_mirror, monkeypatch, capsys):
    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))
    empty = tmp_path / "no_images"
    (empty / "cats").mkdir(parents=True)
    (empty / "cats" / "notes.txt").write_text("not an image")
    code = main(["run", "--source", str(empty), "--output", str(tmp_path / "run"), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    # The fingerprint step lists the source first, so a source without images fails there, before any training.
    assert "step fingerprint failed" in err


@pytest.mark.slow
def test_demo_without_weights_falls_back_loudly(tmp_path, monkeypatch, capsys):
    """The no-argument demo (README's `make demo`) offline with no cache and no mirror: random init, said twice."""
    monkeypatch.delenv("KFP_FINETUNE_WEIGHTS_MIRROR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    code = main(["run", "--output", str(tmp_path / "demo"), "--param", "head_epochs=1",
                 "--param", "fine_tune_epochs=1", "--param", "image_size=64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "demo" / "sample_digits" / "7").is_dir()
    summary = out[out.index("kfp-finetune run: summary"):]
    assert "WARNING" in summary and "RANDOM" in summary.upper()
    assert float(summary_value(summary, "accuracy")) >= 0.0
    assert Path(summary_value(summary, "report")).is_file()
    meta = json.loads((Path(summary_value(summary, "model")) / "model.json").read_text())
    assert meta["backbone"]["weights"]["source"] == "random-fallback"

