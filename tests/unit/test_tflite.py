"""LiteRT (TFLite) export: fp16 and int8 models with labels.txt, loaded in a process with only the LiteRT runtime,
agreeing with Keras's top-1; checked numbers in export.json and the report; a broken conversion refused with a
reason; only checked models pushed; predict runs a .tflite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.export import tflite_export
from kfp_finetune.components.export.step import ExportConfig, export
from tests import evalchain


@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_folder, weights_mirror) -> evalchain.Chain:
    return evalchain.get(tmp_path_factory, synthetic_folder, weights_mirror)


@pytest.fixture(scope="module")
def blessed_eval(chain) -> Path:
    """The strong model's evaluation, shared by the session (read-only)."""
    return chain.blessed_eval


@pytest.fixture(scope="module")
def exported(chain):
    """(result, export folder, registry): export(tflite="both", push_to=registry, run_id="v1"), the session's shared
    export (evalchain.Chain.pushed), read-only."""
    result, out, registry = chain.pushed
    assert result.version == "v1"
    return result, out, registry


# A fresh interpreter with the LiteRT runtime and NumPy only: TensorFlow, Keras and this project unimportable.
LITERT_ONLY = r'''
import json, sys
for name in ("tensorflow", "keras", "tf_keras", "components", "pipelines"):
    sys.modules[name] = None
import numpy as np
from ai_edge_litert.interpreter import Interpreter
job = json.load(open(sys.argv[1]))
pixels = np.load(job["pixels"])
out = {}
for path in job["models"]:
    it = Interpreter(model_path=path, num_threads=1)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    top = []
    for x in pixels:
        x = x[None]
        if i["dtype"] == np.uint8:
            x = np.clip(np.round(x / i["quantization"][0] + i["quantization"][1]), 0, 255).astype(np.uint8)
        it.set_tensor(i["index"], x)
        it.invoke()
        top.append(int(it.get_tensor(o["index"])[0].argmax()))
    out[path] = {"top1": top, "input_dtype": np.dtype(i["dtype"]).name}
json.dump(out, open(job["output"], "w"))
'''


def test_both_models_load_with_only_litert_and_agree_with_keras(chain, exported, tmp_path):
    from kfp_finetune.components.core import modelio

    result, out, _ = exported
    folder = out / "tflite"
    meta = json.loads((chain.strong / "model.json").read_text())
    assert (folder / "labels.txt").read_text().splitlines() == meta["class_names"]
    model, _ = modelio.load_model(chain.strong)
    pixels, labels = tflite_export.split_pixels(chain.dataset, "test", evalchain.IMAGE_SIZE)
    keras_top1 = model.predict(pixels, verbose=0).argmax(1)
    np.save(tmp_path / "pixels.npy", pixels)
    models = [str(folder / "model_fp16.tflite"), str(folder / "model_int8.tflite")]
    job = {"pixels": str(tmp_path / "pixels.npy"), "models": models, "output": str(tmp_path / "out.json")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LITERT_ONLY, str(tmp_path / "job.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads((tmp_path / "out.json").read_text())
    fp16, int8 = (np.array(answers[m]["top1"]) for m in models)
    assert answers[models[1]]["input_dtype"] == "uint8" and answers[models[0]]["input_dtype"] == "float32"
    assert np.mean(fp16 == keras_top1) >= 0.99
    assert np.mean(int8 == keras_top1) >= 0.95
    # export.json records the same check, measured in-process
    section = json.loads((out / "export.json").read_text())["tflite"]
    assert section["examples"] == len(labels) and section["split"] == "test"
    for name, top in (("model_fp16.tflite", fp16), ("model_int8.tflite", int8)):
        m = section["models"][name]
        assert m["accuracy"] == pytest.approx(np.mean(top == labels))
        assert m["top1_agreement"] == pytest.approx(np.mean(top == keras_top1))
        assert m["size_bytes"] == (folder / name).stat().st_size and m["latency_ms"] > 0
        assert m["push"] is True and 0 <= m["ece"] <= 1
    assert section["models"]["model_int8.tflite"]["input"]["quantization"] == pytest.approx([1.0, 0], abs=1e-3)
    assert result.tflite == section


def test_checked_models_are_pushed_and_reported(exported):
    _, out, registry = exported
    version = registry / "v1"
    assert sorted(p.name for p in (version / "tflite").iterdir()) == ["labels.txt", "model_fp16.tflite",
                                                                      "model_int8.tflite"]
    html = (out / "report.html").read_text()
    assert "LiteRT (TFLite) models" in html and "model_int8.tflite" in html
    assert json.loads((out / "evaluation.json").read_text())["tflite"]["models"]["model_fp16.tflite"]["push"]


def test_prune_keeps_only_models_that_passed(tmp_path):
    folder = tmp_path / "v" / "tflite"
    folder.mkdir(parents=True)
    for name in ("labels.txt", "model_fp16.tflite", "model_int8.tflite"):
        (folder / name).write_bytes(b"x")
    section = {"models": {"model_fp16.tflite": {"push": True},
                          "model_int8.tflite": {"push": False, "reason": "accuracy 0.9 is 0.05 below ..."}}}
    tflite_export.prune(tmp_path / "v", section)
    assert sorted(p.name for p in folder.iterdir()) == ["labels.txt", "model_fp16.tflite"]
    assert tflite_export.problems(section) == ["model_int8.tflite: accuracy 0.9 is 0.05 below ..."]
    section["models"]["model_fp16.tflite"]["push"] = False
    section["models"]["model_fp16.tflite"]["reason"] = "x"
    tflite_export.prune(tmp_path / "v", section)
    assert not folder.exists()


def _unconvertible(model):  # noqa: ANN001
    """The model with an op TFLite's builtins lack (Erfinv) after the head: the converter must refuse it."""
    import keras

    return keras.Model(model.inputs, keras.ops.erfinv(model.outputs[0] * 0.5))


def _tiny_classifier():
    """A classifier of the exported shape (pixels in, softmax out) with a handful of weights: the converter's refusal
    does not depend on the backbone, and converting MobileNet twice only to see it refused took ~12 s (the chain's
    real model is converted by the `exported` fixture and, with an unconvertible int8, by the slow test below)."""
    import keras

    pixels = keras.Input((16, 16, 3), name="pixels")
    pooled = keras.layers.GlobalAveragePooling2D()(pixels)
    return keras.Model(pixels, keras.layers.Dense(3, activation="softmax", name="head")(pooled))


def test_a_broken_conversion_is_refused_with_a_reason():
    model = _tiny_classifier()
    assert len(tflite_export.convert(model, "fp16")) > 0  # the same model without the Erfinv converts
    with pytest.raises(tflite_export.ConversionError, match="Erfinv") as info:
        tflite_export.convert(_unconvertible(model), "fp16")
    assert "\n" not in str(info.value)
    with pytest.raises(tflite_export.ConversionError, match="representative"):
        tflite_export.convert(model, "int8", [])


@pytest.mark.slow  # two exports with serving checks and conversions: ~30 s
def test_a_failing_conversion_does_not_block_the_saved_model_unless_required(chain, blessed_eval, tmp_path,
                                                                            monkeypatch, caplog):
    real = tflite_export.convert
    monkeypatch.setattr(tflite_export, "convert",
                        lambda model, variant, rep=None: real(_unconvertible(model) if variant == "int8" else model,
                                                              variant, rep))
    registry = tmp_path / "registry"
    result = export(ExportConfig(model=str(chain.strong), output=str(tmp_path / "e1"), evaluation=str(blessed_eval),
                                 tflite="both", push_to=str(registry), run_id="a"))
    assert result.pushed_uri  # the SavedModel went
    int8 = result.tflite["models"]["model_int8.tflite"]
    assert int8["push"] is False and int8["reason"].startswith("conversion failed: ConverterError") and "Erfinv" in \
        int8["reason"]
    assert any("tflite int8: conversion failed" in r.message for r in caplog.records)
    assert sorted(p.name for p in (registry / "a" / "tflite").iterdir()) == ["labels.txt", "model_fp16.tflite"]

    with pytest.raises(UserError, match=r"tflite_required: model_int8.tflite: conversion failed: .*Erfinv"):
        export(ExportConfig(model=str(chain.strong), output=str(tmp_path / "e2"), evaluation=str(blessed_eval),
                            tflite="int8", tflite_required=True, push_to=str(registry), run_id="b"))
    assert (tmp_path / "e2" / "saved_model.pb").is_file() and not (registry / "b").exists()


def test_predict_runs_a_tflite(chain, exported, tmp_path):
    from kfp_finetune.components.predict.step import PredictConfig, predict

    _, out, _ = exported
    result = predict(PredictConfig(model=str(out / "tflite" / "model_int8.tflite"), input=str(chain.synthetic_folder),
                                   output=str(tmp_path / "p.jsonl"), top_k=2))
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert result.predicted == len(rows) == 90
    right = sum(r["classes"][0] == Path(r["file"]).parent.name for r in rows)
    assert right >= 85, right
    (tmp_path / "alone.tflite").write_bytes((out / "tflite" / "model_int8.tflite").read_bytes())
    with pytest.raises(UserError, match="labels.txt beside it"):
        predict(PredictConfig(model=str(tmp_path / "alone.tflite"), input=str(chain.synthetic_folder),
                              output=str(tmp_path / "q.jsonl")))
