"""Data checks for issue 23: a dataset profile, near-duplicate leakage across splits, and drift against the
champion's data. A pure library (standard library, numpy, Pillow; nothing else from this project), so that ingest
(local and Beam), evaluate, the CLI and the report can all call it. docs/data-checks.md explains each check.

Where each piece is meant to be called:

- **ingest, where an image is already decoded** (`imagecheck.decode_bytes` after `im.load()`, on both runners; a
  kept JPEG at a reduced DCT scale, `stats.draft`): `stats = image_stats(data, im, size=source_size)` ->
  ImageStats (size, file size, format, mode, brightness, contrast, grey, the two perceptual hashes). Small and
  picklable: return it from the worker beside the decode result.
- **ingest, once all kept images are known** (local: after pass 1, in hash order; Beam: a CombineGlobally(ToList) of
  `HashRecord.from_stats(sha256, split, label, stats, name=ref, digest=sha256)`):
  `leak = check_leakage(records, policy)` -> LeakageResult: the cross-split pairs (both file names, distance), the
  groups, and `moves` {id: new split} under `leakage=move`. Apply the moves before writing shards and counting;
  `leak.to_json()` / `leak.summary()` go into ingest_report.json.
- **ingest, the profile**: `ProfileBuilder().add(split_after_moves, label, stats, duplicates=n_identical_skipped)`,
  `merge`, `result(meta)` -> Profile; `Profile.dumps()` is the JSON (PROFILE_FILE, beside ingest_report.json and in
  the pushed version). On Beam: create / add / merge / extract = ProfileBuilder(), add, merge_all, result.
- **drift** (evaluate, or a step before training): `compare(profile, champion_profile, DriftThresholds(...),
  policy)` -> DriftResult with `verdict` (pass / warn / refuse), `findings` and a one-line `message()`.
- **report**: `html_section(profile, baseline, leakage, images={id: bytes}, drift=result)` -> an HTML fragment.
- **measuring the hash**: `python -m kfp_finetune.components.dataprofile.measure FOLDER`.
"""

from kfp_finetune.components.dataprofile.drift import DriftResult, DriftThresholds, Finding, compare, tvd
from kfp_finetune.components.dataprofile.hashing import HASH_NAME, THRESHOLD, distance, image_hashes, phash
from kfp_finetune.components.dataprofile.leakage import LeakageResult, LeakedPair, apply_moves, check_leakage
from kfp_finetune.components.dataprofile.neardup import HashRecord, Pair, find_pairs
from kfp_finetune.components.dataprofile.profile import (
    EDGES,
    PROFILE_FILE,
    SCHEMA_VERSION,
    Profile,
    ProfileBuilder,
    SplitProfile,
    build_profile,
)
from kfp_finetune.components.dataprofile.reporthtml import html_section, thumbnail_uri
from kfp_finetune.components.dataprofile.stats import ImageStats, image_stats

__all__ = [
    "EDGES",
    "HASH_NAME",
    "PROFILE_FILE",
    "SCHEMA_VERSION",
    "THRESHOLD",
    "DriftResult",
    "DriftThresholds",
    "Finding",
    "HashRecord",
    "ImageStats",
    "LeakageResult",
    "LeakedPair",
    "Pair",
    "Profile",
    "ProfileBuilder",
    "SplitProfile",
    "apply_moves",
    "build_profile",
    "check_leakage",
    "compare",
    "distance",
    "find_pairs",
    "html_section",
    "image_hashes",
    "image_stats",
    "phash",
    "thumbnail_uri",
    "tvd",
]
