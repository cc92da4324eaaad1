"""The leakage policy: what happens to near-duplicates that sit in different splits.

`leakage="move"` (the default) puts each group of near-duplicates into one split; `leakage="report"` keeps the
splits and only reports the pairs. A group is a connected component of the "within the threshold" graph over all
kept images (pairs inside one split included, so that a chain train~test~test moves both test images: moving only
the first would leave the second next to it). Only groups that span more than one split are touched; no image
outside such a group changes split.

Where a group goes: the first of SPLIT_PRECEDENCE (train > validation > test) that any member is in. Why train:
moving into train removes the leak without growing the evaluation splits, and an image only ever moves towards
train, so an image that any earlier model may have trained on never lands in validation or test (the champion and
the challenger are compared on this run's test split: it must not contain the champion's training images). The
rule uses only the members' original splits, which are a function of their content, so the result is the same
whatever the order of the records and whichever runner computed them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kfp_finetune.components.dataprofile.hashing import HASH_NAME, THRESHOLD
from kfp_finetune.components.dataprofile.neardup import HashRecord, Pair, find_pairs

POLICIES = ("move", "report")
# A group larger than this is not one photo and its edits but a chain of look-alikes joined through different photos
# (on the demo's digits one chain holds 1,291 of the 1,797 images; on 300 generated 64 px shapes, four chains of
# 32-49). Moving it would empty the evaluation splits, so it is reported and not moved. Flowers' groups: all 2.
MAX_GROUP = 8
DEFAULT_POLICY = "move"
# ingest_report.json lists at most this many pairs (the first in id order, the same on both runners) and the members
# of at most this many groups; the counts always cover all of them. A chain of look-alikes (digits, above) has
# ~10^5 pairs: listing them all made a report of tens of MB that nobody reads and the report page cannot show.
MAX_LISTED = 1000
SPLIT_PRECEDENCE = ("train", "validation", "test")


@dataclass(frozen=True)
class LeakedPair:
    """A report entry: two near-duplicate images in different splits (splits before any move)."""

    a_id: str
    a_name: str
    a_split: str
    a_label: str
    b_id: str
    b_name: str
    b_split: str
    b_label: str
    distance: int
    kind: str  # 'near' or 'exact'

    @property
    def label_conflict(self) -> bool:
        return self.a_label != self.b_label

    def to_json(self) -> dict[str, Any]:
        return {"a": {"id": self.a_id, "name": self.a_name, "split": self.a_split, "label": self.a_label},
                "b": {"id": self.b_id, "name": self.b_name, "split": self.b_split, "label": self.b_label},
                "distance": self.distance, "kind": self.kind, "label_conflict": self.label_conflict}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LeakedPair:
        a, b = d["a"], d["b"]
        return cls(a["id"], a["name"], a["split"], a["label"], b["id"], b["name"], b["split"], b["label"],
                   int(d["distance"]), d["kind"])

    def line(self) -> str:
        """One line for a log or the ingest report."""
        extra = f" (labels {self.a_label!r} vs {self.b_label!r})" if self.label_conflict else ""
        return (f"{self.a_name or self.a_id} [{self.a_split}] ~ {self.b_name or self.b_id} [{self.b_split}]: "
                f"{self.kind}, {self.distance} bits{extra}")


@dataclass(frozen=True)
class LeakageResult:
    """What the check found and decided.

    pairs: every cross-split pair (sorted); groups: each group that spans splits, as (sorted member ids, target
    split), sorted; moves: id -> new split for each member not already in its group's target (empty under
    'report'). `summary()` gives the counts for ingest_report.json.
    """

    policy: str
    threshold: int
    pairs: tuple[LeakedPair, ...]
    groups: tuple[tuple[tuple[str, ...], str], ...]
    moves: dict[str, str] = field(default_factory=dict)
    max_group: int = MAX_GROUP
    # The counts as written, for a result read back from a report whose lists were cut at MAX_LISTED.
    written_summary: Mapping[str, Any] | None = field(default=None, compare=False)

    def summary(self) -> dict[str, Any]:
        if self.written_summary is not None:
            return dict(self.written_summary)
        return {"policy": self.policy, "hash": HASH_NAME, "threshold": self.threshold,
                "cross_split_pairs": len(self.pairs),
                "exact_pairs": sum(p.kind == "exact" for p in self.pairs),
                "label_conflicts": sum(p.label_conflict for p in self.pairs),
                "groups": len(self.groups), "moved": len(self.moves), "max_group": self.max_group,
                "groups_too_large_to_move": sum(len(ids) > self.max_group for ids, _ in self.groups)}

    def to_json(self, max_listed: int = MAX_LISTED) -> dict[str, Any]:
        """The summary, the moves (all: they are at most max_group per group and decide the splits), and the first
        `max_listed` pairs and groups; `pairs_listed` / `groups_listed` say how many are listed."""
        pairs, groups = self.pairs[:max_listed], self.groups[:max_listed]
        return {**self.summary(), "pairs_listed": len(pairs), "groups_listed": len(groups),
                "pairs": [p.to_json() for p in pairs],
                "group_members": [{"ids": list(ids[:max_listed]), "split": split, "size": len(ids)}
                                  for ids, split in groups],
                "moves": dict(sorted(self.moves.items()))}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LeakageResult:
        return cls(policy=d["policy"], threshold=int(d["threshold"]),
                   pairs=tuple(LeakedPair.from_json(p) for p in d["pairs"]),
                   groups=tuple((tuple(g["ids"]), g["split"]) for g in d["group_members"]),
                   moves=dict(d["moves"]), max_group=int(d.get("max_group", MAX_GROUP)),
                   written_summary={k: d[k] for k in _SUMMARY_KEYS if k in d} if "pairs_listed" in d else None)


_SUMMARY_KEYS = ("policy", "hash", "threshold", "cross_split_pairs", "exact_pairs", "label_conflicts", "groups",
                 "moved", "max_group", "groups_too_large_to_move")


def _rank(split: str) -> tuple[int, str]:
    return (SPLIT_PRECEDENCE.index(split), "") if split in SPLIT_PRECEDENCE else (len(SPLIT_PRECEDENCE), split)


def check_leakage(records: Iterable[HashRecord], policy: str = DEFAULT_POLICY, threshold: int = THRESHOLD,
                  pairs: Iterable[Pair] | None = None, max_group: int = MAX_GROUP) -> LeakageResult:
    """Find near-duplicates across splits among `records` and apply `policy` ('move' or 'report').

    `max_group`: a group with more members is reported but never moved (see MAX_GROUP).

    `pairs`: the output of `neardup.find_pairs(records, threshold)` when already computed (all pairs, within
    splits too); computed here otherwise.
    """
    if policy not in POLICIES:
        raise ValueError(f"leakage policy {policy!r}: expected one of {', '.join(POLICIES)}")
    by_id = {r.id: r for r in records}
    all_pairs = list(pairs) if pairs is not None else find_pairs(by_id.values(), threshold)

    parent = {i: i for i in by_id}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in all_pairs:
        ra, rb = root(p.a), root(p.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # by id: the union does not depend on the order of the pairs
    components: dict[str, list[str]] = {}
    for p in all_pairs:
        for x in (p.a, p.b):
            components.setdefault(root(x), [])
    for x in by_id:
        r = root(x)
        if r in components:
            components[r].append(x)
    groups = []
    moves: dict[str, str] = {}
    for members in components.values():
        splits = {by_id[m].split for m in members}
        if len(splits) < 2:
            continue
        target = min(splits, key=_rank)
        groups.append((tuple(sorted(members)), target))
        if policy == "move" and len(members) <= max_group:
            moves.update({m: target for m in members if by_id[m].split != target})
    leaked = []
    for p in all_pairs:
        a, b = by_id[p.a], by_id[p.b]
        if a.split != b.split:
            leaked.append(LeakedPair(a.id, a.name, a.split, a.label, b.id, b.name, b.split, b.label,
                                     p.distance, p.kind))
    leaked.sort(key=lambda lp: (lp.a_id, lp.b_id))
    return LeakageResult(policy=policy, threshold=threshold, pairs=tuple(leaked), groups=tuple(sorted(groups)),
                         moves=dict(sorted(moves.items())), max_group=max_group)


def apply_moves(split_of: Mapping[str, str], moves: Mapping[str, str]) -> dict[str, str]:
    """id -> split after the moves (a convenience for callers that keep the splits in a dict)."""
    return {i: moves.get(i, s) for i, s in split_of.items()}
