"""components/ingest/rules.py: the dataset rules both ingest runners call (their byte-for-byte equality is tested in
test_beam_ingest.py; these pin the rules themselves)."""

from types import SimpleNamespace

import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.ingest import rules


def test_the_split_depends_on_seed_and_content_only():
    shas = [f"{i:064x}" for i in range(2000)]
    splits = [rules.split_of(sha, 0, 0.1, 0.2) for sha in shas]
    assert splits == [rules.split_of(sha, 0, 0.1, 0.2) for sha in shas]
    share = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert abs(share["test"] - 0.2) < 0.03 and abs(share["validation"] - 0.1) < 0.03
    assert splits != [rules.split_of(sha, 1, 0.1, 0.2) for sha in shas]


def test_shard_counts():
    assert rules.auto_shards(0, 0.8) == 1
    assert rules.auto_shards(10 * rules.TARGET_SHARD_BYTES, 0.5) == 5
    assert rules.auto_shards(10**15, 1.0) == rules.MAX_AUTO_SHARDS
    job = SimpleNamespace(num_shards=None, fractions={"train": 0.8})
    assert rules.num_shards(job, "train", 10 * rules.TARGET_SHARD_BYTES) == 8
    assert rules.num_shards(SimpleNamespace(num_shards=3, fractions={}), "train", 1) == 3


def test_duplicates_are_kept_once_and_conflicts_not_at_all():
    keep, skips = rules.resolve_group([("a/1.jpg", "cat"), ("b/1.jpg", "cat")])
    assert keep == ("a/1.jpg", "cat")
    assert skips == [rules.skip("b/1.jpg", rules.DUPLICATE, "same bytes as a/1.jpg")]
    keep, skips = rules.resolve_group([("a/1.jpg", "cat"), ("b/1.jpg", "dog")])
    assert keep is None and [s["reason"] for s in skips] == [rules.CONFLICT] * 2
    assert skips[0]["detail"] == "identical bytes labelled 'cat', 'dog': a/1.jpg, b/1.jpg"


def test_final_checks():
    job = SimpleNamespace(source="src", max_corrupt_fraction=0.1)
    counts = {"train": {"a": 1, "b": 0}, "validation": {"a": 0, "b": 1}, "test": {"a": 0, "b": 0}}
    rules.final_checks(job, ["a", "b"], counts, [rules.skip("x", rules.DUPLICATE)] * 5, 10, {})
    with pytest.raises(UserError, match=r"2 of 10 image files are unusable \(20.0% > --max-corrupt-fraction 0.1\)"):
        rules.final_checks(job, ["a", "b"], counts, [rules.skip("x", rules.MISSING)] * 2, 10, {})
    counts["validation"]["b"] = 0
    with pytest.raises(UserError, match=r"class 'b' \(src/b\) has no valid image"):
        rules.final_checks(job, ["a", "b"], counts, [], 10, {"b": "src/b"})
    with pytest.raises(UserError, match=r"found 1 class\(es\) \['a'\]; a classifier needs at least 2"):
        rules.check_classes("src", ["a"])
