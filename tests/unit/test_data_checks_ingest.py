"""Issue 23 through ingest, on real photos: near-duplicates across splits are found after re-encoding, resizing and
a small crop, reported with both file names, and moved into one split the same way on the local and the Beam runner
(the same shards, byte for byte, and the same data_profile.json); nothing outside a group changes split."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from kfp_finetune.components.dataprofile import PROFILE_FILE, Profile
from kfp_finetune.components.ingest import rules, tfds_format
from kfp_finetune.components.ingest.step import IngestConfig, ingest, profile_source

PER_CLASS = 8
CLASSES = ("daisy", "roses", "tulips")


def _edit(data: bytes, how: str) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if how == "resize":
        im = im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)
    elif how == "crop":
        dx, dy = im.width * 5 // 100, im.height * 5 // 100
        im = im.crop((dx, dy, im.width - dx, im.height - dy))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=50)
    return buf.getvalue()


def _split(data: bytes) -> str:
    return rules.split_of(hashlib.sha256(data).hexdigest(), 0, 0.25, 0.25)


def leaky_folder(flowers: Path, root: Path) -> list[tuple[str, str]]:
    """PER_CLASS photos per class, plus an edited copy (JPEG q50 / half size / 5 % crop) of the first photos whose
    copy lands in another split than the original: the planted leaks, as (original name, copy name)."""
    planted = []
    edits = iter(("reencode", "resize", "crop"))
    how = next(edits)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for photo in sorted((flowers / name).glob("*.jpg"))[:PER_CLASS]:
            shutil.copy(photo, root / name / photo.name)
            data = photo.read_bytes()
            if how and _split(_edit(data, how)) != _split(data):
                copy = root / name / f"{how}-of-{photo.name}"
                copy.write_bytes(_edit(data, how))
                planted.append((str(root / name / photo.name), str(copy)))
                how = next(edits, None)
    assert len(planted) == 3, "not enough photos to plant a leak of each kind"
    return planted


def split_of_each(dataset: Path) -> dict[str, str]:
    """sha256 of each stored image -> its split (the photos are JPEGs, stored unchanged)."""
    out = {}
    for shard in dataset.glob("images-*.tfrecord-*"):
        split = shard.name.split("-")[1].split(".")[0]
        for record in tfds_format.read_records(shard):
            start = record.index(b"\xff\xd8\xff")
            end = record.rindex(b"\xff\xd9") + 2
            out[hashlib.sha256(record[start:end]).hexdigest()] = split
    return out


@pytest.fixture
def leaky(flowers_dir, tmp_path) -> tuple[Path, list[tuple[str, str]]]:
    root = tmp_path / "src"
    return root, leaky_folder(flowers_dir, root)


def test_planted_leaks_are_moved_the_same_way_on_both_runners(leaky, tmp_path):
    pytest.importorskip("apache_beam")
    from tests.unit.test_beam_ingest import IN_MEMORY, assert_same_dataset, run_both

    root, planted = leaky
    local, beam = run_both(root, tmp_path, beam_options=IN_MEMORY, val_fraction=0.25, test_fraction=0.25)
    assert_same_dataset(local, beam)  # shards, metadata and data_profile.json byte for byte; the leakage decision
    report = json.loads((local / "ingest_report.json").read_text())
    leak = report["leakage"]
    pairs = {frozenset((p["a"]["name"], p["b"]["name"])) for p in leak["pairs"]}
    for original, copy in planted:
        assert frozenset((original, copy)) in pairs, f"{copy} not found as a near-duplicate of {original}"
    assert leak["policy"] == "move" and leak["cross_split_pairs"] == len(pairs) >= 3 and leak["moved"] >= 3

    stored = split_of_each(local)
    in_groups = {i for g in leak["group_members"] for i in g["ids"]}
    for group in leak["group_members"]:
        assert {stored[i] for i in group["ids"]} == {group["split"]}
    for sha, split in stored.items():  # everything else stays in its content-hash split
        if sha not in in_groups:
            assert split == rules.split_of(sha, 0, 0.25, 0.25)
    profile = Profile.loads((local / PROFILE_FILE).read_text())
    assert profile.count == sum(report["num_examples"].values())
    assert {s: sum(p.classes.values()) for s, p in profile.splits.items()} == {
        s: n for s, n in report["num_examples"].items() if n}
    assert profile.meta["leakage"]["moved"] == leak["moved"]


def test_report_policy_lists_the_same_pairs_and_moves_nothing(leaky, tmp_path):
    root, planted = leaky
    moved = ingest(IngestConfig(source=str(root), output=str(tmp_path / "m"), val_fraction=0.25, test_fraction=0.25))
    kept = ingest(IngestConfig(source=str(root), output=str(tmp_path / "r"), val_fraction=0.25, test_fraction=0.25,
                               leakage="report"))
    a, b = moved.report["leakage"], kept.report["leakage"]
    assert a["pairs"] == b["pairs"] and b["moved"] == 0 and b["moves"] == {}
    stored = split_of_each(tmp_path / "r")
    assert all(split == rules.split_of(sha, 0, 0.25, 0.25) for sha, split in stored.items())


def test_profile_of_a_source_equals_the_one_ingest_writes(leaky, tmp_path):
    root, _ = leaky
    config = IngestConfig(source=str(root), output=str(tmp_path / "ds"), val_fraction=0.25, test_fraction=0.25)
    profile, report = profile_source(config)
    assert not (tmp_path / "ds").exists()
    ingest(config)
    assert (tmp_path / "ds" / PROFILE_FILE).read_text() == profile.dumps()
    assert report["leakage"]["moved"] >= 3


def test_bad_leakage_policy_is_one_line(tmp_path):
    from kfp_finetune.components.core.errors import UserError

    with pytest.raises(UserError, match="--leakage must be one of"):
        IngestConfig(source="x", output=str(tmp_path / "o"), leakage="drop")


def test_report_data_section_shows_the_leaked_pairs_and_the_drift_verdict_offline(leaky, tmp_path):
    import re

    from kfp_finetune.components.dataprofile import compare
    from kfp_finetune.components.evaluate import datasection

    root, planted = leaky
    out = tmp_path / "ds"
    result = ingest(IngestConfig(source=str(root), output=str(out), val_fraction=0.25, test_fraction=0.25))
    profile = Profile.loads((out / PROFILE_FILE).read_text())
    drift = compare(profile, profile, policy="refuse")
    champion_dir = tmp_path / "push" / "v1"
    champion_dir.mkdir(parents=True)
    shutil.copy(out / PROFILE_FILE, champion_dir / PROFILE_FILE)
    html = datasection.render(str(out), result.report, {"version": "v1", "uri": str(champion_dir)},
                              datasection.read_drift(json.dumps(drift.to_json())))
    pairs = result.report["leakage"]["cross_split_pairs"]
    assert html.count('src="data:image/jpeg;base64,') == 2 * pairs >= 6  # both photos of each pair, inline
    for original, copy in planted:
        assert Path(original).name in html and Path(copy).name in html
    assert "drift against the champion" in html and "<b>pass</b>" in html and "no champion profile" not in html
    assert re.findall(r'(?:src|href)="(?!data:)', html) == [] and "<script" not in html
    assert datasection.render(str(tmp_path), {}, {}, None) == ""  # a Dataset from before profiles: no section
