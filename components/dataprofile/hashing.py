"""The perceptual hash of the data checks: a 64-bit DCT pHash, computed exactly in integers from a decoded image.

The recipe (one definition, used by every runner; HASH_NAME names it):
0. the image as ingest decodes it: a JPEG whose bytes ingest keeps (RGB or grey, within max_side) at libjpeg's
   reduced DCT scale, 1/2 to 1/8, leaving at least THUMB_SIDE pixels a side (`stats.draft`, the decode check's own
   reduced decode: `imagecheck.decode_bytes`); any other image in full. So a kept JPEG's hash comes from its reduced
   decode, and the same photo converted or resized by ingest from its full decode (flowers, full-frame hash of
   the full vs the reduced decode: median 0, 90th percentile 2, 99th 6 bits apart);
1. as 8-bit RGB (any Pillow mode: transparency composited onto white, 16-bit grey scaled);
2. box-averaged (area) to an 80x80 thumbnail, ignoring the aspect ratio, with Pillow's integer `reduce` first when
   the image is over twice that (`thumbnail`, shared with the per-image stats: one pass over the decoded pixels);
3. ITU-R 601-2 luma (Pillow's `convert("L")`);
4. the 8x8 lowest-frequency coefficients of the 2-D DCT-II of that luma box-averaged to 32x32, the box average
   folded into the DCT basis: one (8, 80) integer matrix per view (`_folded_basis`, the exact box weights times the
   DCT basis, scaled by 2^12 and rounded, computed with Python's math), so the 32x32 block is never rounded to 8
   bits. Every product and partial sum is an integer below 2^53, so float64 BLAS gives exact integers in any
   summation order: the hash is bit-identical on every CPU and BLAS, the local runner and a Dataflow worker;
5. bit i = coefficient i > the median of the 63 AC coefficients (row-major over the 8x8 block, DC first). Every hash
   has exactly 32 bits set, so distances are even.
Each image gets two such hashes (`image_hashes`): the full frame, and the centre (the thumbnail without 4 pixels,
5 %, on each side). The distance of two images is the smallest Hamming distance between a hash of one and a hash of
the other (`distance`): full vs full catches re-encodes and resizes, centre vs full catches small crops (the
full-frame pHash alone is moved 11 bits on average by a 5 %-per-side crop). Two images are near-duplicates when
their distance is at most THRESHOLD = 10 bits. Hashes are only compared within one ingest (the drift check compares
histograms and counts, never hashes), so a new recipe needs no migration of stored profiles.

Why this hash and 10 bits, measured on the 1,500 flowers photos, every photo and edited copy hashed from its bytes as
ingest hashes it (`python -m kfp_finetune.components.dataprofile.measure /work/shared/data/flowers`; table in
docs/data-checks.md). At 10 bits it finds 100 % of JPEG re-encodes (quality 95 -> 50), 100 % of 0.5x and 2x resizes,
99.9 / 99.9 / 97.9 % of crops of 3 / 5 / 7 % per side, 99.9 % of a 5 % crop then 0.5x then quality 50, 82 % of a
5 % cut off two sides only and 36 % of 10 % crops. Among the 224,250 pairs of different files of the same class, 11
(0.0049 %) are within 10 bits, and by eye 9 of those are the same photo or the same scene (a recoloured, framed or
grey copy, two frames of a burst): 2 pairs of truly different photos (0.0009 %). At 12 bits the same-class count
doubles (21) and 27 pairs of different classes join (one centred flower on a plain background); at 8 bits crops of
7 % fall to 92.5 %. The full-frame pHash alone finds 51 % of 5 % crops at 10 bits, a 64-bit difference hash (dHash)
46 % with more false positives (42 same-class pairs). The previous recipe ("phash64-dct-int-full+centre5": the full
decode, the 32x32 block rounded to 8 bits, an integer DCT) measured 99.8 / 99.9 / 97.6 % on the crops, 77 % on the
two-sided cut, 37 % on 10 % crops and 10 same-class pairs (1 truly different).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

HASH_BITS = 64
THRESHOLD = 10  # Hamming distance (bits) at or below which two images are near-duplicates
THUMB_SIDE = 80  # the box-averaged thumbnail the hashes and the per-image stats are computed from
CENTRE_MARGIN = 4  # pixels of the thumbnail cut off each side for the centre hash: 5 % (a crop-tolerant second view)
SAMPLE_SIDE = 32  # the grey block the DCT runs on (box-averaged from the thumbnail, folded into the DCT basis)
REDUCING_GAP = 2.0  # Pillow reduces by an integer box first when an image is over 2x the thumbnail: 30 % faster
LOW_FREQ = 8  # the LOW_FREQ x LOW_FREQ lowest frequencies make the 64 bits
# Recorded beside hashes (ingest_report.json's leakage entry): a different recipe gives incomparable hashes. Hashes are
# only compared within one ingest; earlier names: "phash64-dct-int-full+centre5" (full-size decode, the 32x32 block
# rounded to 8 bits by Pillow before an integer DCT).
HASH_NAME = "phash64-dctfold-full+centre5-jpegdraft"
_SCALE_BITS = 12


def _folded_basis(lo: int, hi: int) -> np.ndarray:
    """(LOW_FREQ, THUMB_SIDE) integers: the first LOW_FREQ rows of the orthonormal DCT-II basis on SAMPLE_SIDE
    points, times the area (box) average of thumbnail pixels [lo, hi) onto SAMPLE_SIDE cells, scaled by 2^12 and
    rounded. Computed with exact fractions for the box and Python's math for the cosines (math.fsum, correctly
    rounded): the same integers everywhere. Kept as float64 for BLAS: see hashes_of_grey for why that is exact."""
    from fractions import Fraction

    n, span = SAMPLE_SIDE, Fraction(hi - lo, SAMPLE_SIDE)
    box = [[0.0] * THUMB_SIDE for _ in range(n)]  # box[o][p]: weight of thumbnail pixel p in cell o
    for o in range(n):
        a, b = lo + o * span, lo + (o + 1) * span
        for px in range(math.floor(a), math.ceil(b)):
            box[o][px] = float((min(b, px + 1) - max(a, px)) / span)
    rows = []
    for k in range(LOW_FREQ):
        c = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
        basis = [c * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n)]
        rows.append([round(math.fsum(basis[o] * box[o][px] for o in range(n)) * (1 << _SCALE_BITS))
                     for px in range(THUMB_SIDE)])
    return np.array(rows, dtype=np.float64)


_FULL = _folded_basis(0, THUMB_SIDE)
_CENTRE = _folded_basis(CENTRE_MARGIN, THUMB_SIDE - CENTRE_MARGIN)
_BOTH = np.vstack([_FULL, _CENTRE])
_BOTH_T = np.ascontiguousarray(_BOTH.T)
# Every product and partial sum below is an integer under 2^53 (|row| sums are < 2^15, pixels < 2^8, 80 terms), so
# float64 gives the exact integer whatever the BLAS's summation order or FMA use: bit-identical on every CPU.
assert float(np.abs(_BOTH).sum(axis=1).max()) ** 2 * 255 < 2.0**53


def to_rgb(image: Any) -> Any:
    """A decoded image (PIL image of any mode, or a numpy HxW / HxWx3 / HxWx4 uint8 array) -> an RGB PIL image."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(_as_uint8(image))
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _as_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def thumbnail(image: Any) -> Any:
    """The RGB THUMB_SIDE x THUMB_SIDE box-averaged thumbnail of a decoded image (what the hash and stats use)."""
    from PIL import Image

    return to_rgb(image).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX, reducing_gap=REDUCING_GAP)


def hashes_of_thumbnail(thumb: Any) -> tuple[int, int]:
    """(full-frame hash, centre hash) of a `thumbnail` result: the centre hash sees the thumbnail without
    CENTRE_MARGIN pixels on each side, i.e. what a copy cropped by 5 % per side shows in full."""
    return hashes_of_grey(thumb.convert("L"))


def hashes_of_grey(grey: Any) -> tuple[int, int]:
    """`hashes_of_thumbnail` of the thumbnail's luma (`thumb.convert("L")`), for callers that already have it.

    Each view (the full 80x80, and its centre without CENTRE_MARGIN pixels a side) is box-averaged to 32x32 and
    DCT'd in one product with the folded basis (no rounding of the 32x32 block); both views in one numpy step."""
    return hashes_of_luma(luma_array(grey))


def luma_array(grey: Any) -> np.ndarray:
    """The thumbnail's luma (a THUMB_SIDE x THUMB_SIDE mode-L image) as float64 (exact: 8-bit integers)."""
    return np.frombuffer(grey.tobytes(), dtype=np.uint8).reshape(THUMB_SIDE, THUMB_SIDE).astype(np.float64)


def hashes_of_luma(g: np.ndarray) -> tuple[int, int]:
    """`hashes_of_grey` of `luma_array(grey)`."""
    both = _BOTH @ g @ _BOTH_T  # (16, 16): the full view's coefficients top left, the centre's bottom right
    coeffs = both.reshape(2, LOW_FREQ, 2, LOW_FREQ)[[0, 1], :, [0, 1], :].reshape(2, -1)
    # The median of the 63 AC terms (an odd count: one of them, exact); bit 63 = the DC term.
    median = np.partition(coeffs[:, 1:], 31, axis=1)[:, 31:32]
    full_hash, centre_hash = np.packbits(coeffs > median, axis=1)
    return int.from_bytes(full_hash.tobytes(), "big"), int.from_bytes(centre_hash.tobytes(), "big")


def phash(image: Any) -> int:
    """The full-frame 64-bit perceptual hash of a decoded image (PIL image or numpy array), as a Python int."""
    return hashes_of_thumbnail(thumbnail(image))[0]


def image_hashes(image: Any) -> tuple[int, int]:
    """(full-frame hash, centre hash) of a decoded image; see `distance`."""
    return hashes_of_thumbnail(thumbnail(image))


def distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Near-duplicate distance of two images' hash tuples: the smallest Hamming distance between any hash of one and
    any hash of the other (full vs full catches re-encodes and resizes, centre vs full catches small crops)."""
    return min((x ^ y).bit_count() for x in a for y in b)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def to_hex(value: int) -> str:
    return f"{value:016x}"


def from_hex(text: str) -> int:
    value = int(text, 16)
    if not 0 <= value < 1 << HASH_BITS:
        raise ValueError(f"not a {HASH_BITS}-bit hash: {text!r}")
    return value
