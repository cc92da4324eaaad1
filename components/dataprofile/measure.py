"""Measure the perceptual hash on a class-per-folder set of photos: how far edited copies land from their original
(detection rate) and how close different photos of the same class land (false-positive rate), per threshold.

    python -m kfp_finetune.components.dataprofile.measure /work/shared/data/flowers [--json out.json] [--per-class N]

Every image is hashed as ingest hashes it (`ingest_decode`: a JPEG at a reduced DCT scale, the rest in full; the
same hashes as `image_stats(data).hashes`). Edits, each applied to the full-size decoded photo, then hashed from
their new bytes: `jpeg50` (re-encoded as JPEG quality 95, then that re-encoded at 50), `half` and `double` (Lanczos
resize to 0.5x and 2x, saved as JPEG quality 90), `crop3` / `crop5` / `crop7` (3, 5, 7 % cut off each side, JPEG
90), `shift5` (5 % off the left and top only), `mixed` (crop5, then half, then JPEG 50) and `crop10` (10 % off each
side: beyond what the threshold promises, shown for the record). False positives: all pairs of different files
within each class folder.

Hashes compared: `phash2` (what the data checks use: the full-frame and the centre pHash of an image, distance =
the smallest of the four Hamming distances), `phash` (the full-frame pHash alone) and `dhash` (a 64-bit difference
hash on the same thumbnail), the alternatives considered.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kfp_finetune.components.dataprofile.hashing import THRESHOLD, distance, image_hashes, phash, thumbnail, to_rgb
from kfp_finetune.components.dataprofile.stats import draft

EDITS = ("jpeg50", "half", "double", "crop3", "crop5", "crop7", "shift5", "mixed", "crop10")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _jpeg(image: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _full_decode(data: bytes) -> Any:
    from PIL import Image

    out = Image.open(io.BytesIO(data))
    out.load()
    return out


def ingest_decode(data: bytes) -> Any:
    """The image ingest hashes: kept JPEG bytes decoded at a reduced DCT scale (`stats.draft`), others in full."""
    from PIL import Image

    out = Image.open(io.BytesIO(data))
    draft(out)
    out.load()
    return out


def edit(image: Any, kind: str) -> Any:
    """One edited copy of an RGB PIL image, decoded again (in full) from its encoded bytes."""
    return _full_decode(edit_bytes(image, kind))


def edit_bytes(image: Any, kind: str) -> bytes:
    """The encoded bytes of one edited copy of an RGB PIL image (what ingest would read)."""
    from PIL import Image

    w, h = image.size
    if kind == "jpeg50":
        return _jpeg(_full_decode(_jpeg(image, 95)), 50)
    if kind == "half":
        return _jpeg(image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS), 90)
    if kind == "double":
        return _jpeg(image.resize((2 * w, 2 * h), Image.Resampling.LANCZOS), 90)
    if kind.startswith("crop"):
        f = int(kind[4:]) / 100
        dx, dy = round(w * f), round(h * f)
        return _jpeg(image.crop((dx, dy, w - dx, h - dy)), 90)
    if kind == "shift5":  # 5 % off the left and the top only
        return _jpeg(image.crop((round(w * 0.05), round(h * 0.05), w, h)), 90)
    if kind == "mixed":  # 5 % off each side, then 0.5x, then JPEG quality 50
        dx, dy = round(w * 0.05), round(h * 0.05)
        small = image.crop((dx, dy, w - dx, h - dy))
        return _jpeg(small.resize((max(1, small.width // 2), max(1, small.height // 2)), Image.Resampling.LANCZOS), 50)
    raise ValueError(kind)


def dhash(image: Any) -> int:
    """64-bit difference hash (9x8 grey, left < right), the alternative measured against pHash."""
    from PIL import Image

    g = np.asarray(thumbnail(image).convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).ravel()
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return (value,)


def _pairwise(hashes: list[tuple[int, ...]]) -> np.ndarray:
    """Near-duplicate distances (`hashing.distance`) of all i < j pairs."""
    a = np.array(hashes, dtype=np.uint64)  # (n, k)
    best = None
    for x in range(a.shape[1]):
        for y in range(a.shape[1]):
            d = np.bitwise_count(a[:, None, x] ^ a[None, :, y])
            best = d if best is None else np.minimum(best, d)
    iu = np.triu_indices(len(hashes), k=1)
    return best[iu].astype(np.int64)




def measure(root: Path, per_class: int | None = None, thresholds: range = range(0, 17)) -> dict[str, Any]:
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    hashers = {"phash2": image_hashes, "phash": lambda im: (phash(im),), "dhash": dhash}
    edit_dist: dict[str, dict[str, list[int]]] = {h: {e: [] for e in EDITS} for h in hashers}
    same_class: dict[str, list[np.ndarray]] = {h: [] for h in hashers}
    close_pairs: list[tuple[int, str, str]] = []
    seconds = {"decode": 0.0, "hashes": 0.0}
    n = 0
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:per_class]
        per_hash: dict[str, list[int]] = {h: [] for h in hashers}
        for path in files:
            data = path.read_bytes()
            t0 = time.perf_counter()
            seen = ingest_decode(data)  # what ingest hashes (a reduced decode of JPEG)
            t1 = time.perf_counter()
            base = image_hashes(seen)
            seconds["decode"] += t1 - t0
            seconds["hashes"] += time.perf_counter() - t1
            n += 1
            rgb = to_rgb(_full_decode(data))  # the edits start from the full-size pixels
            edited = [ingest_decode(edit_bytes(rgb, kind)) for kind in EDITS]
            for name, fn in hashers.items():
                h0 = base if name == "phash2" else fn(seen)
                per_hash[name].append(h0)
                for kind, copy in zip(EDITS, edited, strict=True):
                    edit_dist[name][kind].append(distance(h0, fn(copy)))
        for name in hashers:
            same_class[name].append(_pairwise(per_hash[name]))
        hs = per_hash["phash2"]
        for i in range(len(hs)):
            for j in range(i + 1, len(hs)):
                d = distance(hs[i], hs[j])
                if d <= THRESHOLD:
                    close_pairs.append((d, f"{folder.name}/{files[i].name}", f"{folder.name}/{files[j].name}"))
    out: dict[str, Any] = {"root": str(root), "images": n, "threshold": THRESHOLD, "hashes": {}}
    for name in hashers:
        fp = np.concatenate(same_class[name])
        rows = {}
        for t in thresholds:
            row = {kind: float(np.mean(np.array(edit_dist[name][kind]) <= t)) for kind in EDITS}
            row["same_class_fp"] = float(np.mean(fp <= t))
            row["same_class_fp_pairs"] = int(np.sum(fp <= t))
            rows[t] = row
        out["hashes"][name] = {
            "same_class_pairs": int(fp.size),
            "same_class_distance_percentiles": {p: float(np.percentile(fp, p)) for p in (0.01, 0.1, 1, 5, 50)},
            "edit_distance_max": {k: int(max(v)) for k, v in edit_dist[name].items()},
            "edit_distance_mean": {k: round(float(np.mean(v)), 2) for k, v in edit_dist[name].items()},
            "by_threshold": rows,
        }
    out["phash2_close_same_class_pairs"] = sorted(close_pairs)
    out["ms_per_image"] = {k: round(1000 * v / max(n, 1), 3) for k, v in seconds.items()}
    return out


def _print_table(result: dict[str, Any]) -> None:
    for name, h in result["hashes"].items():
        print(f"\n{name}: {result['images']} images, {h['same_class_pairs']} same-class pairs")
        print("| t | " + " | ".join(EDITS) + " | same-class FP | FP pairs |")
        print("|---|" + "---|" * (len(EDITS) + 2))
        for t, row in h["by_threshold"].items():
            cells = " | ".join(f"{row[k]:.2%}" for k in EDITS)
            print(f"| {t} | {cells} | {row['same_class_fp']:.4%} | {row['same_class_fp_pairs']} |")
        print("edit distance max:", h["edit_distance_max"], "mean:", h["edit_distance_mean"])
        print("same-class distance percentiles:", h["same_class_distance_percentiles"])
    print("\nphash2 same-class pairs within", result["threshold"], "bits:")
    for d, a, b in result["phash2_close_same_class_pairs"]:
        print(f"  {d:2d}  {a}  {b}")
    print("ms per image:", result["ms_per_image"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="a folder with one sub-folder of photos per class")
    p.add_argument("--per-class", type=int, default=None, help="only the first N files of each class")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    result = measure(args.root, args.per_class)
    _print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
