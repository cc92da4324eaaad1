"""model.keras opens with plain Keras: a fresh interpreter that cannot import this project, safe mode, compile on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kfp_finetune.components.core import layers, modelio
from tests import evalchain

# Runs in a fresh interpreter: this project is made unimportable before anything else happens (the shared venv has
# an editable install of it, and PYTHONPATH may point at a checkout), then each model is loaded the way a user of
# the Model artifact would: keras.saving.load_model(path), defaults (safe_mode=True, compile=True).
PLAIN_KERAS = r"""
import importlib.abc, json, sys
import numpy as np

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("components", "pipelines", "kfp_finetune"):
            raise ImportError(f"{name} is blocked: plain Keras only")
        return None

sys.meta_path.insert(0, Block())
try:
    import kfp_finetune.components  # noqa: F401
    sys.exit("the project is importable")
except ImportError:
    pass

import keras

jobs = json.loads(sys.argv[1])
for job in jobs:
    model = keras.saving.load_model(job["model"])
    x = np.load(job["x"])
    np.save(job["out"], np.asarray(model.predict(x, verbose=0)))
    print(job["model"], "compiled" if model.compiled else "uncompiled")
"""


def _plain_keras(jobs: list[dict[str, str]], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return subprocess.run([sys.executable, "-c", PLAIN_KERAS, json.dumps(jobs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _tiny_classifier(mode: str, compiled: bool):
    """pixels -> feature_extractor(preprocess -> conv -> pool) -> dropout -> head, compiled with the project's
    label-smoothing loss (the custom object that must not reach the file)."""
    import keras

    from kfp_finetune.components.train import sparse_crossentropy

    pixels = keras.Input((16, 16, 3), name="pixels")
    x = layers.preprocessing_block(mode, 16)(pixels)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    extractor = keras.Model(pixels, keras.layers.GlobalAveragePooling2D(name="pool")(x), name="feature_extractor")
    inputs = keras.Input((16, 16, 3), name="pixels")
    y = keras.layers.Dropout(0.1, name="dropout")(extractor(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(y), name="classifier")
    if compiled:
        model.compile(optimizer="adam", loss=sparse_crossentropy(0.1))
        model.fit(np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32"),
                  np.arange(8) % 3, epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_folder, weights_mirror) -> evalchain.Chain:
    return evalchain.get(tmp_path_factory, synthetic_folder, weights_mirror)


def _load_plain_and_compare(models: dict, tmp_path: Path) -> None:
    """Save inputs, load each model.keras in the plain-Keras subprocess, compare with the in-process outputs."""
    rng = np.random.default_rng(3)
    jobs, expected = [], {}
    for name, (path, model, size) in models.items():
        x = rng.uniform(0, 255, (4, size, size, 3)).astype("float32")
        np.save(tmp_path / f"{name}-x.npy", x)
        expected[name] = np.asarray(model(x, training=False))
        jobs.append({"model": f"{path}/model.keras", "x": str(tmp_path / f"{name}-x.npy"),
                     "out": str(tmp_path / f"{name}-y.npy")})
    done = _plain_keras(jobs, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in models:
        np.testing.assert_allclose(np.load(tmp_path / f"{name}-y.npy"), expected[name], atol=1e-5, rtol=0)


def test_plain_keras_loads_every_preprocessing_family(tmp_path):
    """tf / torch / caffe / none blocks, each in a classifier compiled and fitted with the project's custom loss,
    saved by modelio: plain Keras (compile=True, safe mode) loads them and predicts the same."""
    models = {}
    for mode in layers.PREPROCESSING_MODES:
        model = _tiny_classifier(mode, compiled=True)
        (tmp_path / mode).mkdir()
        modelio.save_model(model, {"class_names": ["a", "b", "c"]}, tmp_path / mode)
        assert b"SparseCategoricalCrossentropyWithSmoothing" not in (tmp_path / mode / "model.keras").read_bytes()
        models[mode] = (str(tmp_path / mode), model, 16)
    _load_plain_and_compare(models, tmp_path)


@pytest.mark.slow  # trains the session's chain head (~20 s) and starts TensorFlow in a subprocess (~15 s)
def test_plain_keras_loads_the_trained_head(chain, tmp_path):
    """The real train-head output (MobileNet backbone with ImageNet weights, trained with label smoothing)."""
    # the training loss is the project's custom class: it must not be in the file
    assert b"SparseCategoricalCrossentropyWithSmoothing" not in (chain.strong / "model.keras").read_bytes()
    trained, _ = modelio.load_model(chain.strong)
    _load_plain_and_compare({"strong": (str(chain.strong), trained, evalchain.IMAGE_SIZE)}, tmp_path)


@pytest.mark.slow  # one more TensorFlow start-up in a subprocess
def test_the_blocker_really_blocks(tmp_path):
    """The plain-Keras subprocess fails when it is asked to rebuild our legacy custom layer."""
    import keras

    pixels = keras.Input((8, 8, 3), name="pixels")
    model = keras.Model(pixels, layers.Preprocess(mode="tf", name="preprocess")(pixels))
    model.save(tmp_path / "legacy.keras")
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8, 3), "float32"))
    done = _plain_keras([{"model": str(tmp_path / "legacy.keras"), "x": str(tmp_path / "x.npy"),
                          "out": str(tmp_path / "y.npy")}], tmp_path)
    assert done.returncode != 0 and "Preprocess" in done.stderr


def test_legacy_models_load_and_upgrade(tmp_path):
    """A model.keras written before the built-in block (custom Preprocess) loads here with the same output, and
    `python -m kfp_finetune.components.core.modelio upgrade` writes one without the custom layer."""
    import keras

    from kfp_finetune.components.core.errors import UserError

    pixels = keras.Input((16, 16, 3), name="pixels")
    x = layers.Preprocess(mode="caffe", name="preprocess")(pixels)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    extractor = keras.Model(pixels, keras.layers.GlobalAveragePooling2D(name="pool")(x), name="feature_extractor")
    inputs = keras.Input((16, 16, 3), name="pixels")
    legacy = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(extractor(inputs)))
    (tmp_path / "old").mkdir()
    legacy.save(tmp_path / "old" / "model.keras")  # as the previous version wrote it
    (tmp_path / "old" / "model.json").write_text('{"class_names": ["a", "b", "c"]}')
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")

    model, meta = modelio.load_model(tmp_path / "old")
    assert not layers.has_legacy(model) and meta["class_names"] == ["a", "b", "c"]
    assert [layer.name for layer in model.get_layer("feature_extractor").layers] == ["pixels", "preprocess",
                                                                                      "conv", "pool"]
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(legacy(x)), atol=1e-6)

    assert modelio.main(["upgrade", str(tmp_path / "old"), str(tmp_path / "new")]) == 0
    assert b"Preprocess" not in (tmp_path / "new" / "model.keras").read_bytes()
    plain = keras.saving.load_model(tmp_path / "new" / "model.keras")
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(legacy(x)), atol=1e-6)
    with pytest.raises(UserError, match="not empty|exists"):
        modelio.upgrade(tmp_path / "old", tmp_path / "new")


def test_preprocessing_has_no_trainable_weights():
    """fine-tune sets trainable=True on the whole feature extractor: nothing in the block can move."""
    for mode in layers.PREPROCESSING_MODES:
        block = layers.preprocessing_block(mode, 8)
        block.trainable = True
        assert block.trainable_weights == []
