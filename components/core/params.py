"""A step parameter, defined once: name, type, default, help, validation, and what it means to the pipeline.

Every step declares its parameters as tuples of `Param` in its own package (components/train/params.py,
components/ingest/params.py, components/backbone/params.py, components/evaluate/release_params.py,
components/predict/params.py). Every door derives from those definitions or is held to them by
tests/unit/test_parameter_parity.py and tests/unit/test_step_parameters.py:

- the step's config dataclass takes its defaults and checks from them (`validate`);
- its CLI subcommand generates its options with `add_arguments` (or spells one out, held to the definition);
- its KFP component spells its signature out (KFP reads it from the source), held to the definitions;
- the pipeline's parameters (`Param.pipeline` names the one feeding each) have the same defaults, are wired with
  `step_arguments`, and `Param.training` decides whether a pipeline parameter is a training setting (compared with
  the champion's by the "no new data" skip);
- docs/interfaces.md writes every component signature out, held to the definitions.

No TensorFlow here: the pipeline imports this module at compile time. docs/architecture.md says how to add one.
"""

import argparse
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Param:
    """One parameter of a step.

    Args:
        name: the config field and the KFP component's argument (`--name-with-dashes` on the CLI).
        type: int, float, str or bool.
        default: the default of every door. None (for `optional` ones) travels as 0 / "" through KFP.
        help: one line for `--help`, the component's docstring and docs/interfaces.md.
        check: True when a value is acceptable; `expect` says what is (the error reads "--NAME must be EXPECT").
        choices: the accepted strings, if a closed set.
        optional: None is allowed ("not set").
        recipe: (training parameters) a recipe may set it (how a model is trained); False for what belongs to the
            run (seed, batch size, caching, checkpoints) and for every parameter of the other steps.
        pipeline: the pipeline parameter that feeds it; None when the pipeline does not expose it.
        training: a change of its value makes a different model, so the pipeline parameter feeding it is a training
            setting: a run whose data and training settings equal the champion's is skipped ("no new data").
            False for what only decides where things go or whether a model ships (paths, thresholds, policies).
        required: no default: every door must be given a value (the CLI option is required).
    """

    name: str
    type: type
    default: Any
    help: str
    check: Check | None = None
    expect: str = ""
    choices: tuple[str, ...] = ()
    optional: bool = False
    recipe: bool = True
    pipeline: str | None = None
    training: bool = True
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def unset(self) -> Any:
        """How KFP spells None for this parameter (its signatures have no Optional)."""
        return {int: 0, float: 0.0, str: ""}.get(self.type) if self.optional else None

    @property
    def kfp_default(self) -> Any:
        """The default as a KFP signature spells it (0 / "" for an unset optional one)."""
        return self.unset if self.default is None else self.default

    def validate(self, value: Any) -> None:
        from kfp_finetune.components.core.errors import UserError

        if value is None and self.optional:
            return
        if self.required and (value is None or (isinstance(value, str) and not value.strip())):
            raise UserError(f"{self.flag} is required: {self.help}")
        if self.choices and value not in self.choices:
            raise UserError(f"{self.flag} must be one of {self.choices} (got {value!r})")
        if self.check is not None and not self.check(value):
            raise UserError(f"{self.flag} must be {self.expect} (got {value!r})")


# --- checks ----------------------------------------------------------------------------------------------------


def int_at_least(low: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def fraction(v: Any) -> bool:
    """In [0, 1)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v < 1.0


def ratio(v: Any) -> bool:
    """In [0, 1]."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


def positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def non_negative(v: Any) -> bool:
    """A finite number ≥ 0."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def boolean(v: Any) -> bool:
    return isinstance(v, bool)


# --- derivations -----------------------------------------------------------------------------------------------


def by_name(params: Iterable[Param]) -> dict[str, Param]:
    return {p.name: p for p in params}


def defaults(params: Iterable[Param], *, recipe_only: bool = False) -> dict[str, Any]:
    """{name: default} (only the parameters a recipe may set, with `recipe_only`)."""
    return {p.name: p.default for p in params if p.recipe or not recipe_only}


def validate_all(params: Iterable[Param], values: Any) -> None:
    """Check every parameter's value on `values` (a config object): the first bad one raises UserError."""
    for p in params:
        p.validate(getattr(values, p.name))


def from_step(params: Iterable[Param], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A KFP component's arguments -> config keyword arguments: 0 / "" of optional parameters become None."""
    out = {}
    for p in params:
        if p.name in arguments:
            value = arguments[p.name]
            out[p.name] = None if p.optional and value == p.unset else value
    return out


def step_arguments(params: Iterable[Param], pipeline_values: Mapping[str, Any]) -> dict[str, Any]:
    """The component arguments fed by pipeline parameters: {param name: pipeline_values[param.pipeline]}."""
    return {p.name: pipeline_values[p.pipeline] for p in params if p.pipeline}


def training_settings(params: Iterable[Param]) -> frozenset[str]:
    """The pipeline parameters that are training settings: fed to at least one parameter with `training`."""
    return frozenset(p.pipeline for p in params if p.pipeline and p.training)


def add_arguments(parser: argparse.ArgumentParser | Any, params: Iterable[Param]) -> None:
    """One option per parameter: type, default, choices and help from the definitions."""
    for p in params:
        help = p.help if p.default is None else f"{p.help} (default {p.default})"
        if p.type is bool:
            parser.add_argument(p.flag, action=argparse.BooleanOptionalAction, default=p.default, help=help)
        elif p.required:
            parser.add_argument(p.flag, type=p.type, required=True, choices=p.choices or None, help=p.help)
        else:
            parser.add_argument(p.flag, type=p.type, default=p.default, choices=p.choices or None, help=help)


def config_kwargs(params: Iterable[Param], args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options of `params` as config keyword arguments."""
    return {p.name: getattr(args, p.name) for p in params}
