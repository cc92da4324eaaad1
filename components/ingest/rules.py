"""The dataset rules, in one place: which split an image goes to, how many shards a split gets, which files are
skipped and why, the final checks, and the ingest report. The local runner (step.py) and the Beam runner
(beam_pipeline.py) both call these, so that the two produce the same dataset byte for byte and the same report.

The data checks (docs/data-checks.md) are rules too: each kept image's `ImageStats` (computed where it is decoded),
the leakage decision over all kept images (`leakage`, before any image is written to a split), the final split of
each image (`final_split`) and the profile's meta (`profile_meta`; the profile itself, data_profile.json beside the
report, is a `dataprofile.ProfileBuilder` of the kept images under their final splits).

`job` below is anything with the ingest settings as attributes (`IngestConfig`, or the Beam runner's `Job`):
source, fingerprint, seed, val_fraction, test_fraction, fractions, max_side, num_shards, max_corrupt_fraction,
leakage.
"""

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kfp_finetune.components import __version__
from kfp_finetune.components.core import imagecheck
from kfp_finetune.components.core.dataset import SPLITS
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.sources import DOWNLOAD_FAILED
from kfp_finetune.components.dataprofile import (
    THRESHOLD,
    HashRecord,
    ImageStats,
    LeakageResult,
    check_leakage,
)

# Skip reasons besides the listing's (components.core.sources) and imagecheck's corrupt / too_large / unreadable.
MISSING = "missing"
DUPLICATE = "duplicate"
CONFLICT = "label_conflict"
# The reasons that count against --max-corrupt-fraction.
BAD_REASONS = imagecheck.BAD_REASONS | {MISSING, DOWNLOAD_FAILED}

TARGET_SHARD_BYTES = 64 << 20
MAX_AUTO_SHARDS = 1024


def skip(path: str, reason: str, detail: str = "") -> dict[str, str]:
    """One skipped file, as the report lists it."""
    return {"path": path, "reason": reason, "detail": detail}


def split_of(sha256: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic in (seed, content hash) alone: the same bytes always land in the same split."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def auto_shards(total_bytes: int, fraction: float) -> int:
    """Shards of about TARGET_SHARD_BYTES for a split holding `fraction` of `total_bytes` (1..MAX_AUTO_SHARDS)."""
    return max(1, min(MAX_AUTO_SHARDS, math.ceil(total_bytes * fraction / TARGET_SHARD_BYTES)))


def num_shards(job: Any, split: str, total_bytes: int) -> int:
    """The shard count of `split`: --num-shards, else auto_shards (before the writer drops shards left empty)."""
    return job.num_shards or auto_shards(total_bytes, job.fractions[split])


def resolve_group(items: Sequence[tuple[str, str]]) -> tuple[tuple[str, str] | None, list[dict[str, str]]]:
    """One content hash's files, (ref, label) sorted by ref -> (the file kept or None, the skipped files).

    The first file is kept and the others are duplicates; identical bytes under different labels are all skipped
    as a label conflict.
    """
    labels = sorted({label for _, label in items})
    if len(labels) > 1:
        detail = f"identical bytes labelled {', '.join(map(repr, labels))}: " + ", ".join(ref for ref, _ in items)
        return None, [skip(ref, CONFLICT, detail) for ref, _ in items]
    keep = items[0]
    return keep, [skip(ref, DUPLICATE, f"same bytes as {keep[0]}") for ref, _ in items[1:]]


def hash_record(sha256: str, ref: str, label: str, split: str, stats: ImageStats) -> HashRecord:
    """The leakage check's record of one kept image: its content hash is the id (runner-independent)."""
    return HashRecord.from_stats(sha256, split, label, stats, name=ref, digest=sha256)


def leakage(records: Iterable[HashRecord], policy: str) -> LeakageResult:
    """Near-duplicates across splits among all kept images, and the moves `policy` (move | report) decides."""
    return check_leakage(records, policy, THRESHOLD)


def final_split(sha256: str, split: str, leak: LeakageResult) -> str:
    """The split an image is written to: its content-hash split, unless the leakage policy moved its group."""
    return leak.moves.get(sha256, split)


def profile_meta(job: Any, leak: LeakageResult) -> dict[str, Any]:
    """data_profile.json's meta: nothing that differs between runners or runs of the same data (no paths of temporary
    folders, no times), so both runners write the same bytes."""
    return {"source": job.source, "data_fingerprint": job.fingerprint or None, "seed": job.seed,
            "fractions": job.fractions, "max_side": job.max_side, "leakage": leak.summary(),
            "kfp_finetune_version": __version__}


def empty_counts(class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    return {split: dict.fromkeys(class_names, 0) for split in SPLITS}


def sort_skipped(skipped: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(skipped, key=lambda s: (s["path"], s["reason"]))


def check_classes(source: str, class_names: Sequence[str]) -> None:
    if len(class_names) < 2:
        raise UserError(
            f"--source {source}: found {len(class_names)} class(es) {list(class_names)}; "
            "a classifier needs at least 2 (one sub-folder or label per class)"
        )


def final_checks(job: Any, class_names: Sequence[str], counts: Mapping[str, Mapping[str, int]],
                 skipped: Sequence[dict[str, str]], num_candidates: int, class_refs: Mapping[str, str]) -> None:
    """Refuse a dataset with too many unusable files (--max-corrupt-fraction) or a class left without an image."""
    bad = [s for s in skipped if s["reason"] in BAD_REASONS]
    if num_candidates and len(bad) / num_candidates > job.max_corrupt_fraction:
        examples = "; ".join(f"{s['path']}: {s['detail'] or s['reason']}" for s in bad[:3])
        raise UserError(
            f"--source {job.source}: {len(bad)} of {num_candidates} image files are unusable "
            f"({len(bad) / num_candidates:.1%} > --max-corrupt-fraction {job.max_corrupt_fraction}); "
            f"fix or remove them, or raise the limit. First: {examples}"
        )
    for name in class_names:
        if not any(counts[split][name] for split in SPLITS):
            raise UserError(
                f"--source {job.source}: class {name!r} ({class_refs.get(name, name)}) has no valid image; "
                "add images or remove it"
            )


def description(source: str) -> str:
    """The TFDS dataset description."""
    return f"Images ingested by kfp-finetune {__version__} from {source}"


def report(job: Any, class_names: Sequence[str], counts: dict[str, dict[str, int]], skipped: list[dict[str, str]],
           *, num_candidates: int, num_listing_skips: int, converted: int, resized: int,
           shards_per_split: Mapping[str, int], seconds: float, leak: LeakageResult | None = None) -> dict[str, Any]:
    """ingest_report.json: the settings, the counts per split and class, every skipped file with its reason, and the
    near-duplicates across splits (both file names, the distance, the moves) under `leakage`."""
    num_examples = {split: sum(counts[split].values()) for split in SPLITS}
    total = sum(num_examples.values())
    return {
        "source": job.source,
        "data_fingerprint": job.fingerprint or None,
        "seed": job.seed,
        "fractions": job.fractions,
        "max_side": job.max_side,
        "class_names": list(class_names),
        "num_examples": num_examples,
        "counts": counts,
        "num_files": num_candidates + num_listing_skips,
        "num_image_files": num_candidates,
        "converted": converted,
        "resized": resized,
        "num_shards": {split: shards_per_split[split] for split in SPLITS},
        "skipped_counts": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped": skipped,
        "leakage": leak.to_json() if leak is not None else None,
        "seconds": round(seconds, 3),
        "images_per_second": round(total / max(seconds, 1e-9), 1),
        "kfp_finetune_version": __version__,
    }
