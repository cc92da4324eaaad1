"""What production does to a source folder: symlinks out of it (to a file, to a folder, to /dev/zero), a FIFO and a
socket named like images, manifests that are not UTF-8 or carry a BOM, a gs:// download that keeps failing, object
names with `..`. Ingest, fingerprint and predict each read only regular files under the source root, skip the rest
with a reason (the same on every run), and never hang: all on real files, FIFOs, sockets and the GCS emulator."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import pytest

from kfp_finetune.components.core import gcs
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.ingest.fingerprint import fingerprint_source
from kfp_finetune.components.ingest.step import IngestConfig, ingest
from tests import imagegen

CLASSES = ("circle", "square")
# A hang (reading a FIFO or /dev/zero) must fail the test, not the whole session.
pytestmark = pytest.mark.timeout(180)


def _make_hostile(src: Path, outside: Path) -> dict[str, str]:
    """Add hostile entries to the class folder `src`; {file name: the skip reason ingest must give}."""
    imagegen.write_class_folder(outside / "stolen", classes=("circle",), per_class=3, size=16, seed=9)
    secret = outside / "secret.jpg"  # a real image: read by mistake, it would be ingested
    imagegen.write_class_folder(outside / "s", classes=("square",), per_class=1, size=16, seed=8)
    shutil.copy(outside / "s" / "square" / "square_000.jpg", secret)
    (src / "circle" / "shadow.jpg").symlink_to(secret)
    (src / "circle" / "zero.jpg").symlink_to("/dev/zero")
    (src / "stolen").symlink_to(outside / "stolen")  # a symlinked folder outside: no class, not walked
    (src / "circle" / "deeper").symlink_to(outside / "stolen" / "circle")
    os.mkfifo(src / "square" / "pipe.jpg")
    expected = {"shadow.jpg": "outside_source", "zero.jpg": "outside_source", "stolen": "outside_source",
                "deeper": "outside_source", "pipe.jpg": "not_regular_file"}
    sock_path = src / "square" / "sock.png"
    if len(str(sock_path)) < 100:  # AF_UNIX paths are limited to ~107 bytes
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(sock_path))
        expected["sock.png"] = "not_regular_file"
    (src / "square" / "junk.jpg").write_bytes(b"not an image at all")  # Pillow's message names a BytesIO address
    expected["junk.jpg"] = "corrupt"
    (src / "circle" / "inside_link.jpg").symlink_to(src / "square" / "square_001.jpg")  # inside the root: fine
    expected["inside_link.jpg"] = "label_conflict"
    expected["square_001.jpg"] = "label_conflict"
    return expected


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    src = imagegen.write_class_folder(tmp_path / "src", classes=CLASSES, per_class=5, size=16)
    return src, _make_hostile(src, tmp_path / "outside")


def _ingest(source: Path | str, out: Path, **kw) -> dict:
    ingest(IngestConfig(source=str(source), output=str(out), max_corrupt_fraction=1.0, **kw))
    return json.loads((out / "ingest_report.json").read_text())


def _stored_images(out: Path) -> set[bytes]:
    from kfp_finetune.components.core.dataset import SPLITS, read_split

    return {bytes(img) for split in SPLITS for img, _ in read_split(out, split).as_numpy_iterator()}


def test_ingest_reads_only_regular_files_inside_the_source(hostile, tmp_path):
    src, expected = hostile
    report = _ingest(src, tmp_path / "ds")
    assert report["class_names"] == list(CLASSES)  # the symlinked outside folder is no class
    assert {Path(s["path"]).name: s["reason"] for s in report["skipped"]} == expected
    stored = _stored_images(tmp_path / "ds")
    assert (tmp_path / "outside" / "secret.jpg").read_bytes() not in stored
    assert not any(p.read_bytes() in stored for p in (tmp_path / "outside" / "stolen").rglob("*.jpg"))
    assert len(stored) == 2 * 5 - 1  # square_001 and its in-root symlink conflict; nothing else is lost
    by_name = {Path(s["path"]).name: s for s in report["skipped"]}
    assert "/dev/zero" in by_name["zero.jpg"]["detail"] and "FIFO" in by_name["pipe.jpg"]["detail"]
    # Deterministic: a second run reports the very same skips (no object addresses in Pillow's messages).
    again = _ingest(src, tmp_path / "ds2")
    assert again["skipped"] == report["skipped"]
    assert " at 0x" not in json.dumps(report["skipped"]) and "BytesIO" not in json.dumps(report["skipped"])


def test_manifest_rows_follow_the_same_rule(hostile, tmp_path):
    src, _ = hostile
    rows = [f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(src.glob("*/*_00[0-3].jpg"))]
    rows += ["circle/shadow.jpg,circle", "circle/zero.jpg,circle", "square/pipe.jpg,square",
             "stolen/circle/circle_000.jpg,circle"]
    (src / "m.csv").write_text("\ufeffpath,label\n" + "\n".join(rows) + "\n")  # with a BOM, as Excel saves it
    report = _ingest(src / "m.csv", tmp_path / "ds")
    assert report["class_names"] == list(CLASSES)
    got = {Path(s["path"]).name: (s["reason"], s["detail"].split(":")[0]) for s in report["skipped"]}
    assert got == {"shadow.jpg": ("outside_source", "line 10"), "zero.jpg": ("outside_source", "line 11"),
                   "pipe.jpg": ("not_regular_file", "line 12"), "circle_000.jpg": ("outside_source", "line 13")}
    assert sum(report["num_examples"].values()) == 8
    assert (tmp_path / "outside" / "secret.jpg").read_bytes() not in _stored_images(tmp_path / "ds")


def test_manifest_encoding_bom_and_bad_bytes(tmp_path, capsys):
    from kfp_finetune.pipelines.cli import main

    data = imagegen.write_class_folder(tmp_path / "data", classes=CLASSES, per_class=3, size=16)
    body = "".join(f"{p.parent.name}/{p.name},{p.parent.name}\n" for p in sorted(data.rglob("*.jpg")))
    (data / "plain.csv").write_text("path,label\n" + body)
    (data / "bom.csv").write_bytes(b"\xef\xbb\xbf" + ("path,label\n" + body).encode())
    # A BOM changes nothing: the same dataset, the same fingerprint.
    assert _ingest(data / "bom.csv", tmp_path / "a")["num_examples"] == \
        _ingest(data / "plain.csv", tmp_path / "b")["num_examples"]
    assert fingerprint_source(str(data / "bom.csv")).fingerprint == \
        fingerprint_source(str(data / "plain.csv")).fingerprint
    # A Latin-1 byte on line 3: one line naming the file and the line, for ingest and fingerprint alike.
    (data / "latin1.csv").write_bytes(("path,label\n" + body).encode().replace(b"circle_001", b"circl\xe9_001"))
    capsys.readouterr()
    for argv in (["ingest", "--source", str(data / "latin1.csv"), "--output", str(tmp_path / "c")],
                 ["fingerprint", "--source", str(data / "latin1.csv")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "latin1.csv line 3: byte 0xe9 at column 13 is not UTF-8" in err[0], err
        assert "Traceback" not in err[0]
    assert not (tmp_path / "c").exists()


def test_fingerprint_ignores_what_ingest_never_reads(tmp_path):
    src = imagegen.write_class_folder(tmp_path / "src", classes=CLASSES, per_class=4, size=16)
    clean = fingerprint_source(str(src))
    _make_hostile(src, tmp_path / "outside")
    (src / "square" / "junk.jpg").unlink()  # an image name ingest does read: it would count
    (src / "circle" / "inside_link.jpg").unlink()
    after = fingerprint_source(str(src))
    assert (after.num_images, after.fingerprint) == (clean.num_images, clean.fingerprint)
    assert not any("shadow" in line or "zero" in line or "pipe" in line or "stolen" in line for line in after.lines)


# --- predict -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A Model artifact small enough to build in a second: pixels [16x16] -> pooled -> 2-class softmax."""
    import keras

    from kfp_finetune.components.core import modelio

    pixels = keras.Input((16, 16, 3), name="pixels")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(pixels))
    model = keras.Model(pixels, keras.layers.Dense(2, activation="softmax", name="head")(pooled))
    out = tmp_path_factory.mktemp("tiny") / "model"
    out.mkdir()
    modelio.save_model(model, {"class_names": list(CLASSES), "input_size": 16}, out)
    return out


def _predict_rows(model: Path, source: Path, out: Path) -> dict[str, dict]:
    from kfp_finetune.components.predict.step import PredictConfig, predict

    predict(PredictConfig(model=str(model), input=str(source), output=str(out), workers=2), progress=False)
    return {r["file"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_predict_skips_hostile_files_with_a_reason(tiny_model, hostile, tmp_path):
    src, _ = hostile
    rows = _predict_rows(tiny_model, src, tmp_path / "p.jsonl")
    reasons = {Path(f).name: (r["skip_reason"] or "").split(":")[0] for f, r in rows.items()}
    assert reasons["shadow.jpg"] == "outside_source" and reasons["zero.jpg"] == "outside_source"
    assert reasons["pipe.jpg"] == "not_regular_file"
    if "sock.png" in reasons:
        assert reasons["sock.png"] == "not_regular_file"
    assert reasons["junk.jpg"] == "corrupt" and "0x" not in rows[str(src / "square" / "junk.jpg")]["skip_reason"]
    assert reasons["inside_link.jpg"] == ""  # a symlink inside the input folder is an ordinary image
    assert not any("stolen" in f or "deeper" in f for f in rows)  # symlinked folders are not walked
    assert sum(1 for r in reasons.values() if r == "") == 2 * 5 + 1

    # A CSV list (with a BOM) naming the same files: the header is the header, each row is checked alike.
    listing = tmp_path / "list.csv"
    names = ["circle/circle_000.jpg", "circle/shadow.jpg", "circle/zero.jpg", "square/pipe.jpg"]
    listing.write_text("\ufefffile\n" + "".join(f"{src / n}\n" for n in names))
    listed = _predict_rows(tiny_model, listing, tmp_path / "l.jsonl")
    assert list(listed) == [str(src / n) for n in names]  # no bogus "\ufefffile" row
    assert [(r["skip_reason"] or "").split(":")[0] for r in listed.values()] == [
        "", "outside_source", "outside_source", "not_regular_file"]


def test_predict_csv_that_is_not_utf8_is_one_line(tiny_model, tmp_path, capsys):
    from kfp_finetune.pipelines.cli import main

    listing = tmp_path / "list.csv"
    listing.write_bytes(b"file\na.jpg\n\xff\xfeb.jpg\n")
    assert main(["predict", "--model", str(tiny_model), "--input", str(listing), "--output",
                 str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "list.csv line 3: byte 0xff at column 1 is not UTF-8" in err[0], err
    assert not (tmp_path / "p.jsonl").exists()


# --- gs:// -------------------------------------------------------------------------------------------------------


def test_failed_download_is_retried_once_then_reported_as_such(gcs_bucket, gcs_upload, tmp_path, caplog):
    data = imagegen.write_class_folder(tmp_path / "data", classes=CLASSES, per_class=4, size=16)
    uri = gcs_upload(gcs_bucket, data, "data")
    rows = "".join(f"{uri}/{p.parent.name}/{p.name},{p.parent.name}\n" for p in sorted(data.rglob("*.jpg")))
    gcs.write_text(f"{uri}/m.csv", f"path,label\n{rows}{uri}/circle/gone.jpg,circle\n")
    with caplog.at_level(logging.WARNING, logger="kfp_finetune.components.core.sources"):
        report = _ingest(f"{uri}/m.csv", tmp_path / "ds")
    gone = [s for s in report["skipped"] if s["path"].endswith("gone.jpg")]
    assert [s["reason"] for s in gone] == ["download_failed"] and "corrupt" not in report["skipped_counts"]
    assert "404" in gone[0]["detail"] or "No such object" in gone[0]["detail"], gone
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 of 9 downloads failed" in m and "retrying those once" in m for m in messages), messages
    assert any("failed again after the retry" in m for m in messages), messages
    assert sum(report["num_examples"].values()) == 8


def test_object_names_that_climb_out_never_leave_the_folder(gcs_bucket, tmp_path):
    """`..` segments and a leading `/` (from `//` in a name) never make a local path outside the folder. (The
    emulator refuses to store a name with `..`; such a name is checked on the name itself.)"""
    from kfp_finetune.components.core import safefiles
    from kfp_finetune.components.core.sources import OUTSIDE_SOURCE, classify

    assert classify(("circle", "..", "..", "evil.jpg")) == OUTSIDE_SOURCE
    for name in ("circle/../../evil.jpg", "/abs/evil.jpg", "..", ""):
        with pytest.raises(ValueError, match="would leave"):
            safefiles.join_inside(tmp_path, name, "object")
    for name in ("pre/circle/a.jpg", "pre//abs/evil.jpg"):
        gcs_bucket.blob(name).upload_from_string(b"x")
    local = tmp_path / "deep" / "local"
    with pytest.raises(UserError, match=r"'/abs/evil.jpg' would leave .*refusing to download"):
        gcs.download_tree(f"gs://{gcs_bucket.name}/pre", local, "--model")
    assert not list(tmp_path.rglob("evil.jpg")) and not Path("/abs/evil.jpg").exists()
    # download_many itself refuses a destination that climbs out, whoever built it.
    with pytest.raises(UserError, match="climbs out"):
        gcs.download_many([f"gs://{gcs_bucket.name}/pre/circle/a.jpg"], [local / "x" / ".." / ".." / "evil.jpg"])
    assert not list(tmp_path.rglob("evil.jpg"))
