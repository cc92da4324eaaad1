"""Pipeline parameters as operators give them: `--param NAME=VALUE` strings checked against a compiled pipeline's
inputs (names, types, required ones) before anything runs or is sent; and what each pipeline parameter feeds
(`step_parameters`) and whether it is a training setting (`training_parameters`), from the steps' definitions.
"""

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.components.core.errors import UserError

_TYPES = {
    "STRING": "str",
    "NUMBER_INTEGER": "int",
    "NUMBER_DOUBLE": "float",
    "BOOLEAN": "bool",
    "LIST": "list",
    "STRUCT": "dict",
}


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


_SPEC_TYPES = {"String": "str", "Integer": "int", "Float": "float", "Boolean": "bool", "List": "list", "Dict": "dict"}


def spec_inputs(pipeline: Any) -> dict[str, PipelineInput]:
    """The input parameters of a built pipeline (a KFP GraphComponent), read from its own component spec."""
    return {
        name: PipelineInput(name, _SPEC_TYPES.get(str(spec.type), "str"), bool(spec.optional), spec.default)
        for name, spec in pipeline.component_spec.inputs.items()
        if not str(spec.type).startswith("system.")
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
    check_step_values(values)
    return values


def check_step_values(values: dict[str, Any]) -> None:
    """Each value against the step parameters it feeds (their ranges and choices), so that a value a step would
    refuse (dropout=2, batch_norm=sometimes) is refused before anything runs or is sent, not when its step starts."""
    for params in step_parameters().values():
        for p in params:
            if p.pipeline not in values:
                continue
            value = values[p.pipeline]
            if p.optional and value == p.unset:
                continue  # 0 / "": "not set", as the KFP signatures spell None
            if p.type is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif p.type is int and isinstance(value, float) and value.is_integer():
                value = int(value)  # a compiled YAML spells integer defaults as 5.0
            try:
                p.validate(value)
            except UserError as exc:
                expected = f"one of {', '.join(p.choices)}" if p.choices else p.expect
                raise UserError(f"--param {p.pipeline}={value!r}: must be {expected}" if expected else
                                f"--param {p.pipeline}: {exc}") from None


def step_parameters() -> dict[str, tuple[Any, ...]]:
    """Every step's parameter definitions (components.core.params.Param), by KFP task: what the pipeline wires."""
    from kfp_finetune.components.backbone.params import BACKBONE
    from kfp_finetune.components.datacheck.params import DRIFT
    from kfp_finetune.components.evaluate.release_params import EVALUATE, EXPORT
    from kfp_finetune.components.ingest.params import FINGERPRINT, INGEST
    from kfp_finetune.components.train.params import FINE_TUNE, HEAD

    return {"fingerprint": FINGERPRINT, "ingest": INGEST, "data-drift": DRIFT, "backbone": BACKBONE,
            "train-head": HEAD, "fine-tune": FINE_TUNE, "evaluate": EVALUATE, "export": EXPORT}


def training_parameters() -> frozenset[str]:
    """The pipeline parameters that are training settings (fed to a parameter declared `training`)."""
    from kfp_finetune.components.core.params import training_settings

    return training_settings(p for ps in step_parameters().values() for p in ps)
