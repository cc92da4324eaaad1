"""export: a servable SavedModel from a classifier, then (optionally) a versioned push to a folder or gs:// prefix.

SavedModel: `serving_default` takes `image_bytes`, a 1-D tf.string batch of encoded JPEG/PNG images of any size,
decodes and resizes them inside the graph with `components.core.dataset.decode_image` (the very decode+resize training
and evaluation used) and returns `probabilities` [batch, classes] float32, `class_id` [batch] int32 and
`class_name` [batch] string, and `logits` [batch, classes]: log of the model's probabilities (its logits up to a
per-row constant). `probabilities` are calibrated: softmax(logits / T) with the temperature T evaluate fitted on the
validation split (evaluation.json `calibration.temperature`; T = 1 without one), recorded in export.json
`calibration`. TF Serving and Vertex AI Prediction host it unchanged (JSON clients send
`{"image_bytes": {"b64": ...}}`). The output directory is the SavedModel itself, with model.json and
evaluation.json beside saved_model.pb.

A second endpoint, `predict_pixels` (decoded pixels [batch, S, S, 3] float32 in, probabilities out), serves batch
prediction (predict/step.py). Before anything is pushed, serving.py (this package) checks the SavedModel in a fresh
TensorFlow-only process the way a model server loads it (one test image per class, sent as Vertex JSON b64
instances, plus a replay of the `assets.extra/tf_serving_warmup_requests` file it writes); a failing check is
recorded in export.json and nothing is pushed.

Push (`push_to`, components.registry.registry): a complete champion goes to `<push_to>/<version>/`, a folder claimed
exclusively (version = the run id, or a UTC timestamp in milliseconds taken at push time, digits only and above every
numeric version there, so TF Serving orders them): the SavedModel folder, the Model artifact (`model/model.keras` +
`model/model.json`), the data fingerprint and `version.json` (fingerprint, training settings, lineage), version.json
last; only then does `<push_to>/LATEST` move, by compare-and-swap from the champion the evaluation compared against.
If LATEST moved meanwhile, the version is kept but not promoted, and the push says so. A push that fails part-way
leaves LATEST on the previous version and no visible version. A model whose model.keras SHA-256 equals the
champion's is not pushed again. gs:// goes through google-cloud-storage with parallel uploads (components.core.gcs).

LiteRT (`tflite`: fp16 | int8 | both, tflite_export.py): `tflite/model_<variant>.tflite` + `labels.txt`,
each checked with the LiteRT interpreter on the test split (export.json `tflite`); only those within
`max_tflite_drop` of the Keras accuracy are pushed with the version; `tflite_required` fails the export otherwise.

Optional (components/export/vertex_model.py): register the pushed gs:// version in Vertex AI Model Registry
(`Model.upload`, a new version of `parent_model` when given, the prebuilt TensorFlow serving container).
"""

import argparse
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from kfp_finetune.components.core import faults, settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import (
    atomic_directory,
    check_output_dir,
    file_sha256,
    read_json,
    write_json,
)
from kfp_finetune.components.core.modelio import PIXEL_ENDPOINT
from kfp_finetune.components.core.params import add_arguments, by_name, config_kwargs
from kfp_finetune.components.evaluate.calibration import LOG_FLOOR
from kfp_finetune.components.evaluate.release_params import EXPORT as PARAMS
from kfp_finetune.components.evaluate.release_params import tflite_variants
from kfp_finetune.components.export import tflite_export
from kfp_finetune.components.export.server import ServerProcess
from kfp_finetune.components.export.vertex_model import (  # noqa: F401 (re-exported: callers of export use these names)
    DEFAULT_SERVING_IMAGE,
    VERTEX_REGION_PATTERN,
    VertexConfig,
    vertex_upload,
    vertex_upload_args,
)
from kfp_finetune.components.registry.registry import PUSH_RETRY_SECONDS, new_version, push, read_latest  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from kfp_finetune.components.export import serving

log = logging.getLogger("kfp_finetune.export")

LATEST_FILE = "LATEST"
EXPORT_FILE = "export.json"
SIGNATURE = "serving_default"
INPUT_NAME = "image_bytes"
# probabilities: calibrated, softmax(logits / T); logits: log(p) of the Keras model (uncalibrated, to a constant).
OUTPUT_NAMES = ("probabilities", "class_id", "class_name", "logits")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


_DEFAULT = {name: p.default for name, p in by_name(PARAMS).items()}


@dataclass(frozen=True)
class ExportConfig:
    """export's inputs. `model`: a Model artifact dir; `evaluation`: evaluate's output dir or its evaluation.json."""

    model: str
    output: str
    evaluation: str | None = None
    push_to: str | None = _DEFAULT["push_to"]  # (release_params.EXPORT defines this and the parameters below)
    run_id: str | None = _DEFAULT["run_id"]
    vertex: VertexConfig | None = None
    fingerprint: str | None = None  # the data fingerprint, recorded in the pushed version
    settings: dict[str, Any] | None = None  # the training settings, compared by the next run's skip decision
    pipeline_job: str | None = None  # the KFP pipeline job / run name, recorded in the lineage
    # Where the serving check takes one test image per class from (default: the evaluation's dataset).
    dataset: str | None = None
    tflite: str = _DEFAULT["tflite"]  # none | fp16 | int8 | both (components/export/tflite_export.py)
    max_tflite_drop: float = _DEFAULT["max_tflite_drop"]  # a .tflite more than this below Keras's is not pushed
    tflite_required: bool = _DEFAULT["tflite_required"]  # a requested .tflite that will not ship fails the export

    def __post_init__(self) -> None:
        for p in PARAMS:
            p.validate(getattr(self, p.name))
        for name in ("model", "output"):
            if not str(getattr(self, name) or "").strip():
                raise UserError(f"--{name} is required")
        for name in ("evaluation", "push_to", "run_id"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                object.__setattr__(self, name, None)
        if self.run_id is not None and not RUN_ID_PATTERN.match(self.run_id):
            raise UserError(f"--run-id {self.run_id!r} must be 1..128 of letters, digits, '.', '_', '-' "
                            "(it names the pushed version folder)")
        if self.push_to is not None:
            from kfp_finetune.components.core import gcs

            if gcs.is_gcs(self.push_to):
                gcs.split_uri(self.push_to)  # raises on gs:// without a bucket
        for name in ("fingerprint", "pipeline_job"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                object.__setattr__(self, name, None)
        if self.vertex is not None:
            if self.push_to is None or not self.push_to.startswith("gs://"):
                raise UserError("--vertex-upload needs --push-to gs://...: Vertex AI reads the model from GCS")


@dataclass
class ExportResult:
    """Where the SavedModel is, and where it was pushed ('' when not pushed)."""

    saved_model_dir: str
    pushed_uri: str = ""
    skipped_push: str = ""  # why a push was not made (e.g. the champion is this very model)
    version: str = ""
    promoted: bool = False  # whether LATEST moved to the pushed version
    not_promoted: str = ""  # why it did not (LATEST moved since the evaluation): one line naming both versions
    vertex_model: str = ""
    class_names: list[str] = field(default_factory=list)
    seconds: float = 0.0
    serving_check: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0  # the calibration the serving signature applies
    tflite: dict[str, Any] = field(default_factory=dict)  # export.json's `tflite` section ({} when none asked for)


# --- the serving SavedModel ------------------------------------------------------------------------------------


def write_saved_model(model: "keras.Model", class_names: list[str], directory: str | os.PathLike,
                      temperature: float = 1.0) -> None:
    """Write a SavedModel whose serving_default maps encoded images to probabilities (calibrated with
    `temperature`: softmax(logits / T)), class_id, class_name and logits (log of the model's probabilities)."""
    import keras
    import tensorflow as tf

    from kfp_finetune.components.core.dataset import decode_image
    from kfp_finetune.components.core.modelio import input_size

    size = input_size(model)
    names = tf.constant(list(class_names), dtype=tf.string)

    # A batch of 0 never reaches the model (oneDNN on AMD EPYC with AVX-512 failed on it: "Incompatible shapes:
    # [0,96,96,3] vs. [8]"): each endpoint answers it with outputs of shape (0, classes) / (0,) and the same dtypes.
    def empty_outputs() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        return (tf.zeros([0, len(class_names)], tf.float32), tf.zeros([0], tf.int32), tf.zeros([0], tf.string),
                tf.zeros([0, len(class_names)], tf.float32))

    # One traced function for the model body, called by both endpoints: the SavedModel holds the network's graph
    # once per trace, not once per endpoint (measured: tf.saved_model.load of a MobileNet 0.25 export, as predict
    # does, 0.49 s -> 0.45 s; most of the rest is the SavedModel's own save/restore graphs, which serving needs).
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def calibrated(pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(softmax(logits / T), logits): the head is a softmax, so log(p) are its logits up to a per-row
        constant (components/evaluate/calibration.py); floored so that a probability of 0 gives a finite logit."""
        logits = tf.math.log(tf.maximum(tf.cast(model(pixels, training=False), tf.float32), LOG_FLOOR))
        return tf.nn.softmax(logits / tf.constant(temperature, tf.float32), axis=-1), logits

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
    def serve(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        def classify() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
            pixels = tf.map_fn(
                lambda b: decode_image(b, size), image_bytes,
                fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
            )
            probabilities, logits = calibrated(pixels)
            class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
            return probabilities, class_id, tf.gather(names, class_id), logits

        return dict(zip(OUTPUT_NAMES, tf.cond(tf.shape(image_bytes)[0] > 0, classify, empty_outputs), strict=True))

    # For batch prediction (components.predict.step): decoded pixels in, (calibrated) probabilities out, no strings.
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")])
    def predict_pixels(pixels: tf.Tensor) -> tf.Tensor:
        return tf.cond(tf.shape(pixels)[0] > 0, lambda: calibrated(pixels)[0], lambda: empty_outputs()[0])

    # Not archive.track(model): the endpoints capture every variable they use (add_endpoint tracks those), and
    # track() only adds lookup tables (none in an image model) at the cost of walking every layer's tf.functions,
    # and saves the Keras variable wrappers beside the tf.Variables. The loaded SavedModel still lists the model's
    # variables (`.variables`, `.trainable_variables`, `.non_trainable_variables`), as the raw tf.Variables.
    # Measured on MobileNet v1 α=0.25 at 64 px: write_saved_model 11.5 s -> 5.6 s, the export step 18.8 s -> 12.3 s.
    archive = keras.export.ExportArchive()
    for name in ("variables", "trainable_variables", "non_trainable_variables"):
        archive.add_variable_collection(name, [v.value for v in getattr(model, name)])
    archive.add_endpoint(name=SIGNATURE, fn=serve)
    archive.add_endpoint(name=PIXEL_ENDPOINT, fn=predict_pixels)
    archive.write_out(str(directory), verbose=False)


def _serving_check(saved_model_dir: Path, model: "keras.Model", class_names: list[str], config: ExportConfig,
                   evaluation: dict[str, Any] | None, temperature: float,
                   server: "ServerProcess") -> "serving.ServingCheck":
    """serving.py's check with one test image per class (synthetic images when no dataset is at hand)."""
    from kfp_finetune.components.export import serving

    dataset = config.dataset or (evaluation or {}).get("dataset")
    if dataset and Path(dataset).is_dir():
        samples = serving.sample_images(dataset, class_names)
    else:
        log.warning("serving check: no dataset at hand (--dataset, or the evaluation's dataset %r): sending "
                    "synthetic images instead of real ones", dataset)
        samples = serving.synthetic_images(len(class_names))
    return serving.check_saved_model(saved_model_dir, model, class_names, samples, temperature=temperature,
                                     server=server)


def _serving_requirements(saved_model_dir: Path) -> dict[str, Any]:
    """TF version and op list of the SavedModel: what a serving image must support."""
    from kfp_finetune.components.export import serving

    info = serving.saved_model_requirements(saved_model_dir)
    return {"tensorflow_version": info["tensorflow_version"], "op_count": len(info["ops"]), "ops": info["ops"]}


# --- evaluation checks -----------------------------------------------------------------------------------------


def read_evaluation(path: str) -> dict[str, Any]:
    """evaluation.json from evaluate's output directory (or the file itself)."""
    from kfp_finetune.components.evaluate.step import EVALUATION_FILE

    p = Path(path)
    return read_json(p / EVALUATION_FILE if p.is_dir() else p, f"--evaluation {path}")


def _check_evaluation(evaluation: dict[str, Any], model_dir: str, class_names: list[str], pushing: bool) -> None:
    if list(evaluation.get("class_names") or []) != list(class_names):
        raise UserError(f"--evaluation is for classes {evaluation.get('class_names')} but model {model_dir} has "
                        f"{class_names}; pass the evaluation of this model")
    sha = evaluation.get("model_sha256")
    if sha and sha != file_sha256(Path(model_dir) / "model.keras"):
        raise UserError(f"--evaluation measured another model (model.keras SHA-256 {sha[:12]}... differs from "
                        f"{model_dir}); evaluate this model first")
    if pushing and not evaluation.get("blessed", False):
        reasons = "; ".join((evaluation.get("blessing") or {}).get("reasons") or []) or "not blessed"
        raise UserError(f"--push-to refused: the evaluation did not bless this model ({reasons})")


# --- the step --------------------------------------------------------------------------------------------------


@faults.stops_cleanly("export")
def export(config: ExportConfig) -> ExportResult:
    """Write the serving SavedModel to `config.output`; push it when `config.push_to` is set.

    Re-runnable after a kill: an `--output` that already holds a complete export of this very request (export.json's
    `request`: the model's and the evaluation's SHA-256 and the export settings) with a passed serving check is
    pushed as it is; a version a killed attempt pushed but never promoted is promoted (pushing.py). SIGTERM removes
    the temporary files and the serving-check process and exits 75; a full disk is one line (core/faults.py)."""
    from kfp_finetune.components.core import modelio
    from kfp_finetune.components.evaluate import calibration
    from kfp_finetune.components.export import pushing

    started = time.perf_counter()
    model_sha = file_sha256(Path(config.model) / "model.keras")
    request = _request(config, model_sha)
    done = _earlier_export(config, request)
    if done is None:
        check_output_dir(config.output)
    model, meta = modelio.load_model(config.model)
    class_names = list(meta.get("class_names") or [])
    if not class_names:
        raise UserError(f"--model {config.model}: model.json has no class_names; export a train-head or fine-tune "
                        "output")
    if model.output_shape[-1] != len(class_names):
        raise UserError(f"--model {config.model}: the model outputs {model.output_shape[-1]} classes but model.json "
                        f"names {len(class_names)}")
    evaluation = read_evaluation(config.evaluation) if config.evaluation else None
    if evaluation is not None:
        _check_evaluation(evaluation, config.model, class_names, pushing=config.push_to is not None)
    duplicate = pushing.duplicate_of_champion(config) if config.push_to else ""
    temperature = calibration.temperature_of(evaluation)

    if done is None:
        with faults.resource_errors(config.output, "--output", lambda: 3 * faults.tree_bytes(config.model)):
            done = _write_export(config, model, meta, class_names, evaluation, temperature, request)
        log.info("exported SavedModel (%s: %s -> %s) to %s", SIGNATURE, INPUT_NAME, ", ".join(OUTPUT_NAMES),
                 config.output)
    else:
        log.info("--output %s already holds this export (an earlier attempt wrote it, serving check passed): "
                 "reusing it", config.output)
    check, tflite = done["serving_check"], done.get("tflite") or {}

    result = ExportResult(saved_model_dir=str(config.output), class_names=class_names,
                          serving_check=check, temperature=temperature, tflite=tflite)
    if not check.get("passed"):
        raise UserError(f"serving check failed, so nothing was pushed: {check.get('reason')} (details in "
                        f"{Path(config.output) / EXPORT_FILE})")
    if config.tflite_required:
        tflite_export.require(tflite, config.output)
    if config.push_to and duplicate:
        result.skipped_push = duplicate
        log.warning("not pushed: %s", duplicate)
    elif config.push_to:
        pushed = pushing.push_version(config, meta, evaluation, model_sha, tflite)
        result.pushed_uri, result.version, result.promoted = pushed.uri, pushed.version, pushed.promoted
        result.not_promoted = pushed.message
        if config.vertex is not None:
            args = vertex_upload_args(config.vertex, result.pushed_uri, pushed.version, class_names, evaluation,
                                      default_version=pushed.promoted)
            result.vertex_model = vertex_upload(config.vertex, args)
    result.seconds = time.perf_counter() - started
    return result


def _request(config: ExportConfig, model_sha: str) -> dict[str, Any]:
    """What determines the export folder's content: an earlier attempt's folder with the same request is reused."""
    evaluation = None
    if config.evaluation:
        p = Path(config.evaluation)
        file = p / "evaluation.json" if p.is_dir() else p
        evaluation = file_sha256(file) if file.is_file() else None
    return {"model_sha256": model_sha, "evaluation_sha256": evaluation, "dataset": config.dataset,
            **{p.name: getattr(config, p.name) for p in PARAMS}}


def _earlier_export(config: ExportConfig, request: dict[str, Any]) -> dict[str, Any] | None:
    """export.json of a complete export of `request` at --output with a passed serving check, else None."""
    file = Path(config.output) / EXPORT_FILE
    if not file.is_file():
        return None
    try:
        done = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("request") != request:
        return None
    return done if (done.get("serving_check") or {}).get("passed") else None


def _write_export(config: ExportConfig, model: "keras.Model", meta: dict[str, Any], class_names: list[str],
                  evaluation: dict[str, Any] | None, temperature: float, request: dict[str, Any]) -> dict[str, Any]:
    """Build the export folder beside --output and move it into place; its export.json."""
    from kfp_finetune.components.core import modelio

    tflite: dict[str, Any] = {}
    with atomic_directory(config.output) as tmp, ServerProcess() as server:
        # The check's TensorFlow-only process imports TensorFlow while this one writes the SavedModel.
        write_saved_model(model, class_names, tmp, temperature)
        check = _serving_check(tmp, model, class_names, config, evaluation, temperature, server)
        if tflite_variants(config.tflite):
            tflite = tflite_export.export_tflite(
                model, class_names, tmp, tflite_variants(config.tflite),
                config.dataset or (evaluation or {}).get("dataset"), config.max_tflite_drop, temperature)
        write_json(tmp / modelio.META_FILE, meta)
        if evaluation is not None:
            write_json(tmp / "evaluation.json", {**evaluation, "tflite": tflite} if tflite else evaluation)
            tflite_export.copy_report(config.evaluation, tmp, tflite)
        done = {
            "signature": SIGNATURE, "endpoints": [SIGNATURE, PIXEL_ENDPOINT],
            "inputs": {INPUT_NAME: "tf.string [None]: encoded JPEG/PNG, any size"},
            "outputs": {"probabilities": f"float32 [None, {len(class_names)}]: softmax(logits / temperature)",
                        "class_id": "int32 [None]", "class_name": "string [None]",
                        "logits": f"float32 [None, {len(class_names)}]: log of the model's probabilities"},
            "calibration": {"temperature": temperature,
                            "source": "evaluation.json calibration" if evaluation and evaluation.get("calibration")
                            else "none (T = 1): no calibrated evaluation"},
            "class_names": class_names, "input_size": modelio.input_size(model), "source_model": str(config.model),
            "version": config.run_id,  # without --run-id the version is named at push time (version.json)
            "serving_check": check.as_dict(), "serving_requirements": _serving_requirements(tmp),
            "tflite": tflite or None, "request": request,
        }
        write_json(tmp / EXPORT_FILE, done)
    return json.loads((Path(config.output) / EXPORT_FILE).read_text())


# --- CLI -----------------------------------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a servable SavedModel (image bytes in, probabilities out) and push a version",
        description="Export a classifier as a SavedModel whose serving_default takes encoded images "
                    "(image_bytes) and returns probabilities, class_id and class_name; optionally push it as a "
                    "new version to a folder or gs:// prefix and register it in Vertex AI Model Registry.",
    )
    p.add_argument("--model", required=True, help="Model artifact directory (output of `train-head`/`fine-tune`)")
    p.add_argument("--output", required=True, help="new directory for the SavedModel")
    p.add_argument("--evaluation", default=None,
                   help="evaluate's output directory (or evaluation.json): copied along; a push needs it blessed")
    add_arguments(p, PARAMS[:2])  # --push-to, --run-id
    p.add_argument("--dataset", default=None,
                   help="Dataset artifact for the serving check's test images (default: the evaluation's dataset)")
    add_arguments(p.add_argument_group("LiteRT (TFLite) models for phones (optional)"), PARAMS[2:])
    v = p.add_argument_group("Vertex AI Model Registry (optional)")
    v.add_argument("--vertex-upload", action="store_true", help="register the pushed gs:// version in Vertex AI")
    v.add_argument("--vertex-project", default=None, help="GCP project (default: $GOOGLE_CLOUD_PROJECT)")
    v.add_argument("--vertex-region", default="us-central1")
    v.add_argument("--vertex-display-name", default="kfp-finetune-classifier")
    v.add_argument("--vertex-parent-model", default=None, help="existing model resource name: upload a new version")
    v.add_argument("--vertex-serving-image", default=DEFAULT_SERVING_IMAGE)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    vertex = None
    if args.vertex_upload:
        vertex = VertexConfig(project=args.vertex_project or settings.gcp_project() or "", region=args.vertex_region,
                              display_name=args.vertex_display_name, parent_model=args.vertex_parent_model,
                              serving_image=args.vertex_serving_image)
    result = export(ExportConfig(model=args.model, output=args.output, evaluation=args.evaluation, vertex=vertex,
                                 dataset=args.dataset, **config_kwargs(PARAMS, args)))
    if result.pushed_uri and result.promoted:
        log.info("pushed version %s to %s; LATEST names it", result.version, result.pushed_uri)
    return 0


# --- KFP component ---------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def export_op(
    model: Input[Model],
    evaluation: Input[Artifact],
    exported_model: Output[Model],
    push_to: str = "",
    run_id: str = "",
    fingerprint: str = "",
    training_settings: dict = {},  # noqa: B006 (KFP reads the default from the signature)
    pipeline_job: str = "",
    tflite: str = "none",
    max_tflite_drop: float = 0.01,
    tflite_required: bool = False,
) -> NamedTuple("ExportOutputs", [("pushed_uri", str)]):
    """Export a blessed classifier as a serving SavedModel and push a versioned copy.

    Args:
        model: Model artifact written by train_head or fine_tune.
        evaluation: The `evaluation` artifact of evaluate (a folder with evaluation.json); a push needs it blessed.
        exported_model: Output Model: the SavedModel (serving_default: image_bytes -> probabilities, class_id,
            class_name), with model.json and evaluation.json beside it.
        push_to: Local folder or gs:// prefix to push a new version to (then LATEST is updated); "" for none.
        run_id: Name of the pushed version folder; "" for a UTC timestamp.
        fingerprint: The data fingerprint (fingerprint step), recorded in the pushed version.
        training_settings: The run's training settings, recorded so that the next run can skip unchanged data.
        pipeline_job: The pipeline job name (dsl.PIPELINE_JOB_NAME_PLACEHOLDER), recorded in the lineage.
        tflite: Also write LiteRT models in tflite/ with labels.txt: "none", "fp16", "int8" (full-integer, uint8
            image input) or "both"; each is checked with the LiteRT interpreter on the test split.
        max_tflite_drop: A .tflite whose test accuracy is more than this below the Keras model's is not pushed.
        tflite_required: Fail the export (nothing pushed) when a requested .tflite does not convert or pass.

    Returns:
        pushed_uri: Where the version was pushed ("" when push_to is "").
    """
    from collections import namedtuple

    from kfp_finetune.components.export.step import ExportConfig, export

    result = export(ExportConfig(model=model.path, output=exported_model.path, evaluation=evaluation.path,
                                 push_to=push_to or None, run_id=run_id or None, fingerprint=fingerprint or None,
                                 settings=training_settings or None, pipeline_job=pipeline_job or None,
                                 tflite=tflite, max_tflite_drop=max_tflite_drop, tflite_required=tflite_required))
    exported_model.metadata.update({"class_names": result.class_names, "signature": "serving_default",
                                    "pushed_uri": result.pushed_uri, "version": result.version,
                                    "skipped_push": result.skipped_push, "promoted": result.promoted,
                                    "not_promoted": result.not_promoted, "temperature": result.temperature,
                                    "tflite": sorted(n for n, m in (result.tflite.get("models") or {}).items()
                                                     if m.get("push"))})
    outputs = namedtuple("ExportOutputs", ["pushed_uri"])
    return outputs(result.pushed_uri)
