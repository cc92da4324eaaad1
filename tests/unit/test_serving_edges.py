"""The export's endpoints on an empty batch, with oneDNN forced on, in a TensorFlow-only process; and the serving
check with relative paths (its server runs in another working directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLASSES = ["daisy", "rose", "tulip"]
SIZE = 96

# What a model server does with the export: plain TensorFlow, an empty batch on each endpoint.
EMPTY_BATCH = r"""
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
out = {}
serving = loaded.signatures["serving_default"](image_bytes=tf.constant([], dtype=tf.string))
out["serving_default"] = {k: [v.dtype.name, v.shape.as_list()] for k, v in serving.items()}
pixels = loaded.predict_pixels(tf.zeros([0, %(size)d, %(size)d, 3], tf.float32))
out["predict_pixels"] = [pixels.dtype.name, pixels.shape.as_list()]
one = loaded.signatures["serving_default"](image_bytes=tf.constant([tf.io.encode_png(tf.zeros([7, 5, 3], tf.uint8))
                                                                    .numpy()]))
out["one"] = one["probabilities"].shape.as_list()
json.dump(out, open(sys.argv[2], "w"))
"""


def _mobilenet_classifier():
    """The shape of the real thing (MobileNet v1 alpha 0.25 at 96 px, BatchNorm and depthwise convolutions, the ops
    oneDNN rewrites), random weights: built in seconds, no download."""
    import keras

    pixels = keras.Input((SIZE, SIZE, 3), name="pixels")
    base = keras.applications.MobileNet(input_shape=(SIZE, SIZE, 3), alpha=0.25, include_top=False, weights=None,
                                        pooling="avg")
    return keras.Model(pixels, keras.layers.Dense(len(CLASSES), activation="softmax", name="head")(base(pixels)))


@pytest.fixture(scope="module")
def model():
    return _mobilenet_classifier()


def test_empty_batch_answers_zero_rows_on_every_endpoint_with_onednn(model, tmp_path):
    from kfp_finetune.components.export import serving
    from kfp_finetune.components.export.step import write_saved_model

    write_saved_model(model, CLASSES, tmp_path / "export")
    # The size-0 case is handled in the graph itself, not left to the CPU's kernels.
    assert {"StatelessIf", "If"} & set(serving.saved_model_requirements(tmp_path / "export")["ops"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", EMPTY_BATCH % {"size": SIZE}, str(tmp_path / "export"),
                           str(tmp_path / "out.json")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["serving_default"] == {"probabilities": ["float32", [0, len(CLASSES)]], "class_id": ["int32", [0]],
                                      "class_name": ["string", [0]], "logits": ["float32", [0, len(CLASSES)]]}
    assert out["predict_pixels"] == ["float32", [0, len(CLASSES)]]
    assert out["one"] == [1, len(CLASSES)]


def test_serving_check_with_relative_paths(model, tmp_path, monkeypatch):
    """`export --output out/export` (relative, as in the README): the server process runs elsewhere, so the paths
    it gets must be absolute."""
    from kfp_finetune.components.export import serving
    from kfp_finetune.components.export.step import write_saved_model

    monkeypatch.chdir(tmp_path)
    relative = Path("out") / "export"
    write_saved_model(model, CLASSES, relative)
    check = serving.check_saved_model(relative, model, CLASSES, serving.synthetic_images(len(CLASSES)))
    assert check.passed, check.reason
    assert check.warmup_records == len(CLASSES)
    assert (tmp_path / "out" / "export" / serving.WARMUP_DIR / serving.WARMUP_FILE).is_file()


def test_a_server_started_ahead_and_never_used_is_stopped_and_leaves_nothing(tmp_path: Path) -> None:
    """export starts the check's server before writing the SavedModel (components/export/server.py); when the
    export fails before the check, closing it stops the interpreter and removes its job folder."""
    from kfp_finetune.components.core.errors import UserError
    from kfp_finetune.components.export.server import ServerProcess

    server = ServerProcess()
    process, folder = server._process, server.tmp
    assert process is not None and process.poll() is None and folder.is_dir()
    server.close()
    assert process.returncode is not None and not folder.exists()
    with pytest.raises(RuntimeError, match="already run its job"):
        server.run(tmp_path, {"instances": []})
    with pytest.raises(UserError, match="cannot start the server interpreter"):
        ServerProcess(python=str(tmp_path / "no-such-python"))


def test_a_server_given_no_job_exits_cleanly() -> None:
    """The server reads its job's path from stdin after importing TensorFlow; an empty line (stdin closed by an
    export that ended) makes it exit 0 without touching anything."""
    from kfp_finetune.components.export.server import SERVER_SCRIPT

    done = subprocess.run([sys.executable, "-c", SERVER_SCRIPT, str(os.getpid())], input="", capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-600:]
