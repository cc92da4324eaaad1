"""Drift: this run's data profile against a baseline (the champion's), with thresholds and a warn / refuse verdict.

Checks, each on the profiles pooled over all splits (more images, less noise than one split):
- class share: the largest absolute change of a class's share, over the classes present in both (shares
  renormalised over those classes: adding or removing a class folder is `class_change`'s business, not drift);
- histograms (width, height, short side, aspect ratio, file size, brightness, contrast): total variation distance
  (TVD) = half the sum of absolute differences of the bin shares = the share of images that would have to change bin
  to turn one distribution into the other. Chosen over PSI because it is bounded (0..1), defined when a bin is empty
  on one side (PSI divides by zero there and needs an arbitrary epsilon), and reads directly as a share of images;
- categories (format, colour mode, grey vs colour): TVD likewise, and any category absent from the baseline that
  now holds at least `min_new_category_share` of the images (a new colour mode or format);
- resolution collapse: the median short side (to its histogram bin) falls below `min_resolution_ratio` x the
  baseline's, or below the absolute floor `min_short_side`.
Class shares, histogram and category distances need `min_images` on both sides (fewer images are too noisy to
judge: see docs/data-checks.md for the noise measured on the flowers photos); new categories and the resolution
check always run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kfp_finetune.components.dataprofile.profile import CATEGORIES, HISTOGRAMS, Profile, SplitProfile

POLICIES = ("warn", "refuse")
DEFAULT_POLICY = "warn"

@dataclass(frozen=True)
class DriftThresholds:
    """The limits of each drift check. Proposed pipeline parameters: `drift_<field name>` (e.g.
    `drift_max_class_share_change=0.15`), and `data_drift=warn|refuse` for the policy."""

    # Largest tolerated absolute change of one class's share (0.10 = 10 points), classes present in both.
    # A broken feed (20 % -> 2 %) moves 18 points; sampling noise between independent draws of 750 photos: <= 6.4.
    max_class_share_change: float = 0.10
    # Largest tolerated TVD of a size / file-size / brightness / contrast histogram. Noise between independent draws
    # of 750 flowers photos: <= 0.10 (200: <= 0.19); 64 px thumbnails instead of photos: 1.0 on every size histogram.
    max_histogram_distance: float = 0.25
    # Largest tolerated TVD of the format, colour-mode and grey/colour counts.
    max_category_distance: float = 0.25
    # A format / colour mode / tone absent from the baseline is a finding when it holds at least this share.
    min_new_category_share: float = 0.01
    # Median short side below this fraction of the baseline's is a resolution collapse.
    min_resolution_ratio: float = 0.5
    # Median short side below this many pixels is a collapse whatever the baseline.
    min_short_side: int = 32
    # Class-share, histogram and category checks need at least this many images in each profile: between two
    # independent draws of 200 flowers photos the worst of 20 draws had TVD 0.19 and a class share 11 points apart.
    min_images: int = 200

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"drift threshold {f.name}={value!r} must be a number >= 0")
        for name in ("max_class_share_change", "max_histogram_distance", "max_category_distance",
                     "min_new_category_share", "min_resolution_ratio"):
            if getattr(self, name) > 1:
                raise ValueError(f"drift threshold {name}={getattr(self, name)!r} is a share: give a value in [0, 1]")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DriftThresholds:
        """From {'max_class_share_change': 0.15, ...} or the pipeline-parameter spelling {'drift_max_...': ...};
        unknown names raise."""
        names = {f.name for f in fields(cls)}
        out = {}
        for key, value in values.items():
            name = key[len("drift_"):] if key.startswith("drift_") else key
            if name not in names:
                raise ValueError(f"unknown drift threshold {key!r}; known: {', '.join(sorted(names))}")
            out[name] = value
        return cls(**out)

@dataclass(frozen=True)
class Finding:
    check: str  # class_share | histogram | category | new_category | resolution
    subject: str  # the class, histogram or category name
    value: float
    threshold: float
    reason: str  # one line, for people

@dataclass(frozen=True)
class DriftResult:
    policy: str
    verdict: str  # pass | warn | refuse
    findings: tuple[Finding, ...]
    measures: dict[str, Any] = field(default_factory=dict)  # every distance computed, findings or not
    note: str = ""

    @property
    def refused(self) -> bool:
        return self.verdict == "refuse"

    def message(self) -> str:
        """One line: the verdict and every reason."""
        if not self.findings:
            return f"data drift: pass{(' (' + self.note + ')') if self.note else ''}"
        return f"data drift: {self.verdict}: " + "; ".join(f.reason for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "verdict": self.verdict, "message": self.message(), "note": self.note,
                "findings": [asdict(f) for f in self.findings], "measures": self.measures}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DriftResult:
        return cls(policy=d["policy"], verdict=d["verdict"], findings=tuple(Finding(**f) for f in d["findings"]),
                   measures=dict(d.get("measures") or {}), note=d.get("note", ""))

def tvd(a: Mapping[str, int] | list[int], b: Mapping[str, int] | list[int]) -> float:
    """Total variation distance of two count vectors (lists of equal length, or dicts over the union of keys)."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        keys = sorted(set(a) | set(b))
        a, b = [a.get(k, 0) for k in keys], [b.get(k, 0) for k in keys]
    na, nb = sum(a), sum(b)
    if not na or not nb:
        return 0.0
    return 0.5 * sum(abs(x / na - y / nb) for x, y in zip(a, b, strict=True))

def _shares(counts: Mapping[str, int], keys: list[str]) -> dict[str, float]:
    total = sum(counts.get(k, 0) for k in keys)
    return {k: counts.get(k, 0) / total if total else 0.0 for k in keys}

def median_short_side(p: SplitProfile) -> float:
    return p.quantile("short_side", 0.5)[0]

def compare(current: Profile, baseline: Profile | None, thresholds: DriftThresholds | None = None,
            policy: str = DEFAULT_POLICY) -> DriftResult:
    """Compare `current` with `baseline` (None: no champion yet, pass) and decide per `policy`."""
    if policy not in POLICIES:
        raise ValueError(f"data_drift policy {policy!r}: expected one of {', '.join(POLICIES)}")
    t = thresholds or DriftThresholds()
    if baseline is None:
        return DriftResult(policy, "pass", (), {}, note="no baseline profile (no champion yet)")
    cur, base = current.overall(), baseline.overall()
    if not cur.count or not base.count:
        return DriftResult(policy, "pass", (), {}, note="an empty profile: nothing to compare")
    findings: list[Finding] = []
    measures: dict[str, Any] = {"images": {"current": cur.count, "baseline": base.count}}

    enough = cur.count >= t.min_images and base.count >= t.min_images
    measures["distributions_checked"] = enough
    common = sorted(set(cur.classes) & set(base.classes))
    if common:
        cs, bs = _shares(cur.classes, common), _shares(base.classes, common)
        worst = max(common, key=lambda c: (abs(cs[c] - bs[c]), c))
        change = cs[worst] - bs[worst]
        measures["class_share"] = {"class": worst, "baseline": round(bs[worst], 4), "current": round(cs[worst], 4),
                                   "change": round(change, 4)}
        if enough and abs(change) > t.max_class_share_change:
            findings.append(Finding(
                "class_share", worst, round(abs(change), 4), t.max_class_share_change,
                f"class {worst!r} share {bs[worst]:.1%} -> {cs[worst]:.1%} ({100 * change:+.1f} points, "
                f"limit {100 * t.max_class_share_change:.0f})"))

    for name in HISTOGRAMS:
        d = tvd(cur.histograms[name], base.histograms[name])
        measures.setdefault("histogram_tvd", {})[name] = round(d, 4)
        if enough and d > t.max_histogram_distance:
            findings.append(Finding("histogram", name, round(d, 4), t.max_histogram_distance,
                                    f"{name} distribution moved: TVD {d:.2f} > {t.max_histogram_distance:.2f} "
                                    f"({_describe(name, base, cur)})"))
    for name in CATEGORIES:
        c, b = cur.categories[name], base.categories[name]
        d = tvd(c, b)
        measures.setdefault("category_tvd", {})[name] = round(d, 4)
        new = sorted(k for k in c if not b.get(k) and c[k] / cur.count >= max(t.min_new_category_share, 1e-12))
        for k in new:
            findings.append(Finding("new_category", f"{name}:{k}", round(c[k] / cur.count, 4),
                                    t.min_new_category_share,
                                    f"new {_CATEGORY_WORD[name]} {k!r}: {c[k] / cur.count:.1%} of images "
                                    f"(none in the baseline)"))
        if enough and d > t.max_category_distance and not new:
            findings.append(Finding("category", name, round(d, 4), t.max_category_distance,
                                    f"{_CATEGORY_WORD[name]} mix moved: TVD {d:.2f} > {t.max_category_distance:.2f} "
                                    f"({_mix(b, base.count)} -> {_mix(c, cur.count)})"))

    cm, bm = median_short_side(cur), median_short_side(base)
    measures["median_short_side"] = {"current": cm, "baseline": bm}
    if cm < t.min_short_side:
        findings.append(Finding("resolution", "short_side", cm, t.min_short_side,
                                f"median short side {cm:.0f} px is below the floor {t.min_short_side} px "
                                f"(baseline {bm:.0f} px)"))
    elif bm and cm < t.min_resolution_ratio * bm:
        findings.append(Finding("resolution", "short_side", round(cm / bm, 4), t.min_resolution_ratio,
                                f"resolution collapsed: median short side {bm:.0f} px -> {cm:.0f} px "
                                f"({cm / bm:.0%} of the baseline < {t.min_resolution_ratio:.0%})"))
    findings.sort(key=lambda f: _PRIORITY.index(f.check))  # the most telling reason first in the one line
    verdict = "pass" if not findings else ("refuse" if policy == "refuse" else "warn")
    return DriftResult(policy, verdict, tuple(findings), measures)


_PRIORITY = ("resolution", "class_share", "new_category", "category", "histogram")

_CATEGORY_WORD = {"format": "format", "mode": "colour mode", "tone": "tone"}

def _mix(counts: Mapping[str, int], n: int) -> str:
    return ", ".join(f"{k} {v / n:.0%}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3])

def _describe(name: str, base: SplitProfile, cur: SplitProfile) -> str:
    """The median bin on each side, e.g. 'median 160-176 -> 64-80'."""
    lo_b, hi_b = base.quantile(name, 0.5)
    lo_c, hi_c = cur.quantile(name, 0.5)
    return f"median bin {_bin(name, lo_b, hi_b)} -> {_bin(name, lo_c, hi_c)}"

def _bin(name: str, lo: float, hi: float) -> str:
    def fmt(x: float) -> str:
        if x == float("inf"):
            return "inf"
        if name == "file_size":
            return f"{x / 1024:g}K"
        return f"{x:g}"

    return f"{fmt(lo)}-{fmt(hi)}"
