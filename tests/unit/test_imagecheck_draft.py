"""The decode check of kept JPEG bytes runs at a reduced DCT scale (`Image.draft`): it must refuse exactly what the full
decode refuses (truncated data, a bad marker inside the entropy-coded data), and the stats must be those of the
source (its size) computed from the same reduced decode that `image_stats(data)` makes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kfp_finetune.components.core import imagecheck
from kfp_finetune.components.dataprofile.hashing import THUMB_SIDE
from kfp_finetune.components.dataprofile.stats import image_stats
from kfp_finetune.components.ingest.profiling import stats_of
from tests import imagegen


def _jpeg(mode: str = "RGB", progressive: bool = False, size: int = 400) -> bytes:
    rgb = Image.fromarray(imagegen.pattern("circle", size, np.random.default_rng(5)))
    buf = io.BytesIO()
    rgb.convert(mode).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def _scan_start(data: bytes) -> int:
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


def _full_decode_ok(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:  # noqa: BLE001
        return False
    return True


def _broken(data: bytes) -> dict[str, bytes]:
    start = _scan_start(data)
    mid = start + (len(data) - start) // 3
    return {
        "truncated_half": data[: start + (len(data) - start) // 2],
        "truncated_90": data[: start + (len(data) - start) * 9 // 10],
        "truncated_in_header": data[: start - 10],
        "bad_marker_in_scan": data[:mid] + b"\xff\xc8" + data[mid:],  # 0xFF then a marker no scan may hold
        "bad_marker_early": data[: start + 20] + b"\xff\xc8" + data[start + 20 :],
    }


@pytest.mark.parametrize(("mode", "progressive"), [("RGB", False), ("RGB", True), ("L", False)])
def test_the_reduced_decode_refuses_what_the_full_decode_refuses(mode, progressive):
    data = _jpeg(mode, progressive)
    for name, bad in _broken(data).items():
        assert not _full_decode_ok(bad), name  # the full decode refuses it ...
        for inspect in (None, stats_of):  # ... and so does the check, with or without a draft side
            result = imagecheck.decode_bytes(bad, None, inspect)
            assert not result.ok and result.reason == imagecheck.CORRUPT, (name, inspect)
    assert imagecheck.decode_bytes(data, None, stats_of).ok


def test_garbage_without_a_marker_is_judged_as_the_full_decode_judges_it():
    """libjpeg only warns about entropy-coded bytes that decode to wrong coefficients; Pillow accepts such a file with
    the full decode too. The reduced decode gives the same verdict, whatever it is."""
    data = _jpeg()
    start = _scan_start(data)
    rng = np.random.default_rng(0)
    garbage = bytes(int(b) for b in rng.integers(0, 255, size=300))  # no 0xFF: no marker
    for filler in (garbage, bytes(300)):
        bad = data[: start + 400] + filler + data[start + 700 :]
        assert imagecheck.decode_bytes(bad, None, stats_of).ok == _full_decode_ok(bad)
        assert imagecheck.decode_bytes(bad).ok == _full_decode_ok(bad)


def test_kept_jpeg_is_inspected_at_a_reduced_scale_with_the_source_size():
    data = _jpeg(size=400)
    seen = []

    def inspect(blob, im, size):
        seen.append((im.size, size))
        return stats_of(blob, im, size)

    inspect.draft_side = THUMB_SIDE
    result = imagecheck.decode_bytes(data, None, inspect)
    assert result.ok and result.data == data and (result.width, result.height) == (400, 400)
    assert seen == [((100, 100), (400, 400))]  # 1/4: the largest scale leaving >= 80 pixels a side
    assert (result.stats.width, result.stats.height) == (400, 400)
    assert result.stats == image_stats(data)  # one definition: ingest's hook and image_stats(data) agree

    seen.clear()  # too big for max_side: converted from the full decode, and inspected at full size
    resized = imagecheck.decode_bytes(data, 200, inspect)
    assert resized.ok and resized.resized and seen == [((400, 400), (400, 400))]
    assert (resized.stats.width, resized.stats.height) == (400, 400)


def test_png_and_converted_jpeg_are_inspected_in_full():
    rgb = Image.fromarray(imagegen.pattern("square", 200, np.random.default_rng(1)))
    for fmt, image in (("PNG", rgb), ("JPEG", rgb.convert("CMYK"))):
        buf = io.BytesIO()
        image.save(buf, fmt)
        seen = []

        def inspect(blob, im, size, seen=seen):
            seen.append(im.size)
            return stats_of(blob, im, size)

        inspect.draft_side = THUMB_SIDE
        assert imagecheck.decode_bytes(buf.getvalue(), None, inspect).ok
        assert seen == [(200, 200)], fmt
