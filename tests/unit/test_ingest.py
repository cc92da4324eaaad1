"""The ingest step on generated images: odd formats, broken files, splits, duplicates, manifests, errors, CLI."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kfp_finetune.components.core.dataset import SPLITS, load_info, read_split
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.ingest import tfds_format
from kfp_finetune.components.ingest.step import IngestConfig, ingest
from kfp_finetune.pipelines.cli import main as cli_main
from tests import imagegen

VALID = imagegen.ImageFactory.VALID


def run(source: Path | str, out: Path, **kw) -> dict:
    ingest(IngestConfig(source=str(source), output=str(out), **kw))
    return json.loads((out / "ingest_report.json").read_text())


def records(out: Path) -> dict[str, list[tuple[bytes, int]]]:
    """Every (image bytes, label) per split, read the way training reads them (components.core.dataset)."""
    return {
        split: [(bytes(img), int(label)) for img, label in read_split(out, split).as_numpy_iterator()]
        for split in SPLITS
    }


def nothing_left(out: Path) -> bool:
    """Nothing at `out` and no temporary sibling left behind."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def reasons(report: dict) -> dict[str, str]:
    return {Path(s["path"]).name: s["reason"] for s in report["skipped"]}


# --- the dataset contract ----------------------------------------------------------------------------------------


def test_folder_ingest_is_a_tfds_dataset_with_source_bytes_and_labels(synthetic_folder, tmp_path):
    import tensorflow_datasets as tfds

    out = tmp_path / "ds"
    report = run(synthetic_folder, out, num_shards=2)
    assert report["class_names"] == ["circle", "square", "stripes"]
    assert sum(report["num_examples"].values()) == 90 and report["skipped"] == []

    builder = tfds.builder_from_directory(str(out))
    assert builder.info.features["label"].names == ["circle", "square", "stripes"]
    assert {s: builder.info.splits[s].num_examples for s in SPLITS} == report["num_examples"]
    example = next(iter(builder.as_dataset(split="train").take(1)))
    assert example["image"].shape[-1] == 3 and example["image"].shape[0] == 64

    # Every record holds a source file's bytes unchanged, under its folder's label, in the split of the report.
    source = {p.read_bytes(): p.parent.name for p in synthetic_folder.rglob("*.jpg")}
    got = records(out)
    for split, items in got.items():
        assert len(items) == report["num_examples"][split]
        for image, label in items:
            assert report["class_names"][label] == source[image]
    assert sum(len(v) for v in got.values()) == len(source)
    info = load_info(out)
    assert info.num_examples == report["num_examples"] and len(info.files("train")) == 2


def test_metadata_matches_what_tfds_itself_writes(tmp_path):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_info, file_adapters, naming, utils
    from tensorflow_datasets.core import splits as split_lib

    names = ["a", "b", "c"]
    splits = {"train": ([3, 2], 1234), "validation": ([1], 99), "test": ([0], 0)}
    ours = tmp_path / "ours"
    ours.mkdir()
    tfds_format.write_metadata(ours, names, splits, "desc")

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(names=names)}
    )
    identity = dataset_info.DatasetIdentity(
        name=tfds_format.DATASET_NAME, version=utils.Version(tfds_format.DATASET_VERSION), data_dir=str(theirs),
        module_name="",
    )
    info = dataset_info.DatasetInfo(builder=identity, features=features, description="desc",
                                    supervised_keys=("image", "label"))
    info.set_file_format(file_adapters.FileFormat.TFRECORD)
    template = naming.ShardedFileTemplate(data_dir=theirs, template=naming.DEFAULT_FILENAME_TEMPLATE,
                                          dataset_name=tfds_format.DATASET_NAME, filetype_suffix="tfrecord")
    info.set_splits(split_lib.SplitDict([
        split_lib.SplitInfo(name=s, shard_lengths=lengths, num_bytes=n, filename_template=template)
        for s, (lengths, n) in splits.items()
    ]))
    info.write_to_directory(theirs)
    for name in (tfds_format.INFO_FILE, tfds_format.FEATURES_FILE):
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
    assert (ours / tfds_format.LABELS_FILE).read_text() == (theirs / tfds_format.LABELS_FILE).read_text()


# --- odd and broken files ----------------------------------------------------------------------------------------


def test_every_odd_kind_is_converted_and_every_broken_file_reported(image_factory, tmp_path):
    f = image_factory
    for label in ("a", "b"):
        for kind in VALID:
            f.make(kind, f"{label}/nested/deeper/{kind}{_ext(kind)}")
    kept_as_is = {p.read_bytes() for p in f.root.rglob("*") if p.name.split(".")[0] in ("jpeg", "png", "grey_jpeg")}
    for kind in ("truncated_jpeg", "corrupt", "empty", "bomb", "fake_ext", "not_image"):
        f.make(kind, f"a/{kind}{_ext(kind)}")
    f.make("hidden", "b/hidden.jpg")
    (f.root / ".DS_Store").write_bytes(b"junk")
    (f.root / "README.txt").write_text("top-level file, not in a class folder")

    out = tmp_path / "ds"
    report = run(f.root, out, max_corrupt_fraction=1.0)
    assert report["num_examples"]["train"] + report["num_examples"]["validation"] + report["num_examples"]["test"] \
        == 2 * len(VALID)
    assert reasons(report) == {
        "truncated_jpeg.jpg": "corrupt", "corrupt.jpg": "corrupt", "empty.jpg": "corrupt", "fake_ext.png": "corrupt",
        "bomb.png": "too_large", "not_image.txt": "not_image", ".hidden.jpg": "hidden", ".DS_Store": "hidden",
        "README.txt": "outside_class_folder",
    }
    # bmp, gif, webp, tiff, cmyk_jpeg, png16, palette_png, rgba_png were re-encoded; jpeg, png, grey_jpeg were not.
    assert report["converted"] == 2 * 8
    got = [img for items in records(out).values() for img, _ in items]
    assert kept_as_is <= set(got)
    for image in got:
        assert image[:3] == b"\xff\xd8\xff" or image[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(image)) as im:
            assert im.mode in ("RGB", "L") and im.size == (32, 32)


def _ext(kind: str) -> str:
    return {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "gif": ".gif", "webp": ".webp", "tiff": ".tif",
            "cmyk_jpeg": ".jpg", "png16": ".png", "palette_png": ".png", "rgba_png": ".png", "grey_jpeg": ".jpg",
            "truncated_jpeg": ".jpg", "corrupt": ".jpg", "empty": ".jpg", "bomb": ".png", "not_image": ".txt",
            "fake_ext": ".png"}[kind]


def test_conversions_keep_the_picture(tmp_path):
    """Alpha is composited on white, 16-bit grey is scaled (not clipped), CMYK comes back as RGB."""
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent on the left half
    rgba[:, 4:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "a" / "alpha.png")
    grey16 = np.full((8, 8), 32768, np.uint16)
    Image.fromarray(grey16).save(root / "b" / "grey16.png")
    out = tmp_path / "ds"
    report = run(root, out, val_fraction=0.0, test_fraction=0.0)
    assert report["converted"] == 2
    pixels = {}
    for image, label in records(out)["train"]:
        with Image.open(io.BytesIO(image)) as im:
            pixels[report["class_names"][label]] = np.asarray(im.convert("RGB"))
    assert (pixels["a"][:, :4] == 255).all()  # transparent -> white
    assert (pixels["a"][:, 4:] == (200, 0, 0)).all()
    assert (pixels["b"] == 128).all()  # 32768/65535 of full scale, not clipped to 255


def test_max_side_downscales_only_larger_images(tmp_path):
    root = tmp_path / "src"
    for label, size in (("big", (200, 100)), ("small", (40, 30))):
        (root / label).mkdir(parents=True)
        rng = np.random.default_rng(len(label))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / label / "x.jpg")
    out = tmp_path / "ds"
    report = run(root, out, max_side=50, val_fraction=0.0, test_fraction=0.0)
    assert report["resized"] == 1
    small = (root / "small" / "x.jpg").read_bytes()
    for image, label in records(out)["train"]:
        if report["class_names"][label] == "small":
            assert image == small
        else:
            with Image.open(io.BytesIO(image)) as im:
                assert im.size == (50, 25) and im.format == "JPEG"


# --- splits, duplicates, conflicts -------------------------------------------------------------------------------


def _split_by_bytes(out: Path) -> dict[bytes, str]:
    return {image: split for split, items in records(out).items() for image, _ in items}


def test_splits_are_stable_when_the_folder_grows_and_follow_the_fractions(tmp_path):
    root = tmp_path / "src"
    imagegen.write_class_folder(root, classes=("circle", "square"), per_class=150, size=16, seed=1)
    first = _split_by_bytes_after(run_dir := tmp_path / "one", root)
    sizes = {s: sum(1 for v in first.values() if v == s) for s in SPLITS}
    assert 0.7 * 300 < sizes["train"] < 0.9 * 300 and 10 < sizes["validation"] < 50 and 10 < sizes["test"] < 50
    assert run_dir.exists()

    imagegen.write_class_folder(tmp_path / "more", classes=("circle", "square"), per_class=60, size=16, seed=2)
    for p in (tmp_path / "more").rglob("*.jpg"):
        shutil.copy(p, root / p.parent.name / f"new_{p.name}")
    second = _split_by_bytes_after(tmp_path / "two", root)
    assert len(second) == 420
    assert all(second[image] == split for image, split in first.items())

    reseeded = _split_by_bytes_after(tmp_path / "three", root, seed=7)
    assert sum(reseeded[i] != second[i] for i in second) > 20  # the seed does change the assignment


def _split_by_bytes_after(out: Path, root: Path, **kw) -> dict[bytes, str]:
    # The content-hash split is what must be stable: a leakage move depends on the whole set (these 16 px patterns
    # are hundreds of look-alike pairs, so a group that moves in one run can join a group too large to move in the
    # next), so the leakage policy only reports here.
    run(root, out, leakage="report", **kw)
    return _split_by_bytes(out)


def test_duplicates_kept_once_and_label_conflicts_left_out(tmp_path):
    root = tmp_path / "src"
    imagegen.write_class_folder(root, classes=("circle", "square"), per_class=10, size=16)
    shutil.copy(root / "circle" / "circle_000.jpg", root / "circle" / "copy_of_000.jpg")
    (root / "circle" / "sub").mkdir()
    shutil.copy(root / "circle" / "circle_000.jpg", root / "circle" / "sub" / "again.jpg")
    shutil.copy(root / "circle" / "circle_001.jpg", root / "square" / "mislabelled.jpg")
    out = tmp_path / "ds"
    report = run(root, out)
    assert reasons(report) == {"copy_of_000.jpg": "duplicate", "again.jpg": "duplicate",
                               "circle_001.jpg": "label_conflict", "mislabelled.jpg": "label_conflict"}
    assert report["skipped_counts"] == {"duplicate": 2, "label_conflict": 2}
    got = [img for items in records(out).values() for img, _ in items]
    assert len(got) == len(set(got)) == 19  # 20 distinct contents, one of them in conflict
    assert (root / "circle" / "circle_000.jpg").read_bytes() in got
    assert (root / "circle" / "circle_001.jpg").read_bytes() not in got


# --- manifests ---------------------------------------------------------------------------------------------------


def test_manifest_gives_the_same_dataset_as_the_folder(synthetic_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_folder, data / "images")
    rows = ["path,label"] + [f"images/{p.parent.name}/{p.name},{p.parent.name}"
                             for p in sorted((data / "images").rglob("*.jpg"))]
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    from_folder, from_manifest = tmp_path / "a", tmp_path / "b"
    run(data / "images", from_folder)
    report = run(data / "manifest.csv", from_manifest)
    assert report["class_names"] == ["circle", "square", "stripes"]
    assert records(from_folder) == records(from_manifest)


@pytest.mark.parametrize("bad_path", ["../outside.jpg", "images/../../outside.jpg", "/etc/passwd"])
def test_manifest_path_escaping_its_folder_is_rejected(tmp_path, bad_path):
    data = tmp_path / "data"
    imagegen.write_class_folder(data / "images", classes=("a", "b"), per_class=2, size=16)
    (tmp_path / "outside.jpg").write_bytes((data / "images" / "a" / "a_000.jpg").read_bytes())
    (data / "m.csv").write_text(f"path,label\nimages/a/a_000.jpg,a\nimages/b/b_000.jpg,b\n{bad_path},a\n")
    out = tmp_path / "ds"
    with pytest.raises(UserError, match="line 4") as err:
        run(data / "m.csv", out)
    assert "manifest's folder" in str(err.value)
    assert nothing_left(out)


def test_manifest_missing_file_is_reported_and_bad_header_rejected(tmp_path):
    data = tmp_path / "data"
    imagegen.write_class_folder(data, classes=("a", "b"), per_class=3, size=16)
    rows = "".join(f"{p.parent.name}/{p.name},{p.parent.name}\n" for p in sorted(data.rglob("*.jpg")))
    (data / "m.csv").write_text("path,label\n" + rows + "a/gone.jpg,a\n")
    report = run(data / "m.csv", tmp_path / "ds", max_corrupt_fraction=0.5)
    assert reasons(report) == {"gone.jpg": "missing"}
    (data / "bad.csv").write_text("file,class\na/a_000.jpg,a\n")
    with pytest.raises(UserError, match="path,label"):
        run(data / "bad.csv", tmp_path / "ds2")


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": -0.1}, "--val-fraction"),
    ({"test_fraction": 1.0}, "--test-fraction"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "sum to less than 1"),
    ({"max_side": 0}, "--max-side"),
    ({"num_shards": 0}, "--num-shards"),
    ({"max_corrupt_fraction": 2.0}, "--max-corrupt-fraction"),
])
def test_bad_config_is_rejected(kwargs, message, tmp_path):
    with pytest.raises(UserError, match=message):
        IngestConfig(source="x", output=str(tmp_path / "ds"), **kwargs)


def _make_error_source(case: str, root: Path, factory: imagegen.ImageFactory) -> Path:
    if case == "missing":
        return root / "does-not-exist"
    root.mkdir(parents=True)
    if case == "empty":
        return root
    imagegen.write_class_folder(root, classes=("a",), per_class=5, size=16)
    if case == "one_class":
        return root
    (root / "b").mkdir()
    if case == "class_without_valid_image":
        (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nothing")
        (root / "b" / "notes.txt").write_text("x")
        return root
    imagegen.write_class_folder(root, classes=("b",), per_class=5, size=16)
    if case == "too_corrupt":
        factory.root = root
        factory.make("truncated_jpeg", "b/t.jpg")
        return root
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("empty", "no image files"),
    ("one_class", "at least 2"),
    ("class_without_valid_image", "class 'b'"),
    ("too_corrupt", "max-corrupt-fraction"),
])
def test_error_cases_fail_with_one_line_and_leave_nothing(case, message, tmp_path, image_factory, capsys):
    source = _make_error_source(case, tmp_path / "src", image_factory)
    out = tmp_path / "out" / "ds"
    code = cli_main(["ingest", "--source", str(source), "--output", str(out),
                     "--max-corrupt-fraction", "1" if case == "class_without_valid_image" else "0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("kfp-finetune: error: --source") and message in err[-1]
    assert nothing_left(out)


def test_output_that_exists_and_is_not_empty_is_refused(synthetic_folder, tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["ingest", "--source", str(synthetic_folder), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_success_with_shards_and_an_empty_output_dir(synthetic_folder, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()  # KFP pre-creates artifact folders: an empty one is fine
    assert cli_main(["ingest", "--source", str(synthetic_folder), "--output", str(out), "--num-shards", "3",
                     "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "3"]) == 0
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["num_shards"]["train"] == 3 and report["fractions"]["train"] == 0.6
    lengths = json.loads((out / "dataset_info.json").read_text())["splits"]
    assert sorted(p.name for p in out.glob("images-train.tfrecord-*")) == [
        f"images-train.tfrecord-0000{i}-of-00003" for i in range(3)]
    assert sum(int(n) for s in lengths for n in s["shardLengths"]) == 90


def test_tfds_source_with_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="TFDS has no dataset 'surely_not_a_dataset'"):
        run("tfds:surely_not_a_dataset", tmp_path / "ds")


def test_component_signature_matches_the_interface(tmp_path):
    from kfp import compiler

    from kfp_finetune.components.core import settings
    from kfp_finetune.components.ingest.step import ingest_op

    spec = ingest_op.component_spec
    assert spec.implementation.container.image == settings.component_image()
    defaults = {name: i.default for name, i in spec.inputs.items()}
    assert defaults == {"source": None, "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0, "max_side": 0,
                        "max_corrupt_fraction": 0.01, "num_shards": 0, "fingerprint": "", "leakage": "move"}
    assert {name: o.type for name, o in spec.outputs.items()} == {"dataset": "system.Dataset@0.0.1"}
    compiler.Compiler().compile(ingest_op, str(tmp_path / "ingest.yaml"))
    import yaml

    ir = yaml.safe_load((tmp_path / "ingest.yaml").read_text())  # parsed: the YAML may fold a long source line
    executor = next(iter(ir["deploymentSpec"]["executors"].values()))
    code = " ".join(executor["container"]["command"] + executor["container"]["args"])
    assert "from kfp_finetune.components.ingest.step import IngestConfig" in code
