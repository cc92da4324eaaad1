"""The serving check before a push: a TensorFlow-only process answers Vertex-format JSON and replays the warmup
file; a broken export is refused and not pushed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.export import serving
from kfp_finetune.components.export.step import LATEST_FILE, ExportConfig, export
from tests import evalchain


@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_folder, weights_mirror) -> evalchain.Chain:
    return evalchain.get(tmp_path_factory, synthetic_folder, weights_mirror)


@pytest.fixture(scope="module")
def pushed(chain) -> tuple[Path, Path]:
    """export with a local push (run_id v1): the serving check runs first (test images from the evaluation's
    dataset). The session's shared export (evalchain.Chain.pushed), read-only."""
    _, exported, registry = chain.pushed
    return exported, registry


def test_export_runs_the_serving_check_and_pushes(pushed, chain):
    exported, registry = pushed
    info = json.loads((exported / "export.json").read_text())
    check = info["serving_check"]
    assert check["passed"] is True and check["reason"] == ""
    assert check["images"] == 3 and check["class_names_sent"] == ["circle", "square", "stripes"]
    assert check["warmup_records"] == 3 and check["max_abs_diff"] <= serving.TOLERANCE
    assert check["server_tensorflow"]
    assert (registry / LATEST_FILE).read_text().strip() == "v1"
    assert (registry / "v1" / serving.WARMUP_DIR / serving.WARMUP_FILE).is_file()
    assert info["serving_requirements"]["tensorflow_version"] and "DecodeImage" in " ".join(
        info["serving_requirements"]["ops"]) or "DecodeJpeg" in " ".join(info["serving_requirements"]["ops"])


def test_warmup_file_parses_as_prediction_log_records(pushed, chain):
    exported, _ = pushed
    path = exported / serving.WARMUP_DIR / serving.WARMUP_FILE
    import tensorflow as tf

    samples = serving.sample_images(chain.dataset, ["circle", "square", "stripes"])
    raw = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    assert len(raw) == 3
    # Wire level, independent of any proto declaration: field 6 (predict_log), length-delimited, comes first.
    assert all(r[0] == (6 << 3 | 2) for r in raw)
    try:  # the real tensorflow_serving classes when installed, our declared copies otherwise
        from tensorflow_serving.apis import prediction_log_pb2

        logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in raw]
    except ImportError:
        logs = serving.read_warmup(path)
    for log, (_, image) in zip(logs, samples, strict=True):
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        assert list(request.inputs) == ["image_bytes"]
        from tensorflow.core.framework import tensor_pb2

        tensor = tf.make_ndarray(tensor_pb2.TensorProto.FromString(request.inputs["image_bytes"].SerializeToString()))
        assert tensor.shape == (1,) and tensor[0] == image


def test_declared_protos_match_tensorflow_serving_bytes():
    """Our declared messages serialize exactly as tensorflow-serving-api's (checked when it is installed)."""
    pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    from tensorflow_serving.apis import prediction_log_pb2

    declared = serving._declared_protos()
    assert serving.protos().source == "tensorflow_serving"
    import tensorflow as tf

    request = declared.PredictRequest(model_spec=declared.ModelSpec(name="m", signature_name="serving_default"))
    tensor = tf.make_tensor_proto([b"\xff\xd8abc"], dtype=tf.string, shape=[1])
    request.inputs["image_bytes"].ParseFromString(tensor.SerializeToString())
    ours = declared.PredictionLog(predict_log=declared.PredictLog(request=request)).SerializeToString()
    theirs = prediction_log_pb2.PredictionLog.FromString(ours)
    assert theirs.predict_log.request.model_spec.name == "m"
    assert theirs.SerializeToString() == ours


def test_b64_instances_give_the_same_answer(pushed, chain):
    """Vertex's JSON instance format, decoded as the prebuilt TF container decodes it, fed to the signature."""
    import tensorflow as tf

    from kfp_finetune.components.core import modelio

    exported, _ = pushed
    samples = serving.sample_images(chain.dataset, ["circle", "square", "stripes"])
    images = [b for _, b in samples]
    body = json.loads(json.dumps(serving.vertex_body(images)))  # through real JSON text
    assert set(body["instances"][0]) == {"image_bytes"} and set(body["instances"][0]["image_bytes"]) == {"b64"}
    decoded = serving.decode_instances(body)
    assert decoded == images
    # a one-input signature also takes bare {"b64": ...} instances
    assert serving.decode_instances({"instances": [{"b64": i["image_bytes"]["b64"]} for i in body["instances"]]}) \
        == images
    with pytest.raises(UserError, match="b64"):
        serving.decode_instances({"instances": [{"image_bytes": "not-b64-wrapped"}]})

    signature = tf.saved_model.load(str(exported)).signatures["serving_default"]
    out = signature(image_bytes=tf.constant(decoded))
    model, meta = modelio.load_model(chain.strong)
    expected = serving.keras_probabilities(model, images)
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-4)
    assert [n.decode() for n in out["class_name"].numpy()] == [meta["class_names"][i] for i in expected.argmax(1)]


def test_serving_check_refuses_a_broken_export_and_does_not_push(chain, tmp_path, monkeypatch):
    """A SavedModel that serves something else than the Keras model (here: a head with its weights shifted) fails the
    check: export.json says why and nothing is pushed. Exported without an evaluation, the check's images coming
    from --dataset (the shared export covers the evaluation's dataset)."""
    import keras

    from kfp_finetune.components.export import step as export_module

    real = export_module.write_saved_model

    def broken(model, class_names, directory, temperature=1.0):  # noqa: ANN001
        other = keras.models.clone_model(model)
        other.set_weights([w + 0.5 for w in model.get_weights()])
        real(other, class_names, directory, temperature)

    monkeypatch.setattr(export_module, "write_saved_model", broken)
    registry = tmp_path / "registry"
    with pytest.raises(UserError, match="serving check failed, so nothing was pushed: .*differ from the Keras"):
        export(ExportConfig(model=str(chain.strong), output=str(tmp_path / "export"), dataset=str(chain.dataset),
                            push_to=str(registry), run_id="bad"))
    assert not registry.exists()
    info = json.loads((tmp_path / "export" / "export.json").read_text())
    check = info["serving_check"]
    assert check["passed"] is False and "differ from the Keras model" in check["reason"]
    assert check["images"] == 3 and check["class_names_sent"] == ["circle", "square", "stripes"]  # from --dataset
    assert info["calibration"]["temperature"] == 1.0 and not (tmp_path / "export" / "evaluation.json").exists()


def test_server_process_failure_is_reported(tmp_path):
    """A SavedModel the server cannot load at all fails with the server's own error."""
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"not a protobuf")
    check = serving.check_saved_model(tmp_path / "sm", model=None, class_names=["a"],  # type: ignore[arg-type]
                                      samples=serving.synthetic_images(1), write_warmup_file=False)
    assert not check.passed and check.reason


def test_saved_model_needs_only_ops_the_vertex_tf215_image_has(pushed):
    """The default --vertex-serving-image is tf2-cpu.2-15: every op of the export must exist in TF 2.15
    (tests/golden/tf2.15_ops.txt, dumped from tensorflow-cpu 2.15.1's op registry)."""
    from kfp_finetune.components.export.step import DEFAULT_SERVING_IMAGE

    exported, _ = pushed
    golden = Path(__file__).resolve().parents[1] / "golden" / "tf2.15_ops.txt"
    available = {line for line in golden.read_text().splitlines() if line and not line.startswith("#")}
    info = serving.saved_model_requirements(exported)
    assert info["tensorflow_version"] and info["tags"] == ["serve"]
    assert len(info["ops"]) > 20 and {"DecodeImage", "ResizeBilinear", "Softmax"} <= set(info["ops"])
    assert sorted(set(info["ops"]) - available) == []
    assert "tf2-cpu.2-15" in DEFAULT_SERVING_IMAGE


@pytest.mark.skipif(not __import__("os").environ.get("KFP_FINETUNE_SERVING_PYTHON"),
                    reason="KFP_FINETUNE_SERVING_PYTHON (a Python with the serving image's TF) is not set")
def test_serving_check_with_the_serving_images_tensorflow(pushed, chain):
    """With KFP_FINETUNE_SERVING_PYTHON pointing at e.g. a tensorflow-cpu 2.15 venv, the same check passes there."""
    from kfp_finetune.components.core import modelio

    exported, _ = pushed
    model, meta = modelio.load_model(chain.strong)
    check = serving.check_saved_model(exported, model, meta["class_names"],
                                      serving.sample_images(chain.dataset, meta["class_names"]))
    assert check.passed, check.reason
    import tensorflow as tf

    assert check.server_tensorflow != tf.__version__
