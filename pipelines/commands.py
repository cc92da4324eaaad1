"""Operator commands: `kfp-finetune compile | run | submit | schedule`.

- `compile` writes the pipeline's IR YAML (every executor on one pinned image; a warning for mutable tags).
- `run` executes the whole pipeline locally through `kfp.local.SubprocessRunner(use_venv=False)`, offline; with no
  `--source` it runs on an embedded sample (scikit-learn's handwritten digits written out as images).
- `submit` / `schedule` send the compiled pipeline to a KFP endpoint (`kfp.Client`) or to Vertex AI Pipelines
  (`aiplatform.PipelineJob`), after checking every `--param` against the compiled pipeline's inputs, before any
  network call. Building the request and sending it are separate functions so that tests check the request.
"""

import argparse
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import settings
from components.errors import UserError
from pipelines.pipeline import CompileOptions, CustomJob, Gpu, compile_pipeline, mutable_tag_warning

log = logging.getLogger("kfp_finetune.pipelines")

# `run` is for a laptop: unless --param says otherwise it trains a small backbone (the recipe study's: MobileNet
# α=0.25 at 160 px) with the default recipe's epochs, ~4.5 min of training on the flowers set on 2 cores. The compiled
# pipeline keeps its production defaults (see pipelines/pipeline.py).
LOCAL_DEFAULTS: dict[str, Any] = {
    "backbone": "mobilenet",
    "backbone_alpha": 0.25,
    "image_size": 160,
    "min_accuracy": 0.5,
}
# The no-argument demo: scikit-learn's 8x8 digits, upscaled, with the default recipe's epochs (a shorter fine-tune
# with BatchNorm training scored 0.2: 2 epochs are too few steps for the moving statistics to follow the new data).
DEMO_DEFAULTS: dict[str, Any] = {
    **LOCAL_DEFAULTS,
    "image_size": 128,
    # Mirrored or rotated digits are other digits (or none): the default recipe's flips would teach wrong labels.
    "augment": False,
}
DEMO_PER_CLASS = 100
DEMO_PIXELS = 32

_TYPES = {
    "STRING": "str",
    "NUMBER_INTEGER": "int",
    "NUMBER_DOUBLE": "float",
    "BOOLEAN": "bool",
    "LIST": "list",
    "STRUCT": "dict",
}


# --- parameters ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineInput:
    """One input parameter of a compiled pipeline."""

    name: str
    type: str  # str | int | float | bool | list | dict
    optional: bool
    default: Any = None


def pipeline_inputs(package: str | os.PathLike) -> dict[str, PipelineInput]:
    """The input parameters declared in a compiled pipeline (IR YAML)."""
    import yaml

    path = Path(package)
    if not path.is_file():
        raise UserError(f"--package {path} not found; create it with `kfp-finetune compile --output {path}`")
    try:
        spec = yaml.safe_load(path.read_text())
        params = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"--package {path} is not a compiled KFP pipeline ({exc})") from exc
    return {
        name: PipelineInput(name, _TYPES.get(p.get("parameterType", "STRING"), "str"), bool(p.get("isOptional")),
                            p.get("defaultValue"))
        for name, p in params.items()
    }


def _convert(raw: str, kind: str, name: str) -> Any:
    import json

    try:
        if kind == "str":
            return raw
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        value = json.loads(raw)
        if not isinstance(value, list if kind == "list" else dict):
            raise ValueError(raw)
        return value
    except ValueError:
        raise UserError(f"--param {name}={raw!r}: {name} takes a {kind}") from None


def parse_params(pairs: Iterable[str], inputs: dict[str, PipelineInput]) -> dict[str, Any]:
    """`NAME=VALUE` strings -> typed values, checked against the pipeline's inputs (names and types)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"--param {pair!r}: expected NAME=VALUE, e.g. --param head_epochs=5")
        if name not in inputs:
            raise UserError(f"--param {name}: the pipeline has no such parameter; it has {', '.join(sorted(inputs))}")
        values[name] = _convert(raw, inputs[name].type, name)
    return values


def check_values(values: dict[str, Any], inputs: dict[str, PipelineInput]) -> dict[str, Any]:
    """Check already-typed values (e.g. from Python) against the inputs; every required input must be given."""
    for name, value in values.items():
        if name not in inputs:
            raise UserError(f"parameter {name}: the pipeline has no such parameter; it has {', '.join(sorted(inputs))}")
        kind = inputs[name].type
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "list": isinstance(value, list),
            "dict": isinstance(value, dict),
        }[kind]
        if not ok:
            raise UserError(f"parameter {name}={value!r}: {name} takes a {kind}")
    missing = sorted(n for n, i in inputs.items() if not i.optional and n not in values)
    if missing:
        raise UserError(f"missing required parameter(s) {', '.join(missing)}; add --param NAME=VALUE for each")
    return values


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
        compare_recipes=tuple((getattr(args, "compare_recipes", None) or "").split(",")) if getattr(
            args, "compare_recipes", None) else (),
    )


def compile_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    options = compile_options(args)
    warning = mutable_tag_warning(options.image)
    if warning:
        log.warning(warning)
    if options.gpu and options.custom_job:
        log.warning("--gpu is ignored with --custom-job; the custom job's --accelerator-type decides")
    path = compile_pipeline(args.output, options)
    log.info("compiled %s (image %s) in %.1f s", path, options.image, time.perf_counter() - started)
    return 0


# --- run (local) --------------------------------------------------------------------------------------------------


def write_demo_dataset(folder: str | os.PathLike, per_class: int = DEMO_PER_CLASS, pixels: int = DEMO_PIXELS) -> Path:
    """scikit-learn's handwritten digits (shipped with scikit-learn, no download) as PNGs, one folder per digit.

    The 8x8, 17-level images are stretched to 0..255 and upscaled (nearest) to `pixels` x `pixels`.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = Path(folder)
    digits = load_digits()
    counts: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target, strict=True):
        label = int(label)
        if counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels_u8 = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        out = folder / str(label) / f"digit_{label}_{counts[label]:03d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels_u8, mode="L").resize((pixels, pixels), Image.NEAREST).save(out)
    (folder / "SOURCE.txt").write_text(
        "scikit-learn's copy of the UCI ML hand-written digits dataset (sklearn.datasets.load_digits), "
        "written out as PNG by `kfp-finetune run`.\n"
    )
    return folder


@dataclass
class RunSummary:
    """What `run` reports at the end."""

    pipeline_root: Path
    blessed: bool | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    model: Path | None = None
    report: Path | None = None
    evaluation: Path | None = None
    export: Path | None = None
    winner_recipe: str | None = None
    comparison: Path | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    status: str = ""  # the fingerprint step's status: "no new data" ends the run before training
    decision: str = ""  # evaluate's champion decision (evaluation.json `champion.decision`)

    def lines(self) -> list[str]:
        out = ["", "kfp-finetune run: summary"]
        if self.status:
            out.append(f"  {'status':<18} {self.status}")
        if self.decision:
            out.append(f"  {'decision':<18} {self.decision}")
        out += [f"  {k:<18} {_fmt(v)}" for k, v in sorted(self.metrics.items())]
        out.append(f"  {'blessed':<18} {self.blessed}")
        if self.winner_recipe:
            out.append(f"  {'winner recipe':<18} {self.winner_recipe} (picked on the validation split)")
            out.append(f"  {'comparison':<18} {self.comparison}")
        for label, path in (("model", self.model), ("report", self.report), ("evaluation", self.evaluation),
                            ("export", self.export)):
            shown = str(path) if path else ("-" if label != "export" else "(nothing trained: no new data)"
                                            if self.status == "no new data" else "(not exported: model not blessed)")
            out.append(f"  {label:<18} {shown}")
        out.append(f"  {'pipeline root':<18} {self.pipeline_root}")
        out.append(f"  {'wall time':<18} {self.seconds:.0f} s")
        out += [f"  WARNING: {w}" for w in self.warnings]
        return out


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _failed_step(message: str) -> str:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", message)
    found = re.findall(r"'([^']+)'", plain.split("Inner task failed:")[-1])
    return found[-1] if found else "unknown"


def run_local(
    params: dict[str, Any],
    pipeline_root: str | os.PathLike,
    *,
    demo_fallback: bool = False,
    enable_caching: bool = False,
    compare_recipes: Sequence[str] = (),
) -> RunSummary:
    """Run the whole pipeline locally with kfp.local (subprocesses, this interpreter's environment).

    Raises UserError naming the failed step.
    """
    from pipelines._kfp_local import init_local
    from pipelines.pipeline import build_pipeline

    root = Path(pipeline_root).resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"--output {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    # No retries locally: a failure is reported at once (retries are for preempted cloud machines).
    options = CompileOptions(demo_fallback=demo_fallback, retries=0, compare_recipes=tuple(compare_recipes))
    pipeline = build_pipeline(options)
    init_local(str(root), enable_caching=enable_caching)
    log.info("running the pipeline locally; artifacts under %s", root)
    # Compare mode: ingest, then per recipe 7 steps (settings, backbone, head, fine-tune, validate, candidate),
    # then pick-winner, evaluate, export.
    n = len(options.compare_recipes)
    progress = StepProgress(total=(6 if not n else 1 + 6 * n + 3) + 1)  # + the fingerprint step
    logging.getLogger().addFilter(progress)
    try:
        task = pipeline(**params)
    except RuntimeError as exc:
        step = _failed_step(str(exc))
        raise UserError(f"step {step} failed (its log is above); artifacts so far under {root}") from exc
    finally:
        logging.getLogger().removeFilter(progress)
    summary = summarize(task.outputs, root)
    summary.seconds = progress.elapsed()
    return summary


class StepProgress(logging.Filter):
    """Numbers kfp.local's "Executing task" lines ([3/6] ...) and times each step."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self.step_started = self.started

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Executing task"):
            self.done += 1
            self.step_started = time.perf_counter()
            record.msg = f"[{self.done}/{self.total}, {self.elapsed():.0f} s] {message}"
        elif message.startswith("Task ") and " finished with status " in message:
            record.msg = f"{message} in {time.perf_counter() - self.step_started:.1f} s"
        return True

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def summarize(outputs: dict[str, Any], root: Path) -> RunSummary:
    """Read the pipeline's outputs (and export's artifact on disk) into a RunSummary."""
    summary = RunSummary(pipeline_root=root)
    summary.blessed = bool(outputs.get("blessed"))
    if outputs.get("winner_recipe"):
        summary.winner_recipe = str(outputs["winner_recipe"])
        comparison = outputs.get("comparison")
        summary.comparison = Path(comparison.path) if comparison is not None else None
    metrics = outputs.get("metrics")
    if metrics is not None:
        # kfp.local hands metadata numbers back as floats: show whole numbers (counts) as ints again.
        summary.metrics = {
            k: int(v) if isinstance(v, float) and v.is_integer() and k.startswith("num_") else v
            for k, v in dict(metrics.metadata).items()
            if k not in ("display_name", "blessed")
        }
    model = outputs.get("model")
    if model is not None:
        summary.model = Path(model.path)
        meta_file = summary.model / "model.json"
        if meta_file.is_file():
            import json

            weights = json.loads(meta_file.read_text()).get("backbone", {}).get("weights", {}) or {}
            if weights.get("source") == "random-fallback":
                summary.warnings.append(
                    weights.get("warning")
                    or "no ImageNet weights could be had: the backbone was randomly initialised (demo only)"
                )
        run_dir = summary.model.parent.parent
        exported = run_dir / "export" / "exported_model"
        if exported.exists():
            summary.export = exported
    summary.status = str(outputs.get("status") or "")
    evaluation = outputs.get("evaluation")
    if evaluation is not None:
        summary.evaluation = Path(evaluation.path)
        evaluation_file = summary.evaluation / "evaluation.json"
        if summary.status != "no new data" and evaluation_file.is_file():
            import json

            summary.decision = str((json.loads(evaluation_file.read_text()).get("champion") or {})
                                   .get("decision") or "")
    report = outputs.get("report")
    # The HTML artifact is a file named `report` (no extension); evaluate's folder has the same page as report.html,
    # which a browser opens by double-click.
    if summary.evaluation and (summary.evaluation / "report.html").is_file():
        summary.report = summary.evaluation / "report.html"
    elif report is not None:
        summary.report = Path(report.path)
    return summary


def run_command(args: argparse.Namespace) -> int:
    output = Path(args.output)
    demo = not args.source
    defaults = dict(DEMO_DEFAULTS if demo else LOCAL_DEFAULTS)
    with tempfile.TemporaryDirectory(prefix="kfp-finetune-") as tmp:
        compare = tuple(args.compare_recipes.split(",")) if args.compare_recipes else ()
        package = compile_pipeline(Path(tmp) / "pipeline.yaml", CompileOptions(compare_recipes=compare))
        inputs = pipeline_inputs(package)
    overrides = parse_params(args.param or [], inputs)
    if demo:
        source = output / "sample_digits"
        if not source.is_dir():
            write_demo_dataset(source)
        log.info("no --source: running the demo on scikit-learn's handwritten digits (%s)", source)
        defaults["source"] = str(source.resolve())
    else:
        defaults["source"] = _local_or_uri(args.source)
    params = check_values({**defaults, **overrides}, inputs)
    log.info("parameters: %s", ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
    summary = run_local(params, output / "pipeline_root", demo_fallback=demo, enable_caching=args.cache,
                        compare_recipes=compare)
    for line in summary.lines():
        print(line)
    return 0


def _local_or_uri(source: str) -> str:
    if "://" in source:
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"--source {source} does not exist; give a folder, a CSV manifest or a gs:// URI")
    return str(path.resolve())


# --- submit / schedule --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where to send the pipeline: a KFP endpoint (`host`) or Vertex AI (`project`, `region`)."""

    host: str | None = None
    project: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if bool(self.host) == bool(self.project or self.region):
            raise UserError("give either --host URL (a KFP endpoint) or --vertex --project P --region R")
        if self.host and not re.match(r"https?://", self.host):
            raise UserError(f"--host {self.host!r}: expected an http(s):// URL of the KFP API")
        if not self.host and not (self.project and self.region):
            raise UserError("--vertex needs both --project and --region")

    @property
    def vertex(self) -> bool:
        return not self.host


CRON_FIELD = r"[0-9A-Za-z*/,\-?]+"


def check_cron(cron: str) -> str:
    """A 5-field cron expression, optionally prefixed by TZ=Area/City or CRON_TZ=..."""
    body = re.sub(r"^(CRON_)?TZ=\S+\s+", "", cron.strip())
    fields = body.split()
    if len(fields) != 5 or not all(re.fullmatch(CRON_FIELD, f) for f in fields):
        raise UserError(f'--cron {cron!r}: expected 5 fields "MIN HOUR DOM MON DOW", e.g. "0 3 * * 1"')
    return cron.strip()


@dataclass(frozen=True)
class Request:
    """Everything needed to submit (or schedule) a compiled pipeline, checked, before any network call."""

    target: Target
    package: str
    parameters: dict[str, Any]
    pipeline_root: str
    display_name: str
    experiment: str | None = None
    service_account: str | None = None
    enable_caching: bool | None = None
    cron: str | None = None
    max_concurrency: int = 1
    labels: dict[str, str] = field(default_factory=dict)


def build_request(
    target: Target,
    package: str | os.PathLike,
    params: Iterable[str] | dict[str, Any],
    pipeline_root: str,
    *,
    display_name: str = "",
    experiment: str | None = None,
    service_account: str | None = None,
    enable_caching: bool | None = None,
    cron: str | None = None,
    max_concurrency: int = 1,
    labels: dict[str, str] | None = None,
) -> Request:
    """Check the parameters (names, types, required ones) against the compiled `package` and build a Request."""
    inputs = pipeline_inputs(package)
    values = dict(params) if isinstance(params, dict) else parse_params(params, inputs)
    values = check_values(values, inputs)
    if not pipeline_root:
        raise UserError("--pipeline-root is required (gs://BUCKET/PATH on Vertex, s3:// or minio:// on KFP)")
    if target.vertex and not pipeline_root.startswith("gs://"):
        raise UserError(f"--pipeline-root {pipeline_root}: Vertex AI needs a gs:// URI")
    if max_concurrency < 1:
        raise UserError(f"--max-concurrency {max_concurrency}: must be at least 1")
    name = display_name or f"kfp-finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    if target.vertex and not re.fullmatch(r"[a-z0-9][a-z0-9\-]{0,127}", name):
        raise UserError(f"--name {name!r}: Vertex job names use lowercase letters, digits and '-' only")
    return Request(target=target, package=str(package), parameters=values, pipeline_root=pipeline_root,
                   display_name=name, experiment=experiment, service_account=service_account,
                   enable_caching=enable_caching, cron=check_cron(cron) if cron is not None else None,
                   max_concurrency=max_concurrency, labels=dict(labels or {}))


def vertex_job(request: Request, credentials: Any = None) -> Any:
    """The `aiplatform.PipelineJob` for a Vertex request (constructing it makes no network call)."""
    from google.cloud import aiplatform

    return aiplatform.PipelineJob(
        display_name=request.display_name,
        template_path=request.package,
        pipeline_root=request.pipeline_root,
        parameter_values=request.parameters,
        enable_caching=request.enable_caching,
        labels=request.labels or None,
        project=request.target.project,
        location=request.target.region,
        credentials=credentials,
    )


def kfp_client(request: Request, **client_kwargs: Any) -> Any:
    import kfp

    return kfp.Client(host=request.target.host, **client_kwargs)


def send(request: Request, *, credentials: Any = None, client: Any = None) -> str:
    """Submit the run, or create the schedule when `request.cron` is set. Returns an id or resource name."""
    if request.target.vertex:
        job = vertex_job(request, credentials)
        if request.cron:
            schedule = job.create_schedule(cron=request.cron, display_name=request.display_name,
                                           max_concurrent_run_count=request.max_concurrency,
                                           service_account=request.service_account)
            return schedule.resource_name
        job.submit(service_account=request.service_account, experiment=request.experiment)
        return job.resource_name
    client = client or kfp_client(request)
    if request.cron:
        experiment = client.create_experiment(name=request.experiment or "Default")
        recurring = client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=request.display_name, cron_expression=request.cron,
            max_concurrency=request.max_concurrency, params=request.parameters,
            pipeline_package_path=request.package, pipeline_root=request.pipeline_root,
            enable_caching=request.enable_caching, service_account=request.service_account,
        )
        return recurring.recurring_run_id
    result = client.create_run_from_pipeline_package(
        request.package, arguments=request.parameters, run_name=request.display_name,
        experiment_name=request.experiment, pipeline_root=request.pipeline_root,
        enable_caching=request.enable_caching, service_account=request.service_account,
    )
    return result.run_id


def _request_from_args(args: argparse.Namespace, cron: str | None, tmp: str) -> Request:
    if args.vertex:
        target = Target(project=args.project or settings.gcp_project(), region=args.region)
    else:
        target = Target(host=args.host)
    package = args.package
    if not package:
        package = str(compile_pipeline(Path(tmp) / "pipeline.yaml", CompileOptions()))
        log.info("compiled the pipeline (image %s) to a temporary package", settings.component_image())
    labels = dict(_label(pair) for pair in (args.label or []))
    return build_request(target, package, args.param or [], args.pipeline_root, display_name=args.name or "",
                         experiment=args.experiment, service_account=args.service_account,
                         enable_caching=False if args.no_cache else None, cron=cron,
                         max_concurrency=getattr(args, "max_concurrency", 1), labels=labels)


def _label(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise UserError(f"--label {pair!r}: expected KEY=VALUE")
    return key, value


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


def _send_or_explain(request: Request) -> str:
    where = request.target.host or f"Vertex AI ({request.target.project}, {request.target.region})"
    log.info("sending %s to %s", "a schedule" if request.cron else "a run", where)
    try:
        return send(request)
    except UserError:
        raise
    except Exception as exc:  # auth, network, API errors: one line naming the target
        raise UserError(f"{where} refused the request: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


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
                   help="compare these recipes (comma-separated names from components/recipes.py, or 'all') as "
                        "parallel branches; the best on the validation split goes on to test and export")
    p.set_defaults(func=compile_command)

    p = subparsers.add_parser(
        "run", help="run the whole pipeline locally (kfp.local); no --source: the embedded demo",
        description="Run the whole pipeline locally through kfp.local, offline. Without --source it runs on "
                    "scikit-learn's handwritten digits. Local defaults (override with --param): "
                    + ", ".join(f"{k}={v}" for k, v in LOCAL_DEFAULTS.items()),
    )
    p.add_argument("--source", help="images: a class-per-folder directory, a CSV manifest, or a gs:// URI")
    p.add_argument("--output", default="out/run", help="folder for the demo data and all artifacts (default out/run)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="a pipeline parameter (repeatable)")
    p.add_argument("--cache", action="store_true", help="reuse cached step results from earlier local runs")
    p.add_argument("--compare-recipes", metavar="NAMES",
                   help="compare these recipes (comma-separated names from components/recipes.py, or 'all') as "
                        "parallel branches; the best on the validation split goes on to test and export")
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
