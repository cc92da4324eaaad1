"""predict: run a classifier over a folder, a gs:// prefix or a CSV list of images; one output row per file.

    kfp-finetune predict --model EXPORT_OR_MODEL --input FOLDER|gs://PREFIX|CSV --output predictions.jsonl|.csv
                         [--top-k K] [--batch-size N]

--model: an export (SavedModel folder from `kfp-finetune export`), a Model artifact (model.keras + model.json from
train-head / fine-tune), a LiteRT model (`tflite/model_<variant>.tflite` of an export, run by the LiteRT interpreter,
class names from the `labels.txt` beside it), or a push destination (folder or gs:// prefix holding LATEST): then
the version LATEST names. A gs:// model is copied to a temporary folder first (models are small; images are not).

--input: a folder (searched recursively for image file names), a gs:// prefix (listed page by page, each object
downloaded when its turn comes), or a .csv file whose column `file` (or `path`, `uri`, `image`; else the first
column) names local paths (relative to the CSV's folder) or gs:// URIs.

Each file is read and its header checked by Pillow (format, and the pixel count against the ingest step's
decompression-bomb limit) on a thread pool, at most `window` files in flight, so memory does not grow with the
input. Decode + resize (`components.core.dataset.decode_image`, the one training, evaluation and the serving signature
use) then run in a tf.data parallel map feeding the model batch by batch, as a hand-written tf.data loop would. A
file TensorFlow cannot decode goes through `components.core.imagecheck` (ingest's full decode): when Pillow can read it
(TIFF, 16-bit PNG, CMYK JPEG, ...) its RGB re-encoding is predicted, otherwise the row gets `skip_reason` (corrupt /
too_large / unreadable, with the detail).

Output rows, in input order. JSON Lines: {"file", "classes": [top-k names], "probabilities": [...], "skip_reason"}.
CSV: file, class_1, probability_1, ..., class_K, probability_K, skip_reason. The file is written to a temporary
name beside the output and renamed when complete (gs:// outputs are uploaded when complete).
"""

# No `from __future__ import annotations`: KFP reads predict_op's annotations as real types.
import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from kfp_finetune.components.core import faults, gcs, settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.modelio import PIXEL_ENDPOINT
from kfp_finetune.components.core.params import add_arguments, by_name, config_kwargs
from kfp_finetune.components.predict.inputs import (  # noqa: F401  (re-exported: the reading and writing side of predict)
    TF_FORMATS,
    Item,
    RowWriter,
    input_root,
    iter_items,
    list_inputs,
    load_item,
    read_item,
)
from kfp_finetune.components.predict.params import PREDICT

log = logging.getLogger("kfp_finetune.predict")

OUTPUT_FORMATS = (".jsonl", ".csv")
_DEFAULT = {name: p.default for name, p in by_name(PREDICT).items()}
DEFAULT_BATCH = _DEFAULT["batch_size"]
DEFAULT_TOP_K = _DEFAULT["top_k"]
CHUNK = 16  # files per hand-over from the reader threads to tf.data


@dataclass(frozen=True)
class PredictConfig:
    """predict's inputs, checked once."""

    model: str
    input: str
    output: str
    # The parameters (components/predict/params.py defines their defaults, help and checks).
    top_k: int = DEFAULT_TOP_K
    batch_size: int = DEFAULT_BATCH
    workers: int = _DEFAULT["workers"]  # 0: the CPU count

    def __post_init__(self) -> None:
        for name in ("model", "input", "output"):
            if not str(getattr(self, name) or "").strip():
                raise UserError(f"--{name} is required")
        if Path(str(self.output)).suffix.lower() not in OUTPUT_FORMATS:
            raise UserError(f"--output {self.output}: name a .jsonl or .csv file")
        for p in PREDICT:
            p.validate(getattr(self, p.name))
        if gcs.is_gcs(self.input):
            gcs.split_uri(self.input)
        elif not Path(self.input).exists():
            raise UserError(f"--input {self.input}: no such folder or file (give a folder, a gs:// prefix or a .csv)")
        elif Path(self.input).is_file() and Path(self.input).suffix.lower() != ".csv":
            raise UserError(f"--input {self.input}: a file input must be a .csv list of images")


@dataclass
class PredictResult:
    output: str
    model: str
    rows: int = 0
    predicted: int = 0
    skipped: int = 0
    skip_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds else 0.0


# --- the model -------------------------------------------------------------------------------------------------


class Classifier:
    """A loaded model: `size`, `class_names` and `probabilities(pixels | bytes)` for a batch.

    With `background=True`, when the folder's metadata already says how the model is fed (its input size, and for
    an export that it has the pixel endpoint), the model loads on a thread while the caller starts reading and
    decoding the images; `probabilities` (or `ready`) waits for it and raises its error, if any.
    """

    def __init__(self, path: str, background: bool = False) -> None:
        from kfp_finetune.components.core import modelio

        self.path = path
        root = Path(path)
        self._bytes_fn: Callable[[Any], Any] | None = None
        self._pending: Future | None = None
        if root.suffix == ".tflite":
            self._load_tflite(root)
            return
        self.meta = modelio.read_meta(root)
        self.class_names = list(self.meta.get("class_names") or [])
        if not self.class_names:
            raise UserError(f"--model {path}: model.json has no class_names (give a trained classifier)")
        if (root / modelio.MODEL_FILE).is_file():
            self.kind = "keras"
            declared = int((self.meta.get("backbone") or {}).get("input_size") or 0)
            load = self._load_keras
        elif (root / "saved_model.pb").is_file():
            export_info = json.loads((root / "export.json").read_text()) if (root / "export.json").is_file() else {}
            self.size = int(export_info.get("input_size") or self.meta.get("input_size") or 0)
            if not self.size:
                raise UserError(f"--model {path}: export.json/model.json give no input_size")
            self.kind = "saved_model"
            declared = self.size if PIXEL_ENDPOINT in (export_info.get("endpoints") or ()) else 0
            load = self._load_saved_model
        else:
            raise UserError(f"--model {path}: neither model.keras (a Model artifact) nor saved_model.pb (an export)")
        if background and declared:
            self.size = declared
            pool = ThreadPoolExecutor(1, thread_name_prefix="predict-model")
            self._pending = pool.submit(load, root, declared)
            pool.shutdown(wait=False)  # the thread ends with the load; `ready` waits for it
        else:
            load(root, 0)
        log.info("model %s (%s, %d classes, %dx%d)%s", path, self.kind, len(self.class_names), self.size, self.size,
                 ", loading while the first images are read" if self._pending else "")

    def _load_keras(self, root: Path, declared: int) -> None:
        import tensorflow as tf

        from kfp_finetune.components.core import modelio

        model, _ = modelio.load_model(root)
        size = modelio.input_size(model, f"--model {self.path}")
        if declared and size != declared:
            raise UserError(f"--model {self.path}: model.json says input size {declared}, the model takes {size}")
        self.size = size
        self._pixels_fn = tf.function(lambda x: model(x, training=False),
                                      input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])

    def _load_saved_model(self, root: Path, declared: int) -> None:
        import tensorflow as tf

        loaded = tf.saved_model.load(str(root))
        self._loaded = loaded  # keeps the variables alive
        endpoint = getattr(loaded, PIXEL_ENDPOINT, None)
        if endpoint is not None:
            self._pixels_fn = endpoint
        elif declared:
            raise UserError(f"--model {self.path}: export.json lists {PIXEL_ENDPOINT}, the SavedModel lacks it")
        else:  # an export written before the pixel endpoint: feed encoded bytes to serving_default
            signature = loaded.signatures["serving_default"]
            self._pixels_fn = None
            self._bytes_fn = lambda b: signature(image_bytes=b)["probabilities"]
            self.kind = "saved_model (bytes)"

    def ready(self) -> None:
        """Wait for a model loading in the background (no-op otherwise); raises what its loading raised."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _load_tflite(self, root: Path) -> None:
        """A .tflite in the LiteRT interpreter, one image per invoke (the interpreter's input is [1, S, S, 3])."""
        import numpy as np

        from kfp_finetune.components.export.tflite_export import LABELS_FILE, LiteModel

        labels = root.parent / LABELS_FILE
        if not root.is_file() or not labels.is_file():
            raise UserError(f"--model {root}: a .tflite needs the file and {LABELS_FILE} beside it (class names)")
        self.meta = {}
        self.class_names = [line for line in labels.read_text(encoding="utf-8").splitlines() if line]
        lite = LiteModel(root)
        self.size, self.kind = lite.size, "tflite"
        self._pixels_fn = lambda batch: np.stack([lite.probabilities(x) for x in np.asarray(batch)]) \
            if len(batch) else np.zeros([0, len(self.class_names)], np.float32)
        log.info("model %s (tflite, %d classes, %dx%d)", root, len(self.class_names), self.size, self.size)

    @property
    def wants_bytes(self) -> bool:
        return self._bytes_fn is not None

    def probabilities(self, batch: Any) -> Any:
        import numpy as np
        import tensorflow as tf

        self.ready()
        if self._bytes_fn is not None:
            return np.asarray(self._bytes_fn(tf.constant(batch, dtype=tf.string)))
        out = self._pixels_fn(tf.convert_to_tensor(batch, dtype=tf.float32))
        return np.asarray(out["probabilities"] if isinstance(out, dict) else out)


def resolve_model(model: str, staging: str) -> str:
    """A local model folder for --model: itself, the version LATEST names (push destinations), or a gs:// copy."""
    from kfp_finetune.components.export.step import read_latest

    latest = read_latest(model) if gcs.is_gcs(model) or (Path(model) / "LATEST").is_file() else None
    if latest:
        model = f"{model.rstrip('/')}/{latest}"
        log.info("--model: LATEST names version %s -> %s", latest, model)
    if gcs.is_gcs(model) and model.endswith(".tflite"):  # the file and labels.txt beside it
        local = Path(staging) / "model"
        gcs.download_tree(model.rsplit("/", 1)[0], local, "--model")
        return str(local / model.rsplit("/", 1)[1])
    if gcs.is_gcs(model):
        local = Path(staging) / "model"
        gcs.download_tree(model, local, "--model")
        return str(local)
    if model.endswith(".tflite") and Path(model).is_file():
        return model
    if not Path(model).is_dir():
        raise UserError(f"--model {model}: no such folder")
    return model


# --- the step --------------------------------------------------------------------------------------------------


def _predict_pixels(classifier: Classifier, items: Iterator[Item], batch_size: int, k: int, writer: RowWriter,
                    result: PredictResult, skip: Callable[[str, str], None], bar: Any, root: str | None) -> None:
    """The fast path: the threads read and check the files; decode + resize run in a tf.data parallel map (C++
    threads, as a hand-written tf.data loop would), batched into the model. An image TensorFlow fails to decode
    is dropped there (ignore_errors) and noticed by its missing index: it goes through `load_item` (imagecheck's
    full decode) for its skip reason or a converted copy. Rows are written in input order."""
    import numpy as np
    import tensorflow as tf

    from kfp_finetune.components.core.dataset import decode_image

    names = classifier.class_names
    files: dict[int, str] = {}  # index -> file, for the files in flight
    skips: dict[int, str] = {}  # index -> skip reason found by the threads
    produced = [0]
    failure: list[BaseException] = []

    def generate() -> Iterator[tuple[Any, Any]]:
        """(indices, encoded images) in chunks: one crossing from Python into tf.data per CHUNK files, not per
        file (the per-element generator call, under the GIL, cost ~1.5 ms an image on 2 cores)."""
        indices: list[int] = []
        data: list[bytes] = []
        try:
            for i, item in enumerate(items):
                files[i] = item.file
                produced[0] = i + 1
                if item.skip_reason:
                    skips[i] = item.skip_reason
                    continue
                indices.append(i)
                data.append(item.data)
                if len(indices) >= CHUNK:
                    yield np.array(indices, np.int64), np.array(data, dtype=object)
                    indices, data = [], []
            if indices:
                yield np.array(indices, np.int64), np.array(data, dtype=object)
        except BaseException as exc:  # ignore_errors below would swallow it: kept and re-raised after the loop
            failure.append(exc)

    size = classifier.size
    ds = (tf.data.Dataset.from_generator(generate, output_signature=(tf.TensorSpec([None], tf.int64),
                                                                     tf.TensorSpec([None], tf.string)))
          .unbatch()
          .map(lambda i, b: (i, decode_image(b, size)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .ignore_errors()
          .batch(batch_size)
          .prefetch(2))
    next_index = 0

    def write(file: str, probs: Any) -> None:
        top = np.argsort(-probs, kind="stable")[:k]
        writer.write(file, [names[j] for j in top], [float(probs[j]) for j in top], None)
        result.predicted += 1

    def settle(limit: int) -> None:
        """Rows for the indices below `limit` that did not come out of tf.data: skipped or dropped."""
        nonlocal next_index
        while next_index < limit:
            file = files.pop(next_index)
            reason = skips.pop(next_index, None)
            if reason is None:  # dropped by TensorFlow's decode: the full check says why, or converts it
                item = load_item(file, size, False, root=root)
                if item.skip_reason:
                    reason = item.skip_reason
                else:
                    write(file, classifier.probabilities(item.data[None])[0])
            if reason is not None:
                skip(file, reason)
            next_index += 1
            bar.update(1)

    for indices, pixels in ds:
        probs = classifier.probabilities(pixels)
        for i, p in zip(indices.numpy().tolist(), probs, strict=True):
            settle(i)
            write(files.pop(i), p)
            next_index = i + 1
            bar.update(1)
    if failure:
        raise failure[0]
    settle(produced[0])


@faults.stops_cleanly("predict")
def predict(config: PredictConfig, progress: bool = True) -> PredictResult:
    """Predict every image of `config.input` and write one row per file to `config.output`."""
    import numpy as np
    from tqdm import tqdm

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="predict-model-") as staging:
        model_dir = resolve_model(config.model, staging)
        classifier = Classifier(model_dir, background=True)
        names = classifier.class_names
        k = min(config.top_k, len(names))
        files, total = list_inputs(config.input)
        root = input_root(config.input)
        result = PredictResult(output=config.output, model=model_dir)
        writer = RowWriter(config.output, k)
        workers = config.workers or max(2, os.cpu_count() or 2)
        batch: list[Item] = []

        def flush() -> None:
            if not batch:
                return
            probs = classifier.probabilities(np.stack([i.data for i in batch]) if not classifier.wants_bytes
                                             else [i.data for i in batch])
            top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            for item, p, idx in zip(batch, probs, top, strict=True):
                writer.write(item.file, [names[j] for j in idx], [float(p[j]) for j in idx], None)
            result.predicted += len(batch)
            batch.clear()

        def skip(file: str, reason: str) -> None:
            writer.write(file, [], [], reason)
            result.skipped += 1
            kind = reason.split(":", 1)[0]
            result.skip_counts[kind] = result.skip_counts.get(kind, 0) + 1

        try:
            with tqdm(total=total, unit="img", desc="predict", disable=not progress, mininterval=1.0) as bar:
                window = max(2 * config.batch_size, 4 * workers)
                if classifier.wants_bytes:  # an export without predict_pixels: decode in the threads
                    for item in iter_items(files, classifier.size, True, workers, window, root=root):
                        if item.skip_reason:
                            flush()  # keep the rows in input order
                            skip(item.file, item.skip_reason)
                        else:
                            batch.append(item)
                            if len(batch) >= config.batch_size:
                                flush()
                        bar.update(1)
                    flush()
                else:
                    _predict_pixels(classifier, iter_items(files, classifier.size, False, workers, window,
                                                           decode=False, root=root),
                                    config.batch_size, k, writer, result, skip, bar, root)
            classifier.ready()  # no image at all: the model must still have loaded (its errors are predict's)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    result.rows = result.predicted + result.skipped
    result.seconds = round(time.perf_counter() - started, 3)
    if result.rows == 0:
        log.warning("--input %s: no image files found", config.input)
    log.info("predicted %d images, skipped %d %s in %.1f s -> %s", result.predicted, result.skipped,
             result.skip_counts or "", result.seconds, config.output)
    return result


# --- CLI -------------------------------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="batch prediction over a folder, gs:// prefix or CSV of images",
        description="Classify every image of a folder, gs:// prefix or CSV list with an export, a Model artifact "
                    "or the version LATEST names in a push destination; one row per file (top-k classes and "
                    "probabilities, or why the file was skipped) in a .jsonl or .csv file.",
    )
    p.add_argument("--model", required=True, metavar="EXPORT_OR_MODEL",
                   help="export folder, Model artifact folder, or push destination (folder or gs://) with LATEST")
    p.add_argument("--input", required=True, metavar="FOLDER|gs://PREFIX|CSV", help="the images to classify")
    p.add_argument("--output", required=True, help="predictions file: .jsonl or .csv (local path or gs://)")
    add_arguments(p, PREDICT)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    predict(PredictConfig(model=args.model, input=args.input, output=args.output, **config_kwargs(PREDICT, args)))
    return 0


# --- KFP component ---------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def predict_op(
    model_uri: str,
    input_uri: str,
    predictions: Output[Dataset],
    top_k: int = 3,
    batch_size: int = 32,
    workers: int = 0,
    output_format: str = "jsonl",
) -> NamedTuple("PredictOutputs", [("predicted", int), ("skipped", int)]):
    """Batch prediction: classify every image under input_uri with the model at model_uri.

    Args:
        model_uri: Export or Model artifact folder, or a push destination (folder or gs:// prefix) whose LATEST
            names the version to use.
        input_uri: Folder, gs:// prefix or .csv list of the images.
        predictions: Output Dataset: a folder holding predictions.jsonl (or .csv), one row per file.
        top_k: Classes (with probabilities) per row.
        batch_size: Images per forward pass.
        workers: Reader threads; 0: the CPU count.
        output_format: "jsonl" or "csv".

    Returns:
        predicted: Rows with predictions.
        skipped: Rows for files that could not be read or decoded (with the reason).
    """
    import os
    from collections import namedtuple

    from kfp_finetune.components.predict.step import PredictConfig, predict

    os.makedirs(predictions.path, exist_ok=True)
    out = os.path.join(predictions.path, f"predictions.{output_format}")
    result = predict(PredictConfig(model=model_uri, input=input_uri, output=out, top_k=top_k, batch_size=batch_size,
                                   workers=workers), progress=False)
    predictions.metadata.update({"model": model_uri, "input": input_uri, "predicted": result.predicted,
                                 "skipped": result.skipped, "skip_counts": result.skip_counts,
                                 "file": os.path.basename(out)})
    outputs = namedtuple("PredictOutputs", ["predicted", "skipped"])
    return outputs(result.predicted, result.skipped)
