"""ImageNet weights for the backbone step: the shared mirror (local and gs://), real flower photos, offline errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kfp_finetune.components.core import modelio
from kfp_finetune.pipelines import cli

FILE = "mobilenet_2_5_224_tf_no_top.h5"
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("offline_weights")  # empty Keras cache, no mirror, no network


def flower_batch(flowers_dir: Path, size: int, per_class: int = 2) -> np.ndarray:
    images = []
    for class_dir in sorted(p for p in flowers_dir.iterdir() if p.is_dir()):
        for path in sorted(class_dir.iterdir())[:per_class]:
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype="float32"))
    return np.stack(images)


def keras_features(weights_file: Path, images: np.ndarray) -> np.ndarray:
    """Keras's own MobileNet on the same file, with Keras's own preprocessing, average-pooled."""
    import keras

    size = images.shape[1]
    reference = keras.applications.MobileNet(
        alpha=0.25, include_top=False, weights=str(weights_file), input_shape=(size, size, 3)
    )
    x = keras.applications.mobilenet.preprocess_input(images.copy())
    return np.asarray(reference.predict(x, verbose=0)).mean(axis=(1, 2))


@pytest.mark.slow  # a fresh process importing TensorFlow: ~20-40 s on 2 shared cores
def test_mirror_folder_as_a_new_user_would(weights_mirror, flowers_dir, tmp_path):
    """The issue's 'done when' command, run as a process: features equal Keras's own model on the same file."""
    out = tmp_path / "out" / "backbone"
    env = {**os.environ, "KFP_FINETUNE_WEIGHTS_MIRROR": str(weights_mirror), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "kfp_finetune.pipelines", "backbone", "--name", "mobilenet", "--alpha", "0.25",
         "--image-size", "160", "--weights", "imagenet", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "model.json").read_text())
    weights = meta["backbone"]["weights"]
    sha = hashlib.sha256((weights_mirror / FILE).read_bytes()).hexdigest()
    assert (weights["source"], weights["file"], weights["uri"], weights["sha256"]) == (
        "mirror", FILE, str(weights_mirror / FILE), sha)
    assert "mobilenet_2_5_160_tf_no_top.h5" in weights["note"]  # Keras's name for size 160; the 224 file served
    assert meta["backbone"]["preprocessing"] == "tf" and meta["input_size"] == 160

    model, _ = modelio.load_model(out)
    images = flower_batch(flowers_dir, 160)
    ours = np.asarray(model.predict(images, verbose=0))
    np.testing.assert_allclose(ours, keras_features(weights_mirror / FILE, images), rtol=1e-4, atol=1e-5)
    assert ours.std() > 0.1  # real features, not a constant


def test_mirror_on_gcs(weights_mirror, flowers_dir, gcs_bucket, gcs_upload, tmp_path, monkeypatch):
    prefix = gcs_upload(gcs_bucket, weights_mirror, "keras-weights")
    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", prefix)
    out = tmp_path / "out"
    assert cli.main(["backbone", "--name", "MobileNet", "--alpha", "0.25", "--image-size", "224",
                     "--output", str(out)]) == 0
    model, meta = modelio.load_model(out)
    weights = meta["backbone"]["weights"]
    sha = hashlib.sha256((weights_mirror / FILE).read_bytes()).hexdigest()
    assert (weights["source"], weights["uri"], weights["sha256"], weights["note"]) == (
        "mirror", f"{prefix}/{FILE}", sha, None)
    cached = tmp_path / "keras-home" / "models" / FILE
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha  # the next build hits the Keras cache

    images = flower_batch(flowers_dir, 224, per_class=1)
    np.testing.assert_allclose(np.asarray(model(images)), keras_features(weights_mirror / FILE, images),
                               rtol=1e-4, atol=1e-5)

    again = tmp_path / "again"
    monkeypatch.delenv("KFP_FINETUNE_WEIGHTS_MIRROR")
    assert cli.main(["backbone", "--name", "mobilenet", "--alpha", "0.25", "--output", str(again)]) == 0
    assert modelio.read_meta(again)["backbone"]["weights"]["source"] == "cache"


def test_weights_uri_on_gcs_with_sha256(weights_mirror, gcs_bucket, gcs_upload, tmp_path):
    prefix = gcs_upload(gcs_bucket, weights_mirror, "w")
    sha = hashlib.sha256((weights_mirror / FILE).read_bytes()).hexdigest()
    out = tmp_path / "out"
    assert cli.main(["backbone", "--name", "mobilenet", "--alpha", "0.25", "--image-size", "128",
                     "--weights", f"{prefix}/{FILE}", "--weights-sha256", sha, "--output", str(out)]) == 0
    weights = modelio.read_meta(out)["backbone"]["weights"]
    assert (weights["source"], weights["verified"], weights["sha256"]) == ("uri", True, sha)


def test_wrong_sha256_from_the_mirror(weights_mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))
    out = tmp_path / "out"
    code = cli.main(["backbone", "--name", "mobilenet", "--alpha", "0.25", "--weights-sha256", "0" * 64,
                     "--output", str(out)])
    assert code == 2
    assert "--weights-sha256 mismatch" in capsys.readouterr().err
    assert not out.exists()


def test_mirror_file_that_does_not_fit(weights_mirror, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["backbone", "--name", "mobilenet", "--alpha", "0.5", "--weights", str(weights_mirror / FILE),
                     "--output", str(out)])
    assert code == 2
    assert "does not fit MobileNet" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_name_on_the_cli(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["backbone", "--name", "resnet51", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resnet51" in err and "ResNet50V2" in err
    assert not out.exists()


def test_unreachable_uri(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["backbone", "--name", "mobilenet", "--alpha", "0.25", "--weights",
                     "https://example.invalid/weights.h5", "--output", str(out)])
    assert code == 2
    assert "cannot download https://example.invalid/weights.h5" in capsys.readouterr().err
    assert not out.exists()


def test_offline_without_mirror_fails_fast_and_says_what_to_do(tmp_path, capsys):
    out = tmp_path / "out"
    start = time.monotonic()
    code = cli.main(["backbone", "--name", "mobilenet", "--alpha", "0.25", "--output", str(out)])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    print(f"offline failure took {elapsed:.1f} s")
    assert code == 2 and not out.exists()
    assert FILE in err and str(tmp_path / "keras-home" / "models") in err
    assert "KFP_FINETUNE_WEIGHTS_MIRROR" in err and "https://storage.googleapis.com/" in err
    assert elapsed < 30  # the bound; measured ~1-3 s here (the model build dominates)


def test_component_signature_and_compile(tmp_path):
    import inspect

    from kfp import compiler

    from kfp_finetune.components.backbone.step import backbone_op

    params = inspect.signature(backbone_op.python_func).parameters
    assert {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty} == {
        "name": "mobilenet_v2", "alpha": 0.0, "image_size": 0, "weights": "imagenet", "weights_sha256": "",
        "fallback_to_random": False}
    compiler.Compiler().compile(backbone_op, str(tmp_path / "backbone.yaml"))
    assert "build_backbone" in (tmp_path / "backbone.yaml").read_text()


@pytest.mark.slow  # a component subprocess importing TensorFlow
def test_component_runs_under_kfp_local(weights_mirror, tmp_path, monkeypatch):
    from kfp import local

    from kfp_finetune.components.backbone.step import backbone_op

    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    task = backbone_op(name="mobilenet", alpha=0.25, image_size=128)
    artifact = task.outputs["model"]
    assert artifact.metadata["weights_source"] == "mirror" and artifact.metadata["backbone"] == "MobileNet"
    _, meta = modelio.load_model(artifact.path)
    assert meta["backbone"]["weights"]["file"] == FILE and meta["input_size"] == 128


@pytest.mark.parametrize(("alpha", "size"), [
    (0.35, 160), (0.5, 192),  # each file and each size once in the default suite; the other two pairs are slow
    pytest.param(0.35, 192, marks=pytest.mark.slow), pytest.param(0.5, 160, marks=pytest.mark.slow)])
def test_mobilenet_v2_mirror_serves_160_and_192_from_the_224_file(weights_mirror, flowers_dir, tmp_path, monkeypatch,
                                                                   alpha, size):
    """The production family at the study's sizes: the 224 px file (the only one Keras hosts for these alphas in the
    mirror) serves 160 and 192, its SHA-256 goes into model.json, and the features equal Keras's own MobileNetV2 on
    that file."""
    import keras

    v2 = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha:g}_224_no_top.h5"
    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))
    sha = hashlib.sha256((weights_mirror / v2).read_bytes()).hexdigest()
    out = tmp_path / f"v2-{size}"
    assert cli.main(["backbone", "--name", "mobilenet_v2", "--alpha", str(alpha), "--image-size", str(size),
                     "--weights", "imagenet", "--output", str(out)]) == 0
    model, meta = modelio.load_model(out)
    weights = meta["backbone"]["weights"]
    assert (weights["source"], weights["file"], weights["sha256"]) == ("mirror", v2, sha)
    assert f"_{alpha:g}_{size}_no_top.h5" in weights["note"]  # Keras's own name for this size, not in the mirror
    images = flower_batch(flowers_dir, size, per_class=1)
    reference = keras.applications.MobileNetV2(alpha=alpha, include_top=False, weights=str(weights_mirror / v2),
                                               input_shape=(size, size, 3))
    expected = np.asarray(reference(keras.applications.mobilenet_v2.preprocess_input(images.copy()),
                                    training=False)).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(model(images)), expected, rtol=1e-4, atol=1e-5)
