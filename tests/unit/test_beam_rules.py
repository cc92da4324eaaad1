"""The Beam ingest applies the local ingest's file rules (issue 20): on the hostile-source matrix of
tests/unit/test_hostile_sources.py (symlinks out to a file, a folder and /dev/zero, a FIFO, a socket, a corrupt
file, an in-root symlink), `--runner direct` skips the same files for the same reasons, names the same classes,
and writes the very same shards as `--runner local`. Beam's in-memory DirectRunner, on real files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("apache_beam", reason="needs the beam extra: pip install -e '.[beam]'")

from tests import imagegen  # noqa: E402
from tests.unit.test_beam_ingest import IN_MEMORY, assert_same_dataset, run_both  # noqa: E402
from tests.unit.test_hostile_sources import CLASSES, _make_hostile, _stored_images  # noqa: E402

pytestmark = pytest.mark.timeout(180)  # a hang (reading a FIFO or /dev/zero) must fail the test, not the session


def test_beam_skips_what_the_local_ingest_skips_for_the_same_reasons(tmp_path):
    src = imagegen.write_class_folder(tmp_path / "src", classes=CLASSES, per_class=5, size=16)
    expected = _make_hostile(src, tmp_path / "outside")
    big = src / "square" / "huge.jpg"  # sparse: over the 256 MiB bound without using the disk
    with open(big, "wb") as fh:
        fh.truncate((256 << 20) + 1)
    expected["huge.jpg"] = "too_large"
    local, beam = run_both(src, tmp_path, beam_options=IN_MEMORY, max_corrupt_fraction=1.0, num_shards=2)
    assert_same_dataset(local, beam)
    report = json.loads((beam / "ingest_report.json").read_text())
    assert report["class_names"] == list(CLASSES)  # the symlinked outside folder is no class
    assert {Path(s["path"]).name: s["reason"] for s in report["skipped"]} == expected
    local_report = json.loads((local / "ingest_report.json").read_text())
    assert report["skipped"] == local_report["skipped"]  # same paths, reasons and details
    stored = _stored_images(beam)
    assert (tmp_path / "outside" / "secret.jpg").read_bytes() not in stored
    assert not any(p.read_bytes() in stored for p in (tmp_path / "outside" / "stolen").rglob("*.jpg"))


def test_beam_manifest_rows_report_their_skips_like_the_local_ingest(tmp_path):
    src = imagegen.write_class_folder(tmp_path / "src", classes=CLASSES, per_class=4, size=16)
    _make_hostile(src, tmp_path / "outside")
    rows = [f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(src.glob("*/*_00[0-3].jpg"))]
    rows += ["circle/shadow.jpg,circle", "circle/zero.jpg,circle", "square/pipe.jpg,square"]
    (src / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    local, beam = run_both(src / "m.csv", tmp_path, beam_options=IN_MEMORY, max_corrupt_fraction=1.0, num_shards=1)
    assert_same_dataset(local, beam)
    report = json.loads((beam / "ingest_report.json").read_text())
    assert {Path(s["path"]).name: s["reason"] for s in report["skipped"]} == {
        "shadow.jpg": "outside_source", "zero.jpg": "outside_source", "pipe.jpg": "not_regular_file"}
    assert os.path.realpath(src / "circle" / "zero.jpg") == "/dev/zero"
