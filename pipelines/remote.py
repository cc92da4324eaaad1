"""`kfp-finetune submit | schedule`: send the compiled pipeline to a KFP endpoint (`kfp.Client`) or to Vertex AI
Pipelines (`aiplatform.PipelineJob`), after checking every `--param` against the compiled pipeline's inputs, before
any network call. Building the request and sending it are separate functions so that tests check the request.
"""

import argparse
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp_finetune.components.core import settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.pipelines.params import check_values, parse_params, pipeline_inputs
from kfp_finetune.pipelines.pipeline import CompileOptions, compile_pipeline

log = logging.getLogger("kfp_finetune.pipelines")


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
    from kfp_finetune.components.ingest.beam_ingest import check_compiled_dataflow

    check_compiled_dataflow(package)  # a --dataflow pipeline's settings, before any network call (issue 13)
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


def _send_or_explain(request: Request) -> str:
    where = request.target.host or f"Vertex AI ({request.target.project}, {request.target.region})"
    log.info("sending %s to %s", "a schedule" if request.cron else "a run", where)
    try:
        return send(request)
    except UserError:
        raise
    except Exception as exc:  # auth, network, API errors: one line naming the target
        raise UserError(f"{where} refused the request: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
