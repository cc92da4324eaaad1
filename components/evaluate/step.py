"""evaluate: measure a classifier on one split of a Dataset, write evaluation.json + report.html, decide `blessed`.

Metrics (on the chosen split, `test` by default): accuracy, loss (mean sparse categorical cross-entropy), top-k
accuracy with k = min(5, classes - 1), per-class precision/recall/F1/support, macro and weighted F1, and the
confusion matrix (rows: true class, columns: predicted). Images go through `components.core.dataset.decode_image`, the
same decode+resize that training used, so `accuracy` equals what Keras's own `model.evaluate` reports on the split.

Blessing: `blessed` is true only when accuracy ≥ `min_accuracy` and, when a baseline Model is given (a local
directory or a gs:// prefix), accuracy ≥ baseline accuracy − `max_regression`, the baseline measured here on the
same split. Every rule, both numbers and the outcome are written to evaluation.json.

The champion (scheduled retraining): with `champion_from` (the push destination) and no explicit baseline, the
baseline is the version `champion_from/LATEST` names, measured here on the current split. `baseline_model="none"`
turns the comparison off. No LATEST yet: thresholds only, and evaluation.json says "no champion yet". The champion's
classes differ from the dataset's (a class added or removed): no comparison; `class_change` decides: "bless" (on
thresholds) or "refuse". `max_class_regression` (< 1) adds a rule per class: its recall may not drop by more than
that against the baseline. evaluation.json's `champion` says which case applied, and why.

Calibration (`calibrate`, on by default; evaluate/calibration.py): a temperature T fitted on the validation split,
ECE (15 equal-width bins) and NLL before and after on the split, and a reliability diagram, in evaluation.json
`calibration` and the report; export serves softmax(log(p) / T). `max_ece` < 1 adds a blessing rule on the ECE.

Errors (UserError, nothing written): the model's class names differ from the dataset's; the split is missing or
empty; an explicit baseline's class names differ.
"""

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from kfp_finetune.components import __version__
from kfp_finetune.components.core import faults, settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import atomic_directory, check_output_dir, file_sha256, read_json, write_json
from kfp_finetune.components.core.params import add_arguments, by_name, config_kwargs
from kfp_finetune.components.evaluate import datasection
from kfp_finetune.components.evaluate.blessing import EPSILON, NO_BASELINE, baseline_dir, bless  # noqa: F401 (re-exported)
from kfp_finetune.components.evaluate.blessing import resolve_baseline as _resolve_baseline
from kfp_finetune.components.evaluate.release_params import CLASS_CHANGE_POLICIES  # noqa: F401 (re-exported)
from kfp_finetune.components.evaluate.release_params import EVALUATE as PARAMS

_DEFAULT = {name: p.default for name, p in by_name(PARAMS).items()}

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from kfp_finetune.components.core.dataset import DatasetInfo

log = logging.getLogger("kfp_finetune.evaluate")

EVALUATION_FILE = "evaluation.json"
REPORT_FILE = "report.html"
BATCH_SIZE = 32
MAX_MISTAKES = 12


@dataclass(frozen=True)
class EvaluateConfig:
    """evaluate's inputs. `dataset`: Dataset artifact dir; `model`: Model artifact dir (train_head / fine_tune)."""

    dataset: str
    model: str
    output: str
    # The parameters (release_params.EVALUATE): their defaults, help and checks are defined there.
    split: str = _DEFAULT["split"]
    min_accuracy: float = _DEFAULT["min_accuracy"]
    baseline_model: str | None = _DEFAULT["baseline_model"]
    max_regression: float = _DEFAULT["max_regression"]
    champion_from: str | None = _DEFAULT["champion_from"]  # a push destination: its LATEST is the baseline
    class_change: str = _DEFAULT["class_change"]  # when the champion's classes differ: bless on thresholds, or refuse
    max_class_regression: float = _DEFAULT["max_class_regression"]  # 1: no per-class rule
    calibrate: bool = _DEFAULT["calibrate"]  # fit a temperature on the validation split (calibration.py)
    max_ece: float = _DEFAULT["max_ece"]  # bless only at or below this ECE of the served probabilities (1: no rule)
    data_drift: str | None = None  # the drift step's result (JSON text or drift.json), for the report's data section

    def __post_init__(self) -> None:
        for name in ("dataset", "model", "output", "split"):
            if not str(getattr(self, name) or "").strip():
                raise UserError(f"--{name.replace('_', '-')} is required")
        if self.baseline_model is not None and not str(self.baseline_model).strip():
            object.__setattr__(self, "baseline_model", None)
        if self.champion_from is not None and not str(self.champion_from).strip():
            object.__setattr__(self, "champion_from", None)
        for p in PARAMS:
            p.validate(getattr(self, p.name))


@dataclass
class EvaluateResult:
    """What evaluate measured and decided. `metrics`: the scalar metrics; `evaluation`: all of evaluation.json."""

    output: str
    blessed: bool
    metrics: dict[str, float]
    class_names: list[str]
    confusion_matrix: list[list[int]]
    reasons: list[str] = field(default_factory=list)
    baseline_metrics: dict[str, float] | None = None
    evaluation: dict[str, Any] = field(default_factory=dict, repr=False)
    seconds: float = 0.0


# --- measuring ---------------------------------------------------------------------------------------------------


class Predictions(NamedTuple):
    labels: np.ndarray  # [N] int
    probabilities: np.ndarray  # [N, C] float32


def split_dataset(info: "DatasetInfo", split: str, size: int, batch_size: int = BATCH_SIZE) -> Any:
    """(pixels, label) batches of one split, in file order, decoded exactly as in training."""
    import tensorflow as tf

    from kfp_finetune.components.core import dataset

    ds = dataset.read_split(info.path, split)
    ds = ds.map(lambda b, y: (dataset.decode_image(b, size), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def predict(model: "keras.Model", info: "DatasetInfo", split: str, what: str) -> Predictions:
    """Class probabilities of every example of the split, with their labels, in file order."""
    import tensorflow as tf
    from tqdm.auto import tqdm

    from kfp_finetune.components.core.modelio import input_size

    size = input_size(model, what)
    n = info.num_examples.get(split, 0)

    @tf.function(reduce_retracing=True)
    def forward(x: "tf.Tensor") -> "tf.Tensor":
        return model(x, training=False)

    labels, probs = [], []
    with tqdm(total=n, desc=f"evaluate {what}", unit="img", disable=None, leave=False) as bar:
        for x, y in split_dataset(info, split, size):
            probs.append(forward(x).numpy())
            labels.append(y.numpy())
            bar.update(int(y.shape[0]))
    if not labels:
        raise UserError(f"dataset {info.path}: split {split!r} is empty")
    return Predictions(np.concatenate(labels).astype(np.int64), np.concatenate(probs).astype(np.float32))


def top_k(num_classes: int) -> int:
    return max(1, min(5, num_classes - 1))


def compute_metrics(pred: Predictions, class_names: list[str]) -> dict[str, Any]:
    """Scalars, per-class scores and the confusion matrix from predictions."""
    labels, probs = pred.labels, pred.probabilities
    n_cls = len(class_names)
    predicted = probs.argmax(axis=1)
    k = top_k(n_cls)
    # Rank of the true class = how many classes scored strictly higher (what tf.math.in_top_k does with no ties).
    true_p = probs[np.arange(len(labels)), labels]
    rank = (probs > true_p[:, None]).sum(axis=1)
    eps = 1e-7  # Keras clips probabilities to [eps, 1 - eps] in its cross-entropy
    loss = float(np.mean(-np.log(np.clip(true_p.astype(np.float64), eps, 1 - eps))))
    confusion = np.zeros((n_cls, n_cls), dtype=np.int64)  # [true, predicted]
    np.add.at(confusion, (labels, predicted), 1)
    correct, support, predicted_as = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    # As scikit-learn's precision_recall_fscore_support(..., zero_division=0): 0 where a ratio has nothing below it.
    precision, recall, f1 = (_ratio(correct, predicted_as), _ratio(correct, support),
                             _ratio(2 * correct, predicted_as + support))
    return {
        "metrics": {
            "accuracy": float(np.mean(predicted == labels)),
            "loss": loss,
            "top_k": k,
            "top_k_accuracy": float(np.mean(rank < k)),
            "macro_f1": float(np.mean(f1)),
            "weighted_f1": float(np.sum(f1 * support) / max(1, int(np.sum(support)))),
            "num_examples": int(len(labels)),
            "num_correct": int(np.sum(predicted == labels)),
        },
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion.astype(int).tolist(),
    }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator per class, 0 where the denominator is 0."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def worst_mistakes(pred: Predictions, limit: int = MAX_MISTAKES) -> list[tuple[int, int, int, float]]:
    """(index, true id, predicted id, confidence) of misclassified examples, most confident first."""
    predicted = pred.probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != pred.labels)
    conf = pred.probabilities[wrong, predicted[wrong]]
    order = wrong[np.argsort(-conf, kind="stable")][:limit]
    return [(int(i), int(pred.labels[i]), int(predicted[i]), float(pred.probabilities[i, predicted[i]]))
            for i in order]


def _image_bytes_at(info: "DatasetInfo", split: str, indices: set[int]) -> dict[int, bytes]:
    """The encoded images at these positions of the split (the same file order `predict` used)."""
    from kfp_finetune.components.core import dataset

    found: dict[int, bytes] = {}
    if not indices:
        return found
    last = max(indices)
    for i, (image, _) in enumerate(dataset.read_split(info.path, split)):
        if i in indices:
            found[i] = image.numpy()
        if i >= last:
            break
    return found


# --- model checks ----------------------------------------------------------------------------------------------


def _load_classifier(path: str, info: "DatasetInfo", what: str) -> tuple["keras.Model", dict[str, Any]]:
    from kfp_finetune.components.core import modelio

    model, meta = modelio.load_model(path)
    names = meta.get("class_names")
    if not names:
        raise UserError(f"{what} {path}: model.json has no class_names; pass a train-head or fine-tune output")
    if list(names) != list(info.class_names):
        raise UserError(f"{what} {path} was trained on classes {list(names)} but dataset {info.path} has "
                        f"{list(info.class_names)}; evaluate on the dataset the model was trained for")
    units = model.output_shape[-1]
    if units != len(names):
        raise UserError(f"{what} {path}: the model outputs {units} classes but model.json names {len(names)}")
    return model, meta


def _calibrate(config: EvaluateConfig, model: "keras.Model", info: "DatasetInfo", pred: Predictions) -> dict:
    """evaluation.json's `calibration`: a temperature fitted on the validation split (T = 1 when off or empty)."""
    from kfp_finetune.components.evaluate import calibration

    validation = None
    if not config.calibrate:
        reason = "calibrate is off"
    elif not info.num_examples.get("validation", 0):
        reason = f"dataset {info.path} has no validation split to fit a temperature on"
    else:
        val = pred if config.split == "validation" else predict(model, info, "validation", "model (validation)")
        validation, reason = (val.probabilities, val.labels), ""
    section = calibration.measure(validation, (pred.probabilities, pred.labels), config.split)
    if reason:
        section["reason"] = reason
        log.info("no temperature scaling: %s", reason)
    return section


# --- the step --------------------------------------------------------------------------------------------------


@faults.stops_cleanly("evaluate")
def evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Evaluate `config.model` on `config.split`; write evaluation.json and report.html to `config.output`."""
    from kfp_finetune.components.core import dataset
    from kfp_finetune.components.evaluate import report

    started = time.perf_counter()
    drift = datasection.read_drift(config.data_drift)  # a bad --data-drift fails before any model is loaded
    info = dataset.load_info(config.dataset)
    info.require_split(config.split)
    check_output_dir(config.output)
    model, meta = _load_classifier(config.model, info, "--model")
    pred = predict(model, info, config.split, "model")
    measured = compute_metrics(pred, list(info.class_names))
    metrics = measured["metrics"]
    calibration = _calibrate(config, model, info, pred)

    baseline: dict[str, Any] | None = None
    baseline_uri, champion = _resolve_baseline(config)
    refuse = None
    if baseline_uri:
        with tempfile.TemporaryDirectory(prefix="kfp-finetune-baseline-") as staging:
            local = baseline_dir(baseline_uri, Path(staging))
            from kfp_finetune.components.core import modelio

            base_names = list((read_json(Path(local) / modelio.META_FILE, "--baseline-model")
                               .get("class_names")) or [])
            if champion.get("version") is not None and base_names != list(info.class_names):
                added = sorted(set(info.class_names) - set(base_names))
                removed = sorted(set(base_names) - set(info.class_names))
                change = (f"class set changed since champion {champion['version']} (added: {added or 'none'}; "
                          f"removed: {removed or 'none'}; order or names: {base_names} -> {list(info.class_names)})")
                champion.update(status="class set changed", policy=config.class_change,
                                reason=f"{change}: no comparison; policy {config.class_change!r} "
                                       + ("blesses on thresholds" if config.class_change == "bless" else "refuses"))
                if config.class_change == "refuse":
                    refuse = champion["reason"]
            else:
                base_model, _ = _load_classifier(local, info, "--baseline-model")
                base_measured = compute_metrics(predict(base_model, info, config.split, "baseline"),
                                                list(info.class_names))
                baseline = {"model": baseline_uri, "metrics": base_measured["metrics"],
                            "per_class": base_measured["per_class"]}
    recall = {k: v["recall"] for k, v in measured["per_class"].items()}
    base_recall = {k: v["recall"] for k, v in baseline["per_class"].items()} if baseline else None
    blessing = bless(metrics["accuracy"], config.min_accuracy,
                     baseline["metrics"]["accuracy"] if baseline else None, config.max_regression,
                     recall, base_recall, config.max_class_regression, refuse,
                     ece=calibration["after"]["ece"], max_ece=config.max_ece)
    if baseline:
        champion["decision"] = ("challenger not worse than the baseline: blessed" if blessing["blessed"] else
                                "challenger refused: " + "; ".join(blessing["reasons"]))
    else:
        champion["decision"] = ("blessed on thresholds" if blessing["blessed"] else
                                "refused: " + "; ".join(blessing["reasons"]))

    evaluation = {
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dataset": str(config.dataset),
        "model": str(config.model),
        "model_sha256": file_sha256(Path(config.model) / "model.keras"),
        "split": config.split,
        "class_names": list(info.class_names),
        "blessed": blessing["blessed"],
        "blessing": blessing,
        "metrics": metrics,
        "per_class": measured["per_class"],
        "confusion_matrix": measured["confusion_matrix"],
        "baseline": baseline,
        "champion": champion,
        # The temperature export serves with, ECE/NLL before and after, the reliability bins (calibration.py).
        "calibration": calibration,
        "data_fingerprint": info.report.get("data_fingerprint"),
        "data_source": info.report.get("source"),
        # What the fine-tune guard kept (components/train/guard.py); None when the model was not fine-tuned.
        "fine_tune_guard": ((meta.get("training") or {}).get("fine_tune") or {}).get("guard"),
        "config": {"min_accuracy": config.min_accuracy, "max_regression": config.max_regression,
                   "baseline_model": config.baseline_model, "champion_from": config.champion_from,
                   "class_change": config.class_change, "max_class_regression": config.max_class_regression,
                   "calibrate": config.calibrate, "max_ece": config.max_ece},
        "kfp_finetune_version": __version__,
    }
    worst = worst_mistakes(pred)
    images = _image_bytes_at(info, config.split, {i for i, *_ in worst})
    names = info.class_names
    mistakes = [report.Mistake(i, names[t], names[p], c, images.get(i, b"")) for i, t, p, c in worst]
    evaluation["worst_mistakes"] = [{"index": m.index, "true": m.true_name, "predicted": m.predicted_name,
                                     "confidence": m.confidence} for m in mistakes]
    evaluation["data_drift"] = drift.to_json() if drift else None
    html = report.render(evaluation, meta, info.report, mistakes,
                         datasection.render(config.dataset, info.report, champion, drift))

    with atomic_directory(config.output) as tmp:
        write_json(tmp / EVALUATION_FILE, evaluation)
        (tmp / REPORT_FILE).write_text(html, encoding="utf-8")
    seconds = time.perf_counter() - started
    log.info("evaluate %s on %s (%d images) in %.1fs: accuracy %.4f, loss %.4f, top-%d %.4f, macro F1 %.4f%s",
             config.model, config.split, metrics["num_examples"], seconds, metrics["accuracy"], metrics["loss"],
             metrics["top_k"], metrics["top_k_accuracy"], metrics["macro_f1"],
             f"; baseline accuracy {baseline['metrics']['accuracy']:.4f}" if baseline else "")
    log.info("calibration (%s): T %.3f; ECE %.4f -> %.4f, NLL %.4f -> %.4f on %s", calibration["status"],
             calibration["temperature"], calibration["before"]["ece"], calibration["after"]["ece"],
             calibration["before"]["nll"], calibration["after"]["nll"], config.split)
    log.info("%s%s", "blessed" if blessing["blessed"] else "NOT blessed",
             "" if blessing["blessed"] else ": " + "; ".join(blessing["reasons"]))
    return EvaluateResult(
        output=str(config.output), blessed=blessing["blessed"], metrics=dict(metrics),
        class_names=list(info.class_names), confusion_matrix=measured["confusion_matrix"],
        reasons=list(blessing["reasons"]), baseline_metrics=dict(baseline["metrics"]) if baseline else None,
        evaluation=evaluation, seconds=seconds,
    )


# --- CLI -----------------------------------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="measure a model on a split, write evaluation.json + report.html, decide blessed",
        description="Evaluate a classifier (output of train-head or fine-tune) on one split of a Dataset. "
                    "Exit code 0 whether or not the model is blessed; read `blessed` in evaluation.json.",
    )
    p.add_argument("--dataset", required=True, help="Dataset artifact directory (output of `ingest`)")
    p.add_argument("--model", required=True, help="Model artifact directory (output of `train-head`/`fine-tune`)")
    p.add_argument("--output", required=True, help="new directory for evaluation.json and report.html")
    add_arguments(p, PARAMS)
    p.add_argument("--data-drift", default=None, metavar="DRIFT_JSON", help="the drift step's drift.json, shown")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    evaluate(EvaluateConfig(dataset=args.dataset, model=args.model, output=args.output, data_drift=args.data_drift,
                            **config_kwargs(PARAMS, args)))
    return 0


# --- KFP component ---------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def evaluate_op(
    dataset: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
    split: str = "test",
    min_accuracy: float = 0.7,
    baseline_model: str = "",
    max_regression: float = 0.0,
    champion_from: str = "",
    class_change: str = "bless",
    max_class_regression: float = 1.0,
    calibrate: bool = True,
    max_ece: float = 1.0,
    data_drift: str = "",
) -> NamedTuple("EvaluateOutputs", [("blessed", bool), ("accuracy", float)]):
    """Evaluate a classifier on one split, write a report, and decide whether it is blessed.

    Args:
        dataset: Dataset artifact written by ingest.
        model: Model artifact written by train_head or fine_tune.
        metrics: Output Metrics: accuracy, loss, top-k accuracy, macro and weighted F1 (and the baseline's accuracy).
        classification_metrics: Output ClassificationMetrics: the confusion matrix with class names.
        report: Output HTML: a self-contained report (curves, confusion matrix, per-class table, worst mistakes).
        evaluation: Output Artifact: a directory holding evaluation.json and report.html (export reads it).
        split: Split to evaluate on.
        min_accuracy: Blessed only if accuracy is at least this.
        baseline_model: Model artifact URI (gs:// or local path) to compare against; "" for none.
        max_regression: How far below the baseline's accuracy the candidate may fall and still be blessed.
        champion_from: A push destination: with baseline_model "", its LATEST version is the baseline (measured
            on this split); no LATEST: thresholds only. baseline_model "none" turns the comparison off.
        class_change: When the champion's classes differ from the dataset's: "bless" on thresholds, or "refuse".
        max_class_regression: How far any class's recall may drop against the baseline (1 = no such rule).
        calibrate: Fit a temperature T on the validation split (minimising NLL); export serves softmax(log(p) / T).
        max_ece: Blessed only if the expected calibration error (15 bins) of the served probabilities is at most
            this (1 = no such rule).
        data_drift: The drift step's result (JSON text), shown in the report's data section; "" for none.

    Returns:
        blessed: Whether every blessing rule passed (use with dsl.If to gate export).
        accuracy: Accuracy on the split.
    """
    import shutil
    from collections import namedtuple

    from kfp_finetune.components.evaluate.step import REPORT_FILE, EvaluateConfig, evaluate

    result = evaluate(EvaluateConfig(
        dataset=dataset.path, model=model.path, output=evaluation.path, split=split, min_accuracy=min_accuracy,
        baseline_model=baseline_model or None, max_regression=max_regression,
        champion_from=champion_from or None, class_change=class_change, max_class_regression=max_class_regression,
        calibrate=calibrate, max_ece=max_ece, data_drift=data_drift or None,
    ))
    m = result.metrics
    for key in ("accuracy", "loss", "top_k_accuracy", "macro_f1", "weighted_f1"):
        metrics.log_metric(key, float(m[key]))
    metrics.log_metric("num_examples", float(m["num_examples"]))
    if result.baseline_metrics:
        metrics.log_metric("baseline_accuracy", float(result.baseline_metrics["accuracy"]))
    calibration = result.evaluation["calibration"]
    metrics.log_metric("temperature", float(calibration["temperature"]))
    for when in ("before", "after"):
        metrics.log_metric(f"ece_{when}_calibration", float(calibration[when]["ece"]))
    metrics.log_metric("blessed", float(result.blessed))
    classification_metrics.log_confusion_matrix(result.class_names, result.confusion_matrix)
    shutil.copyfile(f"{evaluation.path}/{REPORT_FILE}", report.path)
    champion = result.evaluation.get("champion") or {}
    evaluation.metadata.update({"blessed": result.blessed, "accuracy": float(m["accuracy"]), "split": split,
                                "reasons": result.reasons, "champion": champion.get("status", ""),
                                "champion_version": champion.get("version") or "",
                                "decision": champion.get("decision", "")})
    outputs = namedtuple("EvaluateOutputs", ["blessed", "accuracy"])
    return outputs(result.blessed, float(m["accuracy"]))
