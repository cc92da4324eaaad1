"""Every door of the release parameters (components/evaluate/release_params.py: evaluate's calibrate / max_ece, export's
tflite / max_tflite_drop / tflite_required) follows its one definition: the configs, the CLI options, the KFP
component signatures and bodies, and the pipeline's parameters and their wiring."""

from __future__ import annotations

import dataclasses
import types

import pytest
import yaml

from kfp_finetune.components.evaluate.release_params import EVALUATE, EXPORT
from kfp_finetune.components.evaluate.step import EvaluateConfig, EvaluateResult, evaluate_op
from kfp_finetune.components.export.step import ExportConfig, ExportResult, export_op
from kfp_finetune.pipelines.pipeline import CompileOptions, build_pipeline, compile_pipeline
from tests.unit.test_parameter_parity import IR_TYPES, KFP_TYPES, other_value

STEPS = {"evaluate": (EVALUATE, EvaluateConfig, evaluate_op), "export": (EXPORT, ExportConfig, export_op)}


@pytest.mark.parametrize("step", list(STEPS))
def test_configs_components_and_pipeline_follow_the_definitions(step):
    params, config, op = STEPS[step]
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    inputs = op.component_spec.inputs
    pipeline = build_pipeline().component_spec.inputs
    for p in params:
        assert fields[p.name] == p.default, p.name
        assert inputs[p.name].type == KFP_TYPES[p.type] and inputs[p.name].default == p.default, p.name
        assert inputs[p.name].description, f"{p.name}: no Args line in {op.name}'s docstring"
        assert pipeline[p.pipeline].type == KFP_TYPES[p.type] and pipeline[p.pipeline].default == p.default
        with pytest.raises(Exception, match=p.flag):
            config(**({"dataset": "d", "model": "m", "output": "o"} if step == "evaluate" else
                      {"model": "m", "output": "o"}), **{p.name: "nonsense" if p.type is not str else "x"})


@pytest.mark.parametrize("step", list(STEPS))
def test_cli_and_component_hand_every_value_to_the_function(step, monkeypatch):
    import kfp_finetune.components.evaluate.step
    import kfp_finetune.components.export.step
    from kfp_finetune.pipelines.cli import main

    params, _, op = STEPS[step]
    seen: list = []

    def capture(config):
        seen.append(config)
        if step == "evaluate":
            return EvaluateResult(output="o", blessed=True, metrics={k: 0.0 for k in (
                "accuracy", "loss", "top_k_accuracy", "macro_f1", "weighted_f1", "num_examples")}, class_names=["a"],
                confusion_matrix=[[0]], evaluation={"calibration": {"temperature": 1.0, "before": {"ece": 0.0},
                                                                    "after": {"ece": 0.0}}})
        return ExportResult(saved_model_dir="o")

    monkeypatch.setattr(kfp_finetune.components.evaluate.step, "evaluate", capture)
    monkeypatch.setattr(kfp_finetune.components.export.step, "export", capture)
    values = {p.name: other_value(p) for p in params}
    argv = [step, *(["--dataset", "d"] if step == "evaluate" else []), "--model", "m", "--output", "o"]
    for p in params:
        v = values[p.name]
        argv += [p.flag if v else "--no-" + p.flag[2:]] if isinstance(v, bool) else [p.flag, str(v)]
    assert main(argv) == 0
    assert {k: getattr(seen[-1], k) for k in values} == values

    def artifact(path):
        return types.SimpleNamespace(path=path, metadata={})

    if step == "evaluate":
        import shutil

        monkeypatch.setattr(shutil, "copyfile", lambda *a: None)
        io = {"dataset": artifact("d"), "model": artifact("m"), "metrics": types.SimpleNamespace(log_metric=print),
              "classification_metrics": types.SimpleNamespace(log_confusion_matrix=lambda *a: None),
              "report": artifact("r"), "evaluation": artifact("e")}
    else:
        io = {"model": artifact("m"), "evaluation": artifact("e"), "exported_model": artifact("x")}
    op.python_func(**io, **values)
    assert {k: getattr(seen[-1], k) for k in values} == values


def test_the_pipeline_wires_them_to_evaluate_and_export(tmp_path):
    ir = yaml.safe_load(compile_pipeline(tmp_path / "p.yaml", CompileOptions()).read_text())
    params = ir["root"]["inputDefinitions"]["parameters"]
    for task, defs in (("evaluate", EVALUATE), ("export", EXPORT)):
        dags = [c["dag"]["tasks"] for c in ir["components"].values() if task in c.get("dag", {}).get("tasks", {})]
        assert len(dags) == 1
        wired = dags[0][task]["inputs"]["parameters"]
        for p in defs:
            assert wired[p.name] == {"componentInputParameter": f"pipelinechannel--{p.pipeline}"}, p.name
            assert params[p.pipeline]["parameterType"] == IR_TYPES[p.type]
