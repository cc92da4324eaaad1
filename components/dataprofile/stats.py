"""One image's statistics for the profile and the leakage check, computed where the image is already decoded.

`image_stats(data, image)` takes the encoded bytes (for the file size, and to decode when no image is given) and the
decoded image (a PIL image as `Image.open(...)` + `load()` leaves it, whose `format` and `mode` are the source's, or
a numpy HxWx3 / HxW uint8 array with `format` and `mode` passed in; `size` when the image is a reduced decode:
ingest decodes the JPEG bytes it keeps at a reduced DCT scale, `draft`, and so does `image_stats(data)`). It does one
box-averaged pass over the pixels (the 80x80 thumbnail of `hashing.thumbnail`) and works on that thumbnail only:
- brightness: mean ITU-R 601-2 luma (0-255); contrast: its standard deviation (RMS contrast). Both on the 80x80
  thumbnail, so they do not depend on the resolution (a 64 px copy of a photo has the same brightness and contrast);
- grey: every thumbnail pixel has max(R, G, B) - min(R, G, B) <= GREY_SPREAD (a grey photo stored as RGB counts);
- hashes: `hashing.hashes_of_luma` of the thumbnail's luma (full frame, centre).
Everything is an integer (brightness and contrast in thousandths), so sums over any number of images, in any order,
on any runner, are exact.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kfp_finetune.components.dataprofile.hashing import THUMB_SIDE, hashes_of_luma, luma_array, thumbnail

GREY_SPREAD = 6  # max channel spread (0-255) of a pixel that counts as grey; JPEG chroma noise of a grey photo is <= 4


def _is_grey(thumb: Any) -> bool:
    """Whether every pixel of the RGB thumbnail has max(R, G, B) - min(R, G, B) <= GREY_SPREAD.

    First a cheap exact rejection: if all pixels were within the spread, so would be the channel means; Pillow's
    `reduce` to 1x1 gives each channel's mean rounded (within 0.5; the margin below allows 1), so two of them more
    than GREY_SPREAD + 2 apart prove a colour pixel. Most colour photos stop there (1,404 of the 1,500 flowers
    photos; 0.005 ms instead of 0.018). Otherwise the largest spread of any pixel, per-channel element-wise
    max/min on Pillow's line-interleaved layout (RRR..GGG..BBB per row: contiguous channel rows; numpy's
    reduction over a length-3 last axis is ten times slower)."""
    means = thumb.reduce((thumb.width, thumb.height)).getpixel((0, 0))
    if max(means) - min(means) > GREY_SPREAD + 2:
        return False
    rgb = np.frombuffer(thumb.tobytes("raw", "RGB;L"), dtype=np.uint8).reshape(thumb.height, 3, thumb.width)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    return int((np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).max()) <= GREY_SPREAD


def draft(image: Any) -> None:
    """Before `load()`: have an RGB or grey JPEG decoded at the largest DCT scale (1/2, 1/4, 1/8) that leaves both
    sides at least THUMB_SIDE pixels, as ingest's decode check does for bytes it keeps (`imagecheck.decode_bytes`
    with `draft_side`): the thumbnail, and so the hashes and the stats, are made from that reduced decode."""
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        image.draft(image.mode, (THUMB_SIDE, THUMB_SIDE))


@dataclass(frozen=True)
class ImageStats:
    """What the profile and the leakage check need from one image (picklable, a few dozen bytes)."""

    width: int
    height: int
    file_size: int
    format: str  # Pillow's format name of the source bytes: JPEG, PNG, WEBP, ... ('' when unknown)
    mode: str  # Pillow's mode of the decoded source: RGB, L, RGBA, CMYK, P, I;16, ...
    brightness_milli: int  # 1000 x mean luma (0-255)
    contrast_milli: int  # 1000 x luma standard deviation
    grey: bool
    hashes: tuple[int, int]  # hashing.image_hashes: (full frame, centre)

    @property
    def brightness(self) -> float:
        return self.brightness_milli / 1000

    @property
    def contrast(self) -> float:
        return self.contrast_milli / 1000

    @property
    def aspect(self) -> float:
        return self.width / self.height if self.height else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "file_size": self.file_size, "format": self.format,
                "mode": self.mode, "brightness_milli": self.brightness_milli, "contrast_milli": self.contrast_milli,
                "grey": self.grey, "hashes": [f"{h:016x}" for h in self.hashes]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageStats:
        return cls(width=int(d["width"]), height=int(d["height"]), file_size=int(d["file_size"]),
                   format=d["format"], mode=d["mode"], brightness_milli=int(d["brightness_milli"]),
                   contrast_milli=int(d["contrast_milli"]), grey=bool(d["grey"]),
                   hashes=tuple(int(h, 16) for h in d["hashes"]))


def image_stats(
    data: bytes, image: Any = None, *, format: str | None = None, mode: str | None = None,
    size: tuple[int, int] | None = None,
) -> ImageStats:
    """The stats of one image from its encoded bytes and, when already decoded, the decoded image.

    image: a loaded PIL image (its `format` / `mode` / `size` are used unless given) or a numpy array (then pass
    `format` and `mode` if known: an array alone says RGB / L / RGBA by its shape and '' for the format). size: the
    source's (width, height) when `image` is a reduced decode (ingest's JPEG `draft`). Without `image`, the bytes are
    decoded here as ingest decodes bytes it keeps (`decode`; Pillow's errors propagate).
    """
    if image is None:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            source_size = im.size
            draft(im)
            im.load()
            return image_stats(data, im, format=format, mode=mode, size=size or source_size)
    if isinstance(image, np.ndarray):
        h, w = image.shape[:2]
        default_mode = "L" if image.ndim == 2 or image.shape[2] == 1 else ("RGBA" if image.shape[2] == 4 else "RGB")
        src_format, src_mode = "", default_mode
    else:
        w, h = image.size
        src_format, src_mode = image.format or "", image.mode
    if size is not None:
        w, h = size
    thumb = thumbnail(image)
    luma = luma_array(thumb.convert("L"))  # ITU-R 601-2 luma, shared by the moments and the hashes
    n = luma.size
    # Exact integer moments: float64 sums of at most 6,400 values under 2^16 are exact (< 2^53) in any order.
    s1, s2 = int(luma.sum()), int(luma.ravel() @ luma.ravel())
    variance_n2 = s2 * n - s1 * s1  # n^2 x variance, an exact integer
    return ImageStats(
        width=int(w), height=int(h), file_size=len(data), format=format if format is not None else src_format,
        mode=mode if mode is not None else src_mode,
        brightness_milli=(1000 * s1 + n // 2) // n,
        contrast_milli=(math.isqrt(variance_n2 * 10**6) + n // 2) // n,
        grey=_is_grey(thumb),
        hashes=hashes_of_luma(luma),
    )
