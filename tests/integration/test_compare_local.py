"""The compare mode run locally through kfp.local: two recipes as ParallelFor branches, dsl.Collected fan-in, the
winner picked on validation, then the test-split evaluate and export, as `kfp-finetune run --compare-recipes`."""

import hashlib
import json
from pathlib import Path

import pytest

from kfp_finetune.pipelines.cli import main

pytest.importorskip("kfp_finetune.components.backbone.step")


def summary_value(out: str, key: str) -> str:
    for line in out.splitlines():
        if line.strip().startswith(key):
            return line.strip()[len(key):].strip()
    raise AssertionError(f"{key} not in the summary:\n{out}")


@pytest.mark.slow
def test_compare_two_recipes_locally(synthetic_folder, weights_mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))
    recipes = ["head_only", "two_phase_bn_frozen"]
    code = main(["run", "--source", str(synthetic_folder), "--output", str(tmp_path / "run"),
                 "--compare-recipes", ",".join(recipes), "--param", "head_epochs=1", "--param", "fine_tune_epochs=1",
                 "--param", "image_size=64", "--param", "batch_size=16", "--param", "min_accuracy=0.0"])
    out = capsys.readouterr().out
    assert code == 0, out[-5000:]
    summary = out[out.index("kfp-finetune run: summary"):]
    winner = summary_value(summary, "winner recipe").split()[0]
    assert winner in recipes

    # The table ranks both recipes on validation; the winner is the best of them there.
    comparison = Path(summary_value(summary, "comparison"))
    table = comparison.read_text()
    assert "validation" in table and all(r in table for r in recipes)
    pick_dir = comparison.parent
    root = pick_dir.parent
    candidates = {}
    for evaluation in root.glob("for-loop-*-iteration-*/evaluate-validation/evaluation/evaluation.json"):
        data = json.loads(evaluation.read_text())
        assert data["split"] == "validation"
        candidates[data["model_sha256"]] = data["metrics"]["accuracy"]
    assert len(candidates) == 2, candidates  # two distinct models: head-only passed through, the other fine-tuned
    # Each branch trained at its recipe's settings: both recipes train without label smoothing (the step default
    # is 0.1, which the branches used to get whatever the recipe said).
    heads = list(root.glob("for-loop-*-iteration-*/train-head/model/model.json"))
    assert len(heads) == 2 and all(
        json.loads(h.read_text())["training"]["train_head"]["label_smoothing"] == 0.0 for h in heads), heads

    # The winner (a copy of its branch's model) went on to the test split, and was exported (min_accuracy 0).
    model = Path(summary_value(summary, "model"))
    assert model.parent == pick_dir
    test_eval = json.loads((Path(summary_value(summary, "evaluation")) / "evaluation.json").read_text())
    assert test_eval["split"] == "test"
    phase = json.loads((model / "model.json").read_text())["phase"]
    assert phase == ("train_head" if winner == "head_only" else "fine_tune")
    winner_sha = hashlib.sha256((model / "model.keras").read_bytes()).hexdigest()
    assert candidates[winner_sha] == max(candidates.values())  # the best on validation is the one tested
    assert summary_value(summary, "blessed") == "True"
    assert any(Path(summary_value(summary, "export")).rglob("saved_model.pb"))
