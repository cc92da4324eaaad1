"""The leakage policy on real photos and on constructed hashes: `move` puts each cross-split group into one split by
train > validation > test, the same whatever the input order, and moves nothing else; `report` moves nothing."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from PIL import Image

from kfp_finetune.components.dataprofile.hashing import THRESHOLD
from kfp_finetune.components.dataprofile.leakage import LeakageResult, apply_moves, check_leakage
from kfp_finetune.components.dataprofile.measure import edit
from kfp_finetune.components.dataprofile.neardup import HashRecord, find_pairs
from kfp_finetune.components.dataprofile.stats import image_stats

SPLITS = ("train", "validation", "test")


def _stats(data: bytes):
    im = Image.open(io.BytesIO(data))
    im.load()
    return image_stats(data, im)


@pytest.fixture(scope="module")
def photo_records(flowers_dir: Path) -> tuple[list[HashRecord], dict[str, str]]:
    """30 photos spread over the splits, plus an edited copy of every third one in another split.
    Returns the records and {copy id: original id}."""
    folders = sorted(d for d in flowers_dir.iterdir() if d.is_dir())
    photos = [p for c in folders for p in sorted(c.glob("*.jpg"))[10:16]]
    records, copies = [], {}
    kinds = ("jpeg50", "half", "crop5")
    for i, path in enumerate(photos):
        data = path.read_bytes()
        split = SPLITS[i % 3]
        ident = f"p{i:02d}"
        records.append(HashRecord.from_stats(ident, split, path.parent.name, _stats(data), name=path.name))
        if i % 3 == 0 or i % 5 == 0:
            buf = io.BytesIO()
            edit(Image.open(io.BytesIO(data)).convert("RGB"), kinds[i % 3]).save(buf, "JPEG", quality=90)
            other = SPLITS[(i + 1 + i % 2) % 3]
            cid = f"c{i:02d}"
            records.append(HashRecord.from_stats(cid, other, path.parent.name, _stats(buf.getvalue()),
                                                 name=f"copy-of-{path.name}"))
            copies[cid] = ident
    return records, copies


def test_move_puts_each_leaked_pair_into_the_higher_split_and_nothing_else_moves(photo_records):
    records, copies = photo_records
    split = {r.id: r.split for r in records}
    result = check_leakage(records, "move")
    pairs = {(p.a_id, p.b_id) for p in result.pairs}
    assert {tuple(sorted((c, o))) for c, o in copies.items()} <= pairs  # every copy found across splits
    grouped = {m for ids, _ in result.groups for m in ids}
    assert set(result.moves) <= grouped  # only members of a cross-split group move
    assert set(result.moves), "some copies sit in a lower split than their original: they must move"
    for c, o in copies.items():
        want = min(split[c], split[o], key=SPLITS.index)
        after = apply_moves(split, result.moves)
        assert after[c] == after[o] == want, (c, o, split[c], split[o])
    untouched = {i for i in split if i not in grouped}
    assert all(apply_moves(split, result.moves)[i] == split[i] for i in untouched)
    # After the moves no pair within the threshold straddles two splits.
    moved = [HashRecord(r.id, result.moves.get(r.id, r.split), r.label, r.hashes, r.name) for r in records]
    assert find_pairs(moved, cross_split_only=True) == []
    for p in result.pairs:
        assert p.a_name and p.b_name and 0 <= p.distance <= THRESHOLD


def test_the_decision_does_not_depend_on_the_order_of_the_records(photo_records):
    records, _ = photo_records
    reference = check_leakage(records, "move")
    rng = random.Random(5)
    for _ in range(4):
        shuffled = records[:]
        rng.shuffle(shuffled)
        again = check_leakage(shuffled, "move")
        assert again.moves == reference.moves and again.pairs == reference.pairs and again.groups == reference.groups
    # Precomputed pairs (e.g. on another worker) give the same answer, and the JSON round-trips.
    same = check_leakage(records, "move", pairs=find_pairs(list(reversed(records))))
    assert same.to_json() == reference.to_json()
    assert LeakageResult.from_json(reference.to_json()) == reference


def test_report_keeps_the_splits_and_reports_the_same_pairs(photo_records):
    records, _ = photo_records
    report, move = check_leakage(records, "report"), check_leakage(records, "move")
    assert report.moves == {} and report.pairs == move.pairs and report.pairs
    assert report.summary()["moved"] == 0 and move.summary()["moved"] == len(move.moves) > 0
    with pytest.raises(ValueError, match="leakage policy"):
        check_leakage(records, "drop")


def _flip(h: int, bits: range) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def test_a_chain_moves_as_one_group_by_precedence():
    a = 0x0F0F_0F0F_0F0F_0F0F
    b = _flip(a, range(0, 8))  # 8 bits from a
    c = _flip(b, range(32, 40))  # 8 bits from b, 16 from a: within reach only through b
    lone = _flip(a, range(8, 40))  # 32 bits from a: no group
    recs = [HashRecord("a", "test", "x", (a,)), HashRecord("b", "validation", "x", (b,)),
            HashRecord("c", "test", "x", (c,)), HashRecord("d", "test", "x", (lone,)),
            HashRecord("e", "train", "y", (_flip(lone, range(40, 64)),))]
    result = check_leakage(recs, "move")
    assert result.groups == ((("a", "b", "c"), "validation"),)
    assert result.moves == {"a": "validation", "c": "validation"}
    assert [(p.a_id, p.b_id) for p in result.pairs] == [("a", "b"), ("b", "c")]  # a~c is 16 bits: not a pair
    recs.append(HashRecord("f", "train", "z", (_flip(c, range(60, 62)),)))  # a train near-copy of c: all to train
    result = check_leakage(recs, "move")
    assert result.groups == ((("a", "b", "c", "f"), "train"),)
    assert result.moves == {"a": "train", "b": "train", "c": "train"}
    assert any(p.label_conflict for p in result.pairs)  # c (x) ~ f (z)


def test_the_report_lists_a_bounded_number_of_pairs_but_counts_them_all():
    # 40 look-alikes (one hash, two bits apart at most) over three splits: 40 * 39 / 2 = 780 pairs within the
    # threshold, 533 of them across splits, in one group too large to move.
    base = 0x0F0F_0F0F_0F0F_0F0F
    recs = [HashRecord(f"r{i:02d}", SPLITS[i % 3], "x", (_flip(base, [i % 64]),)) for i in range(40)]
    result = check_leakage(recs, "move")
    assert len(result.pairs) == sum(1 for i in range(40) for j in range(i + 1, 40) if i % 3 != j % 3) == 533
    written = result.to_json(max_listed=100)
    assert written["cross_split_pairs"] == 533 and written["pairs_listed"] == 100 and len(written["pairs"]) == 100
    assert [(p["a"]["id"], p["b"]["id"]) for p in written["pairs"]] == [(p.a_id, p.b_id) for p in result.pairs[:100]]
    assert written["groups_too_large_to_move"] == 1 and written["moved"] == 0
    assert written["group_members"] == [{"ids": [r.id for r in recs][:100], "split": "train", "size": 40}]
    again = LeakageResult.from_json(written)
    assert again.summary() == result.summary()  # the counts survive the cut list
    assert len(again.pairs) == 100
    assert LeakageResult.from_json(result.to_json()).summary() == result.summary()
