"""evaluate: metrics equal Keras's own, the offline report, blessing against worse/better baselines, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.evaluate.step import EvaluateConfig, bless, evaluate
from tests import evalchain


@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_folder, weights_mirror) -> evalchain.Chain:
    return evalchain.get(tmp_path_factory, synthetic_folder, weights_mirror)


@pytest.fixture(scope="module")
def weak_eval(chain, tmp_path_factory):
    """The weak model evaluated on test: it makes mistakes, so every part of the report has content."""
    out = tmp_path_factory.mktemp("weak_eval") / "out"
    return evaluate(EvaluateConfig(dataset=str(chain.dataset), model=str(chain.weak), output=str(out))), out


def test_metrics_equal_keras_model_evaluate(chain, weak_eval):
    import keras

    from kfp_finetune.components.core import dataset, modelio
    from kfp_finetune.components.evaluate.step import split_dataset

    result, out = weak_eval
    model, _ = modelio.load_model(chain.weak)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                           keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top_k")])
    info = dataset.load_info(chain.dataset)
    keras_metrics = model.evaluate(split_dataset(info, "test", evalchain.IMAGE_SIZE), return_dict=True, verbose=0)

    m = result.metrics
    assert m["num_examples"] == info.num_examples["test"]
    assert m["num_correct"] / m["num_examples"] == pytest.approx(keras_metrics["accuracy"], abs=1e-6)
    assert m["accuracy"] == pytest.approx(keras_metrics["accuracy"], abs=1e-6)
    assert m["loss"] == pytest.approx(keras_metrics["loss"], rel=1e-4)
    assert m["top_k"] == 2  # min(5, 3 classes - 1)
    assert m["top_k_accuracy"] == pytest.approx(keras_metrics["top_k"], abs=1e-6)
    assert 0 < m["accuracy"] < 0.9, "the weak model should be visibly weak"

    saved = json.loads((out / "evaluation.json").read_text())
    cm = np.array(saved["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == m["num_examples"]
    assert np.trace(cm) == m["num_correct"]
    # Rows are true classes: their sums are the test counts per class from the ingest report.
    assert cm.sum(axis=1).tolist() == [info.report["counts"]["test"][c] for c in info.class_names]
    for i, name in enumerate(info.class_names):
        pc = saved["per_class"][name]
        assert pc["support"] == cm[i].sum()
        assert pc["recall"] == pytest.approx(cm[i, i] / cm[i].sum())
        assert pc["precision"] == pytest.approx(cm[i, i] / cm[:, i].sum() if cm[:, i].sum() else 0.0)
    f1s = [saved["per_class"][c]["f1"] for c in info.class_names]
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    assert m["weighted_f1"] == pytest.approx(np.average(f1s, weights=cm.sum(axis=1)))


def test_report_is_self_contained_and_complete(chain, weak_eval):
    result, out = weak_eval
    html = (out / "report.html").read_text()
    # Nothing to fetch: no scripts, stylesheets, fonts or remote URLs (the SVG namespace is an identifier).
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@import" not in html
    text = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "", html).replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert re.findall(r"(?:https?:)?//[^\s\"'<>]+", text) == []
    assert re.findall(r'src="(?!data:)', html) == []
    # Curves (one polyline per series from model.json history), the heatmap, the tables, the thumbnails.
    assert html.count("<svg") >= 3
    assert "train_head" in html
    curves = html[html.index("<h2>Training curves</h2>"):html.index("<h2>Confusion matrix</h2>")]
    assert curves.count("<circle") == 4  # the weak model trained 1 epoch: one train + one validation point per chart
    assert 'aria-label="confusion matrix"' in html
    for name in result.class_names:
        assert f"<td>{name}</td>" in html
    mistakes = len(result.evaluation["worst_mistakes"])
    assert mistakes == min(12, result.metrics["num_examples"] - result.metrics["num_correct"]) > 0
    worst = html[html.index("<h2>Worst mistakes</h2>"):html.index("<h2>Dataset</h2>")]
    assert worst.count('src="data:image/jpeg;base64,') == mistakes
    confidences = [m["confidence"] for m in result.evaluation["worst_mistakes"]]
    assert confidences == sorted(confidences, reverse=True)
    assert str(Path(chain.synthetic_folder)) in html  # the dataset summary names the ingest source
    data = html[html.index('<section class="dp"'):]  # the data section (issue 23): this run's profile, no champion
    assert "Class shares" in data and "no champion profile to compare with" in data and data.count("<svg") >= 7


def test_worse_baseline_from_gcs_keeps_candidate_blessed(chain, tmp_path, gcs_bucket, gcs_upload, weak_eval):
    baseline_uri = gcs_upload(gcs_bucket, chain.weak, "models/weak")
    result = evaluate(EvaluateConfig(dataset=str(chain.dataset), model=str(chain.strong), output=str(tmp_path / "e"),
                                     min_accuracy=0.8, baseline_model=baseline_uri, max_regression=0.0))
    assert result.blessed, result.reasons
    saved = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert saved["blessed"] is True and saved["blessing"]["reasons"] == []
    rules = {r["rule"]: r for r in saved["blessing"]["rules"]}
    regression = rules["accuracy >= baseline_accuracy - max_regression"]
    # The baseline downloaded from gs:// measures exactly what the local weak model measured.
    assert regression["baseline_accuracy"] == weak_eval[0].metrics["accuracy"]
    assert regression["accuracy"] == result.metrics["accuracy"] > regression["baseline_accuracy"]
    assert saved["baseline"]["model"] == baseline_uri


def test_better_baseline_blocks_blessing_unless_regression_allowed(chain, tmp_path, weak_eval):
    strict = evaluate(EvaluateConfig(dataset=str(chain.dataset), model=str(chain.weak), output=str(tmp_path / "a"),
                                     min_accuracy=0.5, baseline_model=str(chain.strong)))
    assert not strict.blessed
    assert strict.baseline_metrics["accuracy"] > strict.metrics["accuracy"] == weak_eval[0].metrics["accuracy"]
    assert len(strict.reasons) == 2  # both rules failed, each named with its numbers
    assert any("min_accuracy" in r for r in strict.reasons)
    assert any("baseline" in r and f"{strict.baseline_metrics['accuracy']:.4f}" in r for r in strict.reasons)
    assert json.loads((tmp_path / "a" / "evaluation.json").read_text())["blessed"] is False

    lenient = bless(strict.metrics["accuracy"], 0.0, strict.baseline_metrics["accuracy"], max_regression=1.0)
    assert lenient["blessed"] and [r["passed"] for r in lenient["rules"]] == [True, True]


def test_training_curves_span_both_phases():
    from kfp_finetune.components.evaluate.report import curve_svg

    history = {"train_head": {"loss": [1.0, 0.8, 0.6], "val_loss": [1.1, 0.9, 0.7]},
               "fine_tune": {"loss": [0.5, 0.4], "val_loss": [0.65, 0.6]}}
    svg = curve_svg(history, "loss")
    assert svg.count("<polyline") == 2 and "epoch (1..5)" in svg
    assert "train_head" in svg and "fine_tune" in svg and 'stroke-dasharray="4,4"' in svg  # the phase change
    points = re.search(r'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="([^"]+)"', svg).group(1)
    ys = [float(p.split(",")[1]) for p in points.split()]
    assert len(ys) == 5 and ys == sorted(ys)  # falling loss is drawn as a line going down (SVG y grows downwards)
    assert "no accuracy history" in curve_svg(history, "accuracy")


def test_bless_boundaries():
    assert bless(0.7, 0.7)["blessed"]
    assert bless(0.7, 0.0, baseline_accuracy=0.8, max_regression=0.1)["blessed"]  # 0.8 - 0.1 rounds to 0.70000001
    assert not bless(0.69, 0.0, baseline_accuracy=0.8, max_regression=0.1)["blessed"]
    assert not bless(0.5, 0.6)["blessed"]


def test_errors_leave_nothing(chain, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="classes"):  # model trained on other class names than the dataset's
        evaluate(EvaluateConfig(dataset=str(chain.other_dataset), model=str(chain.strong), output=str(out)))
    with pytest.raises(UserError, match="no split 'holdout'"):
        evaluate(EvaluateConfig(dataset=str(chain.dataset), model=str(chain.strong), output=str(out), split="holdout"))
    with pytest.raises(UserError, match="'test' is empty"):
        evaluate(EvaluateConfig(dataset=str(chain.no_test_dataset), model=str(chain.strong), output=str(out)))
    with pytest.raises(UserError, match="min-accuracy"):
        EvaluateConfig(dataset="d", model="m", output="o", min_accuracy=1.5)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp directories left behind either


@pytest.mark.slow
def test_baseline_with_other_classes_is_refused(chain, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="--baseline-model .* classes"):
        evaluate(EvaluateConfig(dataset=str(chain.dataset), model=str(chain.strong), output=str(out),
                                baseline_model=str(chain.other_model)))
    assert not out.exists()


def test_cli_writes_evaluation_and_exits_2_on_bad_input(chain, tmp_path, capsys):
    from kfp_finetune.pipelines.cli import main

    out = tmp_path / "cli"
    assert main(["evaluate", "--dataset", str(chain.dataset), "--model", str(chain.strong), "--output", str(out),
                 "--min-accuracy", "0.9"]) == 0
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["blessed"] is True and saved["metrics"]["accuracy"] >= 0.9
    assert (out / "report.html").is_file()
    assert main(["evaluate", "--dataset", str(chain.other_dataset), "--model", str(chain.strong),
                 "--output", str(tmp_path / "bad")]) == 2
    assert "kfp-finetune: error:" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_component_maps_outputs(chain, tmp_path):
    """evaluate_op's body with real artifact objects: Metrics, confusion matrix, HTML file, NamedTuple."""
    from kfp import dsl

    from kfp_finetune.components.evaluate.step import evaluate_op

    def artifact(cls, name):  # noqa: ANN001, ANN202
        return cls(name=name, uri=str(tmp_path / name))

    metrics = artifact(dsl.Metrics, "metrics")
    cm = artifact(dsl.ClassificationMetrics, "cm")
    report = artifact(dsl.HTML, "report.html")
    evaluation = artifact(dsl.Artifact, "evaluation")
    outputs = evaluate_op.python_func(
        dataset=dsl.Dataset(uri=str(chain.dataset)),
        model=dsl.Model(uri=str(chain.strong)), metrics=metrics, classification_metrics=cm, report=report,
        evaluation=evaluation, min_accuracy=0.5)
    assert outputs.blessed is True and outputs.accuracy == metrics.metadata["accuracy"]
    assert set(metrics.metadata) >= {"accuracy", "loss", "top_k_accuracy", "macro_f1", "weighted_f1"}
    matrix = cm.metadata["confusionMatrix"]
    assert [a["displayName"] for a in matrix["annotationSpecs"]] == ["circle", "square", "stripes"]
    assert sum(sum(row["row"]) for row in matrix["rows"]) == metrics.metadata["num_examples"]
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "evaluation" / "evaluation.json").is_file()
