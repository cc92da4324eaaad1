"""Calibration: does a predicted 0.9 mean right 90 % of the time? Expected calibration error, reliability bins, and
temperature scaling fitted on the validation split.

- Expected calibration error (ECE) uses `ECE_BINS` = 15 equal-width bins of the top-1 confidence over [0, 1] (bin k
  holds confidences in (k/15, (k+1)/15], the first also 0): ECE = sum over bins of |bin| / N * |accuracy(bin) -
  mean confidence(bin)|. Empty bins count 0.
- Negative log-likelihood (NLL) is the mean -log p(true class), probabilities clipped to [1e-7, 1 - 1e-7] as
  Keras's cross-entropy does, so the "before" NLL equals evaluate's `loss`.
- Temperature scaling: the classifier's head is a softmax, so log(p) are its logits up to a per-row constant, to
  which softmax is blind. Calibrated probabilities are softmax(log(p) / T) with one scalar T > 0, fitted by
  minimising the NLL on the validation split (never on test) with a bounded 1-D search over log T in
  [log T_MIN, log T_MAX] (a golden-section search, to 1e-5 in log T: the NLL is unimodal in log T, being convex
  in 1/T). T > 1 softens over-confident models, T < 1 sharpens
  under-confident ones (label smoothing, our default 0.1, makes models under-confident); argmax never changes, so
  accuracy does not either. A validation split the model gets all right (or all wrong) has no finite optimum (the
  NLL keeps falling as T -> 0): the fit is recorded (`fitted_temperature`, `status` "separated") and T = 1.

Pure NumPy: no TensorFlow import. evaluate stores the result in evaluation.json `calibration` (see
`measure`); export reads `calibration.temperature` from there and applies it in the serving signature.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

log = logging.getLogger("kfp_finetune.calibration")

ECE_BINS = 15
T_MIN, T_MAX = 0.05, 20.0
# log(p) of a probability 0 would be -inf (not JSON, and inf / T is still inf): logits are log(max(p, LOG_FLOOR)).
LOG_FLOOR = 1e-30
NLL_EPS = 1e-7  # Keras clips probabilities to [eps, 1 - eps] in its cross-entropy


def logits_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """log(p), floored at LOG_FLOOR: the model's logits up to a per-row constant (the head is a softmax)."""
    return np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), LOG_FLOOR))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T): the calibrated probabilities (float64)."""
    return softmax(logits_from_probabilities(probabilities) / float(temperature))


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped like Keras's cross-entropy)."""
    p = np.asarray(probabilities, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(np.mean(-np.log(np.clip(p, NLL_EPS, 1 - NLL_EPS))))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: its edges, count, accuracy and mean confidence (None when empty)."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(labels)
    # bin k holds (k/bins, (k+1)/bins]; a confidence of exactly 0 goes to the first bin
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        member = index == k
        n = int(member.sum())
        out.append({"lower": k / bins, "upper": (k + 1) / bins, "count": n,
                    "accuracy": float(correct[member].mean()) if n else None,
                    "confidence": float(confidence[member].mean()) if n else None})
    return out


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over `bins` equal-width bins of the top-1 confidence (see the module docstring)."""
    table = reliability_bins(probabilities, labels, bins)
    total = sum(b["count"] for b in table)
    if not total:
        raise ValueError("expected_calibration_error needs at least one example")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] that minimises the NLL of softmax(log(p) / T) on these examples."""
    logits = logits_from_probabilities(probabilities)
    labels = np.asarray(labels)

    def objective(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))

    return float(math.exp(_golden_section_minimum(objective, math.log(T_MIN), math.log(T_MAX), XATOL)))


XATOL = 1e-5  # in log T
_INVERSE_PHI = (math.sqrt(5) - 1) / 2


def _golden_section_minimum(f: Any, low: float, high: float, xatol: float) -> float:
    """The x in [low, high] minimising a unimodal f, to within xatol (the bracket's end where f is lowest there)."""
    a, b = low, high
    c, d = b - _INVERSE_PHI * (b - a), a + _INVERSE_PHI * (b - a)
    fc, fd = f(c), f(d)
    while b - a > xatol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _INVERSE_PHI * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INVERSE_PHI * (b - a)
            fd = f(d)
    candidates = [(f(low), low), (f(high), high), (min(fc, fd), c if fc <= fd else d)]
    return min(candidates)[1]


def summary(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"ece": expected_calibration_error(probabilities, labels), "nll": nll(probabilities, labels)}


def measure(validation: tuple[np.ndarray, np.ndarray] | None, test: tuple[np.ndarray, np.ndarray],
            split: str = "test") -> dict[str, Any]:
    """evaluation.json's `calibration`: T fitted on `validation` (probabilities, labels), ECE and NLL before and
    after on it and on the evaluated split `test`, and the reliability bins of the evaluated split.

    `validation` None (calibration off, or an empty validation split): T = 1, `status` says why."""
    test_p, test_y = test
    before = summary(test_p, test_y)
    section: dict[str, Any] = {"method": "temperature scaling: softmax(log(p) / T)", "ece_bins": ECE_BINS,
                               "ece_binning": f"{ECE_BINS} equal-width bins of the top-1 confidence over [0, 1]",
                               "split": split, "reliability_before": reliability_bins(test_p, test_y)}
    if validation is None:
        section.update(status="off", temperature=1.0, fitted_on=None, before=before, after=before,
                       reliability_after=section["reliability_before"])
        return section
    val_p, val_y = validation
    fitted = fit_temperature(val_p, val_y)
    val_accuracy = float(np.mean(val_p.argmax(axis=1) == val_y))
    notes = []
    if val_accuracy in (0.0, 1.0):
        # Every validation example right (or every one wrong): the NLL keeps falling as T -> 0 (or infinity), so the
        # split holds no evidence for a finite T; serving p^(1/T_MIN) would be a certainty the data never showed.
        notes.append(f"validation accuracy is {val_accuracy:g}: no finite temperature minimises its NLL (the fit "
                     f"ran to {fitted:.3g}); too small or too easy a split to calibrate on; not applied (T = 1)")
        log.warning("calibration: %s", notes[-1])
    elif not T_MIN * 1.01 < fitted < T_MAX / 1.01:
        notes.append(f"T is at its search bound [{T_MIN:g}, {T_MAX:g}]: the model is more mis-calibrated than the "
                     "search allows; T is clipped to the bound")
        log.warning("calibration: %s", notes[-1])
    temperature = 1.0 if val_accuracy in (0.0, 1.0) else fitted
    calibrated = apply_temperature(test_p, temperature)
    section.update(
        status="separated" if val_accuracy in (0.0, 1.0) else "fitted", temperature=temperature,
        fitted_temperature=fitted, fitted_on="validation",
        validation={"examples": int(len(val_y)), "before": summary(val_p, val_y),
                    "after": summary(apply_temperature(val_p, temperature), val_y)},
        before=before, after=summary(calibrated, test_y),
        reliability_after=reliability_bins(calibrated, test_y),
    )
    if split == "validation":
        notes.append("evaluated on the split T was fitted on: the 'after' numbers are in-sample")
    if notes:
        section["note"] = "; ".join(notes)
    return section


def temperature_of(evaluation: dict[str, Any] | None) -> float:
    """The fitted temperature in an evaluation.json (1.0 when there is none: no calibration)."""
    t = ((evaluation or {}).get("calibration") or {}).get("temperature", 1.0)
    if not (isinstance(t, int | float) and math.isfinite(t) and t > 0):
        from kfp_finetune.components.core.errors import UserError

        raise UserError(f"evaluation.json calibration.temperature {t!r} is not a number > 0")
    return float(t)
