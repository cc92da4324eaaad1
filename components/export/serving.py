"""The serving check before a push (infra validation) and TF Serving's warmup file.

`check_saved_model` loads the exported SavedModel in a FRESH Python subprocess with TensorFlow alone (Keras and
this project are made unimportable there), the way TF Serving or Vertex AI's prebuilt TensorFlow container loads
it, and

  1. sends one real encoded image per class as a Vertex / TF Serving REST body,
     `{"instances": [{"image_bytes": {"b64": "..."}}, ...]}`, decoded the way those servers decode it
     (`{"b64": ...}` -> the raw bytes of a DT_STRING element; the instances are stacked into one batch);
  2. replays every record of `assets.extra/tf_serving_warmup_requests` through the signature it names, as TF
     Serving does at load time with `--enable_model_warmup`;
  3. returns the outputs (and its TensorFlow version), which are compared here with the Keras model's
     probabilities on the same bytes (decoded with `components.core.dataset.decode_image`): max |difference| <=
     `TOLERANCE`, and class_name must be the class names' entry at argmax.

The server side runs with this interpreter's TensorFlow, or with the Python named by KFP_FINETUNE_SERVING_PYTHON
(e.g. a venv with tensorflow-cpu 2.15, the TF of Vertex AI's tf2-cpu.2-15 image) to check the SavedModel against
the serving image's TensorFlow. A failing check returns `ServingCheck(passed=False, reason=...)`; export records it
in export.json and refuses to push.

The warmup file is a TFRecord file of `tensorflow.serving.PredictionLog` records, each a `predict_log` whose
`request` is a PredictRequest for `serving_default` with `image_bytes` = a 1-D DT_STRING tensor. The classes come
from the `tensorflow-serving-api` package when it is installed; otherwise the four messages needed (ModelSpec,
PredictRequest, PredictLog, PredictionLog) are declared here with the same package, names and field numbers as
tensorflow_serving/apis/{model,predict,prediction_log}.proto, on TensorFlow's own TensorProto, in a private
descriptor pool, so the bytes are the same either way.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.export.server import CHECK_TIMEOUT_S, ServerProcess, run_server

if TYPE_CHECKING:  # pragma: no cover
    import keras

log = logging.getLogger("kfp_finetune.serving")

WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
SIGNATURE = "serving_default"
INPUT_NAME = "image_bytes"
TOLERANCE = 1e-4


# --- TF Serving protos -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protos:
    """The message classes of the warmup file (tensorflow_serving's, or our identical declarations)."""

    ModelSpec: type
    PredictRequest: type
    PredictLog: type
    PredictionLog: type
    source: str


@functools.lru_cache(maxsize=1)
def protos() -> Protos:
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

        return Protos(model_pb2.ModelSpec, predict_pb2.PredictRequest, prediction_log_pb2.PredictLog,
                      prediction_log_pb2.PredictionLog, "tensorflow_serving")
    except ImportError:
        return _declared_protos()


def _declared_protos() -> Protos:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2
    from tensorflow.core.framework import tensor_pb2

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file_descriptor: Any) -> None:
        if file_descriptor.name in added:
            return
        for dep in file_descriptor.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file_descriptor.CopyToProto(proto)
        pool.Add(proto)
        added.add(file_descriptor.name)

    add(tensor_pb2.DESCRIPTOR)
    add(wrappers_pb2.DESCRIPTOR)

    F = descriptor_pb2.FieldDescriptorProto  # noqa: N806
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED

    def fld(name: str, number: int, ftype: int, label: int = opt, type_name: str | None = None,
            oneof: int | None = None) -> descriptor_pb2.FieldDescriptorProto:
        f = F(name=name, number=number, type=ftype, label=label, json_name=_camel(name))
        if type_name:
            f.type_name = type_name
        if oneof is not None:
            f.oneof_index = oneof
        return f

    file = descriptor_pb2.FileDescriptorProto(
        name="kfp_finetune/tensorflow_serving_warmup.proto", package="tensorflow.serving", syntax="proto3",
        dependency=["tensorflow/core/framework/tensor.proto", "google/protobuf/wrappers.proto"])
    # tensorflow_serving/apis/model.proto
    spec = file.message_type.add(name="ModelSpec")
    spec.oneof_decl.add(name="version_choice")
    spec.field.extend([fld("name", 1, F.TYPE_STRING),
                       fld("version", 2, F.TYPE_MESSAGE, type_name=".google.protobuf.Int64Value", oneof=0),
                       fld("version_label", 4, F.TYPE_STRING, oneof=0),
                       fld("signature_name", 3, F.TYPE_STRING)])
    # tensorflow_serving/apis/predict.proto (PredictRequest; the response is never written to a warmup file)
    request = file.message_type.add(name="PredictRequest")
    entry = request.nested_type.add(name="InputsEntry")
    entry.options.map_entry = True
    entry.field.extend([fld("key", 1, F.TYPE_STRING),
                        fld("value", 2, F.TYPE_MESSAGE, type_name=".tensorflow.TensorProto")])
    request.field.extend([fld("model_spec", 1, F.TYPE_MESSAGE, type_name=".tensorflow.serving.ModelSpec"),
                          fld("inputs", 2, F.TYPE_MESSAGE, rep, ".tensorflow.serving.PredictRequest.InputsEntry"),
                          fld("output_filter", 3, F.TYPE_STRING, rep)])
    # tensorflow_serving/apis/prediction_log.proto (only the predict_log member of the log_type oneof)
    predict_log = file.message_type.add(name="PredictLog")
    predict_log.field.append(fld("request", 1, F.TYPE_MESSAGE, type_name=".tensorflow.serving.PredictRequest"))
    prediction_log = file.message_type.add(name="PredictionLog")
    prediction_log.oneof_decl.add(name="log_type")
    prediction_log.field.append(fld("predict_log", 6, F.TYPE_MESSAGE, type_name=".tensorflow.serving.PredictLog",
                                    oneof=0))
    pool.Add(file)

    def cls(name: str) -> type:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))

    return Protos(cls("ModelSpec"), cls("PredictRequest"), cls("PredictLog"), cls("PredictionLog"), "declared")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def warmup_records(images: list[bytes], model_name: str = "") -> list[bytes]:
    """One serialized PredictionLog per image: a PredictRequest of a batch of one to serving_default."""
    import tensorflow as tf

    p = protos()
    records = []
    for image in images:
        request = p.PredictRequest(model_spec=p.ModelSpec(name=model_name, signature_name=SIGNATURE))
        # by bytes, not CopyFrom: the declared messages live in their own descriptor pool
        tensor = tf.make_tensor_proto([image], dtype=tf.string, shape=[1])
        request.inputs[INPUT_NAME].ParseFromString(tensor.SerializeToString())
        records.append(p.PredictionLog(predict_log=p.PredictLog(request=request)).SerializeToString())
    return records


def write_warmup(saved_model_dir: str | os.PathLike, images: list[bytes]) -> Path:
    """Write `assets.extra/tf_serving_warmup_requests` (TFRecord of PredictionLog) into the SavedModel dir."""
    import tensorflow as tf

    path = Path(saved_model_dir) / WARMUP_DIR / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in warmup_records(images):
            writer.write(record)
    return path


def read_warmup(path: str | os.PathLike) -> list[Any]:
    """The PredictionLog records of a warmup file."""
    import tensorflow as tf

    cls = protos().PredictionLog
    return [cls.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


# --- the Vertex / TF Serving REST instance format ------------------------------------------------------------------


def vertex_body(images: list[bytes]) -> dict[str, Any]:
    """The JSON body a Vertex AI / TF Serving REST client sends: binary inputs as {"b64": ...} objects."""
    return {"instances": [{INPUT_NAME: {"b64": base64.b64encode(b).decode("ascii")}} for b in images]}


def decode_instances(body: dict[str, Any], input_name: str = INPUT_NAME) -> list[bytes]:
    """The batch a TF Serving / Vertex prebuilt TensorFlow server builds from a row-format JSON body.

    Each instance is either an object naming the signature's inputs or, for a one-input signature, the bare
    value; a value `{"b64": S}` is base64-decoded into the bytes of a DT_STRING element.
    """
    instances = body.get("instances")
    if not isinstance(instances, list):
        raise UserError('request body needs "instances": a list')
    out = []
    for i, instance in enumerate(instances):
        value = instance.get(input_name) if isinstance(instance, dict) and "b64" not in instance else instance
        if not (isinstance(value, dict) and isinstance(value.get("b64"), str)):
            raise UserError(f'instance {i}: expected {{"{input_name}": {{"b64": "..."}}}}')
        out.append(base64.b64decode(value["b64"], validate=True))
    return out


# --- the check ---------------------------------------------------------------------------------------------------

@dataclass
class ServingCheck:
    """What the serving check found. `reason` says why it failed ('' when it passed)."""

    passed: bool
    reason: str = ""
    images: int = 0
    warmup_records: int = 0
    max_abs_diff: float | None = None
    tolerance: float = TOLERANCE
    server_tensorflow: str = ""
    seconds: float = 0.0
    class_names_sent: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def keras_probabilities(model: keras.Model, images: list[bytes], temperature: float = 1.0) -> Any:
    """The Keras model's probabilities on encoded images, through the training/evaluation decode, calibrated with
    `temperature` (softmax(log(p) / T), components/evaluate/calibration.py) as the export serves them."""
    import numpy as np
    import tensorflow as tf

    from kfp_finetune.components.core.dataset import decode_image

    size = int(model.input_shape[1])
    pixels = tf.stack([decode_image(tf.constant(b), size) for b in images])
    probabilities = np.asarray(model(pixels, training=False), dtype="float64")
    if temperature == 1.0:
        return probabilities
    from kfp_finetune.components.evaluate.calibration import apply_temperature

    return apply_temperature(probabilities, temperature)


def _compare(outputs: dict[str, Any], expected: Any, class_names: list[str], what: str) -> float:
    """Max |difference| of the served probabilities; raises ValueError naming what differs."""
    import numpy as np

    missing = {"probabilities", "class_id", "class_name"} - set(outputs)
    if missing:
        raise ValueError(f"{what}: outputs {sorted(outputs)} lack {sorted(missing)}")
    probs = np.asarray(outputs["probabilities"], dtype="float64")
    if probs.shape != expected.shape:
        raise ValueError(f"{what}: probabilities have shape {probs.shape}, the Keras model gives {expected.shape}")
    diff = float(np.max(np.abs(probs - expected))) if probs.size else 0.0
    if not diff <= TOLERANCE:
        raise ValueError(f"{what}: probabilities differ from the Keras model's by {diff:.3g} (> {TOLERANCE:g})")
    want = [class_names[i] for i in np.argmax(probs, axis=-1)]
    if list(outputs["class_name"]) != want or list(outputs["class_id"]) != list(np.argmax(probs, axis=-1)):
        raise ValueError(f"{what}: class_name/class_id {outputs['class_name']} do not match argmax {want}")
    return diff


def check_saved_model(saved_model_dir: str | os.PathLike, model: keras.Model, class_names: list[str],
                      samples: list[tuple[str, bytes]], write_warmup_file: bool = True,
                      timeout: float = CHECK_TIMEOUT_S, temperature: float = 1.0,
                      server: ServerProcess | None = None) -> ServingCheck:
    """Write the warmup file (one request per sample), then serve the SavedModel in a fresh TensorFlow-only
    process (`server`: one started ahead, components/export/server.py) and compare what it answers with the Keras
    model. Never raises for a bad model: see `.reason`."""
    started = time.perf_counter()
    images = [b for _, b in samples]
    check = ServingCheck(passed=False, images=len(images), class_names_sent=[c for c, _ in samples])
    if not images:
        check.reason = "no sample images to send"
        return check
    warmup = write_warmup(saved_model_dir, images) if write_warmup_file else None
    check.warmup_records = len(images) if warmup else 0
    try:
        served = run_server(saved_model_dir, vertex_body(images), warmup, timeout=timeout, server=server,
                            signature=SIGNATURE, input_name=INPUT_NAME)
        expected = keras_probabilities(model, images, temperature)
        check.server_tensorflow = served.get("tensorflow", "")
        inputs = served.get("inputs", {})
        if list(inputs) != [INPUT_NAME] or inputs[INPUT_NAME][0] != "string":
            raise ValueError(f"{SIGNATURE} takes {inputs}, not one string tensor {INPUT_NAME!r}")
        diffs = [_compare(served["predict"], expected, class_names, "JSON b64 request")]
        if warmup is not None:
            if len(served["warmup"]) != len(images):
                raise ValueError(f"the warmup file replayed {len(served['warmup'])} of {len(images)} requests")
            for i, out in enumerate(served["warmup"]):
                diffs.append(_compare(out, expected[i:i + 1], class_names, f"warmup request {i}"))
        check.max_abs_diff = max(diffs)
        check.passed = True
    except (RuntimeError, ValueError, KeyError) as exc:
        check.reason = str(exc)
    check.seconds = round(time.perf_counter() - started, 2)
    if check.passed:
        log.info("serving check passed: %d images (one per class) through a TensorFlow-only process (TF %s), "
                 "max |diff| %.2g; %d warmup records", check.images, check.server_tensorflow, check.max_abs_diff,
                 check.warmup_records)
    else:
        log.error("serving check FAILED: %s", check.reason)
    return check


# --- sample images -------------------------------------------------------------------------------------------------


def sample_images(dataset_dir: str | os.PathLike, class_names: list[str], split: str = "test",
                  scan_limit: int = 5000) -> list[tuple[str, bytes]]:
    """One real encoded image per class from the Dataset artifact's `split` (falling back to the other splits
    for classes the split lacks). UserError when the dataset's classes differ from the model's."""
    from kfp_finetune.components.core import dataset

    info = dataset.load_info(dataset_dir)
    if list(info.class_names) != list(class_names):
        raise UserError(f"dataset {dataset_dir} has classes {list(info.class_names)}, the model {class_names}")
    found: dict[int, bytes] = {}
    order = [split] + [s for s in dataset.SPLITS if s != split]
    for name in order:
        if not info.files(name):
            continue
        for i, (image, label) in enumerate(dataset.read_split(dataset_dir, name)):
            found.setdefault(int(label), image.numpy())
            if len(found) == len(class_names) or i >= scan_limit:
                break
        if len(found) == len(class_names):
            break
    return [(class_names[k], found[k]) for k in sorted(found)]


def synthetic_images(count: int, size: int = 64) -> list[tuple[str, bytes]]:
    """Encoded JPEG/PNG images (gradients), when no dataset is at hand: they still exercise decode + model."""
    import numpy as np
    import tensorflow as tf

    out = []
    for i in range(count):
        x = np.linspace(0, 255, size, dtype="float32")
        image = np.stack([np.add.outer(x, x * (i % 3)) % 256, np.add.outer(x * 0, x), np.full((size, size), 40.0 * i)],
                         axis=-1).clip(0, 255).astype("uint8")
        encode = tf.io.encode_png if i % 2 else tf.io.encode_jpeg
        out.append((f"synthetic-{i}", encode(image).numpy()))
    return out


# --- what a serving image must support -------------------------------------------------------------------------


def saved_model_requirements(saved_model_dir: str | os.PathLike) -> dict[str, Any]:
    """The TF version compiled into the SavedModel's MetaGraph and every op it uses (graph + function library)."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel.FromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    meta = sm.meta_graphs[0]
    ops = {node.op for node in meta.graph_def.node}
    for fn in meta.graph_def.library.function:
        ops.update(node.op for node in fn.node_def)
    ops -= {fn.signature.name for fn in meta.graph_def.library.function}  # calls of library functions
    return {"tensorflow_version": meta.meta_info_def.tensorflow_version,
            "tensorflow_git_version": meta.meta_info_def.tensorflow_git_version,
            "tags": list(meta.meta_info_def.tags), "ops": sorted(ops)}
