"""export: a servable SavedModel from a classifier, then (optionally) a versioned push to a folder or gs:// prefix.

SavedModel: `serving_default` takes `image_bytes`, a 1-D tf.string batch of encoded JPEG/PNG images of any size,
decodes and resizes them inside the graph with `components.dataset.decode_image` (the very decode+resize training
and evaluation used) and returns `probabilities` [batch, classes] float32, `class_id` [batch] int32 and
`class_name` [batch] string. TF Serving and Vertex AI Prediction host it unchanged (JSON clients send
`{"image_bytes": {"b64": ...}}`). The output directory is the SavedModel itself, with model.json and
evaluation.json beside saved_model.pb.

Push (`push_to`): the exported folder is copied to `<push_to>/<version>/` (version = UTC timestamp in
milliseconds, digits only so TF Serving orders it, or the run id), and only then is `<push_to>/LATEST` rewritten
to name the new version. A push that fails part-way leaves LATEST on the previous version. gs:// goes through
google-cloud-storage with parallel uploads (components.gcs).

Optional: register the pushed gs:// version in Vertex AI Model Registry (`Model.upload`, a new version of
`parent_model` when given, the prebuilt TensorFlow serving container).
"""

import argparse
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components import settings
from components.errors import UserError
from components.fsutil import atomic_directory, check_output_dir, read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    import keras

log = logging.getLogger("kfp_finetune.export")

LATEST_FILE = "LATEST"
EXPORT_FILE = "export.json"
SIGNATURE = "serving_default"
INPUT_NAME = "image_bytes"
OUTPUT_NAMES = ("probabilities", "class_id", "class_name")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Vertex AI's prebuilt TensorFlow prediction image (the newest TF 2 CPU line it offers).
DEFAULT_SERVING_IMAGE = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"
VERTEX_REGION_PATTERN = re.compile(r"^[a-z]+-[a-z]+\d+$")
# How long one file upload of a push keeps retrying transient errors (the library's default is 120 s).
PUSH_RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class VertexConfig:
    """Where and how to register the pushed version in Vertex AI Model Registry."""

    project: str
    region: str
    display_name: str
    parent_model: str | None = None
    serving_image: str = DEFAULT_SERVING_IMAGE
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not str(self.project or "").strip():
            raise UserError("--vertex-project is required with --vertex-upload")
        if not VERTEX_REGION_PATTERN.match(str(self.region or "")):
            raise UserError(f"--vertex-region must be a region like us-central1 (got {self.region!r})")
        if not str(self.display_name or "").strip() or len(self.display_name) > 128:
            raise UserError("--vertex-display-name must be 1..128 characters")
        if not str(self.serving_image or "").strip():
            raise UserError("--vertex-serving-image is empty")
        if self.parent_model is not None and not str(self.parent_model).strip():
            object.__setattr__(self, "parent_model", None)


@dataclass(frozen=True)
class ExportConfig:
    """export's inputs. `model`: a Model artifact dir; `evaluation`: evaluate's output dir or its evaluation.json."""

    model: str
    output: str
    evaluation: str | None = None
    push_to: str | None = None
    run_id: str | None = None
    vertex: VertexConfig | None = None

    def __post_init__(self) -> None:
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
            from components import gcs

            if gcs.is_gcs(self.push_to):
                gcs.split_uri(self.push_to)  # raises on gs:// without a bucket
        if self.vertex is not None:
            if self.push_to is None or not self.push_to.startswith("gs://"):
                raise UserError("--vertex-upload needs --push-to gs://...: Vertex AI reads the model from GCS")


@dataclass
class ExportResult:
    """Where the SavedModel is, and where it was pushed ('' when not pushed)."""

    saved_model_dir: str
    pushed_uri: str = ""
    version: str = ""
    vertex_model: str = ""
    class_names: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- the serving SavedModel ------------------------------------------------------------------------------------


def _input_size(model: "keras.Model") -> int:
    from components import modelio

    return modelio.input_size(model)


def write_saved_model(model: "keras.Model", class_names: list[str], directory: str | os.PathLike) -> None:
    """Write a SavedModel whose serving_default maps encoded images to probabilities, class_id and class_name."""
    import keras
    import tensorflow as tf

    from components.dataset import decode_image

    size = _input_size(model)
    names = tf.constant(list(class_names), dtype=tf.string)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
    def serve(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels = tf.map_fn(
            lambda b: decode_image(b, size), image_bytes,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
        )
        probabilities = tf.cast(model(pixels, training=False), tf.float32)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {"probabilities": probabilities, "class_id": class_id, "class_name": tf.gather(names, class_id)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name=SIGNATURE, fn=serve)
    archive.write_out(str(directory), verbose=False)


# --- evaluation checks -----------------------------------------------------------------------------------------


def read_evaluation(path: str) -> dict[str, Any]:
    """evaluation.json from evaluate's output directory (or the file itself)."""
    from components.evaluate import EVALUATION_FILE

    p = Path(path)
    return read_json(p / EVALUATION_FILE if p.is_dir() else p, f"--evaluation {path}")


def _check_evaluation(evaluation: dict[str, Any], model_dir: str, class_names: list[str], pushing: bool) -> None:
    from components.evaluate import file_sha256

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


# --- push ------------------------------------------------------------------------------------------------------


def new_version(run_id: str | None = None) -> str:
    """The run id, or the UTC time in milliseconds as digits (TF Serving wants numeric, increasing versions)."""
    if run_id:
        return run_id
    now = datetime.now(UTC)
    return now.strftime("%Y%m%d%H%M%S") + f"{now.microsecond // 1000:03d}"


def read_latest(push_to: str) -> str | None:
    """The version LATEST names under a push destination, or None when nothing was pushed yet."""
    from components import gcs

    if gcs.is_gcs(push_to):
        bucket, prefix = gcs.split_uri(push_to.rstrip("/") + "/" + LATEST_FILE)
        blob = gcs.client().bucket(bucket).blob(prefix)
        if not blob.exists():
            return None
        return blob.download_as_text().strip() or None
    file = Path(push_to) / LATEST_FILE
    return file.read_text().strip() or None if file.is_file() else None


def push(local_dir: str | os.PathLike, push_to: str, version: str, retry_seconds: float = PUSH_RETRY_SECONDS) -> str:
    """Copy `local_dir` to `<push_to>/<version>/`, then point `<push_to>/LATEST` at it. Returns the version URI.

    gs://: each file upload retries transient errors for at most `retry_seconds`; a failure raises UserError
    before LATEST is touched (the half-uploaded version folder stays, named in no pointer).
    """
    from components import gcs

    if gcs.is_gcs(push_to):
        from google.cloud.storage.retry import DEFAULT_RETRY

        base = push_to.rstrip("/")
        target = f"{base}/{version}"
        if gcs.list_blobs(target):
            raise UserError(f"--push-to: {target} already exists; give another --run-id")
        try:
            uris = gcs.upload_directory(local_dir, target, retry=DEFAULT_RETRY.with_timeout(retry_seconds))
        except UserError as exc:
            raise UserError(f"push to {target} failed, LATEST not changed: {exc}") from exc
        log.info("pushed %d files to %s", len(uris), target)
        gcs.write_text(f"{base}/{LATEST_FILE}", version + "\n")
    else:
        base_path = Path(push_to)
        target_path = base_path / version
        if target_path.exists():
            raise UserError(f"--push-to: {target_path} already exists; give another --run-id")
        base_path.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=base_path))
        try:
            shutil.copytree(local_dir, staging, dirs_exist_ok=True)
            os.replace(staging, target_path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        latest_tmp = base_path / f".{LATEST_FILE}.tmp"
        latest_tmp.write_text(version + "\n")
        os.replace(latest_tmp, base_path / LATEST_FILE)
        target = str(target_path)
    log.info("LATEST -> %s", version)
    return target


# --- Vertex AI Model Registry ----------------------------------------------------------------------------------


def vertex_upload_args(vertex: VertexConfig, artifact_uri: str, version: str, class_names: list[str],
                       evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments of `aiplatform.Model.upload`, built and checked without any network access."""
    if not artifact_uri.startswith("gs://"):
        raise UserError(f"Vertex AI needs a gs:// artifact URI (got {artifact_uri!r})")
    labels = {"kfp-finetune-version": re.sub(r"[^a-z0-9_-]", "-", version.lower())[:63], **vertex.labels}
    accuracy = (evaluation or {}).get("metrics", {}).get("accuracy")
    description = (f"{len(class_names)} classes: {', '.join(class_names)}"
                   + (f"; test accuracy {accuracy:.4f}" if accuracy is not None else ""))
    args: dict[str, Any] = {
        "display_name": vertex.display_name,
        "artifact_uri": artifact_uri,
        "serving_container_image_uri": vertex.serving_image,
        "description": description[:2048],
        "labels": labels,
        "version_aliases": [f"v{re.sub(r'[^a-z0-9-]', '-', version.lower())}"[:128]],
        "is_default_version": True,
        "sync": True,
    }
    if vertex.parent_model:
        args["parent_model"] = vertex.parent_model
    return args


def vertex_upload(vertex: VertexConfig, args: dict[str, Any], credentials: Any = None,
                  api_endpoint: str | None = None) -> str:
    """Upload to Vertex AI Model Registry; returns the model's resource name (with version)."""
    from google.cloud import aiplatform

    init: dict[str, Any] = {"project": vertex.project, "location": vertex.region}
    if credentials is not None:
        init["credentials"] = credentials
    if api_endpoint:
        init["api_endpoint"] = api_endpoint
    aiplatform.init(**init)
    try:
        model = aiplatform.Model.upload(**args)
    except Exception as exc:  # google.api_core errors, auth errors, network errors
        raise UserError(f"Vertex AI Model.upload of {args['artifact_uri']} failed: {exc}") from exc
    name = f"{model.resource_name}@{model.version_id}" if getattr(model, "version_id", None) else model.resource_name
    log.info("registered in Vertex AI Model Registry: %s", name)
    return name


# --- the step --------------------------------------------------------------------------------------------------


def export(config: ExportConfig) -> ExportResult:
    """Write the serving SavedModel to `config.output`; push it when `config.push_to` is set."""
    from components import modelio

    started = time.perf_counter()
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
    version = new_version(config.run_id) if config.push_to else ""

    with atomic_directory(config.output) as tmp:
        write_saved_model(model, class_names, tmp)
        write_json(tmp / modelio.META_FILE, meta)
        if evaluation is not None:
            write_json(tmp / "evaluation.json", evaluation)
        write_json(tmp / EXPORT_FILE, {
            "signature": SIGNATURE, "inputs": {INPUT_NAME: "tf.string [None]: encoded JPEG/PNG, any size"},
            "outputs": {"probabilities": f"float32 [None, {len(class_names)}]", "class_id": "int32 [None]",
                        "class_name": "string [None]"},
            "class_names": class_names, "input_size": _input_size(model), "source_model": str(config.model),
            "version": version or None,
        })
    log.info("exported SavedModel (%s: %s -> %s) to %s", SIGNATURE, INPUT_NAME, ", ".join(OUTPUT_NAMES),
             config.output)

    result = ExportResult(saved_model_dir=str(config.output), version=version, class_names=class_names)
    if config.push_to:
        result.pushed_uri = push(config.output, config.push_to, version)
        if config.vertex is not None:
            args = vertex_upload_args(config.vertex, result.pushed_uri, version, class_names, evaluation)
            result.vertex_model = vertex_upload(config.vertex, args)
    result.seconds = time.perf_counter() - started
    return result


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
    p.add_argument("--push-to", default=None, metavar="DIR_OR_GS_URI",
                   help="copy the export to PUSH_TO/<version>/ and then point PUSH_TO/LATEST at it")
    p.add_argument("--run-id", default=None, help="version folder name (default: UTC timestamp in ms)")
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
    result = export(ExportConfig(model=args.model, output=args.output, evaluation=args.evaluation,
                                 push_to=args.push_to, run_id=args.run_id, vertex=vertex))
    if result.pushed_uri:
        log.info("pushed version %s to %s", result.version, result.pushed_uri)
    return 0


# --- KFP component ---------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def export_op(
    model: Input[Model],
    evaluation: Input[Artifact],
    exported_model: Output[Model],
    push_to: str = "",
    run_id: str = "",
) -> NamedTuple("ExportOutputs", [("pushed_uri", str)]):
    """Export a blessed classifier as a serving SavedModel and push a versioned copy.

    Args:
        model: Model artifact written by train_head or fine_tune.
        evaluation: The `evaluation` artifact of evaluate (a folder with evaluation.json); a push needs it blessed.
        exported_model: Output Model: the SavedModel (serving_default: image_bytes -> probabilities, class_id,
            class_name), with model.json and evaluation.json beside it.
        push_to: Local folder or gs:// prefix to push a new version to (then LATEST is updated); "" for none.
        run_id: Name of the pushed version folder; "" for a UTC timestamp.

    Returns:
        pushed_uri: Where the version was pushed ("" when push_to is "").
    """
    from collections import namedtuple

    from components.export import ExportConfig, export

    result = export(ExportConfig(model=model.path, output=exported_model.path, evaluation=evaluation.path,
                                 push_to=push_to or None, run_id=run_id or None))
    exported_model.metadata.update({"class_names": result.class_names, "signature": "serving_default",
                                    "pushed_uri": result.pushed_uri, "version": result.version})
    outputs = namedtuple("ExportOutputs", ["pushed_uri"])
    return outputs(result.pushed_uri)
