"""Drift against the champion's profile on real photos: a class whose share collapses and images that become 64 px
grayscale are refused with a one-line reason, a clean growth of the data passes; and the report's data section is
self-contained."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from kfp_finetune.components.dataprofile.drift import DriftThresholds, compare, tvd
from kfp_finetune.components.dataprofile.leakage import check_leakage
from kfp_finetune.components.dataprofile.neardup import HashRecord
from kfp_finetune.components.dataprofile.profile import Profile, ProfileBuilder
from kfp_finetune.components.dataprofile.reporthtml import html_section
from kfp_finetune.components.dataprofile.stats import ImageStats, image_stats


def _stats(data: bytes) -> ImageStats:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return image_stats(data, im)


def _grey64(data: bytes) -> bytes:
    """What a broken upstream job writes: 64x64 grayscale JPEG thumbnails."""
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("L").resize((64, 64), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=85)
        return buf.getvalue()


@pytest.fixture(scope="module")
def photos(flowers_dir: Path) -> dict[str, list[tuple[str, bytes, ImageStats]]]:
    """class -> the first 100 photos as (name, bytes, stats)."""
    out = {}
    for folder in sorted(d for d in flowers_dir.iterdir() if d.is_dir()):
        out[folder.name] = [(p.name, b, _stats(b)) for p in sorted(folder.glob("*.jpg"))[:100]
                            for b in [p.read_bytes()]]
    return out


def _profile(photos, per_class: dict[str, int] | int, transform=None) -> Profile:
    builder = ProfileBuilder()
    for label, items in photos.items():
        n = per_class if isinstance(per_class, int) else per_class[label]
        for i, (_, data, stats) in enumerate(items[:n]):
            split = "train" if i % 10 < 8 else ("validation" if i % 10 == 8 else "test")
            builder.add(split, label, _stats(transform(data)) if transform else stats)
    return builder.result()


@pytest.fixture(scope="module")
def baseline(photos) -> Profile:
    return _profile(photos, 60)  # the champion's data: 300 photos


def test_clean_growth_passes(photos, baseline):
    grown = _profile(photos, 100)  # 500 photos of the same kinds
    result = compare(grown, baseline, policy="refuse")
    assert result.verdict == "pass", result.message()
    assert result.measures["class_share"]["change"] == pytest.approx(0, abs=1e-9)
    assert max(result.measures["histogram_tvd"].values()) < 0.15


def test_a_collapsing_class_share_is_refused_with_a_reason(photos, baseline):
    broken = _profile(photos, {"daisy": 100, "dandelion": 100, "roses": 100, "sunflowers": 100, "tulips": 8})
    result = compare(broken, baseline, policy="refuse")
    assert result.refused
    finding = next(f for f in result.findings if f.check == "class_share")
    assert finding.subject == "tulips"
    assert "class 'tulips' share 20.0% -> 2.0% (-18.0 points, limit 10)" in result.message()
    assert "\n" not in result.message()
    warned = compare(broken, baseline, policy="warn")
    assert warned.verdict == "warn" and not warned.refused and warned.findings == result.findings
    relaxed = compare(broken, baseline, DriftThresholds.from_mapping({"drift_max_class_share_change": 0.2}), "refuse")
    assert not [f for f in relaxed.findings if f.check == "class_share"]


def test_images_becoming_64px_grayscale_are_refused(photos, baseline):
    thumbs = _profile(photos, 60, transform=_grey64)
    result = compare(thumbs, baseline, policy="refuse")
    assert result.refused
    checks = {f.check: f for f in result.findings}
    assert "resolution collapsed: median short side 160 px -> 64 px (40% of the baseline < 50%)" in result.message()
    assert checks["new_category"].subject == "mode:L"
    assert {f.subject for f in result.findings if f.check == "histogram"} >= {"width", "height", "short_side"}
    # Below the size needed to judge distributions, the resolution and new-mode checks still run.
    few = compare(thumbs, baseline, DriftThresholds(min_images=10_000), "refuse")
    assert {f.check for f in few.findings} == {"resolution", "new_category"}


def test_no_baseline_passes_and_thresholds_are_checked(baseline):
    assert compare(baseline, None, policy="refuse").verdict == "pass"
    assert tvd([1, 0], [0, 1]) == 1.0 and tvd({"a": 2}, {"a": 5}) == 0.0
    with pytest.raises(ValueError, match="unknown drift threshold"):
        DriftThresholds.from_mapping({"drift_max_share": 0.2})
    with pytest.raises(ValueError, match="share"):
        DriftThresholds(max_histogram_distance=3)
    with pytest.raises(ValueError, match="policy"):
        compare(baseline, baseline, policy="stop")


def test_the_report_section_is_self_contained(photos, baseline):
    thumbs = _profile(photos, 60, transform=_grey64)
    images, records = {}, []
    for i, (name, data, stats) in enumerate(photos["roses"][:3]):
        copy = _grey64(data)
        images[f"r{i}"], images[f"g{i}"] = data, copy
        records += [HashRecord.from_stats(f"r{i}", "train", "roses", stats, name=name),
                    HashRecord.from_stats(f"g{i}", "test", "roses", _stats(copy), name=f"thumb-{name}")]
    leakage = check_leakage(records, "move")
    assert len(leakage.pairs) == 3  # a 64 px grey copy is still the same photo
    html = html_section(thumbs, baseline, leakage, images, compare(thumbs, baseline, policy="refuse"))
    assert html.startswith('<section class="dp">') and html.endswith("</section>")
    assert html.count("data:image/jpeg;base64,") == 6  # both images of each pair, inline
    assert all(v.startswith("data:") for v in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html))
    text = re.sub(r'"data:image/jpeg;base64,[A-Za-z0-9+/=]*"', '""', html).lower()  # base64 holds '//'
    for banned in ("http:", "https:", "//", "url(", "@import", "<script", "<link", "<iframe", "<object"):
        assert banned not in text, banned
    assert "tulips" in html and "<svg" in html and "resolution collapsed" in html
