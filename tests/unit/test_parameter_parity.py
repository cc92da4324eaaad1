"""Every door of a training parameter follows its one definition (components/train/params.py).

The doors: HeadConfig/FineTuneConfig, the `train-head`/`fine-tune` subcommands, the KFP components (whose signatures
KFP reads from the source, so they are written out), the pipeline's parameters and their wiring in both modes, and
the recipes. A door that misses a parameter, has another default or type, or drops a value on the way fails here.
"""

import dataclasses
import types
from typing import Any

import pytest
import yaml

from kfp_finetune.components.compare.recipes import RECIPES, default_recipe
from kfp_finetune.components.compare.step import BranchSettings, recipe_op
from kfp_finetune.components.train import FineTuneConfig, HeadConfig, TrainResult, fine_tune_op, train_head_op
from kfp_finetune.components.train.params import FINE_TUNE, HEAD, PHASES, Param, branch_outputs
from kfp_finetune.pipelines.cli import main
from kfp_finetune.pipelines.pipeline import CompileOptions, build_pipeline, compile_pipeline

KFP_TYPES = {int: "Integer", float: "Float", str: "String", bool: "Boolean"}
IR_TYPES = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING", bool: "BOOLEAN"}
CONFIGS = {"train_head": HeadConfig, "fine_tune": FineTuneConfig}
OPS = {"train_head": train_head_op, "fine_tune": fine_tune_op}
TASKS = {"train_head": "train-head", "fine_tune": "fine-tune"}


def kfp_default(p: Param) -> Any:
    return p.unset if p.default is None else p.default


def other_value(p: Param) -> Any:
    """A valid value that is not the default (so that a door falling back to the default shows)."""
    if p.choices:
        return next(c for c in p.choices if c != p.default and c != "on")
    if p.type is bool:
        return not p.default
    if p.name == "unfreeze_from":
        return "conv_pw_13"
    if p.type is str:
        return "/tmp/elsewhere"
    if p.type is float:
        return p.default / 2 if p.default else 0.05
    return (p.default or 0) + 2


def other_values(phase: str) -> list[dict[str, Any]]:
    """Non-default values of every parameter; unfreeze_top and unfreeze_from exclude each other: two sets."""
    values = {p.name: other_value(p) for p in PHASES[phase]}
    if "unfreeze_from" not in values:
        return [values]
    top = {k: v for k, v in values.items() if k != "unfreeze_from"}
    return [top, {"unfreeze_from": values["unfreeze_from"]}]


@pytest.mark.parametrize("phase", list(PHASES))
def test_the_config_has_every_parameter_with_its_default(phase):
    fields = {f.name: f.default for f in dataclasses.fields(CONFIGS[phase])}
    assert list(fields)[3:] == [p.name for p in PHASES[phase]]
    assert {k: fields[k] for k in list(fields)[3:]} == {p.name: p.default for p in PHASES[phase]}


@pytest.mark.parametrize("phase", list(PHASES))
def test_the_cli_hands_every_parameter_to_the_function(phase, monkeypatch):
    import kfp_finetune.components.train.finetune
    import kfp_finetune.components.train.head

    seen: list = []
    monkeypatch.setattr(kfp_finetune.components.train.head, "train_head", seen.append)
    monkeypatch.setattr(kfp_finetune.components.train.finetune, "fine_tune", seen.append)
    paths = ["--dataset", "d", "--backbone" if phase == "train_head" else "--model", "m", "--output", "o"]
    command = "train-head" if phase == "train_head" else "fine-tune"
    assert main([command, *paths]) == 0
    assert {p.name: getattr(seen[-1], p.name) for p in PHASES[phase]} == {p.name: p.default for p in PHASES[phase]}
    by_name = {p.name: p for p in PHASES[phase]}
    for values in other_values(phase):
        argv = [command, *paths]
        for name, value in values.items():
            flag = by_name[name].flag
            argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
        assert main(argv) == 0
        assert {k: getattr(seen[-1], k) for k in values} == values


@pytest.mark.parametrize("phase", list(PHASES))
def test_the_component_signature_matches_the_definitions(phase):
    inputs = OPS[phase].component_spec.inputs
    declared = {k: v for k, v in inputs.items() if not v.type.startswith("system.")}
    assert list(declared) == [p.name for p in PHASES[phase]]
    for p in PHASES[phase]:
        assert declared[p.name].type == KFP_TYPES[p.type], p.name
        assert declared[p.name].default == kfp_default(p), p.name
        assert declared[p.name].description, f"{p.name}: no Args line in the component's docstring"


@pytest.mark.parametrize("phase", list(PHASES))
def test_the_component_hands_every_argument_to_the_function(phase, monkeypatch):
    import kfp_finetune.components.train

    seen: list = []

    def capture(config):
        seen.append(config)
        return TrainResult(phase=phase, output="o", class_names=["a"], history={}, epochs_run=0)

    monkeypatch.setattr(kfp_finetune.components.train, "train_head", capture)
    monkeypatch.setattr(kfp_finetune.components.train, "fine_tune", capture)

    def artifact(path):
        return types.SimpleNamespace(path=path, metadata={})

    io = ({"dataset": artifact("d"), "backbone": artifact("b"), "model": artifact("o")} if phase == "train_head"
          else {"dataset": artifact("d"), "model": artifact("m"), "tuned_model": artifact("o")})
    by_name = {p.name: p for p in PHASES[phase]}
    for values in other_values(phase):
        OPS[phase].python_func(**io, **values)
        assert {k: getattr(seen[-1], k) for k in values} == values
        untouched = {k for k in by_name if k not in values}
        assert {k: getattr(seen[-1], k) for k in untouched} == {k: by_name[k].default for k in untouched}


def test_the_pipeline_parameters_match_the_definitions():
    inputs = build_pipeline().component_spec.inputs
    for phase, params in PHASES.items():
        for p in params:
            if p.pipeline is None:
                continue
            assert p.pipeline in inputs, f"{phase}.{p.name}: the pipeline has no parameter {p.pipeline}"
            assert inputs[p.pipeline].type == KFP_TYPES[p.type], p.pipeline
            assert inputs[p.pipeline].default == kfp_default(p), p.pipeline
    shared = {}
    for p in (*HEAD, *FINE_TUNE):
        if p.pipeline:
            assert shared.setdefault(p.pipeline, p.default) == p.default, f"{p.pipeline}: phases disagree"


def _loop_tasks(ir):
    return next(c for n, c in ir["components"].items() if n.startswith("comp-for-loop"))["dag"]["tasks"]


@pytest.fixture(scope="module")
def irs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ir")
    standard = compile_pipeline(tmp / "standard.yaml", CompileOptions())
    compare = compile_pipeline(tmp / "compare.yaml", CompileOptions(compare_recipes=("head_only", "default")))
    return yaml.safe_load(standard.read_text()), yaml.safe_load(compare.read_text())


@pytest.mark.parametrize("phase", list(PHASES))
def test_standard_mode_wires_every_pipeline_parameter_to_its_step(irs, phase):
    ir, _ = irs
    # The training steps sit inside the retraining loop's new-data condition: a sub-DAG, whose inputs carry the
    # pipeline's parameters as pipelinechannel--NAME.
    dags = [c["dag"]["tasks"] for c in ir["components"].values() if TASKS[phase] in c.get("dag", {}).get("tasks", {})]
    assert len(dags) == 1
    wired = dags[0][TASKS[phase]]["inputs"]["parameters"]
    for p in PHASES[phase]:
        if p.pipeline is None:
            assert p.name not in wired, f"{p.name} is not a pipeline parameter, yet wired"
        else:
            assert wired[p.name] == {"componentInputParameter": f"pipelinechannel--{p.pipeline}"}, p.name


@pytest.mark.parametrize("phase", list(PHASES))
def test_compare_mode_wires_recipe_settings_from_the_recipe_and_run_settings_from_the_pipeline(irs, phase):
    _, ir = irs
    tasks = _loop_tasks(ir)
    wired = tasks[TASKS[phase]]["inputs"]["parameters"]
    outputs = {p.name: name for ph, p, name in branch_outputs() if ph == phase}
    for p in PHASES[phase]:
        if p.recipe:
            assert wired[p.name] == {"taskOutputParameter": {"outputParameterKey": outputs[p.name],
                                                             "producerTask": "recipe"}}, p.name
        elif p.pipeline:
            assert wired[p.name] == {"componentInputParameter": f"pipelinechannel--{p.pipeline}"}, p.name
        else:
            assert p.name not in wired, p.name


def test_the_recipe_component_outputs_every_recipe_setting_in_order():
    fields = [(f.name, f.type) for f in dataclasses.fields(BranchSettings)][1:]  # less the recipe name
    declared = list(recipe_op.component_spec.outputs.items())
    assert [name for name, _ in declared] == [name for name, _ in fields]
    assert [o.type for _, o in declared] == [KFP_TYPES[t] for _, t in fields]
    assert [name for _, _, name in branch_outputs()] == [name for name, _ in fields][2:]


def test_recipes_are_overrides_and_the_default_recipe_overrides_nothing():
    default = default_recipe()
    assert dict(default.head) == {} and dict(default.fine_tune) == {}
    assert default.head_kwargs() == {p.name: p.default for p in HEAD if p.recipe}
    assert default.fine_tune_kwargs() == {p.name: p.default for p in FINE_TUNE if p.recipe}
    for recipe in RECIPES.values():
        assert set(recipe.head) <= {p.name for p in HEAD if p.recipe}
        assert set(recipe.fine_tune or {}) <= {p.name for p in FINE_TUNE if p.recipe}
