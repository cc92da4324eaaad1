"""The ingest step on Apache Beam: `kfp-finetune ingest --runner direct|dataflow`.

The same dataset as the local ingest (components/ingest/step.py), record for record, from one Beam pipeline that runs on
the DirectRunner here and on Dataflow in Google Cloud:

1. match the files with Beam's file IO (`fileio.MatchAll`, a manifest is read by the launcher); only names and sizes
   are listed, nothing is downloaded;
2. on the workers, read each file's bytes through Beam's filesystems, SHA-256 them and run the decode check of
   `components.core.imagecheck.decode_bytes` (the one implementation both runners use);
3. group by content hash: identical bytes under one label are kept once, under several labels left out as conflicts;
   each image's split is `rules.split_of` (the same rule, so the same split membership);
4. rank every kept image in its split by content hash (counts per hash prefix give each bucket's offset, so no
   worker ever holds a split) and deal the ranks round-robin over the shards, exactly as the local writer does;
5. write each shard with `components.ingest.tfds_format` through Beam's filesystems, as a temporary file, re-reading the
   image bytes (only small keys go through the shuffles, never image bytes);
6. one finalizing step checks the result (no images, fewer than 2 classes, too many corrupt files, a class with no
   valid image), renames the shards into place and writes dataset_info.json, features.json, label.labels.txt and
   ingest_report.json. It runs inside the job, so a fire-and-forget Dataflow launch still yields a complete dataset,
   and a failed check leaves no shard behind.

Workers import Pillow, numpy and google-crc32c, never TensorFlow; each holds one image and one shard's keys at a time.
"""

# No `from __future__ import annotations`: KFP reads ingest_beam_op's annotations as real types.
# The Beam options and Dataflow settings live in beam_options.py, the pipeline and its step functions in
# beam_pipeline.py; this module keeps the launcher and the KFP component and re-exports their public names.
import logging
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from kfp import dsl

from kfp_finetune.components.core import gcs, settings, sources
from kfp_finetune.components.core.dataset import REPORT_FILE
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.ingest.beam_options import (
    BEAM_RUNNERS,
    DATAFLOW_REQUIRED,
    RUNNERS,
    SHORTHAND_OPTIONS,
    DataflowSettings,
    check_compiled_dataflow,
    check_dataflow_options,
    compiled_dataflow_options,
    parse_option,
    pipeline_flags,
)
from kfp_finetune.components.ingest.beam_pipeline import (
    TMP_PREFIX,
    Candidate,
    Job,
    _delete,
    _emulator_auth,
    _join,
    _read,
    build,
)

if TYPE_CHECKING:  # pragma: no cover
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.runner import PipelineRunner

    from kfp_finetune.components.ingest.step import IngestConfig, IngestResult

__all__ = [  # the public names of the Beam ingest, wherever they are defined
    "BEAM_RUNNERS", "DATAFLOW_REQUIRED", "RUNNERS", "SHORTHAND_OPTIONS", "DataflowSettings", "check_compiled_dataflow",
    "check_dataflow_options", "compiled_dataflow_options", "ingest_beam_op", "parse_option", "pipeline_flags", "run",
]

log = logging.getLogger(__name__)

_USER_ERROR = re.compile(r"UserError: ([^\n]+)")


# --- launcher ------------------------------------------------------------------------------------------------------


def _check_source(source: "sources.GcsSource") -> None:
    """Fail fast, before the job, on a gs:// bucket that does not exist or a prefix with nothing under it."""
    from apache_beam.io.filesystems import FileSystems

    _emulator_auth()
    bucket = gcs.split_uri(source.spec)[0]
    try:
        found = FileSystems.match([source.root + "**"], limits=[1])[0].metadata_list
    except Exception as exc:  # noqa: BLE001  (BeamIOError around NotFound / Forbidden / connection errors)
        text = str(exc)
        if "404" in text or "NotFound" in text or "does not exist" in text or "not exist" in text:
            raise UserError(
                f"--source {source.spec}: bucket gs://{bucket} does not exist (or is not visible to these "
                "credentials); check the bucket name"
            ) from exc
        raise UserError(f"--source {source.spec}: cannot list it ({text.splitlines()[0] if text else exc!r})") from exc
    if not found:
        raise UserError(
            f"--source {source.spec}: no objects under this prefix; check the path (expected "
            f"gs://{bucket}/PREFIX/CLASS/IMAGE.jpg)"
        )


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


def _local_runner(options: "PipelineOptions") -> "PipelineRunner":
    """The runner behind `--runner direct`: Beam's FnApiRunner, which the DirectRunner itself runs batch pipelines on.

    Named here rather than left to the DirectRunner, because the DirectRunner of Beam 2.6x+ first tries the Prism
    runner, which downloads a Go binary from GitHub at run time: offline that costs ~2 s of failed download and a
    second translation of the pipeline before it falls back, and behind a proxy that holds connections it can hang.
    A local ingest never touches the network. The options reach the SDK workers as the DirectRunner sends them.
    """
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


def run(config: "IngestConfig") -> "IngestResult":
    """Run the ingest of `config` on Beam (`config.runner` direct or dataflow) and wait for it."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from kfp_finetune.components.core.fsutil import atomic_directory, check_output_dir
    from kfp_finetune.components.ingest.step import IngestResult

    start = time.perf_counter()
    source = config.source
    kind = sources.detect(source)
    if kind.kind == "tfds":
        raise UserError(f"--source {source}: tfds: sources run with --runner local (TFDS prepares them on one machine)")
    job_name = f"kfp-finetune-ingest-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    flags = pipeline_flags(config.runner, config.beam_options, job_name)
    output = config.output
    remote_output = gcs.is_gcs(output)
    if config.runner == "dataflow" and not remote_output:
        raise UserError(f"--output {output}: Dataflow workers write to gs://; give a gs:// --output for dataflow")
    skipped: list[dict[str, str]] = []
    if isinstance(kind, sources.GcsSource):  # matched by Beam's file IO on the workers: it scales to any size
        candidates: list[Candidate] | None = None
        class_refs = {}
        _check_source(kind)
    else:
        # A manifest or a local folder is listed here by the local runner's own listing (components.core.sources):
        # only regular files under the source root after realpath, of bounded size; symlinks out, devices, FIFOs and
        # sockets are skipped with their reason, and a symlinked folder outside the root is neither walked nor a
        # class.
        listing = kind.list()
        candidates = [Candidate(e.ref, e.label) for e in listing.entries]
        class_refs, skipped = dict(listing.class_refs), list(listing.skipped)
        if not candidates:
            raise UserError(sources.no_images_message(source, len(skipped)))

    def launch(out: str) -> dict:
        job = Job(
            source=source, output=out, tmp=_join(out, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"), seed=config.seed,
            val_fraction=config.val_fraction, test_fraction=config.test_fraction, fractions=config.fractions,
            max_side=config.max_side, max_corrupt_fraction=config.max_corrupt_fraction, num_shards=config.num_shards,
            started=time.time(), class_refs=class_refs, fingerprint=config.fingerprint, leakage=config.leakage,
        )
        log.info("ingest on Beam %s: %s", BEAM_RUNNERS[config.runner], " ".join(flags))
        options = PipelineOptions(flags)
        pipeline = beam.Pipeline(runner=_local_runner(options) if config.runner == "direct" else None, options=options)
        build(pipeline, job, candidates, list(class_refs), skipped)
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
    leakage: str = "move",
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
        leakage: near-duplicates (perceptual hash within 10 bits) in different splits: "move" each group into one
            split or "report" them only (ingest_report.json lists the pairs either way).
    """
    from kfp_finetune.components.ingest.beam_ingest import parse_option
    from kfp_finetune.components.ingest.step import IngestConfig, ingest

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
            beam_options=tuple(options), fingerprint=fingerprint or None, leakage=leakage,
        )
    )
    dataset.metadata["class_names"] = list(result.class_names)
    dataset.metadata["num_examples"] = dict(result.num_examples)
    dataset.metadata["data_fingerprint"] = fingerprint

