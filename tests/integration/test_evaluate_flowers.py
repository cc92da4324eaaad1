"""The end of the pipeline on the real flowers photos, driven through the CLI as a new user would.

ingest -> backbone (MobileNet v1 0.25, ImageNet weights from the mirror) -> train-head -> fine-tune -> evaluate
(accuracy equals Keras's own model.evaluate) -> export --push-to gs:// on the emulator -> serve the pushed version.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_flowers_evaluate_equals_keras_and_export_push_serves(flowers_dir, weights_mirror, gcs_bucket, tmp_path,
                                                              monkeypatch):
    import keras
    import tensorflow as tf

    from kfp_finetune.components.core import dataset, gcs, modelio
    from kfp_finetune.components.evaluate.step import split_dataset
    from kfp_finetune.components.export.step import read_latest
    from kfp_finetune.pipelines.cli import main

    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))
    ds, bb, head, tuned = (str(tmp_path / n) for n in ("dataset", "backbone", "head", "tuned"))
    assert main(["ingest", "--source", str(flowers_dir), "--output", ds]) == 0
    assert main(["backbone", "--name", "mobilenet", "--alpha", "0.25", "--image-size", "160", "--output", bb]) == 0
    assert main(["train-head", "--dataset", ds, "--backbone", bb, "--output", head, "--epochs", "4",
                 "--no-augment"]) == 0
    assert main(["fine-tune", "--dataset", ds, "--model", head, "--output", tuned, "--epochs", "1",
                 "--unfreeze-top", "6"]) == 0

    evaluation = tmp_path / "evaluation"
    assert main(["evaluate", "--dataset", ds, "--model", tuned, "--output", str(evaluation),
                 "--min-accuracy", "0.5", "--baseline-model", head, "--max-regression", "0.1"]) == 0
    saved = json.loads((evaluation / "evaluation.json").read_text())

    model, meta = modelio.load_model(tuned)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    info = dataset.load_info(ds)
    keras_metrics = model.evaluate(split_dataset(info, "test", 160), return_dict=True, verbose=0)
    assert saved["metrics"]["accuracy"] == pytest.approx(keras_metrics["accuracy"], abs=1e-6)
    assert saved["metrics"]["loss"] == pytest.approx(keras_metrics["loss"], rel=1e-4)
    assert saved["metrics"]["num_examples"] == info.num_examples["test"] >= 100
    assert saved["metrics"]["top_k"] == 4
    assert saved["metrics"]["accuracy"] > 0.5, "ImageNet features + a head should clearly beat chance (0.2)"
    assert saved["blessed"] is True, saved["blessing"]["reasons"]
    html = (evaluation / "report.html").read_text()
    assert "fine_tune" in html and "train_head" in html and "data:image/jpeg;base64," in html

    dest = f"gs://{gcs_bucket.name}/flowers"
    assert main(["export", "--model", tuned, "--output", str(tmp_path / "export"), "--evaluation", str(evaluation),
                 "--push-to", dest]) == 0
    version = read_latest(dest)
    assert version and version.isdigit()
    blobs = gcs.list_blobs(f"{dest}/{version}")
    local = tmp_path / "served"
    prefix = f"flowers/{version}/"
    gcs.download_many([f"gs://{gcs_bucket.name}/{b.name}" for b in blobs],
                      [local / b.name[len(prefix):] for b in blobs])
    serving = tf.saved_model.load(str(local)).signatures["serving_default"]
    photos = {c: sorted((flowers_dir / c).iterdir())[-1].read_bytes() for c in meta["class_names"]}
    out = serving(image_bytes=tf.constant(list(photos.values())))
    assert out["probabilities"].shape == (len(photos), len(meta["class_names"]))
    predicted = [n.decode() for n in out["class_name"].numpy()]
    assert sum(p == c for p, c in zip(predicted, photos, strict=True)) >= 3  # one photo per class: most right
