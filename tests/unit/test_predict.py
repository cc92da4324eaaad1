"""predict: a folder, the GCS emulator and a CSV, with odd and broken files among the images; an export, a Model
artifact and a push destination's LATEST as the model; the batch-prediction pipeline (compiled and run locally)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.predict.step import PredictConfig, predict
from tests import evalchain
from tests.imagegen import ImageFactory

CLASSES = ["circle", "square", "stripes"]
# file name -> the skip reason's kind (None: predicted)
ODD = {"jpeg.jpg": None, "png.png": None, "gif.gif": None, "bmp.bmp": None, "tiff.tif": None, "webp.webp": None,
       "png16.png": None, "cmyk_jpeg.jpg": None, "rgba_png.png": None, "truncated_jpeg.jpg": "corrupt",
       "corrupt.jpg": "corrupt", "empty.jpg": "corrupt", "bomb.png": "too_large"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_folder, weights_mirror) -> evalchain.Chain:
    return evalchain.get(tmp_path_factory, synthetic_folder, weights_mirror)


@pytest.fixture(scope="module")
def exported(chain) -> Path:
    """The session's shared export of the strong model (evalchain.Chain.pushed; read-only: copied before a push).
    (An export without an evaluation, given only --dataset, is test_serving's broken-export test.)"""
    _, out, _ = chain.pushed
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory, synthetic_folder) -> Path:
    """Odd and broken files at the top, and 10 real class images per class in sub-folders."""
    root = tmp_path_factory.mktemp("predict_images")
    factory = ImageFactory(root)
    for name in ODD:
        factory.make(Path(name).stem, name)
    (root / "notes.txt").write_text("not an image name: ignored")
    for cls in CLASSES:
        (root / "real" / cls).mkdir(parents=True)
        for f in sorted((synthetic_folder / cls).iterdir())[:10]:
            shutil.copy(f, root / "real" / cls / f.name)
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_rows(rows: list[dict], root: str, k: int) -> None:
    assert len(rows) == len(ODD) + 30
    by_name = {r["file"][len(root) + 1:]: r for r in rows}
    for name, kind in ODD.items():
        row = by_name[name]
        if kind is None:
            assert row["skip_reason"] is None, row
            assert len(row["classes"]) == k and set(row["classes"]) <= set(CLASSES)
            assert row["probabilities"] == sorted(row["probabilities"], reverse=True)
        else:
            assert row["skip_reason"].startswith(kind + ":") and row["classes"] == [], row
    real = [r for r in rows if "/real/" in r["file"]]
    assert len(real) == 30
    # the strong model gets (nearly all) of the real images right
    right = sum(r["classes"][0] == r["file"].split("/real/")[1].split("/")[0] for r in real)
    assert right >= 27, right


def test_predict_local_folder_with_an_export_and_a_model_artifact(chain, exported, images, tmp_path):
    from kfp_finetune.components.core import modelio
    from kfp_finetune.components.core.dataset import decode_image

    a = predict(PredictConfig(model=str(exported), input=str(images), output=str(tmp_path / "a.jsonl"), top_k=2),
                progress=False)
    assert (a.rows, a.predicted, a.skipped) == (len(ODD) + 30, len(ODD) + 30 - 4, 4)
    assert a.skip_counts == {"corrupt": 3, "too_large": 1}
    rows = _rows(tmp_path / "a.jsonl")
    _check_rows(rows, str(images), 2)
    from kfp_finetune.components.predict.inputs import list_inputs

    files, count = list_inputs(str(images))
    assert [r["file"] for r in rows] == list(files) and count == len(rows)  # input order: a sorted walk
    assert [r["file"] for r in rows[:len(ODD)]] == sorted(str(images / n) for n in ODD)

    b = predict(PredictConfig(model=str(chain.strong), input=str(images), output=str(tmp_path / "b.jsonl"),
                              top_k=2, batch_size=5), progress=False)
    assert b.skip_counts == a.skip_counts
    for ra, rb in zip(rows, _rows(tmp_path / "b.jsonl"), strict=True):
        assert ra["file"] == rb["file"] and ra["classes"] == rb["classes"]
        np.testing.assert_allclose(ra["probabilities"], rb["probabilities"], atol=1e-5)

    # the probabilities are the Keras model's on the training decode
    model, _ = modelio.load_model(chain.strong)
    jpeg = images / "real" / "square" / sorted(p.name for p in (images / "real" / "square").iterdir())[0]
    expected = np.asarray(model(decode_image(jpeg.read_bytes(), evalchain.IMAGE_SIZE)[None]))[0]
    row = next(r for r in rows if r["file"] == str(jpeg))
    np.testing.assert_allclose(row["probabilities"], np.sort(expected)[::-1][:2], atol=1e-5)


def test_the_model_loads_while_images_are_read_and_its_errors_still_stop_predict(chain, exported, images, tmp_path,
                                                                                caplog):
    """Both model kinds load on a thread while the first images are read and decoded (their metadata gives the input
    size, and export.json lists the pixel endpoint). An export without that list (written before it) loads first,
    as before, with the same rows. A model that fails to load fails predict, even with no image to wait for it,
    and leaves no output behind; a model.json whose input size is not the model's is refused."""
    import logging

    real = images / "real" / "square"
    with caplog.at_level(logging.INFO, logger="kfp_finetune.predict"):
        for name, model in (("export", exported), ("model", chain.strong)):
            predict(PredictConfig(model=str(model), input=str(real), output=str(tmp_path / f"{name}.jsonl")),
                    progress=False)
            assert f"model {model} (" in caplog.text and "loading while the first images are read" in caplog.text
            caplog.clear()
    older = tmp_path / "older_export"
    shutil.copytree(exported, older)
    info = json.loads((older / "export.json").read_text())
    del info["endpoints"]
    (older / "export.json").write_text(json.dumps(info))
    with caplog.at_level(logging.INFO, logger="kfp_finetune.predict"):
        predict(PredictConfig(model=str(older), input=str(real), output=str(tmp_path / "older.jsonl")), progress=False)
    assert "loading while" not in caplog.text
    assert [r["classes"] for r in _rows(tmp_path / "older.jsonl")] == [r["classes"] for r in
                                                                       _rows(tmp_path / "export.jsonl")]

    broken = tmp_path / "broken_model"
    shutil.copytree(chain.strong, broken)
    (broken / "model.keras").write_bytes((broken / "model.keras").read_bytes()[:2000])
    (tmp_path / "no_images").mkdir()
    for source in (real, tmp_path / "no_images"):
        out = tmp_path / "broken" / "rows.jsonl"
        with pytest.raises(UserError, match="model.keras cannot be loaded"):
            predict(PredictConfig(model=str(broken), input=str(source), output=str(out)), progress=False)
        assert (list(out.parent.iterdir()) if out.parent.exists() else []) == []  # nothing half-written
    lying = tmp_path / "lying_model"
    shutil.copytree(chain.strong, lying)
    meta = json.loads((lying / "model.json").read_text())
    meta["backbone"]["input_size"] = 2 * meta["backbone"]["input_size"]
    (lying / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="model.json says input size"):
        predict(PredictConfig(model=str(lying), input=str(real), output=str(tmp_path / "lying.jsonl")), progress=False)
    assert not (tmp_path / "lying.jsonl").exists()


def complete_version(exported: Path, tmp_path: Path) -> Path:
    """A copy of the export that the registry takes as a complete version (it needs its version.json)."""
    version = tmp_path / "version"
    shutil.copytree(exported, version)
    (version / "version.json").write_text('{"version": "v1", "created": "2026-11-30T00:00:00Z"}')
    return version


def test_predict_from_the_gcs_emulator_with_latest_and_csv_output(exported, images, gcs_bucket, gcs_upload, tmp_path):
    from kfp_finetune.components.core import gcs
    from kfp_finetune.components.export.step import push

    source = gcs_upload(gcs_bucket, images, "incoming")
    dest = f"gs://{gcs_bucket.name}/models"
    push(complete_version(exported, tmp_path), dest, "v1")
    out = f"gs://{gcs_bucket.name}/out/predictions.csv"
    result = predict(PredictConfig(model=dest, input=source, output=out, top_k=3, batch_size=4), progress=False)
    assert (result.predicted, result.skipped) == (len(ODD) + 30 - 4, 4)
    assert result.model.endswith("model")  # a local copy of the version LATEST names
    text = gcs.read_text(out)
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0]) == ["file", "class_1", "probability_1", "class_2", "probability_2", "class_3",
                             "probability_3", "skip_reason"]
    as_json = [{"file": r["file"], "skip_reason": r["skip_reason"] or None,
                "classes": [r[f"class_{i}"] for i in (1, 2, 3) if r[f"class_{i}"]],
                "probabilities": [float(r[f"probability_{i}"]) for i in (1, 2, 3) if r[f"probability_{i}"]]}
               for r in rows]
    _check_rows(as_json, source, 3)


def test_predict_csv_list_with_a_missing_file(exported, images, tmp_path):
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        w.writerow(["1", str(images / "png.png")])
        w.writerow(["2", "missing.jpg"])  # relative to the CSV's folder
        w.writerow(["3", str(images / "corrupt.jpg")])
    result = predict(PredictConfig(model=str(exported), input=str(listing), output=str(tmp_path / "p.jsonl")),
                     progress=False)
    rows = _rows(tmp_path / "p.jsonl")
    assert [r["file"] for r in rows] == [str(images / "png.png"), str(tmp_path / "missing.jpg"),
                                         str(images / "corrupt.jpg")]
    assert rows[0]["skip_reason"] is None and len(rows[0]["classes"]) == 3
    assert rows[1]["skip_reason"].startswith("unreadable: FileNotFoundError")
    assert rows[2]["skip_reason"].startswith("corrupt:")
    assert (result.predicted, result.skipped) == (1, 2)


def test_predict_cli_and_config_errors(exported, images, tmp_path):
    from kfp_finetune.pipelines.cli import main

    assert main(["predict", "--model", str(exported), "--input", str(images / "real"), "--output",
                 str(tmp_path / "cli.jsonl"), "--top-k", "1"]) == 0
    assert len(_rows(tmp_path / "cli.jsonl")) == 30
    with pytest.raises(UserError, match=r"\.jsonl or \.csv"):
        PredictConfig(model="m", input=str(images), output="out.txt")
    with pytest.raises(UserError, match="--top-k"):
        PredictConfig(model="m", input=str(images), output="o.jsonl", top_k=0)
    with pytest.raises(UserError, match="no such folder"):
        PredictConfig(model="m", input=str(tmp_path / "nope"), output="o.jsonl")
    assert main(["predict", "--model", str(tmp_path), "--input", str(images), "--output",
                 str(tmp_path / "x.jsonl")]) == 2  # not a model folder: one-line error


@pytest.mark.slow  # two kfp.local steps in subprocesses (~40 s each on 2 busy cores)
def test_batch_predict_pipeline_uses_latest(exported, images, tmp_path):
    from kfp_finetune.components.export.step import push
    from kfp_finetune.pipelines.batch_predict import build_batch_predict_pipeline, compile_batch_predict
    from kfp_finetune.pipelines.testing import local_kfp

    path = compile_batch_predict(tmp_path / "bp.yaml")
    text = path.read_text()
    assert "comp-predict" in text and "push_to" in text and "model_uri" in text
    registry = tmp_path / "registry"
    push(complete_version(exported, tmp_path), str(registry), "v1")
    with local_kfp(tmp_path / "root") as root:
        build_batch_predict_pipeline()(input_uri=str(images / "real"), push_to=str(registry), top_k=1)
    files = list(root.rglob("predictions.jsonl"))
    assert len(files) == 1
    rows = _rows(files[0])
    assert len(rows) == 30 and all(len(r["classes"]) == 1 for r in rows)
