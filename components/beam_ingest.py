"""The ingest step on Apache Beam: `kfp-finetune ingest --runner direct|dataflow`.

The same dataset as the local ingest (components/ingest.py), record for record, from one Beam pipeline that runs on
the DirectRunner here and on Dataflow in Google Cloud:

1. match the files with Beam's file IO (`fileio.MatchAll`, a manifest is read by the launcher); only names and sizes
   are listed, nothing is downloaded;
2. on the workers, read each file's bytes through Beam's filesystems, SHA-256 them and run the decode check of
   `components.imagecheck.decode_bytes` (the one implementation both runners use);
3. group by content hash: identical bytes under one label are kept once, under several labels left out as conflicts;
   each image's split is `ingest._split_of` (the same rule, so the same split membership);
4. rank every kept image in its split by content hash (counts per hash prefix give each bucket's offset, so no
   worker ever holds a split) and deal the ranks round-robin over the shards, exactly as the local writer does;
5. write each shard with `components.tfds_format` through Beam's filesystems, as a temporary file, re-reading the
   image bytes (only small keys go through the shuffles, never image bytes);
6. one finalizing step checks the result (no images, fewer than 2 classes, too many corrupt files, a class with no
   valid image), renames the shards into place and writes dataset_info.json, features.json, label.labels.txt and
   ingest_report.json. It runs inside the job, so a fire-and-forget Dataflow launch still yields a complete dataset,
   and a failed check leaves no shard behind.

Workers import Pillow, numpy and google-crc32c, never TensorFlow; each holds one image and one shard's keys at a time.
"""

# No `from __future__ import annotations`: KFP reads ingest_beam_op's annotations as real types.
import difflib
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kfp import dsl

from components import __version__, gcs, imagecheck, settings, tfds_format
from components.dataset import REPORT_FILE, SPLITS
from components.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from components.ingest import IngestConfig, IngestResult

log = logging.getLogger(__name__)

RUNNERS = ("local", "direct", "dataflow")
BEAM_RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner"}
# `ingest` flags that are Beam pipeline options under their Beam name (the rest go through --beam-option KEY=VALUE).
SHORTHAND_OPTIONS = ("project", "region", "temp_location", "max_num_workers", "sdk_container_image")
# What DataflowRunner cannot run without; checked before anything is sent.
DATAFLOW_REQUIRED = ("project", "region", "temp_location")
RANK_PREFIX = 3  # hex digits of the content hash that bucket the ranking: 4096 buckets per split
TMP_PREFIX = ".beam-tmp-"
_USER_ERROR = re.compile(r"UserError: ([^\n]+)")


# --- options -------------------------------------------------------------------------------------------------------


def parse_option(text: str) -> tuple[str, str]:
    """'max_num_workers=10' (or '--max_num_workers=10') -> ('max_num_workers', '10')."""
    key, sep, value = str(text).partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise UserError(f"--beam-option {text!r}: expected KEY=VALUE, e.g. max_num_workers=10")
    return key, value.strip()


def _known_options() -> dict[str, Any]:
    """Every option Beam's PipelineOptions subclasses define: {dest name: argparse action}."""
    import argparse

    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(add_help=False)
    seen, stack = set(), list(PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:  # an option two subclasses both define
            continue
    return {a.dest: a for a in parser._actions}


def pipeline_flags(runner: str, options: Iterable[str], job_name: str | None = None) -> list[str]:
    """The Beam command-line flags for `runner` and the KEY=VALUE `options`; raises UserError for a key Beam does
    not know (naming the closest one), a value it rejects, or a Dataflow setting that is missing."""
    if runner not in BEAM_RUNNERS:
        raise UserError(f"--runner {runner!r}: expected one of {', '.join(RUNNERS)}")
    pairs = dict(parse_option(o) for o in options)
    known = _known_options()
    for key in pairs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else "see `python -m apache_beam.options.pipeline_options`"
            raise UserError(f"--beam-option {key}: Beam has no such pipeline option; {hint}")
    if "runner" in pairs:
        raise UserError(f"--beam-option runner={pairs['runner']}: choose the runner with --runner direct|dataflow")
    defaults: dict[str, str] = {}
    if runner == "direct":
        if "direct_running_mode" not in pairs and "direct_num_workers" not in pairs:  # one process per core
            defaults = {"direct_running_mode": "multi_processing", "direct_num_workers": "0"}
    else:
        defaults = {"sdk_container_image": settings.component_image()}  # workers run our own image: same versions
        if job_name:
            defaults["job_name"] = job_name
        missing = [k for k in DATAFLOW_REQUIRED if not pairs.get(k)]
        if missing:
            raise UserError(
                f"--runner dataflow needs {', '.join('--' + k for k in missing)}; "
                "e.g. --project my-project --region europe-west4 --temp_location gs://my-bucket/tmp"
            )
        if not gcs.is_gcs(pairs["temp_location"]):
            raise UserError(f"--temp_location {pairs['temp_location']}: Dataflow needs a gs:// location")
    merged = {**defaults, **pairs}
    flags = [f"--runner={BEAM_RUNNERS[runner]}"]
    for key, value in merged.items():
        action = known[key]
        if action.nargs == 0:  # store_true flags: KEY=true / KEY=false
            if value.lower() in ("", "true", "1", "yes"):
                flags.append(f"--{key}")
            elif value.lower() not in ("false", "0", "no"):
                raise UserError(f"--beam-option {key}={value}: {key} is a switch; give true or false")
        elif action.type is int and not re.fullmatch(r"-?\d+", value):
            raise UserError(f"--beam-option {key}={value}: {key} takes a whole number")
        elif action.choices and value not in action.choices:
            raise UserError(f"--beam-option {key}={value}: expected one of {', '.join(map(str, action.choices))}")
        else:
            flags.append(f"--{key}={value}")
    return flags


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


class Kept(NamedTuple):
    sha256: str
    ref: str
    label: str
    split: str
    converted: bool
    resized: bool


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
    fingerprint: str | None = None  # the source's data fingerprint (components.fingerprint), recorded in the report


def _skip(path: str, reason: str, detail: str = "") -> dict[str, str]:
    return {"path": path, "reason": reason, "detail": detail}


def _join(base: str, *parts: str) -> str:
    _emulator_auth()
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(base, *parts)


# --- step functions (module level, so the pipeline pickles only references) ---------------------------------------


def _listing_root(source: str) -> str:
    """The prefix that every matched path of a folder/gs:// source starts with, ending in a separator."""
    if gcs.is_gcs(source):
        return source.rstrip("/") + "/"
    return os.path.abspath(os.path.expanduser(source)).rstrip(os.sep) + os.sep


def _classify_match(path: str, source: str) -> Iterator[tuple[str, Any]]:
    """A matched file -> ('candidate', Candidate) or ('skip', skip), and ('class', name) for the class it names."""
    from components.ingest import _classify

    root = _listing_root(source)
    if not path.startswith(root):
        return
    sep = "/" if gcs.is_gcs(source) else os.sep
    rel = tuple(p for p in path[len(root) :].split(sep) if p)
    if gcs.is_gcs(source):
        ref = path
    else:
        ref = os.path.join(str(Path(source).expanduser()), *rel)
    if len(rel) >= 2 and not rel[0].startswith("."):
        yield "class", rel[0]
    reason = _classify(rel)
    if reason:
        yield "skip", _skip(ref, reason)
    else:
        yield "candidate", Candidate(ref, rel[0])


def _emulator_auth() -> None:
    """Against a GCS emulator (STORAGE_EMULATOR_HOST), Beam's GCS filesystem connects anonymously at once instead
    of looking for credentials first (~20 s of retries per process): google-cloud-storage then talks to the
    emulator. Beam has no option for this, so its per-process credentials cache is filled with "none"."""
    if not settings.storage_emulator_host():
        return
    try:
        from apache_beam.internal.gcp import auth

        with auth._Credentials._credentials_lock:
            if not auth._Credentials._credentials_init:
                auth._Credentials._credentials, auth._Credentials._credentials_init = None, True
    except (ImportError, AttributeError):  # pragma: no cover  (a Beam version without that cache: just slower)
        pass


def _read(ref: str) -> bytes:
    _emulator_auth()
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    raw = CompressionTypes.UNCOMPRESSED
    with FileSystems.open(ref, mime_type="application/octet-stream", compression_type=raw) as f:
        return f.read()


def _exists(ref: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    try:
        return FileSystems.exists(ref)
    except Exception:  # noqa: BLE001  (a bucket we cannot even ask about counts as missing)
        return False


def inspect(candidate: Candidate, max_side: int | None) -> Inspected:
    """Read, hash and decode-check one file (on a worker)."""
    from components.ingest import MISSING

    try:
        data = _read(candidate.ref)
    except Exception as exc:  # noqa: BLE001  (BeamIOError, OSError, google.api_core errors)
        reason = imagecheck.UNREADABLE if _exists(candidate.ref) else MISSING
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return Inspected(candidate.ref, candidate.label, None, 0, False, reason, detail, False, False)
    digest = imagecheck.hash_bytes(data)
    result = imagecheck.decode_bytes(data, max_side)
    return Inspected(
        candidate.ref, candidate.label, digest.sha256, digest.size, result.ok, result.reason, result.detail,
        result.converted, result.resized,
    )


def resolve(sha: str, group: Iterable[Inspected], job: Job) -> Iterator[tuple[str, Any]]:
    """One content hash -> ('size', bytes) once, then ('kept', Kept) and/or ('skip', skip) as the local ingest."""
    from components.ingest import CONFLICT, DUPLICATE, _split_of

    items = sorted(group, key=lambda e: e.ref)
    first = items[0]
    yield "size", first.size
    if not first.ok:
        for e in items:
            yield "skip", _skip(e.ref, first.reason, first.detail)
        return
    labels = sorted({e.label for e in items})
    if len(labels) > 1:
        detail = f"identical bytes labelled {', '.join(map(repr, labels))}: " + ", ".join(e.ref for e in items)
        for e in items:
            yield "skip", _skip(e.ref, CONFLICT, detail)
        return
    for e in items[1:]:
        yield "skip", _skip(e.ref, DUPLICATE, f"same bytes as {first.ref}")
    split = _split_of(sha, job.seed, job.val_fraction, job.test_fraction)
    yield "kept", Kept(sha, first.ref, first.label, split, first.converted, first.resized)


def bucket_offsets(counts: Iterable[tuple[tuple[str, str], int]]) -> dict[str, Any]:
    """{(split, prefix): n} -> {'offsets': {(split, prefix): images before it in its split}, 'totals': {split: n}}."""
    offsets: dict[tuple[str, str], int] = {}
    totals = dict.fromkeys(SPLITS, 0)
    for (split, prefix), n in sorted(counts):
        offsets[(split, prefix)] = totals[split]
        totals[split] += n
    return {"offsets": offsets, "totals": totals}


def num_shards(job: Job, split: str, total_bytes: int) -> int:
    """The local writer's shard count for `split` (before it drops the shards that stayed empty)."""
    from components.ingest import _auto_shards

    return job.num_shards or _auto_shards(total_bytes, job.fractions[split])


def rank(key: tuple[str, str], items: Iterable[Kept], job: Job, ranks: dict, total_bytes: int) -> Iterator:
    """Kept images of one (split, hash prefix) -> ((split, shard), (rank, Kept)): rank = position in the split
    sorted by hash, shard = rank mod the shard count (the local writer's round robin over hash order)."""
    split, _ = key
    start = ranks["offsets"][key]
    n = num_shards(job, split, total_bytes)
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
            data = _read(item.ref)
            if imagecheck.hash_bytes(data).sha256 != item.sha256:
                raise RuntimeError(f"{item.ref} changed while it was being ingested; run the ingest again")
            if item.converted or item.resized:
                result = imagecheck.decode_bytes(data, job.max_side)
                if not result.ok or result.data is None:  # pragma: no cover  (decoded fine moments ago)
                    raise RuntimeError(f"{item.ref}: decode check gave a different answer the second time")
                data = result.data
            example = tfds_format.encode_example(data, label_index[item.label])
            tfds_format.write_record(f, example)
            length += 1
            num_bytes += len(example)
    return ShardInfo(split, index, length, num_bytes)


def _no_images_message(source: str, others: int) -> str:
    return (
        f"--source {source}: no image files found ({others} other files); expected one folder of "
        "JPEG/PNG/... images per class"
    )


def finalize(
    _: Any, job: Job, classes: list[str], stats: dict[str, int], skips: list[dict], shards: list[ShardInfo],
    class_counts: list[tuple[tuple[str, str], int]], total_bytes: int,
) -> Iterator[dict]:
    """Check the result, rename the shards into place and write the metadata and ingest_report.json (in the job)."""
    from apache_beam.io.filesystems import FileSystems

    from components.ingest import BAD_REASONS

    def fail(message: str) -> None:
        _delete(job.tmp)
        raise UserError(message)

    num_candidates, num_listed_skips = stats.get("candidates", 0), stats.get("listing_skips", 0)
    if not num_candidates:
        fail(_no_images_message(job.source, num_listed_skips))
    if len(classes) < 2:
        fail(
            f"--source {job.source}: found {len(classes)} class(es) {classes}; "
            "a classifier needs at least 2 (one sub-folder or label per class)"
        )
    skipped = sorted(skips, key=lambda s: (s["path"], s["reason"]))
    bad = [s for s in skipped if s["reason"] in BAD_REASONS]
    if num_candidates and len(bad) / num_candidates > job.max_corrupt_fraction:
        examples = "; ".join(f"{s['path']}: {s['detail'] or s['reason']}" for s in bad[:3])
        fail(
            f"--source {job.source}: {len(bad)} of {num_candidates} image files are unusable "
            f"({len(bad) / num_candidates:.1%} > --max-corrupt-fraction {job.max_corrupt_fraction}); "
            f"fix or remove them, or raise the limit. First: {examples}"
        )
    counts = {split: dict.fromkeys(classes, 0) for split in SPLITS}
    for (split, label), n in class_counts:
        counts[split][label] += n
    for name in classes:
        if not any(counts[split][name] for split in SPLITS):
            fail(
                f"--source {job.source}: class {name!r} ({job.class_refs.get(name, name)}) has no valid image; "
                "add images or remove it"
            )

    split_infos = {}
    by_split = {split: sorted((s for s in shards if s.split == split), key=lambda s: s.index) for split in SPLITS}
    for split in SPLITS:
        infos = by_split[split]
        if not infos:  # an empty split: one empty shard, which TFDS reads as empty (as the local writer does)
            FileSystems.create(_join(job.output, tfds_format.shard_name(split, 0, 1))).close()
            split_infos[split] = ([0], 0)
            log.warning("split %r is empty: too few images for its fraction", split)
            continue
        sources = [_tmp_shard(job, split, s.index) for s in infos]
        targets = [_join(job.output, tfds_format.shard_name(split, i, len(infos))) for i in range(len(infos))]
        FileSystems.rename(sources, targets)
        split_infos[split] = ([s.length for s in infos], sum(s.num_bytes for s in infos))
    description = f"Images ingested by kfp-finetune {__version__} from {job.source}"
    for name, data in tfds_format.metadata_files(classes, split_infos, description).items():
        _write(_join(job.output, name), data)

    num_examples = {split: sum(counts[split].values()) for split in SPLITS}
    total = sum(num_examples.values())
    seconds = time.time() - job.started
    report = {
        "source": job.source,
        "data_fingerprint": job.fingerprint or None,
        "seed": job.seed,
        "fractions": job.fractions,
        "max_side": job.max_side,
        "class_names": list(classes),
        "num_examples": num_examples,
        "counts": counts,
        "num_files": num_candidates + num_listed_skips,
        "num_image_files": num_candidates,
        "converted": stats.get("converted", 0),
        "resized": stats.get("resized", 0),
        "num_shards": {split: len(split_infos[split][0]) for split in SPLITS},
        "skipped_counts": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "images_per_second": round(total / max(seconds, 1e-9), 1),
        "kfp_finetune_version": __version__,
    }
    import json

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


def build(pipeline: Any, job: Job, candidates: Sequence[Candidate] | None, known_classes: Sequence[str]) -> Any:
    """Add the ingest to a beam.Pipeline; `candidates` for a manifest source, else the source is matched."""
    import apache_beam as beam
    from apache_beam.io import fileio

    p = pipeline
    if candidates is None:
        root = _listing_root(job.source)
        listed = (
            p
            | "Pattern" >> beam.Create([root + "**"])
            | "Match" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
            | "Classify" >> beam.FlatMap(lambda m, source: _classify_match(m.path, source), job.source)
        )
        cands = listed | "Candidates" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "candidate" else [])
        listing_skips = listed | "ListingSkips" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "skip" else [])
        seen_classes = listed | "Classes" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "class" else [])
    else:
        cands = p | "Candidates" >> beam.Create(list(candidates))
        listing_skips = p | "ListingSkips" >> beam.Create([])
        seen_classes = p | "Classes" >> beam.Create([])
    classes = (
        (seen_classes, p | "KnownClasses" >> beam.Create(list(known_classes)))
        | "AllClasses" >> beam.Flatten()
        | "DistinctClasses" >> beam.Distinct()
        | "ClassList" >> beam.combiners.ToList()
        | "Sorted" >> beam.Map(sorted)
    )

    inspected = (
        cands
        | "Spread" >> beam.Reshuffle()
        | "Inspect" >> beam.Map(inspect, job.max_side)
    )
    unread = inspected | "Unread" >> beam.FlatMap(
        lambda e: [] if e.sha256 is not None else [_skip(e.ref, e.reason, e.detail)]
    )
    resolved = (
        inspected
        | "ByHash" >> beam.FlatMap(lambda e: [] if e.sha256 is None else [(e.sha256, e)])
        | "GroupHash" >> beam.GroupByKey()
        | "Resolve" >> beam.FlatMap(lambda kv, j: resolve(kv[0], kv[1], j), job)
    )
    kept = resolved | "Kept" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "kept" else [])
    group_skips = resolved | "GroupSkips" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "skip" else [])
    total_bytes = (
        resolved
        | "Sizes" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "size" else [])
        | "TotalBytes" >> beam.CombineGlobally(sum)
    )
    ranks = (
        kept
        | "BucketKeys" >> beam.Map(lambda k: ((k.split, k.sha256[:RANK_PREFIX]), 1))
        | "BucketCounts" >> beam.CombinePerKey(sum)
        | "BucketList" >> beam.combiners.ToList()
        | "Offsets" >> beam.Map(bucket_offsets)
    )
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
    class_counts = (
        kept
        | "ClassKeys" >> beam.Map(lambda k: ((k.split, k.label), 1))
        | "ClassCounts" >> beam.CombinePerKey(sum)
    )
    stats = (
        (
            cands | "CountCandidates" >> beam.Map(lambda _: {"candidates": 1}),
            listing_skips | "CountListingSkips" >> beam.Map(lambda _: {"listing_skips": 1}),
            kept | "CountConverted" >> beam.Map(lambda k: {"converted": int(k.converted), "resized": int(k.resized)}),
        )
        | "AllStats" >> beam.Flatten()
        | "SumStats" >> beam.CombineGlobally(_sum_stats)
    )
    skips = (listing_skips, unread, group_skips) | "AllSkips" >> beam.Flatten()
    return (
        p
        | "Once" >> beam.Create([None])
        | "Finalize" >> beam.FlatMap(
            finalize, job,
            beam.pvalue.AsSingleton(classes), beam.pvalue.AsSingleton(stats), beam.pvalue.AsList(skips),
            beam.pvalue.AsList(shards), beam.pvalue.AsList(class_counts), beam.pvalue.AsSingleton(total_bytes),
        )
    )


# --- launcher ------------------------------------------------------------------------------------------------------


def _check_source(source: str) -> None:
    """Fail fast, before the job, on a gs:// bucket that does not exist or a prefix with nothing under it."""
    from apache_beam.io.filesystems import FileSystems

    _emulator_auth()
    pattern = _listing_root(source) + "**"
    bucket = gcs.split_uri(source)[0] if gcs.is_gcs(source) else None
    try:
        found = FileSystems.match([pattern], limits=[1])[0].metadata_list
    except Exception as exc:  # noqa: BLE001  (BeamIOError around NotFound / Forbidden / connection errors)
        text = str(exc)
        if bucket and ("404" in text or "NotFound" in text or "does not exist" in text or "not exist" in text):
            raise UserError(
                f"--source {source}: bucket gs://{bucket} does not exist (or is not visible to these credentials); "
                "check the bucket name"
            ) from exc
        raise UserError(f"--source {source}: cannot list it ({text.splitlines()[0] if text else exc!r})") from exc
    if not found:
        if bucket:
            raise UserError(
                f"--source {source}: no objects under this prefix; check the path (expected "
                f"gs://{bucket}/PREFIX/CLASS/IMAGE.jpg)"
            )
        if not os.path.isdir(os.path.expanduser(source)):
            raise UserError(f"--source {source}: no such directory; check the path")


def _known_classes(source: str) -> dict[str, str]:
    if gcs.is_gcs(source):
        return {}
    root = Path(source).expanduser()
    if not root.exists():
        raise UserError(f"--source {source}: no such directory; check the path")
    if not root.is_dir():
        raise UserError(f"--source {source} is not a directory (for a manifest, name it *.csv)")
    return {p.name: str(root / p.name) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def _user_error(exc: BaseException) -> UserError | None:
    """The UserError a failed job raised on a worker (runners wrap it in their own exceptions)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _wrapped_user_error(exc: BaseException) -> UserError | None:
    found = _user_error(exc)
    if found:
        return found
    match = _USER_ERROR.search(str(exc))
    return UserError(match.group(1).strip()) if match else None


def run(config: "IngestConfig") -> "IngestResult":
    """Run the ingest of `config` on Beam (`config.runner` direct or dataflow) and wait for it."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from components.fsutil import atomic_directory, check_output_dir
    from components.ingest import IngestResult, _read_manifest

    start = time.perf_counter()
    source = config.source
    if source.startswith("tfds:"):
        raise UserError(f"--source {source}: tfds: sources run with --runner local (TFDS prepares them on one machine)")
    job_name = f"kfp-finetune-ingest-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    flags = pipeline_flags(config.runner, config.beam_options, job_name)
    output = config.output
    remote_output = gcs.is_gcs(output)
    if config.runner == "dataflow" and not remote_output:
        raise UserError(f"--output {output}: Dataflow workers write to gs://; give a gs:// --output for dataflow")
    if source.lower().endswith(".csv"):
        listing = _read_manifest(source)
        candidates: list[Candidate] | None = [Candidate(e.ref, e.label) for e in listing.entries]
        class_refs = dict(listing.class_refs)
        if not candidates:
            raise UserError(_no_images_message(source, 0))
    else:
        candidates = None
        class_refs = _known_classes(source)
        _check_source(source)

    def launch(out: str) -> dict:
        job = Job(
            source=source, output=out, tmp=_join(out, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"), seed=config.seed,
            val_fraction=config.val_fraction, test_fraction=config.test_fraction, fractions=config.fractions,
            max_side=config.max_side, max_corrupt_fraction=config.max_corrupt_fraction, num_shards=config.num_shards,
            started=time.time(), class_refs=class_refs, fingerprint=config.fingerprint,
        )
        log.info("ingest on Beam %s: %s", BEAM_RUNNERS[config.runner], " ".join(flags))
        pipeline = beam.Pipeline(options=PipelineOptions(flags))
        build(pipeline, job, candidates, list(class_refs))
        try:
            result = pipeline.run()
            result.wait_until_finish()
        except Exception as exc:
            _delete(job.tmp)
            found = _wrapped_user_error(exc)
            if found:
                raise found from None
            raise
        state = str(getattr(result, "state", "DONE"))
        if "DONE" not in state.upper():
            _delete(job.tmp)
            raise UserError(f"--runner {config.runner}: the Beam job ended {state}; see its logs")
        import json

        return json.loads(_read(_join(out, REPORT_FILE)))

    if remote_output:
        from apache_beam.io.filesystems import FileSystems

        if FileSystems.match([_join(output, "**")], limits=[1])[0].metadata_list:
            raise UserError(f"--output {output} already holds files; give a new (empty) location")
        report = launch(output)
    else:
        check_output_dir(output)
        with atomic_directory(output) as tmp:
            report = launch(str(tmp))
    seconds = time.perf_counter() - start
    result = IngestResult(
        output=Path(output) if not remote_output else Path(output.replace("gs://", "/gcs/", 1)),
        class_names=tuple(report["class_names"]),
        num_examples=report["num_examples"],
        counts=report["counts"],
        num_skipped=len(report["skipped"]),
        seconds=seconds,
        report=report,
    )
    total = sum(result.num_examples.values())
    log.info(
        "ingested %d images on Beam %s in %.1f s (%.0f images/s): %s; %d classes; skipped %d -> %s",
        total, BEAM_RUNNERS[config.runner], seconds, total / max(seconds, 1e-9),
        ", ".join(f"{s} {n}" for s, n in result.num_examples.items()), len(result.class_names),
        result.num_skipped, output,
    )
    return result

# --- Dataflow settings of a compiled pipeline (`kfp-finetune compile --dataflow`) ---------------------------------

_REGION = re.compile(r"[a-z]+-[a-z]+\d+")
_MACHINE = re.compile(r"[a-z0-9]+-[a-z0-9]+(-\d+)?")
_EMAIL = re.compile(r"[a-z0-9-]+@[a-z0-9-]+\.iam\.gserviceaccount\.com|[^@\s]+@[^@\s]+\.[a-z]+")


@dataclass(frozen=True)
class DataflowSettings:
    """Where and how the pipeline's ingest step runs on Dataflow; validated on construction (UserError naming the
    flag). `project` empty: the project the pipeline runs in (its default credentials' project)."""

    region: str
    temp_location: str
    max_num_workers: int = 10
    machine_type: str = ""
    service_account: str = ""
    network: str = ""
    subnetwork: str = ""
    project: str = ""

    def __post_init__(self) -> None:
        if not _REGION.fullmatch(self.region or ""):
            raise UserError(f"--dataflow-region {self.region!r}: expected a region such as europe-west4")
        if not gcs.is_gcs(self.temp_location or "") or len(self.temp_location.rstrip("/")) <= len("gs://"):
            raise UserError(
                f"--dataflow-temp-location {self.temp_location!r}: expected a gs:// folder, e.g. gs://my-bucket/tmp"
            )
        if not isinstance(self.max_num_workers, int) or self.max_num_workers < 1:
            raise UserError(f"--dataflow-max-workers {self.max_num_workers!r}: must be 1 or more")
        if self.machine_type and not _MACHINE.fullmatch(self.machine_type):
            raise UserError(f"--dataflow-machine-type {self.machine_type!r}: expected e.g. n2-standard-4")
        if self.service_account and not _EMAIL.fullmatch(self.service_account):
            raise UserError(
                f"--dataflow-service-account {self.service_account!r}: expected an email, "
                "e.g. ingest@my-project.iam.gserviceaccount.com"
            )
        for flag, value in (("--dataflow-network", self.network), ("--dataflow-subnetwork", self.subnetwork),
                            ("--dataflow-project", self.project)):
            if value and any(c.isspace() for c in value):
                raise UserError(f"{flag} {value!r} may not contain spaces")

    def beam_options(self, image: str) -> list[str]:
        """KEY=VALUE Beam options; workers run `image` (the pipeline's own image, so versions match)."""
        options = [f"region={self.region}", f"temp_location={self.temp_location}",
                   f"max_num_workers={self.max_num_workers}", f"sdk_container_image={image}"]
        for key, value in (("machine_type", self.machine_type), ("service_account_email", self.service_account),
                           ("network", self.network), ("subnetwork", self.subnetwork), ("project", self.project)):
            if value:
                options.append(f"{key}={value}")
        return options


def check_dataflow_options(options: Sequence[str]) -> None:
    """What `submit` runs on a compiled pipeline's Dataflow options before any network call: every key must be a
    Beam option (when apache-beam is installed here) and the Dataflow settings must be there."""
    pairs = dict(parse_option(o) for o in options)
    for key in ("region", "temp_location", "sdk_container_image"):
        if not pairs.get(key):
            raise UserError(f"the compiled pipeline's Dataflow options lack {key}; recompile with --dataflow-{key}")
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        log.debug("apache-beam not installed here: Dataflow option names are checked when the step runs")
        return
    with_project = list(options) if pairs.get("project") else [*options, "project=from-the-pipeline"]
    pipeline_flags("dataflow", with_project)


# --- KFP component -------------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def ingest_beam_op(
    source: str,
    dataset: dsl.Output[dsl.Dataset],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_side: int = 0,
    max_corrupt_fraction: float = 0.01,
    num_shards: int = 0,
    runner: str = "dataflow",
    beam_options: list = [],  # noqa: B006  (KFP reads the default; it is never mutated)
    fingerprint: str = "",
) -> None:
    """The ingest step on Apache Beam (`kfp-finetune ingest --runner direct|dataflow`); blocks until the job ends.

    Args:
        source: a folder with one sub-folder per class, gs://bucket/prefix with that layout, or a CSV manifest.
        dataset: the output Dataset (TFDS-format directory + ingest_report.json); metadata `class_names` and
            `num_examples` {split: n}. Dataflow workers write it at its gs:// URI.
        val_fraction: share of images in the validation split.
        test_fraction: share of images in the test split.
        seed: changes which images land in which split.
        max_side: downscale images whose longer side exceeds this many pixels; 0 keeps the bytes unchanged.
        max_corrupt_fraction: fail when more than this share of image files is unusable.
        num_shards: TFRecord shards per split; 0 picks about 64 MiB per shard.
        runner: direct (Beam's DirectRunner in this container) or dataflow.
        beam_options: Beam pipeline options as KEY=VALUE strings (region, temp_location, max_num_workers, ...).
        fingerprint: the source's data fingerprint (fingerprint step): recorded in the Dataset, and part of this
            step's cache key, so changed data is ingested again.
    """
    from components.beam_ingest import parse_option
    from components.ingest import IngestConfig, ingest

    options = list(beam_options)
    if runner == "dataflow" and "project" not in dict(parse_option(o) for o in options):
        import google.auth

        project = google.auth.default()[1]
        if project:
            options.append(f"project={project}")
    remote = runner == "dataflow" and dataset.uri.startswith("gs://")
    result = ingest(
        IngestConfig(
            source=source, output=dataset.uri if remote else dataset.path, val_fraction=val_fraction,
            test_fraction=test_fraction, seed=seed, max_side=max_side or None,
            max_corrupt_fraction=max_corrupt_fraction, num_shards=num_shards or None, runner=runner,
            beam_options=tuple(options), fingerprint=fingerprint or None,
        )
    )
    dataset.metadata["class_names"] = list(result.class_names)
    dataset.metadata["num_examples"] = dict(result.num_examples)
    dataset.metadata["data_fingerprint"] = fingerprint


def compiled_dataflow_options(package: str | os.PathLike) -> list[str] | None:
    """The Beam options a `compile --dataflow` pipeline YAML gives its ingest task; None for a pipeline without."""
    import yaml

    try:
        spec = yaml.safe_load(Path(package).read_text())
    except (OSError, yaml.YAMLError):
        return None  # build_request reports an unreadable package itself
    if not isinstance(spec, dict):
        return None
    # The ingest task may sit inside a condition (the new-data branch): look at every DAG, the root's and the nested.
    dags = [spec.get("root") or {}, *(spec.get("components") or {}).values()]
    tasks = [t for dag in dags for t in ((dag.get("dag") or {}).get("tasks") or {}).values()]
    for task in tasks:
        params = (task.get("inputs") or {}).get("parameters") or {}
        runner = (params.get("runner") or {}).get("runtimeValue", {}).get("constant")
        options = (params.get("beam_options") or {}).get("runtimeValue", {}).get("constant")
        if runner == "dataflow" and options is not None:
            return [str(o) for o in options]
    return None


def check_compiled_dataflow(package: str | os.PathLike) -> None:
    """`submit`'s check of a --dataflow pipeline's Dataflow settings (no network): see check_dataflow_options."""
    options = compiled_dataflow_options(package)
    if options is not None:
        try:
            check_dataflow_options(options)
        except UserError as exc:
            raise UserError(f"--package {package}: {exc}") from None
