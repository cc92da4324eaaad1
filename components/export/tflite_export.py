"""LiteRT (TFLite) models for phones, converted by export and checked before they are pushed.

Variants (`tflite`: none | fp16 | int8 | both), written to `<export>/tflite/` with `labels.txt` (one class name per
line, in class-id order, as TFLite Model Maker wrote it):

- `model_fp16.tflite`: float16 weights, float32 pixels in [1, S, S, 3] (RGB 0..255), float32 probabilities out.
- `model_int8.tflite`: full-integer post-training quantization (every op int8, TFLITE_BUILTINS_INT8), calibrated on
  a representative set of `REPRESENTATIVE_IMAGES` images of the train split (file order) plus one 0..255 ramp image,
  so the uint8 input's scale is 1 and its zero point 0: the app feeds raw RGB pixels [1, S, S, 3] uint8. The output
  stays float32 probabilities (a dequantize at the end), so apps read them like the fp16 model's.

Both take pixels already resized to S x S (export.json `input_size`), the model's own preprocessing is inside. They
output the model's probabilities without the temperature: apply export.json `calibration.temperature` on the
device if calibrated probabilities are needed (softmax(log(p) / T); argmax is the same either way).

The check: each model runs in the LiteRT interpreter (`ai-edge-litert`, 1 thread) on every image of the test split,
decoded and resized by `components.core.dataset.decode_image` exactly as the serving signature does (the int8 model gets
them rounded to uint8); its accuracy, its drop against the Keras model on the same pixels, the share of images with
the same top-1 as Keras, its ECE, its size and its median single-image latency go into export.json `tflite` (and the
report). A model whose accuracy drop exceeds `max_tflite_drop` is not pushed with the version; a failed conversion
is named in one line. Neither blocks the SavedModel unless `tflite_required`.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kfp_finetune.components.core.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import keras

log = logging.getLogger("kfp_finetune.tflite")

TFLITE_DIR = "tflite"
LABELS_FILE = "labels.txt"
VARIANTS = ("fp16", "int8")
REPRESENTATIVE_IMAGES = 100
LATENCY_RUNS = 30
EPSILON = 1e-9


def file_name(variant: str) -> str:
    return f"model_{variant}.tflite"


class ConversionError(Exception):
    """A model that TensorFlow's converter could not turn into a .tflite (the message is one line)."""


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # The converter's own message is long; its first "error:" line names the op that failed.
    errors = [line for line in lines if "error:" in line.lower()]
    text = (errors or lines or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text}"[:400]


def convert(model: keras.Model, variant: str, representative: list[np.ndarray] | None = None) -> bytes:
    """The .tflite bytes of `model` (pixels [1, S, S, 3] in) for a variant; ConversionError with one line if it
    cannot be converted. int8 needs `representative`: float32 pixel batches [1, S, S, 3]."""
    import tempfile

    import keras
    import tensorflow as tf

    if variant not in VARIANTS:
        raise ValueError(f"unknown TFLite variant {variant!r}")
    size = int(model.input_shape[1])
    try:
        with tempfile.TemporaryDirectory(prefix="kfp-finetune-tflite-") as staging:
            # Through a SavedModel, not from_concrete_functions: that path leaves Dropout's seed-generator state as a
            # live variable, and int8 calibration then fails on READ_VARIABLE. Batch 1, a fixed shape, as phones use.
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(name="serve", fn=lambda x: model(x, training=False),
                                 input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="pixels")])
            archive.write_out(staging, verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(staging, signature_keys=["serve"])
            return _convert(converter, variant, representative)
    except ConversionError:
        raise
    except Exception as exc:  # the converter raises ConverterError, ValueError, RuntimeError, ... for a bad model
        raise ConversionError(_one_line(exc)) from exc


def _convert(converter: Any, variant: str, representative: list[np.ndarray] | None) -> bytes:
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    else:
        if not representative:
            raise ConversionError("int8 needs a representative dataset (train-split images); none was given")
        converter.representative_dataset = lambda: ([x] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
    return converter.convert()


# --- data ----------------------------------------------------------------------------------------------------


def split_pixels(dataset_dir: str | os.PathLike, split: str, size: int,
                 limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [N, S, S, 3] float32, labels [N]) of a split in file order, decoded as the serving signature does."""
    from kfp_finetune.components.core import dataset

    ds = dataset.read_split(dataset_dir, split)
    if limit is not None:
        ds = ds.take(limit)
    ds = ds.map(lambda b, y: (dataset.decode_image(b, size), y)).batch(64)
    pixels, labels = [], []
    for x, y in ds:
        pixels.append(x.numpy())
        labels.append(y.numpy())
    if not pixels:
        return np.zeros([0, size, size, 3], np.float32), np.zeros([0], np.int64)
    return np.concatenate(pixels).astype(np.float32), np.concatenate(labels).astype(np.int64)


def representative_set(dataset_dir: str | os.PathLike, size: int,
                       limit: int = REPRESENTATIVE_IMAGES) -> list[np.ndarray]:
    """Calibration batches for int8: a 0..255 ramp (pins the uint8 input to scale 1, zero point 0), then up to
    `limit` train-split images in file order."""
    pixels, _ = split_pixels(dataset_dir, "train", size, limit)
    ramp = np.broadcast_to(np.linspace(0, 255, size, dtype=np.float32)[None, :, None], (size, size, 3))
    return [ramp[None].copy()] + [p[None] for p in pixels]


# --- the LiteRT interpreter ----------------------------------------------------------------------------------


class LiteModel:
    """A .tflite classifier in the LiteRT interpreter: `probabilities(pixels [S, S, 3] float32 0..255)`."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.size = int(self.input["shape"][1])

    def _feed(self, pixels: np.ndarray) -> None:
        x = np.asarray(pixels, dtype=np.float32)[None]
        if self.input["dtype"] in (np.uint8, np.int8):
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(self.input["dtype"])
        self.interpreter.set_tensor(self.input["index"], x)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        self._feed(pixels)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])[0]
        if self.output["dtype"] in (np.uint8, np.int8):
            scale, zero = self.output["quantization"]
            out = (out.astype(np.float32) - zero) * scale
        return np.asarray(out, dtype=np.float32)

    def latency_ms(self, pixels: np.ndarray, runs: int = LATENCY_RUNS) -> float:
        """Median wall time of one invoke on one image (after 3 warm-up runs), in milliseconds."""
        self._feed(pixels)
        for _ in range(3):
            self.interpreter.invoke()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.interpreter.invoke()
            times.append((time.perf_counter() - start) * 1000)
        return float(statistics.median(times))


def check(path: str | os.PathLike, pixels: np.ndarray, labels: np.ndarray, keras_probs: np.ndarray,
          temperature: float = 1.0) -> dict[str, Any]:
    """Accuracy, agreement with Keras's top-1, ECE (before/after the temperature), size and latency of a .tflite."""
    from kfp_finetune.components.evaluate import calibration

    lite = LiteModel(path)
    probs = np.stack([lite.probabilities(p) for p in pixels])
    predicted = probs.argmax(axis=1)
    accuracy = float(np.mean(predicted == labels))
    keras_accuracy = float(np.mean(keras_probs.argmax(axis=1) == labels))
    return {
        "file": f"{TFLITE_DIR}/{Path(path).name}", "size_bytes": Path(path).stat().st_size,
        "input": {"dtype": np.dtype(lite.input["dtype"]).name, "shape": [int(d) for d in lite.input["shape"]],
                  "quantization": [float(q) for q in lite.input["quantization"]]},
        "accuracy": accuracy, "accuracy_drop": keras_accuracy - accuracy,
        "top1_agreement": float(np.mean(predicted == keras_probs.argmax(axis=1))),
        "max_abs_prob_diff": float(np.max(np.abs(probs - keras_probs))),
        "ece": calibration.expected_calibration_error(probs, labels),
        "ece_calibrated": calibration.expected_calibration_error(
            calibration.apply_temperature(probs, temperature), labels),
        "latency_ms": lite.latency_ms(pixels[0]), "latency_threads": 1,
    }


# --- the export's part ---------------------------------------------------------------------------------------


def export_tflite(model: keras.Model, class_names: list[str], directory: str | os.PathLike, variants: tuple[str, ...],
                  dataset_dir: str | None, max_drop: float, temperature: float = 1.0,
                  split: str = "test") -> dict[str, Any]:
    """Convert, write and check each variant in `directory/tflite/`; export.json's `tflite` section.

    Each model gets `push` (True: goes with the pushed version) or `reason` (why not, one line)."""
    import keras

    out = Path(directory) / TFLITE_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
    size = int(model.input_shape[1])
    section: dict[str, Any] = {"variants": list(variants), "labels": f"{TFLITE_DIR}/{LABELS_FILE}", "split": split,
                               "max_tflite_drop": max_drop, "input_size": size, "models": {}}
    have_data = bool(dataset_dir) and Path(str(dataset_dir)).is_dir()
    if have_data:
        pixels, labels = split_pixels(dataset_dir, split, size)
        keras_probs = np.asarray(model.predict(pixels, batch_size=32, verbose=0), dtype=np.float32) \
            if len(pixels) else np.zeros([0, len(class_names)], np.float32)
        section.update(examples=int(len(labels)),
                       keras={"accuracy": float(np.mean(keras_probs.argmax(1) == labels)) if len(labels) else None})
    keras.utils.set_random_seed(0)
    for variant in variants:
        name = file_name(variant)
        entry: dict[str, Any] = {"file": f"{TFLITE_DIR}/{name}", "push": False}
        section["models"][name] = entry
        try:
            representative = representative_set(dataset_dir, size) if variant == "int8" and have_data else None
            (out / name).write_bytes(convert(model, variant, representative))
        except ConversionError as exc:
            entry.update(error=str(exc), reason=f"conversion failed: {exc}")
            log.error("tflite %s: conversion failed: %s", variant, exc)
            continue
        if not have_data:
            entry["reason"] = f"not checked: no dataset at hand ({dataset_dir!r}) to measure it on"
            log.warning("tflite %s: %s", variant, entry["reason"])
            continue
        if not len(labels):
            entry["reason"] = f"not checked: split {split!r} of {dataset_dir} is empty"
            continue
        entry.update(check(out / name, pixels, labels, keras_probs, temperature))
        entry["push"] = entry["accuracy_drop"] <= max_drop + EPSILON
        if not entry["push"]:
            entry["reason"] = (f"accuracy {entry['accuracy']:.4f} is {entry['accuracy_drop']:.4f} below the Keras "
                               f"model's (max_tflite_drop {max_drop:.4f})")
        log.info("tflite %s: accuracy %.4f (Keras %.4f), top-1 agreement %.4f, %.2f MB, %.2f ms/image; %s", variant,
                 entry["accuracy"], section["keras"]["accuracy"], entry["top1_agreement"],
                 entry["size_bytes"] / 1e6, entry["latency_ms"], "pushed with the version" if entry["push"]
                 else "NOT pushed: " + entry["reason"])
    return section


def problems(section: dict[str, Any] | None) -> list[str]:
    """One line per requested model that will not ship (failed conversion, not checked, or too great a drop)."""
    return [f"{name}: {m['reason']}" for name, m in ((section or {}).get("models") or {}).items() if not m["push"]]


def prune(version_dir: str | os.PathLike, section: dict[str, Any] | None) -> None:
    """Remove from a staged version the .tflite files that are not to be pushed (and the folder if none is)."""
    folder = Path(version_dir) / TFLITE_DIR
    if not folder.is_dir():
        return
    keep = {name for name, m in ((section or {}).get("models") or {}).items() if m.get("push")}
    for path in folder.iterdir():
        if path.name != LABELS_FILE and path.name not in keep:
            path.unlink()
    if not keep:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def require(section: dict[str, Any] | None, output: str) -> None:
    """With tflite_required: a UserError naming every requested model that will not ship."""
    failed = problems(section)
    if failed:
        raise UserError(f"tflite_required: {'; '.join(failed)}; nothing was pushed (details in {output}/export.json)")


def copy_report(evaluation_path: str, directory: str | os.PathLike, section: dict[str, Any] | None) -> None:
    """evaluate's report.html beside the export, with the LiteRT models' section added when there are some."""
    from kfp_finetune.components.evaluate import report
    from kfp_finetune.components.evaluate.step import REPORT_FILE

    source = Path(evaluation_path)
    source = (source if source.is_dir() else source.parent) / REPORT_FILE
    if source.is_file():
        html = source.read_text(encoding="utf-8").replace("</body>", report.tflite_section(section) + "</body>", 1)
        (Path(directory) / REPORT_FILE).write_text(html, encoding="utf-8")
