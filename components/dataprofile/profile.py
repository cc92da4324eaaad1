"""The dataset profile: per split, class counts, fixed-bin histograms of image size, aspect, file size, brightness
and contrast, and counts of format, colour mode and grey images; an accumulator that can be fed one image at a time,
merged (Beam CombineFn style: create / add / merge / extract) and stored as a small JSON.

Every number in a profile is an integer count (or an integer sum), and the bin edges are fixed constants (EDGES,
recorded in the JSON and pinned by SCHEMA_VERSION), so two profiles are always comparable and the result is
identical whatever the order in which images were added or partial profiles merged.

Bins: bin i counts values v with edges[i] <= v < edges[i + 1]; the last bin is open-ended (v >= edges[-1]).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kfp_finetune.components.dataprofile.stats import ImageStats

SCHEMA_VERSION = 1
KIND = "kfp-finetune.dataprofile"
PROFILE_FILE = "data_profile.json"  # the proposed file name beside ingest_report.json and in a pushed version

_SIDES = (0, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024, 1536, 2048, 3072,
          4096)
_SHORT = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 256, 288, 320, 384, 448,
          512, 640, 768, 1024, 1536, 2048, 3072, 4096)
EDGES: dict[str, tuple[float, ...]] = {
    "width": _SIDES,  # pixels
    "height": _SIDES,
    "short_side": _SHORT,  # min(width, height): finer bins, for the resolution-collapse check's median
    "aspect": (0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97, 1.03, 1.12, 1.25, 1.4, 1.6, 1.8, 2.0, 2.5),  # width / height
    "file_size": tuple([0] + [1 << k for k in range(10, 26)]),  # bytes: 1 KiB, 2 KiB, ... 32 MiB
    "brightness": tuple(range(0, 256, 16)),  # mean luma 0-255
    "contrast": tuple(range(0, 128, 8)),  # luma standard deviation 0-127.5
}
HISTOGRAMS = tuple(EDGES)
CATEGORIES = ("format", "mode", "tone")  # tone: 'grey' or 'colour'


def bin_index(edges: tuple[float, ...], value: float) -> int:
    """The bin of `value`: the last i with edges[i] <= value (values below edges[0] go to bin 0)."""
    return max(bisect.bisect_right(edges, value) - 1, 0)


def _values(stats: ImageStats) -> dict[str, float]:
    return {"width": stats.width, "height": stats.height, "short_side": min(stats.width, stats.height),
            "aspect": stats.aspect, "file_size": stats.file_size, "brightness": stats.brightness,
            "contrast": stats.contrast}


def _bump(counts: dict[str, int], key: str, n: int) -> None:
    value = counts.get(key, 0) + n
    if value:
        counts[key] = value
    else:
        del counts[key]


def _add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


@dataclass
class SplitProfile:
    """One split's counts (mutable while building; `ProfileBuilder.result()` hands out copies)."""

    count: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, list[int]] = field(default_factory=lambda: {k: [0] * len(e) for k, e in EDGES.items()})
    categories: dict[str, dict[str, int]] = field(default_factory=lambda: {k: {} for k in CATEGORIES})
    brightness_milli_sum: int = 0
    contrast_milli_sum: int = 0
    exact_duplicates: int = 0  # files skipped as byte-identical copies of an image kept in this split

    def add(self, label: str, stats: ImageStats, duplicates: int = 0, times: int = 1) -> None:
        """Count one image (`times` -1: take back one counted before; keys left at zero go, so taking an image back
        gives exactly the profile that never counted it)."""
        self.count += times
        _bump(self.classes, label, times)
        for name, value in _values(stats).items():
            self.histograms[name][bin_index(EDGES[name], value)] += times
        for name, key in (("format", stats.format or "unknown"), ("mode", stats.mode or "unknown"),
                          ("tone", "grey" if stats.grey else "colour")):
            _bump(self.categories[name], key, times)
        self.brightness_milli_sum += times * stats.brightness_milli
        self.contrast_milli_sum += times * stats.contrast_milli
        self.exact_duplicates += times * duplicates

    def merged(self, other: SplitProfile) -> SplitProfile:
        return SplitProfile(
            count=self.count + other.count,
            classes=_add_counts(self.classes, other.classes),
            histograms={k: [x + y for x, y in zip(self.histograms[k], other.histograms[k], strict=True)]
                        for k in EDGES},
            categories={k: _add_counts(self.categories[k], other.categories[k]) for k in CATEGORIES},
            brightness_milli_sum=self.brightness_milli_sum + other.brightness_milli_sum,
            contrast_milli_sum=self.contrast_milli_sum + other.contrast_milli_sum,
            exact_duplicates=self.exact_duplicates + other.exact_duplicates,
        )

    @property
    def shares(self) -> dict[str, float]:
        return {c: n / self.count for c, n in sorted(self.classes.items())} if self.count else {}

    @property
    def mean_brightness(self) -> float:
        return self.brightness_milli_sum / 1000 / self.count if self.count else 0.0

    @property
    def mean_contrast(self) -> float:
        return self.contrast_milli_sum / 1000 / self.count if self.count else 0.0

    def quantile(self, histogram: str, q: float) -> tuple[float, float]:
        """The bin [lower edge, upper edge) holding the q-quantile of `histogram` (upper inf for the last bin)."""
        counts = self.histograms[histogram]
        edges = EDGES[histogram]
        target = q * self.count
        seen = 0
        for i, c in enumerate(counts):
            seen += c
            if c and seen >= target:
                return float(edges[i]), float(edges[i + 1]) if i + 1 < len(edges) else float("inf")
        return 0.0, 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "classes": dict(sorted(self.classes.items())),
            "class_shares": {c: round(s, 6) for c, s in self.shares.items()},
            "histograms": {k: list(v) for k, v in self.histograms.items()},
            "categories": {k: dict(sorted(v.items())) for k, v in self.categories.items()},
            "brightness_milli_sum": self.brightness_milli_sum,
            "contrast_milli_sum": self.contrast_milli_sum,
            "mean_brightness": round(self.mean_brightness, 3),
            "mean_contrast": round(self.mean_contrast, 3),
            "exact_duplicates": self.exact_duplicates,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SplitProfile:
        hist = {k: [int(x) for x in d["histograms"][k]] for k in EDGES}
        for k, v in hist.items():
            if len(v) != len(EDGES[k]):
                raise ValueError(f"histogram {k!r} has {len(v)} bins, expected {len(EDGES[k])}")
        return cls(
            count=int(d["count"]),
            classes={c: int(n) for c, n in d["classes"].items()},
            histograms=hist,
            categories={k: {c: int(n) for c, n in d["categories"].get(k, {}).items()} for k in CATEGORIES},
            brightness_milli_sum=int(d["brightness_milli_sum"]),
            contrast_milli_sum=int(d["contrast_milli_sum"]),
            exact_duplicates=int(d.get("exact_duplicates", 0)),
        )


@dataclass(frozen=True)
class Profile:
    """A finished profile: {split: SplitProfile}; `overall()` pools the splits."""

    splits: dict[str, SplitProfile]
    meta: dict[str, Any] = field(default_factory=dict)  # free-form: source, data fingerprint, leakage summary...

    def overall(self) -> SplitProfile:
        total = SplitProfile()
        for name in sorted(self.splits):
            total = total.merged(self.splits[name])
        return total

    @property
    def count(self) -> int:
        return sum(s.count for s in self.splits.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "edges": {k: list(v) for k, v in EDGES.items()},
            "splits": {name: self.splits[name].to_json() for name in sorted(self.splits)},
            "overall": self.overall().to_json(),
            "meta": self.meta,
        }

    def dumps(self) -> str:
        """The JSON text (sorted keys, so equal profiles give equal bytes)."""
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Profile:
        if d.get("kind") != KIND:
            raise ValueError(f"not a data profile (kind {d.get('kind')!r})")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"data profile schema_version {version!r}: this code reads {SCHEMA_VERSION}")
        edges = {k: tuple(v) for k, v in d.get("edges", {}).items()}
        if edges != {k: tuple(v) for k, v in EDGES.items()}:
            raise ValueError("data profile bin edges differ from this code's (same schema version): not comparable")
        return cls(splits={name: SplitProfile.from_json(s) for name, s in d["splits"].items()},
                   meta=dict(d.get("meta", {})))

    @classmethod
    def loads(cls, text: str) -> Profile:
        return cls.from_json(json.loads(text))


class ProfileBuilder:
    """The accumulator: add images one at a time, merge partial builders, take the `result()`.

    The Beam shape: `create_accumulator` = ProfileBuilder(), `add_input` = builder.add(...), `merge_accumulators` =
    ProfileBuilder.merge_all(builders), `extract_output` = builder.result(). Picklable; `to_json`/`from_json` too.
    """

    def __init__(self) -> None:
        self.splits: dict[str, SplitProfile] = {}

    def add(self, split: str, label: str, stats: ImageStats, duplicates: int = 0) -> ProfileBuilder:
        """Count one kept image of `split` and `label`; `duplicates`: how many byte-identical files were skipped as
        its copies (ingest's `duplicate` reason)."""
        self.splits.setdefault(split, SplitProfile()).add(label, stats, duplicates)
        return self

    def move(self, old_split: str, new_split: str, label: str, stats: ImageStats, duplicates: int = 0) -> None:
        """Count an image added to `old_split` under `new_split` instead (the leakage policy moved it): the result
        is the profile that added it to `new_split` in the first place."""
        self.splits[old_split].add(label, stats, duplicates, times=-1)
        if not self.splits[old_split].count:
            del self.splits[old_split]
        self.add(new_split, label, stats, duplicates)

    def merge(self, other: ProfileBuilder) -> ProfileBuilder:
        """A new builder holding both (neither input changes)."""
        out = ProfileBuilder()
        for name in sorted(set(self.splits) | set(other.splits)):
            out.splits[name] = self.splits.get(name, SplitProfile()).merged(other.splits.get(name, SplitProfile()))
        return out

    @staticmethod
    def merge_all(builders: Iterable[ProfileBuilder]) -> ProfileBuilder:
        out = ProfileBuilder()
        for b in builders:
            out = out.merge(b)
        return out

    def result(self, meta: Mapping[str, Any] | None = None) -> Profile:
        copy = self.merge(ProfileBuilder())
        return Profile(splits=copy.splits, meta=dict(meta or {}))

    def to_json(self) -> dict[str, Any]:
        return self.result().to_json()

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ProfileBuilder:
        out = cls()
        out.splits = Profile.from_json(d).splits
        return out


def build_profile(items: Iterable[tuple[str, str, ImageStats]], meta: Mapping[str, Any] | None = None) -> Profile:
    """A profile of (split, label, stats) items in one go."""
    builder = ProfileBuilder()
    for split, label, stats in items:
        builder.add(split, label, stats)
    return builder.result(meta)
