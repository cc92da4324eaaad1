"""Beam pipeline options for the ingest step: `--runner direct|dataflow` flags, --beam-option validation, and the
Dataflow settings of a compiled pipeline (`kfp-finetune compile --dataflow`, checked by `submit`).

Split out of components/ingest/beam_ingest.py (the launcher and KFP component), which re-exports these names.
"""

import difflib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.components.core import gcs, settings
from kfp_finetune.components.core.errors import UserError

log = logging.getLogger(__name__)

RUNNERS = ("local", "direct", "dataflow")
BEAM_RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner"}
# `ingest` flags that are Beam pipeline options under their Beam name (the rest go through --beam-option KEY=VALUE).
SHORTHAND_OPTIONS = ("project", "region", "temp_location", "max_num_workers", "sdk_container_image")
# What DataflowRunner cannot run without; checked before anything is sent.
DATAFLOW_REQUIRED = ("project", "region", "temp_location")


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
