"""Operator commands: `kfp-finetune compile | run | submit | schedule`.

- `compile` writes the pipeline's IR YAML (every executor on one pinned image; a warning for mutable tags).
- `run` compiles the pipeline (to OUTPUT/pipeline.yaml) or takes `--package`, and executes that YAML locally
  through kfp.local, offline: each step a subprocess (`SubprocessRunner(use_venv=False)`), or with `--runner docker`
  a container of the image (`DockerRunner`, Docker or podman). One line per step; full logs in OUTPUT/logs. With no
  `--source` it runs on an embedded sample (the UCI handwritten digits, pipelines/sample/, written out as images).
- `submit` / `schedule` send the compiled pipeline to a KFP endpoint (`kfp.Client`) or to Vertex AI Pipelines
  (`aiplatform.PipelineJob`), after checking every `--param` against the compiled pipeline's inputs, before any
  network call. Building the request and sending it are separate functions so that tests check the request.

The work lives in pipelines/params.py (parameter parsing and checks), pipelines/local.py (the local runner, its
summary and the demo data) and pipelines/remote.py (submission and schedules); this module wires them to the CLI.
"""

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kfp_finetune.components.core import settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.pipelines.local import (  # noqa: F401 (re-exported: the public names of `run`)
    DEMO_DEFAULTS,
    LOCAL_DEFAULTS,
    RunSummary,
    _local_or_uri,
    local_options,
    run_local,
    run_package,
    summarize,
    write_demo_dataset,
)
from kfp_finetune.pipelines.params import PipelineInput, check_values, parse_params, pipeline_inputs, spec_inputs  # noqa: F401
from kfp_finetune.pipelines.pipeline import CompileOptions, CustomJob, Gpu, compile_pipeline, mutable_tag_warning
from kfp_finetune.pipelines.remote import (  # noqa: F401 (re-exported: the public names of `submit` / `schedule`)
    Request,
    Target,
    _request_from_args,
    _send_or_explain,
    build_request,
    check_cron,
    send,
    vertex_job,
)

log = logging.getLogger("kfp_finetune.pipelines")


# --- compile ------------------------------------------------------------------------------------------------------


def compile_options(args: argparse.Namespace) -> CompileOptions:
    custom_job = None
    if args.custom_job:
        custom_job = CustomJob(machine_type=args.machine_type, accelerator_type=args.accelerator_type or "",
                               accelerator_count=args.accelerator_count, replica_count=args.replica_count)
    elif args.accelerator_type or args.replica_count != 1:
        raise UserError("--accelerator-type and --replica-count need --custom-job; use --gpu TYPE:COUNT on KFP")
    return CompileOptions(
        image=args.image or settings.component_image(),
        gpu=Gpu.parse(args.gpu) if args.gpu else None,
        custom_job=custom_job,
        cpu=args.cpu,
        memory=args.memory,
        retries=args.retries,
        compare_recipes=getattr(args, "compare_recipes", None) or (),  # CompileOptions parses "a,b" or "all"
        dataflow=_dataflow_settings(args),
    )


def _dataflow_settings(args: argparse.Namespace) -> Any:
    """--dataflow and its settings -> components.ingest.beam_ingest.DataflowSettings, or None (issue 13)."""
    given = [name for name in vars(args) if name.startswith("dataflow_") and getattr(args, name) is not None]
    if not getattr(args, "dataflow", False):
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} needs --dataflow")
        return None
    from kfp_finetune.components.ingest.beam_ingest import DataflowSettings

    return DataflowSettings(
        region=args.dataflow_region or "", temp_location=args.dataflow_temp_location or "",
        max_num_workers=args.dataflow_max_workers if args.dataflow_max_workers is not None else 10,
        machine_type=args.dataflow_machine_type or "", service_account=args.dataflow_service_account or "",
        network=args.dataflow_network or "", subnetwork=args.dataflow_subnetwork or "",
        project=args.dataflow_project or "",
    )


def _add_dataflow_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Dataflow", "run the ingest step as an Apache Beam job on Dataflow (issue 13)")
    g.add_argument("--dataflow", action="store_true", help="run the ingest step on Dataflow and wait for it")
    g.add_argument("--dataflow-region", help="Dataflow region, e.g. europe-west4 (required with --dataflow)")
    g.add_argument("--dataflow-temp-location", help="gs:// folder for Dataflow's temp files (required)")
    g.add_argument("--dataflow-max-workers", type=int, help="autoscaling limit (default 10)")
    g.add_argument("--dataflow-machine-type", help="worker machine type, e.g. n2-standard-4 (default Dataflow's)")
    g.add_argument("--dataflow-service-account", help="worker service account email (default Dataflow's)")
    g.add_argument("--dataflow-network", help="VPC network of the workers (default 'default')")
    g.add_argument("--dataflow-subnetwork", help="subnetwork of the workers, e.g. regions/REGION/subnetworks/NAME")
    g.add_argument("--dataflow-project", help="project of the Dataflow job (default: the pipeline's project)")


def compile_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    options = compile_options(args)
    warning = mutable_tag_warning(options.image)
    if warning:
        log.warning(warning)
    if options.gpu and options.custom_job:
        log.warning("--gpu is ignored with --custom-job; the custom job's --accelerator-type decides")
    if getattr(args, "batch_predict", False):
        from kfp_finetune.pipelines.batch_predict import compile_batch_predict

        path = compile_batch_predict(args.output, options)
    else:
        path = compile_pipeline(args.output, options)
    log.info("compiled %s (image %s) in %.1f s", path, options.image, time.perf_counter() - started)
    return 0


# --- run / submit / schedule -------------------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    """Compile (as `compile --image IMAGE --retries 0` does), or take --package, and run that YAML locally."""
    output = Path(args.output)
    demo = not args.source
    compiled = Path(tempfile.mkdtemp(prefix="kfp-finetune-compile-"))
    try:
        package, params = _checked_run(args, output, demo, compiled)
    finally:
        shutil.rmtree(compiled, ignore_errors=True)
    summary = run_package(package, params, output / "pipeline_root", enable_caching=args.cache, runner=args.runner,
                          logs_dir=output / "logs", verbose=args.stream_logs)
    for line in summary.lines():
        print(line)
    return 0


def _checked_run(args: argparse.Namespace, output: Path, demo: bool, compiled: Path) -> tuple[Path, dict[str, Any]]:
    """`run`'s package and parameters, checked before the output folder gets anything (the compiled pipeline is
    written to `compiled` first, and moved into `output` once the parameters pass)."""
    import dataclasses

    if args.package:
        if args.compare_recipes or args.image:
            raise UserError("--compare-recipes and --image are compiled into the package: "
                            "give them to `kfp-finetune compile`, or drop --package")
        package = Path(args.package)
        inputs = pipeline_inputs(package)
    else:
        # Retries are for preempted cloud machines: locally a failure is reported at once. The no-argument demo's
        # backbone may fall back to random weights when no ImageNet weights can be had.
        options = dataclasses.replace(local_options(demo_fallback=demo, compare_recipes=args.compare_recipes or ()),
                                      image=args.image or settings.component_image())
        package = compile_pipeline(compiled / "pipeline.yaml", options)
        inputs = pipeline_inputs(package)
    defaults = {k: v for k, v in (DEMO_DEFAULTS if demo else LOCAL_DEFAULTS).items() if k in inputs}
    overrides = parse_params(args.param or [], inputs)
    source = output / "sample_digits"
    defaults["source"] = str(source.resolve()) if demo else _local_or_uri(args.source)
    params = check_values({**defaults, **overrides}, inputs)
    if not args.package:
        output.mkdir(parents=True, exist_ok=True)
        package = Path(shutil.move(str(package), output / "pipeline.yaml"))
        log.info("compiled %s (image %s)", package, options.image)
    if demo:
        if not source.is_dir():
            write_demo_dataset(source)
        log.info("no --source: running the demo on the embedded handwritten digits (%s)", source)
    log.info("parameters: %s", ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
    return package, params


def submit_command(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="kfp-finetune-") as tmp:
        request = _request_from_args(args, None, tmp)
        run_id = _send_or_explain(request)
    print(run_id)
    return 0


def schedule_command(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="kfp-finetune-") as tmp:
        request = _request_from_args(args, args.cron, tmp)
        schedule_id = _send_or_explain(request)
    print(schedule_id)
    return 0


# --- CLI ----------------------------------------------------------------------------------------------------------


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", help="KFP API endpoint, e.g. https://kfp.example.com/pipeline")
    where.add_argument("--vertex", action="store_true", help="submit to Vertex AI Pipelines")
    parser.add_argument("--project", help="Google Cloud project (Vertex; default GOOGLE_CLOUD_PROJECT)")
    parser.add_argument("--region", help="Vertex region, e.g. europe-west4")
    parser.add_argument("--pipeline-root", required=True, help="where artifacts land, e.g. gs://BUCKET/pipeline-root")
    parser.add_argument("--package", help="a compiled pipeline YAML (default: compile this release's pipeline)")
    parser.add_argument("--param", action="append", metavar="NAME=VALUE", help="a pipeline parameter (repeatable)")
    parser.add_argument("--name", help="run / schedule display name (default kfp-finetune-TIMESTAMP)")
    parser.add_argument("--experiment", help="KFP experiment or Vertex experiment name")
    parser.add_argument("--service-account", help="service account the steps run as")
    parser.add_argument("--label", action="append", metavar="KEY=VALUE", help="Vertex label (repeatable)")
    parser.add_argument("--no-cache", action="store_true", help="disable step caching for this run")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register compile, run, submit and schedule."""
    p = subparsers.add_parser("compile", help="compile the pipeline to IR YAML",
                              description="Compile the pipeline to KFP IR YAML (loads in KFP and Vertex AI).")
    p.add_argument("--output", default="pipeline.yaml", help="the YAML file to write (default pipeline.yaml)")
    p.add_argument("--image", help=f"container image of every step (default {settings.component_image()})")
    p.add_argument("--gpu", metavar="TYPE[:COUNT]", help="a GPU for the training steps, e.g. NVIDIA_TESLA_T4:1")
    p.add_argument("--cpu", default="4", help="CPU request of each training step (default 4)")
    p.add_argument("--memory", default="16G", help="memory request of each training step (default 16G)")
    p.add_argument("--retries", type=int, default=2, help="retries of a failed training step (default 2)")
    p.add_argument("--custom-job", action="store_true",
                   help="run the training steps as Vertex AI custom jobs (google-cloud-pipeline-components)")
    p.add_argument("--machine-type", default="n1-standard-8", help="custom job machine type (default n1-standard-8)")
    p.add_argument("--accelerator-type", help="custom job accelerator, e.g. NVIDIA_TESLA_T4, NVIDIA_L4")
    p.add_argument("--accelerator-count", type=int, default=1, help="accelerators per replica (default 1)")
    p.add_argument("--replica-count", type=int, default=1, help="custom job replicas (default 1)")
    p.add_argument("--compare-recipes", metavar="NAMES",
                   help="compare these recipes (comma-separated names from components/compare/recipes.py, or 'all') as "
                        "parallel branches; the best on the validation split goes on to test and export")
    _add_dataflow_args(p)
    p.add_argument("--batch-predict", action="store_true",
                   help="compile the batch-prediction pipeline instead (predict with push_to/LATEST or model_uri)")
    p.set_defaults(func=compile_command)

    p = subparsers.add_parser(
        "run", help="run the whole pipeline locally (kfp.local); no --source: the embedded demo",
        description="Compile the pipeline to OUTPUT/pipeline.yaml (or take --package) and run that YAML locally "
                    "through kfp.local, offline: one line per step, full logs in OUTPUT/logs. Without --source it "
                    "runs on the embedded handwritten digits. Local defaults (override with --param): "
                    + ", ".join(f"{k}={v}" for k, v in LOCAL_DEFAULTS.items()),
    )
    p.add_argument("--source", help="images: a class-per-folder directory, a CSV manifest, or a gs:// URI")
    p.add_argument("--output", default="out/run", help="folder for the demo data and all artifacts (default out/run)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="a pipeline parameter (repeatable)")
    p.add_argument("--cache", action="store_true", help="reuse cached step results from earlier local runs")
    p.add_argument("--compare-recipes", metavar="NAMES",
                   help="compare these recipes (comma-separated names from components/compare/recipes.py, or 'all') as "
                        "parallel branches; the best on the validation split goes on to test and export")
    p.add_argument("--package", help="run this compiled pipeline YAML (from `kfp-finetune compile`) instead of "
                                     "compiling one; --param values are checked against it")
    p.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   help="subprocess (default): each step in this Python environment; docker: each step in the "
                        "component image, through Docker or podman's Docker-compatible socket (DOCKER_HOST)")
    p.add_argument("--image", help=f"the steps' image, compiled into the pipeline (default {settings.component_image()}"
                                   "; `make image` builds it)")
    p.add_argument("--verbose", dest="stream_logs", action="store_true",
                   help="stream every step's full log (also kept in OUTPUT/logs/STEP.log) instead of one line per step")
    p.set_defaults(func=run_command)

    p = subparsers.add_parser("submit", help="submit a run to a KFP endpoint or Vertex AI")
    _add_target_args(p)
    p.set_defaults(func=submit_command)

    p = subparsers.add_parser("schedule", help="create a recurring run (KFP) or a schedule (Vertex AI)")
    _add_target_args(p)
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * 1" (optionally "TZ=Europe/Paris ...")')
    p.add_argument("--max-concurrency", type=int, default=1, help="most runs of the schedule at once (default 1)")
    p.set_defaults(func=schedule_command)


__all__: Sequence[str] = [
    "add_cli", "build_request", "check_cron", "parse_params", "pipeline_inputs", "run_local", "send", "vertex_job",
    "write_demo_dataset",
]
