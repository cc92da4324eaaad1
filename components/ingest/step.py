"""The ingest step: images (a class-per-folder tree, gs://, a CSV manifest or a TFDS dataset) into a Dataset artifact.

    kfp-finetune ingest --source SRC --output DIR [--val-fraction 0.1] [--test-fraction 0.1] [--seed 0]
                        [--max-side N] [--max-corrupt-fraction 0.01] [--num-shards auto]

How it works, in three passes over the files (the first and the last on a process pool with one worker per core):
1. read each candidate file once: its SHA-256, the full decode (catching truncated/corrupt files and decompression
   bombs) and the image's statistics and perceptual hashes for the data checks; no bytes come back.
2. in hash order: identical bytes are grouped (under one label they are kept once, under several labels they are
   left out as conflicts). Each image's split is a function of the seed and its hash only, so a grown folder keeps
   every old image in its old split and identical bytes never straddle two splits; then the leakage decision
   (near-duplicates across splits) over all kept images.
3. one task per shard file: a worker re-reads the shard's kept files (checked against their pass-1 hash), converts
   what is not RGB/grey JPEG/PNG, and streams the bytes straight into that TFRecord shard: memory stays flat however
   large the dataset, and no image bytes travel between processes.
The dataset rules (split, shard count, duplicates and conflicts, the final checks, the report) are rules.py's, the
same functions the Beam runner calls. The directory is built beside DIR and renamed into place (`atomic_directory`);
any error leaves nothing at DIR.
EXIF orientation is not applied, neither to kept nor to converted images: TF's decoders ignore it as well, so
training, evaluation and serving all see the same pixels.
"""

import argparse
import logging
import math
import multiprocessing
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kfp import dsl

from kfp_finetune.components.core import faults, gcs, imagecheck, settings
from kfp_finetune.components.core.dataset import REPORT_FILE, SPLITS
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import atomic_directory, check_output_dir, write_json
from kfp_finetune.components.core.params import add_arguments, by_name
from kfp_finetune.components.core.sources import DOWNLOAD_FAILED, Entry, Listing, collect, detect
from kfp_finetune.components.dataprofile import PROFILE_FILE, Profile, ProfileBuilder
from kfp_finetune.components.ingest import profiling, rules, shards, tfds_format
from kfp_finetune.components.ingest.params import INGEST, LEAKAGE

log = logging.getLogger(__name__)

BATCH = 16  # files per task sent to a worker


# --- config and result -------------------------------------------------------------------------------------------


_DEFAULT = {name: p.default for name, p in by_name(INGEST).items()}


@dataclass(frozen=True)
class IngestConfig:
    """What to ingest and how; validated on construction (raises UserError naming the flag)."""

    source: str
    output: str
    # The parameters (components/ingest/params.py defines their defaults, help and checks).
    val_fraction: float = _DEFAULT["val_fraction"]
    test_fraction: float = _DEFAULT["test_fraction"]
    seed: int = _DEFAULT["seed"]
    max_side: int | None = _DEFAULT["max_side"]
    max_corrupt_fraction: float = _DEFAULT["max_corrupt_fraction"]
    num_shards: int | None = _DEFAULT["num_shards"]
    # Where it runs: "local" (this machine's process pool) or Beam's "direct" / "dataflow" (beam_ingest.py),
    # with Beam pipeline options as KEY=VALUE strings.
    runner: str = "local"
    beam_options: tuple[str, ...] = ()
    fingerprint: str | None = None  # the source's data fingerprint (fingerprint.py), recorded in the report
    leakage: str = _DEFAULT["leakage"]  # near-duplicates across splits: move | report

    def __post_init__(self) -> None:
        LEAKAGE.validate(self.leakage)
        if not str(self.source).strip():
            raise UserError("--source is empty; give a folder, gs://bucket/prefix, a .csv manifest or tfds:NAME")
        if not str(self.output).strip():
            raise UserError("--output is empty; give a local directory to create")
        if self.runner not in ("local", "direct", "dataflow"):
            raise UserError(f"--runner {self.runner!r}: expected local, direct or dataflow")
        if self.beam_options and self.runner == "local":
            raise UserError("--beam-option and the Beam flags need --runner direct or dataflow")
        object.__setattr__(self, "beam_options", tuple(self.beam_options))
        if gcs.is_gcs(self.output) and self.runner == "local":
            raise UserError(f"--output {self.output}: write to a local path (on Vertex AI, the /gcs/... mount)")
        for flag, value in (("--val-fraction", self.val_fraction), ("--test-fraction", self.test_fraction)):
            if not isinstance(value, int | float) or not 0 <= value < 1:
                raise UserError(f"{flag} {value!r} must be a number in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError(
                f"--val-fraction {self.val_fraction} + --test-fraction {self.test_fraction} must sum to less than 1 "
                "(nothing would be left to train on)"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UserError(f"--seed {self.seed!r} must be an integer")
        if self.max_side is not None and (not isinstance(self.max_side, int) or self.max_side < 1):
            raise UserError(f"--max-side {self.max_side!r} must be a positive number of pixels (or left out)")
        if not isinstance(self.max_corrupt_fraction, int | float) or not 0 <= self.max_corrupt_fraction <= 1:
            raise UserError(f"--max-corrupt-fraction {self.max_corrupt_fraction!r} must be in [0, 1]")
        if self.num_shards is not None and (not isinstance(self.num_shards, int) or self.num_shards < 1):
            raise UserError(f"--num-shards {self.num_shards!r} must be a positive integer or 'auto'")
        for p in INGEST:  # anything the checks above leave to the definitions (components/ingest/params.py)
            p.validate(getattr(self, p.name))

    @property
    def fractions(self) -> dict[str, float]:
        train = round(1.0 - self.val_fraction - self.test_fraction, 12)
        return {"train": train, "validation": float(self.val_fraction), "test": float(self.test_fraction)}


@dataclass(frozen=True)
class IngestResult:
    output: Path
    class_names: tuple[str, ...]
    num_examples: dict[str, int]
    counts: dict[str, dict[str, int]]
    num_skipped: int
    seconds: float
    report: dict[str, Any] = field(repr=False)


# --- the work -------------------------------------------------------------------------------------------------------


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (macOS, Windows)
        return os.cpu_count() or 1


def _start_method() -> str:
    """'fork' where it is safe (Linux, no other thread, TensorFlow not loaded): workers start in milliseconds and
    inherit the loaded modules. Otherwise 'forkserver' (a forked child of a threaded process can inherit a held lock),
    whose workers re-import the calling script: measured here at 1-2 s per pool when that script imports kfp."""
    import sys
    import threading

    methods = multiprocessing.get_all_start_methods()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and type(t).__name__ != "TMonitor"]
    if sys.platform.startswith("linux") and "fork" in methods and not others and "tensorflow" not in sys.modules:
        return "fork"  # tqdm's monitor thread (TMonitor) only sleeps on an Event: harmless to fork past
    return "forkserver" if "forkserver" in methods else "spawn"


def _executor(num_files: int) -> Executor | None:
    """A process pool with one worker per core, or None (work in this process) for a handful of files.

    Its workers are started here, before any progress bar or other thread exists.
    (With forkserver/spawn, a calling script needs the usual `if __name__ == "__main__":` guard.)
    """
    workers = min(_cpu_count(), math.ceil(num_files / (4 * BATCH)))
    if workers <= 1:
        return None
    method = _start_method()
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(
            ["__main__", "kfp_finetune.components.core.imagecheck", "PIL.Image", "PIL.JpegImagePlugin"])
    log.debug("decoding on %d worker processes (%s)", workers, method)
    with imagecheck.children_die_with_parent():  # forked workers: from the first instant of their life
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=imagecheck.die_with_parent)
        executor.submit(int).result()  # launch the workers now
    return executor


def _batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _ordered_map(executor: Executor | None, fn: Callable[..., list], batches: Iterable[list], *args: Any) -> Iterator:
    """fn(batch, *args) for each batch, results in order, with a bounded number of batches in flight (streaming)."""
    if executor is None:
        for batch in batches:
            yield from fn(batch, *args)
        return
    in_flight = 4 * getattr(executor, "_max_workers", 2)
    pending: deque = deque()
    for batch in batches:
        pending.append(executor.submit(fn, batch, *args))
        if len(pending) >= in_flight:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


@faults.stops_cleanly("ingest")
def ingest(config: IngestConfig) -> IngestResult:
    """Build the Dataset artifact at `config.output` from `config.source`; see the module docstring.

    SIGTERM or a full disk leave nothing behind (no output, no `.tmp-*` sibling, no download folder): SIGTERM exits
    with status 75, a full disk is one line naming --output and the space needed (components/core/faults.py)."""
    if config.runner != "local":
        from kfp_finetune.components.ingest import beam_ingest

        return beam_ingest.run(config)
    start = time.perf_counter()
    check_output_dir(config.output)
    listed: list[Entry] = []
    with faults.resource_errors(config.output, "--output", lambda: _listed_bytes(listed)), \
            tempfile.TemporaryDirectory(prefix="kfp-finetune-ingest-") as staging:
        listing = collect(config.source, Path(staging))
        listed.extend(listing.entries)
        rules.check_classes(config.source, listing.class_names)
        with atomic_directory(config.output) as tmp:
            report, _ = _build(config, listing, tmp, start)
    seconds = time.perf_counter() - start
    result = IngestResult(
        output=Path(config.output),
        class_names=tuple(report["class_names"]),
        num_examples=report["num_examples"],
        counts=report["counts"],
        num_skipped=len(report["skipped"]),
        seconds=seconds,
        report=report,
    )
    total = sum(result.num_examples.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(report["skipped_counts"].items())) or "none"
    log.info(
        "ingested %d images in %.1f s (%.0f images/s): %s; %d classes; skipped %d (%s) -> %s",
        total, seconds, total / max(seconds, 1e-9),
        ", ".join(f"{s} {n}" for s, n in result.num_examples.items()),
        len(result.class_names), result.num_skipped, reasons, config.output,
    )
    return result


class _Kept(NamedTuple):
    """One kept image between the leakage decision and the write pass (small: no pixels, no bytes)."""

    sha256: str
    entry: Entry
    label: str
    split: str  # the content-hash split, before any leakage move
    stats: Any  # dataprofile.ImageStats
    duplicates: int
    reencode: bool


def profile_source(config: IngestConfig) -> tuple[Profile, dict[str, Any]]:
    """The profile (and the report) that `ingest(config)` would write, computed without writing a dataset: the same
    listing, decode check, splits and leakage decision (`kfp-finetune profile`)."""
    if detect(config.source).kind == "tfds":
        raise UserError(f"--source {config.source}: profile a folder, gs:// prefix or CSV manifest")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kfp-finetune-profile-") as staging:
        listing = collect(config.source, Path(staging))
        rules.check_classes(config.source, listing.class_names)
        report, profile = _build(config, listing, None, start)
    return profile, report


def _listed_bytes(entries: list[Entry]) -> int:
    """About what the Dataset needs on disk: the listed images' bytes (kept as they came, unless converted)."""
    return sum(faults.tree_bytes(e.local) for e in entries if e.local is not None)


def _build(config: IngestConfig, listing: Listing, out: Path | None, start: float) -> tuple[dict[str, Any], Profile]:
    """The three passes; `out` None: only the profile and the report (`kfp-finetune profile`), nothing written."""
    from tqdm.auto import tqdm

    class_names = listing.class_names
    label_index = {name: i for i, name in enumerate(class_names)}
    skipped = list(listing.skipped)
    entries = []
    for entry in listing.entries:
        if entry.local is None:
            skipped.append(rules.skip(entry.ref, DOWNLOAD_FAILED, entry.error or "could not be downloaded"))
        else:
            entries.append(entry)
    num_candidates = len(listing.entries)

    executor = _executor(len(entries))
    shard_lengths: dict[tuple[str, int], tuple[int, int]] = {}
    try:
        # Pass 1, one read of each file in the workers: its content hash, the decode check, and the image's stats
        # and perceptual hashes for the data checks (no bytes come back). Nothing is written yet: a leakage move
        # must be known before an image goes to a split, and it needs every image's hash. (Identical bytes in
        # different batches are decoded more than once; they give the same result, and the first file's is used.)
        groups: dict[str, list[Entry]] = {}
        inspected: dict[str, imagecheck.ImageResult] = {}
        total_bytes = 0
        scans = _ordered_map(executor, profiling.scan_batch, _batched([e.local for e in entries], BATCH),
                             config.max_side)
        scans = tqdm(scans, total=len(entries), unit="img", desc="inspect", mininterval=1.0, smoothing=0.1)
        for entry, (fh, result) in zip(entries, scans, strict=True):
            if fh.sha256 is None or result is None:
                reason = fh.reason or (rules.MISSING if "FileNotFound" in (fh.error or "") else imagecheck.UNREADABLE)
                skipped.append(rules.skip(entry.ref, reason, fh.error or ""))
                continue
            group = groups.setdefault(fh.sha256, [])
            if not group:
                total_bytes += fh.size
                inspected[fh.sha256] = result
            group.append(entry)
        scans.close()

        # Pass 2, in this process, in hash order (a shuffle that does not depend on paths): duplicates, conflicts,
        # skips and the content-hash split of each distinct content.
        order = sorted(groups)
        for group in groups.values():
            group.sort(key=lambda e: e.ref)
        kept: list[_Kept] = []
        converted = resized = 0
        for sha in order:
            group, result = groups[sha], inspected[sha]
            if not result.ok:
                skipped.extend(rules.skip(e.ref, result.reason, result.detail) for e in group)
                continue
            keep, skips = rules.resolve_group([(e.ref, e.label) for e in group])
            skipped.extend(skips)
            if keep is None:
                continue
            split = rules.split_of(sha, config.seed, config.val_fraction, config.test_fraction)
            kept.append(_Kept(sha, group[0], keep[1], split, result.stats,
                              sum(s["reason"] == rules.DUPLICATE for s in skips), result.converted or result.resized))
            converted += result.converted
            resized += result.resized

        # The leakage decision (near-duplicates across splits) on a worker, while this process counts the profile
        # by content-hash split; the few images the policy moves are then counted under their new split.
        records = [rules.hash_record(k.sha256, k.entry.ref, k.label, k.split, k.stats) for k in kept]
        deciding = executor.submit(rules.leakage, records, config.leakage) if executor is not None else None
        builder = ProfileBuilder()
        for k in kept:
            builder.add(k.split, k.label, k.stats, k.duplicates)
        leak = deciding.result() if deciding is not None else rules.leakage(records, config.leakage)
        del records
        for k in kept:
            moved_to = rules.final_split(k.sha256, k.split, leak)
            if moved_to != k.split:
                builder.move(k.split, moved_to, k.label, k.stats, k.duplicates)
        profile = builder.result(rules.profile_meta(config, leak))
        counts = rules.empty_counts(class_names)
        for k in kept:
            counts[rules.final_split(k.sha256, k.split, leak)][k.label] += 1
        skipped = rules.sort_skipped(skipped)
        rules.final_checks(config, class_names, counts, skipped, num_candidates, listing.class_refs)

        # Pass 3 (shards.py): one pool task per shard file, the worker re-reading, checking and writing its images.
        if out is not None:
            num_shards = {split: rules.num_shards(config, split, total_bytes) for split in SPLITS}
            plan = shards.plan(((rules.final_split(k.sha256, k.split, leak),
                                 (k.entry.local, k.sha256, k.reencode, label_index[k.label], k.stats.file_size))
                                for k in kept), num_shards)
            with tqdm(total=len(kept), unit="img", desc="write", mininterval=1.0, smoothing=0.1) as bar:
                shard_lengths = shards.write_all(out, plan, config.max_side, executor, bar.update)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)  # waits for running shard writes: nothing writes after this

    if leak.pairs:
        log.warning("%d near-duplicate pair(s) across splits (%s): %s", len(leak.pairs),
                    f"moved {len(leak.moves)} image(s)" if config.leakage == "move" else "reported, not moved",
                    "; ".join(p.line() for p in leak.pairs[:3]) + (" ..." if len(leak.pairs) > 3 else ""))
    split_infos = {}
    for split in SPLITS:
        if out is None:
            split_infos[split] = ([0], 0)
            continue
        written = [shard_lengths.get((split, i), (0, 0)) for i in range(num_shards[split])]
        lengths = tfds_format.finish_split(out, split, [n for n, _ in written])
        split_infos[split] = (lengths, sum(b for _, b in written))
        if not sum(lengths):
            log.warning("split %r is empty: too few images for its fraction", split)

    report = rules.report(
        config, class_names, counts, skipped, num_candidates=num_candidates, num_listing_skips=len(listing.skipped),
        converted=converted, resized=resized, shards_per_split={s: len(split_infos[s][0]) for s in SPLITS},
        seconds=time.perf_counter() - start, leak=leak,
    )
    if out is not None:
        tfds_format.write_metadata(out, class_names, split_infos, rules.description(config.source))
        (out / PROFILE_FILE).write_text(profile.dumps(), encoding="utf-8")
        write_json(out / REPORT_FILE, report)
    return report, profile


# --- CLI -----------------------------------------------------------------------------------------------------------


def _shards_arg(value: str) -> int | None:
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="images (folder, gs://, CSV manifest, tfds:NAME) -> a TFDS-format Dataset with stable splits",
        description=(
            "Read images from SRC, decode each once (skipping corrupt files, duplicates and label conflicts), "
            "assign each to train/validation/test by its content hash, and write a TFDS-format directory at DIR "
            "with ingest_report.json. SRC: a folder with one sub-folder per class, gs://bucket/prefix with the same "
            "layout, a CSV manifest with a 'path,label' header, or tfds:NAME[:VERSION]."
        ),
    )
    p.add_argument("--output", required=True, metavar="DIR", help="new (or empty) directory to create")
    add_arguments(p, [q for q in INGEST if q.name != "num_shards"])
    p.add_argument("--num-shards", type=_shards_arg, default=None, metavar="N|auto",
                   help=f"{by_name(INGEST)['num_shards'].help} (default auto)")
    beam = p.add_argument_group("runner", "where the ingest runs (Apache Beam: pip install 'kfp-finetune[beam]')")
    beam.add_argument("--runner", choices=("local", "direct", "dataflow"), default="local",
                      help="local: a process pool here (default); direct: Beam's DirectRunner here; "
                           "dataflow: Beam on Google Cloud Dataflow (needs a gs:// --output)")
    beam.add_argument("--beam-option", action="append", default=[], metavar="KEY=VALUE", dest="beam_options",
                      help="a Beam pipeline option, e.g. machine_type=n2-standard-4 (repeatable)")
    for name in ("project", "region", "temp_location", "max_num_workers", "sdk_container_image"):
        beam.add_argument(f"--{name}", default=None, help=f"Beam's --{name} (same as --beam-option {name}=...)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    config = IngestConfig(
        source=args.source, output=args.output, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        seed=args.seed, max_side=args.max_side, max_corrupt_fraction=args.max_corrupt_fraction,
        num_shards=args.num_shards, runner=args.runner, beam_options=_beam_options(args), leakage=args.leakage,
    )
    ingest(config)
    return 0


def _beam_options(args: argparse.Namespace) -> tuple[str, ...]:
    shorthands = ("project", "region", "temp_location", "max_num_workers", "sdk_container_image")
    given = [f"{name}={getattr(args, name)}" for name in shorthands if getattr(args, name, None) is not None]
    return tuple(given + list(args.beam_options))


# --- KFP component -------------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def ingest_op(
    source: str,
    dataset: dsl.Output[dsl.Dataset],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_side: int = 0,
    max_corrupt_fraction: float = 0.01,
    num_shards: int = 0,
    fingerprint: str = "",
    leakage: str = "move",
) -> None:
    """Ingest images into a TFDS-format Dataset artifact with content-hash splits.

    Args:
        source: a folder with one sub-folder per class, gs://bucket/prefix with that layout, a CSV manifest
            (`path,label`), or tfds:NAME[:VERSION].
        dataset: the output Dataset (TFDS-format directory + ingest_report.json); metadata `class_names` and
            `num_examples` {split: n}.
        val_fraction: share of images in the validation split.
        test_fraction: share of images in the test split.
        seed: changes which images land in which split.
        max_side: downscale images whose longer side exceeds this many pixels; 0 keeps the bytes unchanged.
        max_corrupt_fraction: fail when more than this share of image files is unusable.
        num_shards: TFRecord shards per split; 0 picks about 64 MiB per shard.
        fingerprint: the source's data fingerprint (fingerprint step): recorded in the Dataset, and part of this
            task's inputs, so KFP's cache key changes exactly when the data does.
        leakage: near-duplicates (perceptual hash within 10 bits) in different splits: "move" each group into one
            split (the first of train > validation > test holding a member) or "report" them only; both list the
            pairs in ingest_report.json. The Dataset also holds data_profile.json.
    """
    from kfp_finetune.components.ingest.step import IngestConfig, ingest

    result = ingest(
        IngestConfig(
            source=source, output=dataset.path, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
            max_side=max_side or None, max_corrupt_fraction=max_corrupt_fraction, num_shards=num_shards or None,
            fingerprint=fingerprint or None, leakage=leakage,
        )
    )
    dataset.metadata["class_names"] = list(result.class_names)
    dataset.metadata["num_examples"] = dict(result.num_examples)
    dataset.metadata["data_fingerprint"] = fingerprint
    dataset.metadata["leakage"] = {k: v for k, v in (result.report.get("leakage") or {}).items()
                                   if k in ("policy", "cross_split_pairs", "moved")}
