"""export: the serving signature on real flower JPEGs, saved_model_cli, versioned pushes (local, emulator, cut-off)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.export.step import (
    LATEST_FILE,
    ExportConfig,
    VertexConfig,
    export,
    read_latest,
    vertex_upload,
    vertex_upload_args,
)
from tests import evalchain


@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_folder, weights_mirror) -> evalchain.Chain:
    return evalchain.get(tmp_path_factory, synthetic_folder, weights_mirror)


@pytest.fixture(scope="module")
def blessed_eval(chain) -> Path:
    """The strong model's evaluation (min_accuracy 0.8), shared by the session (read-only)."""
    return chain.blessed_eval


@pytest.fixture(scope="module")
def exported(chain) -> Path:
    """The session's shared export of the strong model (read-only; evalchain.Chain.pushed)."""
    result, out, _ = chain.pushed
    assert result.saved_model_dir == str(out)
    return out


def _flower_images(flowers_dir: Path) -> list[bytes]:
    """Real photos of different sizes, plus one re-encoded as PNG."""
    from PIL import Image

    files = [sorted((flowers_dir / c).iterdir())[i] for i, c in
             enumerate(sorted(p.name for p in flowers_dir.iterdir() if p.is_dir()))]
    images = [f.read_bytes() for f in files]
    sizes = {Image.open(io.BytesIO(b)).size for b in images}
    assert len(sizes) >= 3, f"want photos of several sizes, got {sizes}"
    buf = io.BytesIO()
    Image.open(io.BytesIO(images[0])).convert("RGB").resize((333, 211)).save(buf, "PNG")
    return [*images, buf.getvalue()]


def test_serving_signature_matches_keras_on_flower_photos(chain, exported, flowers_dir):
    import tensorflow as tf

    from kfp_finetune.components.core import modelio
    from kfp_finetune.components.core.dataset import decode_image

    images = _flower_images(flowers_dir)
    serving = tf.saved_model.load(str(exported)).signatures["serving_default"]
    out = serving(image_bytes=tf.constant(images))
    assert set(out) == {"probabilities", "class_id", "class_name", "logits"}

    model, meta = modelio.load_model(chain.strong)
    pixels = tf.stack([decode_image(b, evalchain.IMAGE_SIZE) for b in images])
    expected = model(pixels, training=False).numpy()
    probs = out["probabilities"].numpy()
    assert probs.shape == (len(images), 3)
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    ids = out["class_id"].numpy()
    assert ids.tolist() == expected.argmax(axis=1).tolist()
    assert [n.decode() for n in out["class_name"].numpy()] == [meta["class_names"][i] for i in ids]
    # A batch of one and an empty batch work too (TF Serving sends whatever the client batched).
    assert serving(image_bytes=tf.constant(images[:1]))["probabilities"].shape == (1, 3)
    assert serving(image_bytes=tf.constant([], dtype=tf.string))["probabilities"].shape == (0, 3)
    # model.json and evaluation.json travel with the SavedModel.
    assert json.loads((exported / "model.json").read_text())["class_names"] == meta["class_names"]
    assert json.loads((exported / "evaluation.json").read_text())["blessed"] is True


@pytest.mark.slow  # a TensorFlow start-up in a subprocess: ~12 s
def test_saved_model_cli_lists_the_signature(exported):
    cli = Path(sys.executable).with_name("saved_model_cli")
    proc = subprocess.run([str(cli), "show", "--dir", str(exported), "--all"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    section = text[text.index("signature_def['serving_default']"):]
    assert "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in section
    for name, dtype in (("probabilities", "DT_FLOAT"), ("class_id", "DT_INT32"), ("class_name", "DT_STRING")):
        assert f"outputs['{name}'] tensor_info:\n        dtype: {dtype}" in section


def test_push_is_a_complete_champion_and_never_a_duplicate(chain, blessed_eval, tmp_path):
    import shutil

    assert read_latest(str(tmp_path / "empty")) is None
    # The session's shared push to an empty registry: export(..., push_to=registry, **evalchain.Chain.PUSH).
    assert evalchain.Chain.PUSH == {"run_id": "v1", "fingerprint": "abc123", "settings": {"head_epochs": "6.0"},
                                    "pipeline_job": "job-7"}
    first, _, shared = chain.pushed
    assert read_latest(str(shared)) == "v1" and Path(first.pushed_uri) == shared / "v1"
    assert first.version == "v1" and first.promoted
    dest = tmp_path / "registry"  # a copy: this test pushes again
    shutil.copytree(shared, dest)
    version = dest / "v1"
    assert {"saved_model.pb", "variables", "model.json", "evaluation.json", "data_fingerprint.json", "version.json",
            "model", "data_profile.json"} <= {p.name for p in version.iterdir()}
    # the Dataset's profile travels with the version: the next run's drift baseline
    assert (version / "data_profile.json").read_bytes() == (chain.dataset / "data_profile.json").read_bytes()
    assert (version / "model" / "model.keras").read_bytes() == (chain.strong / "model.keras").read_bytes()
    record = json.loads((version / "version.json").read_text())
    assert record["data_fingerprint"] == "abc123" and record["settings"] == {"head_epochs": "6"}
    assert record["lineage"]["pipeline_job"] == "job-7" and record["lineage"]["kfp_finetune_version"]
    assert len(record["lineage"]["weights_sha256"]) == 64
    assert record["metrics"]["accuracy"] == json.loads((blessed_eval / "evaluation.json").read_text())[
        "metrics"]["accuracy"]
    # The same model again: not pushed, LATEST unchanged, no new folder.
    again = export(ExportConfig(model=str(chain.strong), output=str(tmp_path / "e2"), evaluation=str(blessed_eval),
                                push_to=str(dest), run_id="run-2"))
    assert again.pushed_uri == "" and "v1" in again.skipped_push
    assert read_latest(str(dest)) == "v1"
    assert sorted(p.name for p in dest.iterdir()) == [".LATEST.lock", LATEST_FILE, "v1"]  # no temp leftovers


@pytest.mark.slow  # one evaluation and two exports: ~60 s
def test_two_challengers_evaluated_against_one_champion(chain, blessed_eval, tmp_path, caplog):
    """Overlapping runs: A and B were both compared with champion v1 (evaluation.json says so); A is pushed first,
    so B is kept but not promoted, and export says so in one line naming both versions."""
    import logging

    from kfp_finetune.components.evaluate.step import EvaluateConfig, evaluate
    from kfp_finetune.components.registry import registry
    from tests.unit.test_registry import make_version_dir

    dest = tmp_path / "registry"
    registry.push(make_version_dir(tmp_path, "v1"), str(dest), "v1")
    weak_eval = tmp_path / "weak_eval"
    assert evaluate(EvaluateConfig(dataset=str(chain.dataset), model=str(chain.weak), output=str(weak_eval),
                                   min_accuracy=0.0)).blessed
    results = []
    for name, model, evaluation in (("a", chain.strong, blessed_eval), ("b", chain.weak, weak_eval)):
        record = json.loads((evaluation / "evaluation.json").read_text())
        record["champion"] = {"status": "compared", "version": "v1", "push_to": str(dest)}  # as evaluate writes it
        (tmp_path / f"eval-{name}").mkdir()
        (tmp_path / f"eval-{name}" / "evaluation.json").write_text(json.dumps(record))
        with caplog.at_level(logging.WARNING, logger="kfp_finetune.registry"):
            results.append(export(ExportConfig(model=str(model), output=str(tmp_path / f"export-{name}"),
                                               evaluation=str(tmp_path / f"eval-{name}"), push_to=str(dest))))
    a, b = results
    assert a.promoted and not b.promoted and read_latest(str(dest)) == a.version
    assert int(b.version) > int(a.version) and Path(b.pushed_uri).is_dir()
    assert f"LATEST moved from v1 (the champion this run was compared against) to {a.version}" in b.not_promoted
    assert b.not_promoted in caplog.text
    record = json.loads((Path(b.pushed_uri) / "version.json").read_text())
    assert record["version"] == b.version and record["expected_latest"] == "v1"


def test_export_push_to_emulator_is_servable(chain, blessed_eval, gcs_bucket, tmp_path, flowers_dir):
    import tensorflow as tf

    from kfp_finetune.components.core import gcs

    dest = f"gs://{gcs_bucket.name}/models/flowers"
    result = export(ExportConfig(model=str(chain.strong), output=str(tmp_path / "export"),
                                 evaluation=str(blessed_eval), push_to=dest, run_id="run-7"))
    assert result.pushed_uri == f"{dest}/run-7" and result.version == "run-7"
    assert read_latest(dest) == "run-7"
    # What a server would do: fetch the version LATEST names and serve it.
    blobs = gcs.list_blobs(result.pushed_uri)
    names = [b.name for b in blobs]
    local = tmp_path / "fetched"
    prefix = "models/flowers/run-7/"
    gcs.download_many([f"gs://{gcs_bucket.name}/{n}" for n in names], [local / n[len(prefix):] for n in names])
    # The export, plus what makes it a complete champion: the Model artifact, the data fingerprint and profile,
    # version.json.
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == sorted(
        [p.relative_to(tmp_path / "export").as_posix() for p in (tmp_path / "export").rglob("*") if p.is_file()]
        + ["claim.json", "data_fingerprint.json", "data_profile.json", "model/model.json", "model/model.keras",
           "promoted.json", "version.json"])
    serving = tf.saved_model.load(str(local)).signatures["serving_default"]
    out = serving(image_bytes=tf.constant(_flower_images(flowers_dir)[:2]))
    assert out["probabilities"].shape == (2, 3)


def test_export_refuses_unblessed_or_foreign_evaluation(chain, blessed_eval, tmp_path):
    from kfp_finetune.components.evaluate.step import EvaluateConfig, evaluate

    failed = tmp_path / "failed_eval"
    assert not evaluate(EvaluateConfig(dataset=str(chain.dataset), model=str(chain.weak), output=str(failed),
                                       min_accuracy=0.9)).blessed
    with pytest.raises(UserError, match="did not bless"):
        export(ExportConfig(model=str(chain.weak), output=str(tmp_path / "a"), evaluation=str(failed),
                            push_to=str(tmp_path / "registry")))
    with pytest.raises(UserError, match="measured another model"):  # the strong model's evaluation, weak model
        export(ExportConfig(model=str(chain.weak), output=str(tmp_path / "b"), evaluation=str(blessed_eval)))
    with pytest.raises(UserError, match="--run-id"):
        ExportConfig(model="m", output="o", run_id="../escape")
    with pytest.raises(UserError, match="--vertex-upload needs --push-to gs://"):
        ExportConfig(model="m", output="o", push_to=str(tmp_path / "r"),
                     vertex=VertexConfig(project="p", region="us-central1", display_name="d"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failed_eval"]


def test_vertex_upload_built_offline_and_stops_at_the_network(tmp_path):
    from google.auth.credentials import AnonymousCredentials

    vertex = VertexConfig(project="my-project", region="europe-west4", display_name="flowers",
                          parent_model="projects/my-project/locations/europe-west4/models/123")
    evaluation = {"metrics": {"accuracy": 0.91}}
    args = vertex_upload_args(vertex, "gs://b/models/20260101120000000", "20260101120000000",
                              ["daisy", "rose"], evaluation)
    assert args["artifact_uri"] == "gs://b/models/20260101120000000"
    assert args["parent_model"] == vertex.parent_model and args["is_default_version"] is True
    assert args["serving_container_image_uri"].startswith("us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.")
    assert "0.9100" in args["description"] and args["labels"]["kfp-finetune-version"] == "20260101120000000"

    # The real SDK validates the arguments and builds the request; the call then fails at the (closed) endpoint.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="Model.upload .* failed"):
        vertex_upload(vertex, args, credentials=AnonymousCredentials(), api_endpoint=f"127.0.0.1:{port}")
    with pytest.raises(UserError, match="--vertex-region"):
        VertexConfig(project="p", region="Europe West", display_name="d")
    with pytest.raises(UserError, match="gs://"):
        vertex_upload_args(vertex, str(tmp_path), "v1", ["a"], None)


@pytest.mark.slow  # two more exports: ~17 s
def test_cli_and_component(chain, blessed_eval, tmp_path):
    from kfp import dsl

    from kfp_finetune.components.export.step import export_op
    from kfp_finetune.pipelines.cli import main

    assert main(["export", "--model", str(chain.strong), "--output", str(tmp_path / "cli"), "--evaluation",
                 str(blessed_eval), "--push-to", str(tmp_path / "reg"), "--run-id", "cli-1"]) == 0
    assert read_latest(str(tmp_path / "reg")) == "cli-1"
    assert (tmp_path / "reg" / "cli-1" / "saved_model.pb").is_file()

    # The component, to a fresh destination (to "reg" it would be a duplicate of the champion cli-1: not pushed).
    exported_model = dsl.Model(name="exported_model", uri=str(tmp_path / "component"))
    outputs = export_op.python_func(model=dsl.Model(uri=str(chain.strong)),
                                    evaluation=dsl.Artifact(uri=str(blessed_eval)), exported_model=exported_model,
                                    push_to=str(tmp_path / "reg2"), run_id="", fingerprint="f00d",
                                    pipeline_job="job-1")
    assert outputs.pushed_uri == str(tmp_path / "reg2" / exported_model.metadata["version"])
    assert read_latest(str(tmp_path / "reg2")) == exported_model.metadata["version"]
    record = json.loads((Path(outputs.pushed_uri) / "version.json").read_text())
    assert record["data_fingerprint"] == "f00d" and record["lineage"]["pipeline_job"] == "job-1"
    duplicate = dsl.Model(name="exported_model", uri=str(tmp_path / "component2"))
    assert export_op.python_func(model=dsl.Model(uri=str(chain.strong)), evaluation=dsl.Artifact(uri=str(blessed_eval)),
                                 exported_model=duplicate, push_to=str(tmp_path / "reg"), run_id="").pushed_uri == ""
    assert "cli-1" in duplicate.metadata["skipped_push"] and read_latest(str(tmp_path / "reg")) == "cli-1"
    assert exported_model.metadata["version"].isdigit() and len(exported_model.metadata["version"]) == 17
    assert (tmp_path / "component" / "saved_model.pb").is_file()
