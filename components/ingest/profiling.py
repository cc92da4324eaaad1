"""Per-image work of the data checks inside ingest, run in the worker processes of both runners.

- `stats_of(data, image)`: the `imagecheck.decode_bytes` hook, called on the loaded source image before any
  conversion, so the profile sees the source's format and colour mode. It never fails an image: the statistics of an
  odd mode fall back to its RGB conversion (the image is judged by the decode check alone).
- `inspect_batch`: the local runner's pass 2: decode check + stats, without shipping the image bytes back.
- `load_batch`: the local runner's pass 3: the bytes to store (re-read, checked against the content hash of pass
  1, re-encoded only when pass 2 converted or resized the image, exactly as the Beam runner's `write_shard` does).

Imports only the standard library, numpy, Pillow and our plumbing (no kfp), so the workers start cheaply.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kfp_finetune.components.core import imagecheck, safefiles
from kfp_finetune.components.dataprofile import ImageStats, image_stats


def stats_of(data: bytes, image: Any) -> ImageStats:
    """`dataprofile.image_stats` of a decoded image; an odd mode it cannot read is measured on its RGB conversion."""
    try:
        return image_stats(data, image)
    except Exception:  # noqa: BLE001  (a statistic must never turn a good image into a skipped one)
        import numpy as np

        rgb = np.asarray(image.convert("RGB"))
        return image_stats(data, rgb, format=image.format or "", mode=image.mode)


def inspect_batch(paths: list[str], max_side: int | None) -> list[imagecheck.ImageResult]:
    """Decode check + stats of each file; the results carry no image bytes (pass 3 reads them again)."""
    return [dataclasses.replace(imagecheck.decode_image(p, max_side, stats_of), data=None) for p in paths]


def load_batch(items: list[tuple[str, str, bool]], max_side: int | None) -> list[bytes]:
    """(path, sha256, re-encode?) -> the bytes to store; a file changed since pass 1 fails the ingest."""
    out = []
    for path, sha256, reencode in items:
        data = safefiles.read_bytes(path)
        if imagecheck.hash_bytes(data).sha256 != sha256:
            raise RuntimeError(f"{path} changed while it was being ingested; run the ingest again")
        if reencode:
            result = imagecheck.decode_bytes(data, max_side)
            if not result.ok or result.data is None:  # pragma: no cover  (decoded fine moments ago)
                raise RuntimeError(f"{path}: decode check gave a different answer the second time")
            data = result.data
        out.append(data)
    return out
