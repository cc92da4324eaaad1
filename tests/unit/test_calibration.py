"""Calibration: ECE against a hand computation, temperature scaling on a label-smoothed model (fitted on validation,
never test), the report's reliability diagram, the max_ece rule, and the export serving softmax(logits / T)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.evaluate import calibration
from kfp_finetune.components.evaluate.step import EvaluateConfig, bless, evaluate
from tests import evalchain

# Six examples, 2 classes. Top-1 confidences and whether the argmax is right:
#   0.95 right, 0.95 wrong, 0.62 right, 0.55 right, 0.55 wrong, 0.81 right
FIXED_P = np.array([[0.95, 0.05], [0.05, 0.95], [0.62, 0.38], [0.45, 0.55], [0.55, 0.45], [0.19, 0.81]])
FIXED_Y = np.array([0, 0, 0, 1, 1, 1])


def test_ece_equals_a_hand_computed_value():
    # 15 bins of width 1/15: 0.95 -> bin 14 (0.9333, 1]; 0.81 -> bin 12 (0.8, 0.8667]; 0.62 -> bin 9 (0.6, 0.6667];
    # 0.55 -> bin 8 (0.5333, 0.6].
    # bin 14: 2 examples, accuracy 1/2, confidence 0.95 -> |0.5 - 0.95| = 0.45, weight 2/6
    # bin 12: 1 example, accuracy 1, confidence 0.81 -> 0.19, weight 1/6
    # bin 9: 1 example, accuracy 1, confidence 0.62 -> 0.38, weight 1/6
    # bin 8: 2 examples, accuracy 1/2, confidence 0.55 -> 0.05, weight 2/6
    hand = (2 * 0.45 + 0.19 + 0.38 + 2 * 0.05) / 6
    assert hand == pytest.approx(0.2616666666)
    assert calibration.expected_calibration_error(FIXED_P, FIXED_Y) == pytest.approx(hand, abs=1e-12)
    bins = calibration.reliability_bins(FIXED_P, FIXED_Y)
    assert len(bins) == calibration.ECE_BINS == 15
    assert [b["count"] for b in bins] == [0] * 8 + [2, 1, 0, 0, 1, 0, 2]
    assert bins[8]["lower"] == pytest.approx(8 / 15) and bins[14]["upper"] == 1.0
    # a perfectly calibrated set scores 0; an upper bin edge belongs to its bin: 0.6 -> bin 8, (8/15, 9/15]
    assert calibration.expected_calibration_error(np.array([[1.0, 0.0]] * 3), np.array([0, 0, 0])) == 0.0
    assert calibration.reliability_bins(np.array([[0.6, 0.4]]), np.array([0]))[8]["count"] == 1
    with pytest.raises(ValueError):
        calibration.expected_calibration_error(np.zeros([0, 2]), np.zeros([0], int))


def test_temperature_recovers_a_known_distortion_and_keeps_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, size=(4000, 5))
    # labels drawn from softmax(logits): these probabilities are calibrated by construction
    true_p = calibration.softmax(logits)
    labels = np.array([rng.choice(5, p=p) for p in true_p])
    for distortion in (0.4, 2.5):  # over- and under-confident versions of the same model
        distorted = calibration.softmax(logits / distortion)
        t = calibration.fit_temperature(distorted, labels)
        assert t == pytest.approx(1 / distortion, rel=0.1)
        fixed = calibration.apply_temperature(distorted, t)
        assert calibration.nll(fixed, labels) < calibration.nll(distorted, labels)
        assert calibration.expected_calibration_error(fixed, labels) < 0.03
        assert (fixed.argmax(1) == distorted.argmax(1)).all()


def test_temperature_of_reads_evaluation_json():
    assert calibration.temperature_of(None) == 1.0
    assert calibration.temperature_of({"calibration": {"temperature": 1.7}}) == 1.7
    with pytest.raises(UserError, match="temperature"):
        calibration.temperature_of({"calibration": {"temperature": -1}})


def test_max_ece_rule_is_off_by_default():
    assert [r["rule"] for r in bless(0.9, 0.5, ece=0.3)["rules"]] == ["accuracy >= min_accuracy"]
    refused = bless(0.9, 0.5, ece=0.3, max_ece=0.1)
    assert not refused["blessed"] and "expected calibration error 0.3000 vs max_ece 0.1000" in refused["reasons"][0]
    assert bless(0.9, 0.5, ece=0.05, max_ece=0.1)["blessed"]
    with pytest.raises(UserError, match="--max-ece"):
        EvaluateConfig(dataset="d", model="m", output="o", max_ece=1.5)


# --- on a trained model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_folder, weights_mirror) -> evalchain.Chain:
    return evalchain.get(tmp_path_factory, synthetic_folder, weights_mirror)


@pytest.fixture(scope="module")
def calibrated(chain, tmp_path_factory):
    """A model trained with label smoothing 0.1 (the default) on labels with 25 % noise: mistakes on every split."""
    out = tmp_path_factory.mktemp("calib_eval") / "out"
    return evaluate(EvaluateConfig(dataset=str(chain.noisy_dataset), model=str(chain.noisy), output=str(out))), out


def test_temperature_is_fitted_on_validation_and_lowers_its_nll(chain, calibrated):
    from kfp_finetune.components.core import dataset, modelio
    from kfp_finetune.components.evaluate.step import predict

    result, out = calibrated
    meta = modelio.read_meta(chain.noisy)
    assert meta["training"]["train_head"]["label_smoothing"] == 0.1  # trained with label smoothing
    c = json.loads((out / "evaluation.json").read_text())["calibration"]
    assert c["status"] == "fitted" and c["fitted_on"] == "validation" and c["ece_bins"] == 15
    t = c["temperature"]
    assert t != pytest.approx(1.0, abs=1e-3)
    # Refit independently on the validation split's predictions: the same T (so it was not fitted on test).
    model, _ = modelio.load_model(chain.noisy)
    info = dataset.load_info(chain.noisy_dataset)
    val = predict(model, info, "validation", "check")
    assert calibration.fit_temperature(val.probabilities, val.labels) == pytest.approx(t, rel=1e-6)
    assert c["validation"]["examples"] == len(val.labels)
    assert c["validation"]["after"]["nll"] < c["validation"]["before"]["nll"]
    # "before" on the test split is evaluate's own loss; accuracy does not move with T
    assert c["before"]["nll"] == pytest.approx(result.metrics["loss"], rel=1e-6)
    assert sum(b["count"] for b in c["reliability_after"]) == result.metrics["num_examples"]


def test_report_shows_ece_nll_and_the_reliability_diagram(calibrated):
    _, out = calibrated
    html = (out / "report.html").read_text()
    assert "<h2>Calibration</h2>" in html and 'aria-label="reliability diagram"' in html
    c = json.loads((out / "evaluation.json").read_text())["calibration"]
    assert f"T = {c['temperature']:.3f}" in html
    for when in ("before", "after"):
        assert f"{c[when]['ece']:.4f}" in html and f"{c[when]['nll']:.4f}" in html
    assert "15 equal-width bins" in html


def test_calibrate_off_and_the_max_ece_rule(chain, calibrated, tmp_path):
    off = evaluate(EvaluateConfig(dataset=str(chain.noisy_dataset), model=str(chain.noisy),
                                  output=str(tmp_path / "off"),
                                  calibrate=False, max_ece=0.0))
    c = off.evaluation["calibration"]
    assert c["status"] == "off" and c["temperature"] == 1.0 and c["after"] == c["before"]
    assert not off.blessed and any("max_ece" in r for r in off.reasons)
    assert "not calibrated (calibrate is off)" in (tmp_path / "off" / "report.html").read_text()


def test_served_probabilities_are_softmax_of_logits_over_t(chain, calibrated, tmp_path, flowers_dir):
    import tensorflow as tf

    from kfp_finetune.components.core import modelio
    from kfp_finetune.components.export import serving
    from kfp_finetune.components.export.step import ExportConfig, export

    _, evaluation = calibrated
    t = json.loads((evaluation / "evaluation.json").read_text())["calibration"]["temperature"]
    result = export(ExportConfig(model=str(chain.noisy), output=str(tmp_path / "export"), evaluation=str(evaluation)))
    assert result.temperature == t and result.serving_check["passed"]
    info = json.loads((tmp_path / "export" / "export.json").read_text())
    assert info["calibration"]["temperature"] == t and "logits" in info["outputs"]

    images = [p.read_bytes() for p in sorted(flowers_dir.glob("*/*.jpg"))[::200][:6]]
    out = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"](image_bytes=tf.constant(images))
    logits, probs = out["logits"].numpy().astype(np.float64), out["probabilities"].numpy()
    np.testing.assert_allclose(probs, calibration.softmax(logits / t), atol=1e-5)
    # and the logits are the Keras model's: softmax(logits) gives back its probabilities
    model, _ = modelio.load_model(chain.noisy)
    np.testing.assert_allclose(calibration.softmax(logits), serving.keras_probabilities(model, images), atol=1e-5)
    assert out["class_id"].numpy().tolist() == probs.argmax(1).tolist()
    assert math.isfinite(float(np.min(logits)))


def test_the_cli_and_component_carry_calibrate_and_max_ece(chain, tmp_path):
    from kfp_finetune.pipelines.cli import main

    out = tmp_path / "cli"
    assert main(["evaluate", "--dataset", str(chain.noisy_dataset), "--model", str(chain.noisy), "--output", str(out),
                 "--no-calibrate", "--max-ece", "0.5"]) == 0
    saved = json.loads((Path(out) / "evaluation.json").read_text())
    assert saved["config"]["calibrate"] is False and saved["config"]["max_ece"] == 0.5
    assert saved["calibration"]["status"] == "off"


def test_a_perfectly_separated_validation_split_gives_no_temperature():
    """All right on validation: NLL keeps falling as T -> 0, so the fit ends on its bound; T = 1 is served."""
    p = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]] * 5)
    y = np.array([0, 1, 2] * 5)
    section = calibration.measure((p, y), (p, y))
    assert section["status"] == "separated" and section["temperature"] == 1.0
    assert section["fitted_temperature"] == pytest.approx(calibration.T_MIN, rel=0.02)
    assert "not applied (T = 1)" in section["note"] and section["after"] == section["before"]
