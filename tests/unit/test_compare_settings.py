"""Compare mode trains each branch at its recipe's settings, for every field (the label-smoothing bug: branches
used to train at the step's default label smoothing whatever their recipe said).

The effective arguments of a branch's train-head and fine-tune tasks are read from the compiled pipeline: an input
wired from the branch's `recipe` task takes that task's output (computed by `branch_settings`, the function the
`recipe` component calls), an input wired from a pipeline parameter takes its default, a constant is itself, and an
input left unwired takes the component's default. The one intended difference, the pipeline's epoch budget, is taken
out by running the recipe task without caps (the caps have their own test in test_compare.py).
"""

from dataclasses import asdict

import pytest
import yaml

from kfp_finetune.components.compare.recipes import RECIPES
from kfp_finetune.components.compare.step import branch_settings
from kfp_finetune.pipelines.pipeline import CompileOptions, compile_pipeline

NO_CAP = {"max_head_epochs": 0, "max_fine_tune_epochs": 0}


@pytest.fixture(scope="module")
def compare_ir(tmp_path_factory):
    out = compile_pipeline(tmp_path_factory.mktemp("cmp") / "p.yaml", CompileOptions(compare_recipes=tuple(RECIPES)))
    return yaml.safe_load(out.read_text())


def _value(spec: dict, ir: dict, recipe_outputs: dict, component: str, name: str):
    if "taskOutputParameter" in spec:
        assert spec["taskOutputParameter"]["producerTask"] == "recipe", spec
        return recipe_outputs[spec["taskOutputParameter"]["outputParameterKey"]]
    if "componentInputParameter" in spec:
        param = spec["componentInputParameter"].removeprefix("pipelinechannel--")
        return ir["root"]["inputDefinitions"]["parameters"][param].get("defaultValue")
    if "runtimeValue" in spec:
        return spec["runtimeValue"]["constant"]
    raise AssertionError(f"{component}.{name}: unexpected input {spec}")


def effective_arguments(ir: dict, recipe: str, task: str) -> dict:
    """The arguments `task` (train-head or fine-tune) of `recipe`'s branch runs with."""
    loop = next(c for name, c in ir["components"].items() if name.startswith("comp-for-loop"))
    tasks = loop["dag"]["tasks"]
    recipe_inputs = {
        name: _value(spec, ir, {}, "recipe", name)
        for name, spec in tasks["recipe"]["inputs"]["parameters"].items() if name != "recipe"
    }
    outputs = asdict(branch_settings(recipe, **{**recipe_inputs, **NO_CAP}))
    component = tasks[task]["componentRef"]["name"]
    declared = ir["components"][component]["inputDefinitions"]["parameters"]
    wired = tasks[task]["inputs"]["parameters"]
    return {
        name: _value(wired[name], ir, outputs, task, name) if name in wired else d.get("defaultValue")
        for name, d in declared.items()
    }


def _as_step_argument(value):
    """The KFP door's spelling of "not set": None travels as 0 / ""."""
    return {None: 0}.get(value, value) if not isinstance(value, str) else value


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_branch_trains_with_its_recipes_settings_for_every_field(compare_ir, recipe):
    r = RECIPES[recipe]
    head = effective_arguments(compare_ir, recipe, "train-head")
    for name, wanted in r.head_kwargs().items():
        assert head[name] == pytest.approx(_as_step_argument(wanted)), f"{recipe}: train_head {name}"
    tune = effective_arguments(compare_ir, recipe, "fine-tune")
    wanted_tune = r.fine_tune_kwargs()
    if wanted_tune is None:
        assert tune["epochs"] == 0, f"{recipe}: a head-only recipe must not fine-tune"
        return
    for name, wanted in wanted_tune.items():
        if name == "unfreeze_from":
            wanted = wanted or ""
        assert tune[name] == pytest.approx(_as_step_argument(wanted)), f"{recipe}: fine_tune {name}"
