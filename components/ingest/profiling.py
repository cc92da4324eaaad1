"""Per-image work of the data checks inside ingest, run in the worker processes of both runners.

- `stats_of(data, image, size)`: the `imagecheck.decode_bytes` hook, called on the loaded source image before any
  conversion, so the profile sees the source's format and colour mode (kept JPEG bytes: a reduced decode, about
  THUMB_SIDE pixels a side, as `dataprofile.image_stats(data)` makes it). It never fails an image: the statistics of an
  odd mode fall back to its RGB conversion (the image is judged by the decode check alone).
- `scan_batch`: the local runner's pass 1: each file read once, hashed, decode-checked and measured, without shipping
  the image bytes back.
(The local runner's write pass, pass 3, is shards.py's.)

Imports only the standard library, numpy, Pillow and our plumbing (no kfp), so the workers start cheaply.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kfp_finetune.components.core import imagecheck
from kfp_finetune.components.dataprofile import ImageStats, image_stats
from kfp_finetune.components.dataprofile.hashing import THUMB_SIDE


def stats_of(data: bytes, image: Any, size: tuple[int, int]) -> ImageStats:
    """`dataprofile.image_stats` of a decoded image; an odd mode it cannot read is measured on its RGB conversion.
    size: the source's (width, height); `image` is a reduced decode when the bytes are kept JPEG (`draft_side`)."""
    try:
        return image_stats(data, image, size=size)
    except Exception:  # noqa: BLE001  (a statistic must never turn a good image into a skipped one)
        import numpy as np

        rgb = np.asarray(image.convert("RGB"))
        return image_stats(data, rgb, format=image.format or "", mode=image.mode, size=size)


# The thumbnail needs THUMB_SIDE pixels a side: kept JPEG bytes are decoded at the DCT scale that leaves that much
# (imagecheck.Inspect), the same reduction as `image_stats(data)` (dataprofile.stats.draft).
stats_of.draft_side = THUMB_SIDE  # type: ignore[attr-defined]


def scan_batch(
    paths: list[str], max_side: int | None
) -> list[tuple[imagecheck.FileHash, imagecheck.ImageResult | None]]:
    """The local runner's pass 1, one read per file: its content hash and, when it could be read, the decode check +
    stats of those same bytes (the ImageResult without the image bytes: the write pass reads them again).
    Identical bytes within the batch are decoded once (the same bytes give the same result)."""
    out: list[tuple[imagecheck.FileHash, imagecheck.ImageResult | None]] = []
    seen: dict[str, imagecheck.ImageResult] = {}
    for path in paths:
        fh, data = imagecheck.read_and_hash(path)
        if data is None or fh.sha256 is None:
            out.append((fh, None))
            continue
        result = seen.get(fh.sha256)
        if result is None:
            result = dataclasses.replace(imagecheck.decode_bytes(data, max_side, stats_of), data=None)
            seen[fh.sha256] = result
        out.append((fh, result))
    return out
