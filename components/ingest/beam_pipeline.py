"""The ingest's Apache Beam pipeline (`build`) and its step functions: matching and classifying files, inspecting
(read, hash, decode check) on the workers, resolving duplicates and conflicts, ranking and writing shards, and the
finalizing step that checks the result and writes the metadata and ingest_report.json inside the job.

Split out of beam_ingest.py (the launcher and KFP component). Everything the Beam graph runs is defined at
module level here, so the pipeline pickles only references to `components.ingest.beam_pipeline`.
"""

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from kfp_finetune.components.core import compat, gcs, imagecheck, safefiles, settings, sources
from kfp_finetune.components.core.dataset import REPORT_FILE, SPLITS
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.dataprofile import PROFILE_FILE, ProfileBuilder
from kfp_finetune.components.ingest import profiling, rules, shards, tfds_format

log = logging.getLogger(__name__)

RANK_PREFIX = 3  # hex digits of the content hash that bucket the ranking: 4096 buckets per split
TMP_PREFIX = ".beam-tmp-"
UNREAD = "unread"  # the tagged output of files that could not be read


# --- records -------------------------------------------------------------------------------------------------------


class Candidate(NamedTuple):
    ref: str  # what the report shows: a local path or a gs:// URI (exactly as the local ingest shows it)
    label: str


class Inspected(NamedTuple):
    ref: str
    label: str
    sha256: str | None  # None: the file could not be read
    size: int
    ok: bool
    reason: str | None
    detail: str
    converted: bool
    resized: bool
    stats: Any = None  # dataprofile.ImageStats of a decoded image (profiling.stats_of)


class Kept(NamedTuple):
    sha256: str
    ref: str
    label: str
    split: str  # the content-hash split, then (after the leakage decision) the final one
    converted: bool
    resized: bool
    stats: Any = None
    duplicates: int = 0  # byte-identical files skipped as its copies


class ShardInfo(NamedTuple):
    split: str
    index: int
    length: int
    num_bytes: int


class Job(NamedTuple):
    """Everything the workers need to know, fixed at launch."""

    source: str
    output: str  # where the dataset goes (a local directory or gs://); must be empty
    tmp: str  # where shards are written before the finalizing step renames them
    seed: int
    val_fraction: float
    test_fraction: float
    fractions: dict[str, float]
    max_side: int | None
    max_corrupt_fraction: float
    num_shards: int | None
    started: float  # time.time() at launch, for the report's seconds
    class_refs: dict[str, str]  # class -> where it came from (known classes of a folder/manifest source)
    fingerprint: str | None = None  # the source's data fingerprint (fingerprint.py), recorded in the report
    leakage: str = "move"  # near-duplicates across splits: move | report (rules.leakage)


def _join(base: str, *parts: str) -> str:
    _emulator_auth()
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(base, *parts)


# --- step functions (module level, so the pipeline pickles only references) ---------------------------------------


def _classify_match(path: str, source: str) -> Iterator[tuple[str, Any]]:
    """A matched object of the gs:// source -> ('candidate', Candidate) or ('skip', skip), and ('class', name) for
    the class it names (the listing rules of components.core.sources.GcsSource)."""
    placed = sources.GcsSource(source).place(path)
    if placed is None:
        return
    rel, reason = placed
    if sources.class_of(rel):
        yield "class", rel[0]
    if reason:
        yield "skip", rules.skip(path, reason)
    else:
        yield "candidate", Candidate(path, rel[0])


def _as_outputs(pairs: Iterable[tuple[str, Any]], main: str) -> Iterator[Any]:
    """(kind, value) pairs as one ParDo's outputs: the `main` kind on the main output, every other kind tagged by
    its name, so no later step has to filter the whole collection again."""
    from apache_beam import pvalue

    for kind, value in pairs:
        yield value if kind == main else pvalue.TaggedOutput(kind, value)


def _classify_tagged(match: Any, source: str) -> Iterator[Any]:
    """`_classify_match` as outputs: candidates (main), skips and class names (tagged)."""
    return _as_outputs(_classify_match(match.path, source), "candidate")


def _emulator_auth() -> None:
    """Against a GCS emulator (STORAGE_EMULATOR_HOST), Beam's GCS filesystem connects anonymously at once instead
    of looking for credentials first (~20 s of retries per process): google-cloud-storage then talks to the
    emulator. Beam has no option for this, so its per-process credentials cache is filled with "none"."""
    if settings.storage_emulator_host():
        compat.beam_anonymous_gcs()


def _read(ref: str) -> bytes:
    if not gcs.is_gcs(ref):  # a local file: opened non-blocking, regular files only, bounded (safefiles.py)
        return sources.read(ref)
    _emulator_auth()
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    raw = CompressionTypes.UNCOMPRESSED
    with FileSystems.open(ref, mime_type="application/octet-stream", compression_type=raw) as f:
        data = f.read(safefiles.MAX_FILE_BYTES + 1)  # the local runner's bound: never more in memory
    if len(data) > safefiles.MAX_FILE_BYTES:
        raise safefiles.UnsafeFile(safefiles.TOO_LARGE, f"over the {safefiles.MAX_FILE_BYTES:,}-byte limit")
    return data


def _exists(ref: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    try:
        return FileSystems.exists(ref)
    except Exception:  # noqa: BLE001  (a bucket we cannot even ask about counts as missing)
        return False


def inspect(candidate: Candidate, max_side: int | None) -> Inspected:
    """Read, hash and decode-check one file (on a worker)."""
    try:
        data = _read(candidate.ref)
    except Exception as exc:  # noqa: BLE001  (BeamIOError, OSError, google.api_core errors)
        reason = imagecheck.UNREADABLE if _exists(candidate.ref) else rules.MISSING
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if isinstance(exc, safefiles.UnsafeFile):  # swapped for a FIFO, a device or a huge file since the listing
            reason, detail = exc.reason, exc.detail
        return Inspected(candidate.ref, candidate.label, None, 0, False, reason, detail, False, False)
    digest = imagecheck.hash_bytes(data)
    result = imagecheck.decode_bytes(data, max_side, profiling.stats_of)
    return Inspected(
        candidate.ref, candidate.label, digest.sha256, digest.size, result.ok, result.reason, result.detail,
        result.converted, result.resized, result.stats,
    )


def keyed(inspected: Inspected) -> Iterator[Any]:
    """An inspected file -> (sha256, Inspected) for the grouping, or a skip (tagged `UNREAD`) when unreadable."""
    from apache_beam import pvalue

    if inspected.sha256 is None:
        yield pvalue.TaggedOutput(UNREAD, rules.skip(inspected.ref, inspected.reason, inspected.detail))
    else:
        yield inspected.sha256, inspected


def resolve(sha: str, group: Iterable[Inspected], job: Job) -> Iterator[tuple[str, Any]]:
    """One content hash -> ('size', bytes) once, then ('kept', Kept) and/or ('skip', skip) as the local ingest."""
    items = sorted(group, key=lambda e: e.ref)
    first = items[0]
    yield "size", first.size
    if not first.ok:
        for e in items:
            yield "skip", rules.skip(e.ref, first.reason, first.detail)
        return
    keep, skips = rules.resolve_group([(e.ref, e.label) for e in items])
    for s in skips:
        yield "skip", s
    if keep is None:
        return
    split = rules.split_of(sha, job.seed, job.val_fraction, job.test_fraction)
    duplicates = sum(s["reason"] == rules.DUPLICATE for s in skips)
    yield "kept", Kept(sha, first.ref, first.label, split, first.converted, first.resized, first.stats, duplicates)


def resolve_tagged(kv: tuple[str, Iterable[Inspected]], job: Job) -> Iterator[Any]:
    """`resolve` as outputs: the Kept images (main), skips and sizes (tagged)."""
    return _as_outputs(resolve(kv[0], kv[1], job), "kept")


def move(kept: Kept, leak: Any) -> Kept:
    """A kept image in its final split (the leakage decision, `rules.final_split`)."""
    return kept._replace(split=rules.final_split(kept.sha256, kept.split, leak))


class Tally(NamedTuple):
    """What the finalizing step and the ranking need to know about the kept images, from one pass over them."""

    profile: ProfileBuilder
    buckets: Counter  # (split, hash prefix) -> images
    classes: Counter  # (split, label) -> images
    converted: int = 0
    resized: int = 0


def combine_tally(items: Iterable[Any]) -> Tally:
    """The kept images' combiner (`beam.CombineGlobally`): kept images in their final split and partial tallies,
    mixed (Beam's callable combiner feeds both), into one Tally: the data profile, the images per hash bucket (for
    the ranks), per split and class, and the converted / resized counts. Counts only, so any order gives the same
    result."""
    profile, buckets, classes = ProfileBuilder(), Counter(), Counter()
    converted = resized = 0
    for item in items:
        if isinstance(item, Tally):
            profile = profile.merge(item.profile)
            buckets.update(item.buckets)
            classes.update(item.classes)
            converted, resized = converted + item.converted, resized + item.resized
        else:
            profile.add(item.split, item.label, item.stats, item.duplicates)
            buckets[(item.split, item.sha256[:RANK_PREFIX])] += 1
            classes[(item.split, item.label)] += 1
            converted, resized = converted + int(item.converted), resized + int(item.resized)
    return Tally(profile, buckets, classes, converted, resized)


def bucket_offsets(counts: Iterable[tuple[tuple[str, str], int]]) -> dict[str, Any]:
    """{(split, prefix): n} -> {'offsets': {(split, prefix): images before it in its split}, 'totals': {split: n}}."""
    offsets: dict[tuple[str, str], int] = {}
    totals = dict.fromkeys(SPLITS, 0)
    for (split, prefix), n in sorted(counts):
        offsets[(split, prefix)] = totals[split]
        totals[split] += n
    return {"offsets": offsets, "totals": totals}


def rank(key: tuple[str, str], items: Iterable[Kept], job: Job, ranks: dict, total_bytes: int) -> Iterator:
    """Kept images of one (split, hash prefix) -> ((split, shard), (rank, Kept)): rank = position in the split
    sorted by hash, shard = rank mod the shard count (the local writer's round robin over hash order)."""
    split, _ = key
    start = ranks["offsets"][key]
    n = rules.num_shards(job, split, total_bytes)
    for i, item in enumerate(sorted(items, key=lambda k: k.sha256)):
        r = start + i
        yield (split, r % n), (r, item)


def _tmp_shard(job: Job, split: str, index: int) -> str:
    return _join(job.tmp, f"{split}-{index:05d}.partial")


def write_shard(key: tuple[str, int], items: Iterable[tuple[int, Kept]], job: Job, classes: list[str]) -> ShardInfo:
    """Stream one shard's images, in rank order, into a temporary TFRecord file (one image in memory at a time)."""
    from apache_beam.io.filesystems import FileSystems

    split, index = key
    label_index = {name: i for i, name in enumerate(classes)}
    length = num_bytes = 0
    path = _tmp_shard(job, split, index)
    with FileSystems.create(path, mime_type="application/octet-stream") as f:
        for _, item in sorted(items, key=lambda ri: ri[0]):
            data = shards.checked(_read(item.ref), item.sha256, item.converted or item.resized, job.max_side,
                                  item.ref)
            example = tfds_format.encode_example(data, label_index[item.label])
            tfds_format.write_record(f, example)
            length += 1
            num_bytes += len(example)
    return ShardInfo(split, index, length, num_bytes)


def finalize(
    _: Any, job: Job, classes: list[str], stats: dict[str, int], skips: list[dict], shards: list[ShardInfo],
    tally: Tally, total_bytes: int, leak: Any,
) -> Iterator[dict]:
    """Check the result, rename the shards into place and write the metadata and ingest_report.json (in the job)."""
    from apache_beam.io.filesystems import FileSystems

    def fail(message: str) -> None:
        _delete(job.tmp)
        raise UserError(message)

    num_candidates, num_listed_skips = stats.get("candidates", 0), stats.get("listing_skips", 0)
    if not num_candidates:
        fail(sources.no_images_message(job.source, num_listed_skips))
    skipped = rules.sort_skipped(skips)
    counts = rules.empty_counts(classes)
    for (split, label), n in tally.classes.items():
        counts[split][label] += n
    try:
        rules.check_classes(job.source, classes)
        rules.final_checks(job, classes, counts, skipped, num_candidates, job.class_refs)
    except UserError as exc:
        fail(str(exc))

    split_infos = {}
    by_split = {split: sorted((s for s in shards if s.split == split), key=lambda s: s.index) for split in SPLITS}
    for split in SPLITS:
        infos = by_split[split]
        if not infos:  # an empty split: one empty shard, which TFDS reads as empty (as the local writer does)
            FileSystems.create(_join(job.output, tfds_format.shard_name(split, 0, 1))).close()
            split_infos[split] = ([0], 0)
            log.warning("split %r is empty: too few images for its fraction", split)
            continue
        partials = [_tmp_shard(job, split, s.index) for s in infos]
        targets = [_join(job.output, tfds_format.shard_name(split, i, len(infos))) for i in range(len(infos))]
        FileSystems.rename(partials, targets)
        split_infos[split] = ([s.length for s in infos], sum(s.num_bytes for s in infos))
    for name, data in tfds_format.metadata_files(classes, split_infos, rules.description(job.source)).items():
        _write(_join(job.output, name), data)

    report = rules.report(
        job, classes, counts, skipped, num_candidates=num_candidates, num_listing_skips=num_listed_skips,
        converted=tally.converted, resized=tally.resized,
        shards_per_split={s: len(split_infos[s][0]) for s in SPLITS}, seconds=time.time() - job.started, leak=leak,
    )
    import json

    _write(_join(job.output, PROFILE_FILE), tally.profile.result(rules.profile_meta(job, leak)).dumps().encode())
    _write(_join(job.output, REPORT_FILE), (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode())
    _delete(job.tmp)
    yield report


def _write(path: str, data: bytes) -> None:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path, mime_type="application/octet-stream") as f:
        f.write(data)


def _delete(path: str) -> None:
    """Delete a directory (and what is in it) through Beam's filesystems; quietly when it is not there."""
    from apache_beam.io.filesystems import FileSystems

    try:
        matched = FileSystems.match([_join(path, "**")])[0].metadata_list
        if matched:
            FileSystems.delete([m.path for m in matched])
        if not gcs.is_gcs(path) and os.path.isdir(path):
            import shutil

            shutil.rmtree(path, ignore_errors=True)
    except Exception as exc:  # noqa: BLE001
        log.debug("could not delete %s: %s", path, exc)


# --- the pipeline --------------------------------------------------------------------------------------------------


def _sum_stats(items: Iterable[dict[str, int]]) -> dict[str, int]:
    out: Counter = Counter()
    for item in items:
        out.update(item)
    return dict(out)


class Listing:
    """The launcher's listing as one opaque argument: Beam type-checks a tuple argument element by element (one
    PipelineOptions parse per element: ~30 s for 15,000 files), an object once."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = tuple(items)


def _emit(_: Any, listing: Listing) -> tuple[Any, ...]:
    return listing.items


def build(pipeline: Any, job: Job, candidates: Sequence[Candidate] | None, known_classes: Sequence[str],
          skipped: Sequence[dict[str, str]] = ()) -> Any:
    """Add the ingest to a beam.Pipeline; `candidates` (and the listing's `skipped`) for a source listed by the
    launcher (components.core.sources), else (None) the gs:// source's objects are matched by Beam's file IO.

    Few steps on purpose: each ParDo costs the launcher its translation and the runner a stage, and on the
    DirectRunner that fixed cost is what a small ingest pays. One ParDo with tagged outputs splits a collection
    instead of one filter per kind, and one combiner (`combine_tally`) counts everything the kept images feed.
    """
    import apache_beam as beam
    from apache_beam.io import fileio

    p = pipeline
    if candidates is None:
        listed = (
            p
            | "Pattern" >> beam.Create([sources.GcsSource(job.source).root + "**"])
            | "Match" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
            | "Classify" >> beam.FlatMap(_classify_tagged, job.source).with_outputs("skip", "class", main="candidate")
        )
        cands, listing_skips = listed.candidate, listed.skip
        classes = (
            (listed["class"], p | "KnownClasses" >> beam.Create(list(known_classes)))
            | "AllClasses" >> beam.Flatten()
            | "DistinctClasses" >> beam.Distinct()
            | "ClassList" >> beam.combiners.ToList()
            | "Sorted" >> beam.Map(sorted)
        )
        stats = (
            (
                cands | "CountCandidates" >> beam.Map(lambda _: {"candidates": 1}),
                listing_skips | "CountListingSkips" >> beam.Map(lambda _: {"listing_skips": 1}),
            )
            | "AllStats" >> beam.Flatten()
            | "SumStats" >> beam.CombineGlobally(_sum_stats)
        )
    else:
        # The listing travels as one argument of one step (pickled once), not as beam.Create's per-element source:
        # at 15,000 files that is ~0.2 s of the launcher's time instead of ~1.2 s.
        impulse = p | "Listing" >> beam.Impulse()
        cands = impulse | "Candidates" >> beam.FlatMap(_emit, Listing(candidates))
        listing_skips = impulse | "ListingSkips" >> beam.FlatMap(_emit, Listing(skipped))
        classes = p | "ClassList" >> beam.Create([sorted(set(known_classes))])
        stats = p | "Stats" >> beam.Create([{"candidates": len(candidates), "listing_skips": len(skipped)}])

    inspected = (
        cands
        | "Spread" >> beam.Reshuffle()
        | "Inspect" >> beam.Map(inspect, job.max_side)
        | "ByHash" >> beam.FlatMap(keyed).with_outputs(UNREAD, main="readable")
    )
    resolved = (
        inspected.readable
        | "GroupHash" >> beam.GroupByKey()
        | "Resolve" >> beam.FlatMap(resolve_tagged, job).with_outputs("skip", "size", main="kept")
    )
    unmoved = resolved.kept
    # The leakage decision needs every kept image's hashes (small records, one list); the moves are a side input,
    # applied before anything is ranked, counted or written.
    leak = (
        unmoved
        | "HashRecords" >> beam.Map(lambda k: rules.hash_record(k.sha256, k.ref, k.label, k.split, k.stats))
        | "AllRecords" >> beam.combiners.ToList()
        | "Leakage" >> beam.Map(lambda records, j: rules.leakage(records, j.leakage), job)
    )
    kept = unmoved | "Move" >> beam.Map(move, beam.pvalue.AsSingleton(leak))
    tally = kept | "Tally" >> beam.CombineGlobally(combine_tally)
    total_bytes = resolved.size | "TotalBytes" >> beam.CombineGlobally(sum)
    ranks = tally | "Offsets" >> beam.Map(lambda t: bucket_offsets(t.buckets.items()))
    shards = (
        kept
        | "ByBucket" >> beam.Map(lambda k: ((k.split, k.sha256[:RANK_PREFIX]), k))
        | "GroupBucket" >> beam.GroupByKey()
        | "Rank" >> beam.FlatMap(
            lambda kv, j, r, t: rank(kv[0], kv[1], j, r, t), job,
            beam.pvalue.AsSingleton(ranks), beam.pvalue.AsSingleton(total_bytes),
        )
        | "GroupShard" >> beam.GroupByKey()
        | "WriteShard" >> beam.Map(
            lambda kv, j, c: write_shard(kv[0], kv[1], j, c), job, beam.pvalue.AsSingleton(classes)
        )
    )
    skips = (listing_skips, inspected[UNREAD], resolved.skip) | "AllSkips" >> beam.Flatten()
    return (
        p
        | "Once" >> beam.Create([None])
        | "Finalize" >> beam.FlatMap(
            finalize, job,
            beam.pvalue.AsSingleton(classes), beam.pvalue.AsSingleton(stats), beam.pvalue.AsList(skips),
            beam.pvalue.AsList(shards), beam.pvalue.AsSingleton(tally), beam.pvalue.AsSingleton(total_bytes),
            beam.pvalue.AsSingleton(leak),
        )
    )
