"""The compare mode: winner picking (validation only, ties), branch settings, and the compiled structure."""

import json

import pytest
import yaml

from kfp_finetune.components.compare.step import (
    Candidate,
    branch_settings,
    comparison_table,
    parse_recipe_names,
    pick_winner,
)
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.pipelines.cli import main
from kfp_finetune.pipelines.pipeline import CompileOptions, compile_pipeline
from tests.pipeline_shape import pipeline_structure

IMAGE = "registry.example.com/team/kfp-finetune:1.2.3"


def cand(recipe, accuracy, loss=1.0, split="validation", sha=""):
    return Candidate(recipe=recipe, accuracy=accuracy, loss=loss, split=split, model_sha256=sha)


def test_highest_validation_accuracy_wins():
    assert pick_winner([cand("a", 0.70), cand("b", 0.82), cand("c", 0.79)]).recipe == "b"


def test_ties_go_to_lower_loss_then_to_the_recipe_listed_first():
    assert pick_winner([cand("a", 0.8, loss=0.6), cand("b", 0.8, loss=0.4)]).recipe == "b"
    assert pick_winner([cand("a", 0.8, loss=0.5), cand("b", 0.8, loss=0.5)]).recipe == "a"
    assert pick_winner([cand("b", 0.8, loss=0.5), cand("a", 0.8, loss=0.5)]).recipe == "b"


def test_a_diverged_run_never_wins():
    assert pick_winner([cand("nan", float("nan")), cand("ok", 0.1)]).recipe == "ok"


@pytest.mark.parametrize("split", ["test", "train", ""])
def test_only_validation_results_are_accepted(split):
    """Choosing on the test split would leak it: refused, naming the offending recipe."""
    with pytest.raises(UserError, match=r"validation split only.*b \("):
        pick_winner([cand("a", 0.5), cand("b", 0.99, split=split)])


def test_no_candidates_or_duplicates_are_errors():
    with pytest.raises(UserError, match="no candidates"):
        pick_winner([])
    with pytest.raises(UserError, match="twice"):
        pick_winner([cand("a", 0.5), cand("a", 0.6)])


def test_table_ranks_and_marks_the_winner():
    cands = [cand("a", 0.5), cand("b", 0.9)]
    table = comparison_table(cands, pick_winner(cands))
    rows = [line for line in table.splitlines() if line.startswith("| 1") or line.startswith("| 2")]
    assert "**b** (winner)" in rows[0] and "| a |" in rows[1]


def test_recipe_names_are_checked():
    assert parse_recipe_names("head_only, two_phase_bn_train") == ("head_only", "two_phase_bn_train")
    with pytest.raises(UserError, match="not a known recipe"):
        parse_recipe_names("head_only,nope")
    with pytest.raises(UserError, match="at least two"):
        parse_recipe_names("head_only")


def test_branch_settings_cap_epochs_and_keep_the_recipes_choices():
    head_only = branch_settings("head_only", max_head_epochs=1, max_fine_tune_epochs=1)
    assert head_only.head_epochs == 1 and head_only.fine_tune_epochs == 0  # 0: fine_tune passes through
    trainable = branch_settings("all_trainable", weights="/mirror/w.h5", image_size=96)
    assert trainable.weights == "/mirror/w.h5" and trainable.image_size == 96 and trainable.batch_norm == "train"
    assert trainable.head_epochs == 0
    frozen = branch_settings("two_phase_bn_frozen", weights="/mirror/w.h5", max_fine_tune_epochs=1)
    assert frozen.weights == "/mirror/w.h5" and frozen.batch_norm == "frozen"
    assert frozen.fine_tune_epochs == 1 and frozen.warmup_epochs <= 1


def test_pick_winner_cli_refuses_test_split_and_writes_nothing(tmp_path, capsys):
    for name, split in (("a", "validation"), ("b", "test")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "evaluation.json").write_text(json.dumps(
            {"split": split, "metrics": {"accuracy": 0.5, "loss": 1.0}, "model_sha256": "x"}))
    out = tmp_path / "cmp"
    code = main(["pick-winner", "--candidate", "a", str(tmp_path / "a"), str(tmp_path),
                 "--candidate", "b", str(tmp_path / "b"), str(tmp_path), "--output", str(out)])
    assert code == 2 and "never on test" in capsys.readouterr().err
    assert not out.exists()


def compare_structure(tmp_path):
    out = compile_pipeline(tmp_path / "p.yaml",
                           CompileOptions(image=IMAGE, compare_recipes=("head_only", "two_phase_bn_train")))
    ir = yaml.safe_load(out.read_text())
    return new_data_branch(ir, pipeline_structure(ir, image=IMAGE)["tasks"])


def new_data_branch(ir, tasks):
    """The DAG that trains (the fingerprint's new-data branch, where compare mode lives) and its tasks by inner path."""
    branch = next(path for path in tasks if path.count("/") == 1 and f"{path}/ingest" in tasks)
    group, inner = branch.split("/")
    group_dag = ir["components"][ir["root"]["dag"]["tasks"][group]["componentRef"]["name"]]["dag"]
    dag = ir["components"][group_dag["tasks"][inner]["componentRef"]["name"]]["dag"]
    prefix = branch + "/"
    return dag, {path[len(prefix):]: task for path, task in tasks.items() if path.startswith(prefix)}


def test_compare_mode_compiles_a_parallel_for_over_the_recipes(tmp_path):
    dag, tasks = compare_structure(tmp_path)
    loops = [t for t in dag["tasks"].values() if "parameterIterator" in t]
    assert len(loops) == 1
    assert json.loads(loops[0]["parameterIterator"]["items"]["raw"]) == ["head_only", "two_phase_bn_train"]
    loop = next(name for name in tasks if name.startswith("for-loop") and "/" not in name)
    inner = {name.split("/", 1)[1] for name in tasks if name.startswith(loop + "/")}
    assert inner == {"recipe", "backbone", "train-head", "fine-tune", "evaluate-validation", "candidate"}
    assert tasks[f"{loop}/evaluate-validation"]["parameters"]["split"] == "const:'validation'"
    assert "backbone" not in tasks  # each branch builds its own (a recipe may want other weights)


def test_compare_mode_collects_the_branches_and_the_winner_feeds_test_evaluate_and_export(tmp_path):
    dag, tasks = compare_structure(tmp_path)
    loop = next(name for name in tasks if name.startswith("for-loop") and "/" not in name)
    pick = tasks["pick-winner"]
    assert pick["after"] == [loop]
    assert pick["artifacts"]["models"].startswith(f"{loop}.")  # dsl.Collected of the branches' models
    assert dag["tasks"]["pick-winner"]["inputs"]["parameters"]["candidates"][
        "taskOutputParameter"]["producerTask"] == loop
    assert tasks["evaluate"]["artifacts"]["model"] == "pick-winner.winner"
    assert tasks["evaluate"]["parameters"]["split"] == "const:'test'"
    condition = next(name for name in tasks if name.startswith("condition-") and "/" not in name)
    assert tasks[f"{condition}/export"]["artifacts"]["model"] == "param:pipelinechannel--pick-winner-winner"
    outputs = yaml.safe_load((tmp_path / "p.yaml").read_text())["root"]["outputDefinitions"]
    assert "comparison" in outputs["artifacts"] and "winner_recipe" in outputs["parameters"]


def test_compile_cli_takes_compare_recipes(tmp_path):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out), "--image", IMAGE, "--compare-recipes", "all"]) == 0
    ir = yaml.safe_load(out.read_text())
    _, tasks = new_data_branch(ir, pipeline_structure(ir, image=IMAGE)["tasks"])
    assert "pick-winner" in tasks
