"""The profile accumulator and the per-image stats: the same JSON whatever the order of adds and merges, a JSON round
trip, formats and colour modes as Pillow reports them, and comparable (fixed) bins."""

from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kfp_finetune.components.dataprofile.profile import EDGES, SCHEMA_VERSION, Profile, ProfileBuilder, bin_index
from kfp_finetune.components.dataprofile.stats import ImageStats, image_stats
from tests import imagegen


def _stats(path: Path) -> ImageStats:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return image_stats(data, im)


@pytest.fixture(scope="module")
def items(flowers_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, ImageStats]]:
    """(split, label, stats): 12 flowers photos per class and one generated file of every valid kind."""
    out = []
    folders = sorted(d for d in flowers_dir.iterdir() if d.is_dir())
    for c in folders:
        for i, p in enumerate(sorted(c.glob("*.jpg"))[:12]):
            out.append((("train", "validation", "test")[i % 3], c.name, _stats(p)))
    factory = imagegen.ImageFactory(tmp_path_factory.mktemp("kinds"))
    for kind in imagegen.ImageFactory.VALID:
        out.append(("train", "generated", _stats(factory.make(kind, size=48))))
    return out


def _build(items, order_seed: int, parts: int) -> Profile:
    """Shuffle, cut into `parts` builders, merge them in a random tree."""
    rng = random.Random(order_seed)
    xs = [(item, i % 2) for i, item in enumerate(items)]  # every other image had one identical file skipped
    rng.shuffle(xs)
    builders = [ProfileBuilder() for _ in range(parts)]
    for k, ((split, label, stats), duplicates) in enumerate(xs):
        builders[k % parts].add(split, label, stats, duplicates=duplicates)
    while len(builders) > 1:
        rng.shuffle(builders)
        a, b = builders.pop(), builders.pop()
        builders.append(a.merge(b) if rng.random() < 0.5 else b.merge(a))
    return builders[0].result({"source": "test"})


def test_profile_is_the_same_whatever_the_order_and_the_merges(items):
    reference = _build(items, 0, 1).dumps()
    for seed, parts in ((1, 1), (2, 3), (3, 7), (4, len(items))):
        assert _build(items, seed, parts).dumps() == reference
    profile = Profile.loads(reference)
    assert profile.dumps() == reference  # round trip, byte for byte
    assert len(reference) < 20_000  # small enough to push with every version
    data = json.loads(reference)
    assert data["schema_version"] == SCHEMA_VERSION and data["edges"]["width"] == list(EDGES["width"])
    assert sum(data["overall"]["classes"].values()) == len(items) == profile.count
    assert data["overall"]["exact_duplicates"] == len(items) // 2
    assert pickle.loads(pickle.dumps(ProfileBuilder().add("train", "a", items[0][2]))).result().count == 1


def test_moving_counted_images_gives_the_profile_built_with_their_new_splits(items):
    """The local ingest counts every image under its content-hash split while the leakage decision runs, then moves
    the few it moved: the bytes must be those of a profile built with the final splits (the Beam runner's)."""
    rng = random.Random(5)
    moves = {i: rng.choice(("train", "validation", "test")) for i in rng.sample(range(len(items)), 12)}
    # Every image of class 'generated' moves from train to validation: its train key must vanish, not stay at 0.
    moves.update({i: "validation" for i, (_, label, _) in enumerate(items) if label == "generated"})
    # And a split left with nothing must vanish too: one image alone in split 'extra', moved to train.
    items = [*items, ("extra", "lonely", items[0][2])]
    moves[len(items) - 1] = "train"
    final = [(moves.get(i, split), label, stats) for i, (split, label, stats) in enumerate(items)]
    expected = ProfileBuilder()
    for i, (split, label, stats) in enumerate(final):
        expected.add(split, label, stats, duplicates=i % 2)
    moved = ProfileBuilder()
    for i, (split, label, stats) in enumerate(items):
        moved.add(split, label, stats, duplicates=i % 2)
    for i, target in moves.items():
        split, label, stats = items[i]
        if target != split:
            moved.move(split, target, label, stats, duplicates=i % 2)
    assert moved.result({"m": 1}).dumps() == expected.result({"m": 1}).dumps()
    assert "extra" not in moved.result().splits
    assert "generated" not in moved.result().splits["train"].classes


def test_formats_modes_and_grey_are_what_pillow_decoded(items):
    overall = _build(items, 0, 1).overall()
    modes, formats = overall.categories["mode"], overall.categories["format"]
    assert {"RGB", "L", "CMYK", "P", "RGBA"} <= set(modes) and any(m.startswith("I") for m in modes)
    assert {"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"} <= set(formats)
    grey = {s.mode: s.grey for _, label, s in items if label == "generated" and s.format == "JPEG"}
    assert grey == {"RGB": False, "L": True, "CMYK": False}
    assert overall.categories["tone"]["grey"] >= 2  # the grey JPEG and the 16-bit grey PNG


def test_stats_from_an_array_equal_those_from_the_pil_image_and_ignore_resolution(flowers_dir):
    path = sorted((flowers_dir / "roses").glob("*.jpg"))[0]
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        from_pil = image_stats(data, im)
        arr = np.asarray(im.convert("RGB"))
    from_array = image_stats(data, arr, format="JPEG")
    assert from_array == from_pil
    # Decoded here when no image is given, as ingest decodes kept JPEG bytes: at a reduced DCT scale (80-159 px a
    # side), with the source's size; brightness and contrast within a fraction of a level of the full decode's.
    decoded = image_stats(data)
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (80, 80))
        im.load()
        assert 80 <= min(im.size) < 160
        assert decoded == image_stats(data, im, size=(from_pil.width, from_pil.height))
    assert (decoded.width, decoded.height, decoded.format, decoded.mode) == (arr.shape[1], arr.shape[0], "JPEG", "RGB")
    assert abs(decoded.brightness - from_pil.brightness) < 1 and abs(decoded.contrast - from_pil.contrast) < 1
    small = Image.fromarray(arr).resize((arr.shape[1] // 2, arr.shape[0] // 2), Image.Resampling.BOX)
    half = image_stats(data, small)
    assert (half.width, half.height) == (arr.shape[1] // 2, arr.shape[0] // 2)
    assert abs(half.brightness - from_pil.brightness) < 1 and abs(half.contrast - from_pil.contrast) < 2
    assert ImageStats.from_json(json.loads(json.dumps(from_pil.to_json()))) == from_pil


def test_bins_are_fixed_and_half_open():
    edges = EDGES["width"]
    assert bin_index(edges, 0) == 0 and bin_index(edges, 159) == bin_index(edges, 128)
    assert bin_index(edges, 160) == edges.index(160) and bin_index(edges, 10**6) == len(edges) - 1
    stale = json.loads(ProfileBuilder().result().dumps())
    stale["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="schema_version"):
        Profile.from_json(stale)
    stale["schema_version"] = SCHEMA_VERSION
    stale["edges"]["width"] = [0, 100]
    with pytest.raises(ValueError, match="edges"):
        Profile.from_json(stale)


def test_grey_shortcut_gives_the_pixelwise_answer():
    """`_is_grey` rejects most colour thumbnails from the channel means alone: it must agree with the pixelwise
    rule (every pixel's max - min channel <= GREY_SPREAD) on tints near the limit and on one colour pixel."""
    from kfp_finetune.components.dataprofile.hashing import THUMB_SIDE
    from kfp_finetune.components.dataprofile.stats import GREY_SPREAD, _is_grey

    rng = np.random.default_rng(11)
    cases = []
    for tint in range(GREY_SPREAD - 2, GREY_SPREAD + 12):
        base = rng.integers(0, 256 - tint, size=(THUMB_SIDE, THUMB_SIDE, 1))
        cases.append(np.concatenate([base + tint, base, base + rng.integers(0, tint + 1, size=base.shape)], axis=2))
        noisy = base + rng.integers(0, tint + 1, size=(THUMB_SIDE, THUMB_SIDE, 3))
        cases.append(noisy)
        one = np.repeat(base, 3, axis=2)
        one[5, 7] = (255, 0, 0)
        cases.append(one)
    cases.append(rng.integers(0, 256, size=(THUMB_SIDE, THUMB_SIDE, 3)))
    for arr in cases:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        expected = int((arr.max(axis=2).astype(int) - arr.min(axis=2)).max()) <= GREY_SPREAD
        assert _is_grey(Image.fromarray(arr, "RGB")) == expected
