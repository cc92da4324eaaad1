"""Benchmark of the LiteRT (TFLite) exports and of calibration on ../shared/data/flowers; writes
bench/results/tflite.json and tflite.md.

The run: ingest (val 0.15, test 0.2, seed 0) -> MobileNet v1 alpha 0.25 at 160 px with ImageNet weights (the shared
mirror) -> train_head (--head-epochs, default 5) -> fine_tune (--fine-tune-epochs, default 10) -> evaluate
(temperature fitted on validation) -> export with tflite=both: the default recipe's epochs, the model users get from
`kfp-finetune run` (fewer epochs measure a weaker model, whose close calls flip more often under int8).

Per model, on the test split through the serving decode and resize: accuracy, top-1 agreement with Keras, size,
median single-image CPU latency (Keras: the model under tf.function on a batch of one; LiteRT: the interpreter with
1 thread; 30 runs after warm-up) and ECE (15 bins) before and after the temperature.

    python bench/tflite.py [--source ../shared/data/flowers] [--head-epochs 5] [--fine-tune-epochs 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "flowers"
DEFAULT_WEIGHTS = REPO.parent / "shared" / "data" / "weights"
SIZE = 160


def keras_latency_ms(model, pixels, runs: int = 30) -> float:  # noqa: ANN001
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    x = tf.constant(pixels[None])
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x).numpy()
        times.append((time.perf_counter() - start) * 1000)
    return float(statistics.median(times))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--head-epochs", type=int, default=5)
    ap.add_argument("--fine-tune-epochs", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("KFP_FINETUNE_WEIGHTS_MIRROR", str(DEFAULT_WEIGHTS))

    import numpy as np

    from kfp_finetune.components.backbone.step import BackboneConfig, build_backbone
    from kfp_finetune.components.core import modelio
    from kfp_finetune.components.evaluate import calibration
    from kfp_finetune.components.evaluate.step import EvaluateConfig, evaluate
    from kfp_finetune.components.export import tflite_export
    from kfp_finetune.components.export.step import ExportConfig, export
    from kfp_finetune.components.ingest.step import IngestConfig, ingest
    from kfp_finetune.components.train import FineTuneConfig, HeadConfig, fine_tune, train_head

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-tflite-") as tmp:
        work = Path(tmp)
        ingest(IngestConfig(source=args.source, output=str(work / "data"), val_fraction=0.15, test_fraction=0.2,
                            seed=0))
        build_backbone(BackboneConfig(name="mobilenet", alpha=0.25, image_size=SIZE, output=str(work / "backbone")))
        train_head(HeadConfig(dataset=str(work / "data"), backbone=str(work / "backbone"), output=str(work / "head"),
                              epochs=args.head_epochs, seed=0))
        fine_tune(FineTuneConfig(dataset=str(work / "data"), model=str(work / "head"), output=str(work / "tuned"),
                                 epochs=args.fine_tune_epochs, seed=0))
        trained_s = time.perf_counter() - started
        ev = evaluate(EvaluateConfig(dataset=str(work / "data"), model=str(work / "tuned"), output=str(work / "eval")))
        result = export(ExportConfig(model=str(work / "tuned"), output=str(work / "export"),
                                     evaluation=str(work / "eval"), tflite="both"))
        cal = ev.evaluation["calibration"]
        t = cal["temperature"]
        model, _ = modelio.load_model(work / "tuned")
        pixels, labels = tflite_export.split_pixels(work / "data", "test", SIZE)
        keras_probs = model.predict(pixels, batch_size=32, verbose=0)
        saved_model_bytes = dir_size(work / "export") - dir_size(work / "export" / "tflite")
        rows = [{
            "model": "Keras (SavedModel)", "accuracy": float(np.mean(keras_probs.argmax(1) == labels)),
            "top1_agreement": 1.0, "size_bytes": saved_model_bytes,
            "size_note": "the SavedModel folder (variables, graph, warmup, json)",
            "latency_ms": keras_latency_ms(model, pixels[0]), "latency_note": "tf.function, batch of 1, TF threads",
            "ece_before": calibration.expected_calibration_error(keras_probs, labels),
            "ece_after": calibration.expected_calibration_error(calibration.apply_temperature(keras_probs, t), labels),
        }]
        for name, m in result.tflite["models"].items():
            if m.get("error"):
                rows.append({"model": name, "error": m["error"]})
                continue
            rows.append({"model": name, "accuracy": m["accuracy"], "top1_agreement": m["top1_agreement"],
                         "size_bytes": m["size_bytes"], "latency_ms": m["latency_ms"],
                         "latency_note": "LiteRT interpreter, 1 thread", "ece_before": m["ece"],
                         "ece_after": m["ece_calibrated"], "pushed": m["push"]})
    report = {
        "what": "Keras vs LiteRT fp16 vs int8 on the flowers test split; calibration by temperature scaling",
        "setup": {"backbone": "mobilenet v1 alpha 0.25, ImageNet weights", "image_size": SIZE,
                  "head_epochs": args.head_epochs, "fine_tune_epochs": args.fine_tune_epochs,
                  "training": ("the default recipe's epochs" if (args.head_epochs, args.fine_tune_epochs) == (5, 10)
                               else "shorter than the default recipe"),
                  "split": {"val_fraction": 0.15, "test_fraction": 0.2, "seed": 0},
                  "test_images": int(len(labels)), "ece_bins": calibration.ECE_BINS},
        "calibration": {"temperature": t, "validation": cal.get("validation"), "test_before": cal["before"],
                        "test_after": cal["after"], "note": cal.get("note")},
        "models": rows,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "note": "2 shared cores", "load_average": round(os.getloadavg()[0], 2)},
        "seconds": {"training": round(trained_s, 1), "total": round(time.perf_counter() - started, 1)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tflite.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# LiteRT (TFLite) export and calibration (bench/tflite.py)", "",
        f"Flowers, MobileNet v1 α=0.25 at {SIZE} px, {args.head_epochs} head + {args.fine_tune_epochs} fine-tune "
        f"epochs ({report['setup']['training']}), test split of {len(labels)} images through the serving decode. "
        f"Temperature T = {t:.3f} fitted on the validation split; ECE with {calibration.ECE_BINS} equal-width bins.",
        "", "| model | accuracy | top-1 = Keras | size | latency / image | ECE before T | ECE after T |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | conversion failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['accuracy']:.4f} | {r['top1_agreement']:.4f} | "
                     f"{r['size_bytes'] / 1e6:.2f} MB | {r['latency_ms']:.2f} ms ({r['latency_note']}) | "
                     f"{r['ece_before']:.4f} | {r['ece_after']:.4f} |")
    lines += ["", f"Test NLL {cal['before']['nll']:.4f} -> {cal['after']['nll']:.4f} with T; validation NLL "
              f"{(cal.get('validation') or {}).get('before', {}).get('nll', float('nan')):.4f} -> "
              f"{(cal.get('validation') or {}).get('after', {}).get('nll', float('nan')):.4f}.",
              f"Machine: {report['machine']['platform']}, {os.cpu_count()} CPUs "
              f"(shared; load average {report['machine']['load_average']}). "
              f"Training {trained_s:.0f} s, total {report['seconds']['total']:.0f} s.", ""]
    (RESULTS / "tflite.md").write_text("\n".join(lines))
    logging.getLogger("bench").info("wrote %s and %s", RESULTS / "tflite.json", RESULTS / "tflite.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
