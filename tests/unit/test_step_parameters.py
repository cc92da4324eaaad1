"""Every door of every step parameter follows its one definition (components.core.params.Param), for ingest,
fingerprint, backbone, evaluate, export and predict (training: tests/unit/test_parameter_parity.py):

the step's config defaults and checks, its CLI options, its KFP component's signature (KFP reads it from the source,
so it is written out) and body, the pipeline's parameters (same default), their wiring in the compiled pipeline,
the training settings the "no new data" skip compares (derived from `Param.training`: no hand-kept list), and the
component signatures written out in docs/interfaces.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from kfp_finetune.components.backbone.params import BACKBONE
from kfp_finetune.components.backbone.step import BackboneConfig, backbone_op
from kfp_finetune.components.core.params import Param
from kfp_finetune.components.datacheck.params import DRIFT
from kfp_finetune.components.datacheck.step import DriftConfig, drift_op
from kfp_finetune.components.evaluate.release_params import EVALUATE, EXPORT
from kfp_finetune.components.evaluate.step import EvaluateConfig, EvaluateResult, evaluate_op
from kfp_finetune.components.export.step import ExportConfig, ExportResult, export_op
from kfp_finetune.components.ingest.beam_ingest import ingest_beam_op
from kfp_finetune.components.ingest.fingerprint import fingerprint_op
from kfp_finetune.components.ingest.params import FINGERPRINT, INGEST
from kfp_finetune.components.ingest.step import IngestConfig, ingest_op
from kfp_finetune.components.predict.params import PREDICT
from kfp_finetune.components.predict.step import PredictConfig, predict_op
from kfp_finetune.components.train.params import FINE_TUNE, HEAD
from kfp_finetune.pipelines.batch_predict import build_batch_predict_pipeline
from kfp_finetune.pipelines.cli import build_parser
from kfp_finetune.pipelines.params import training_parameters
from kfp_finetune.pipelines.pipeline import CompileOptions, build_pipeline, compile_pipeline

REPO = Path(__file__).resolve().parents[2]
KFP_TYPES = {int: "Integer", float: "Float", str: "String", bool: "Boolean"}
IR_TYPES = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING", bool: "BOOLEAN"}


@dataclasses.dataclass(frozen=True)
class Step:
    params: tuple[Param, ...]
    config: type | None  # the config dataclass (None: the step has no config of its own)
    ops: tuple[Any, ...]  # the KFP components taking these parameters
    command: str  # the CLI subcommand
    task: str | None  # its task in the training pipeline (None: not there)
    paths: dict[str, str]  # the config's required non-parameter fields


STEPS = {
    "ingest": Step(INGEST, IngestConfig, (ingest_op, ingest_beam_op), "ingest", "ingest",
                   {"source": "src", "output": "out"}),
    "drift": Step(DRIFT, DriftConfig, (drift_op,), "drift", "data-drift", {"dataset": "d"}),
    "fingerprint": Step(FINGERPRINT, None, (fingerprint_op,), "fingerprint", "fingerprint", {}),
    "backbone": Step(BACKBONE, BackboneConfig, (backbone_op,), "backbone", "backbone", {"output": "out"}),
    "evaluate": Step(EVALUATE, EvaluateConfig, (evaluate_op,), "evaluate", "evaluate",
                     {"dataset": "d", "model": "m", "output": "o"}),
    "export": Step(EXPORT, ExportConfig, (export_op,), "export", "export", {"model": "m", "output": "o"}),
    "predict": Step(PREDICT, PredictConfig, (predict_op,), "predict", None,
                    {"model": "m", "input": str(REPO), "output": "p.jsonl"}),
}


def kfp_default(p: Param) -> Any:
    return p.kfp_default


def subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("step", list(STEPS))
def test_the_config_takes_every_default_and_check_from_the_definitions(step):
    s = STEPS[step]
    if s.config is None:
        pytest.skip(f"{step} has no config of its own")
    fields = {f.name: f.default for f in dataclasses.fields(s.config)}
    for p in s.params:
        if p.required:
            assert p.name in s.paths, p.name
            continue
        assert p.name in fields, f"{s.config.__name__} has no field {p.name}"
        assert fields[p.name] == p.default, p.name
        if p.check is not None or p.choices:
            bad = "nonsense" if p.type is not str else "x-not-a-choice"
            with pytest.raises(Exception, match=re.escape(p.flag)):
                s.config(**s.paths, **{p.name: -5 if p.type in (int, float) else bad})


@pytest.mark.parametrize("step", list(STEPS))
def test_the_cli_options_follow_the_definitions(step):
    actions = {a.dest: a for a in subparser(STEPS[step].command)._actions}
    for p in STEPS[step].params:
        assert p.name in actions, f"`{STEPS[step].command}` has no option {p.flag}"
        action = actions[p.name]
        assert p.flag in action.option_strings, p.name
        if p.required:
            assert action.required, f"{p.flag} must be required"
        else:
            assert action.default == p.default, f"{p.flag}: default {action.default!r}, defined {p.default!r}"
        assert tuple(action.choices or ()) == p.choices, p.flag


@pytest.mark.parametrize("step", list(STEPS))
def test_the_components_signatures_follow_the_definitions(step):
    for op in STEPS[step].ops:
        inputs = op.component_spec.inputs
        for p in STEPS[step].params:
            assert p.name in inputs, f"{op.name} has no argument {p.name}"
            spec = inputs[p.name]
            assert spec.type == KFP_TYPES[p.type], f"{op.name}.{p.name}"
            if p.required:
                assert spec.default is None and not spec.optional, f"{op.name}.{p.name} must be required"
            else:
                assert spec.default == kfp_default(p), f"{op.name}.{p.name}: {spec.default!r} vs {p.default!r}"
            assert spec.description, f"{p.name}: no Args line in {op.name}'s docstring"


@pytest.mark.parametrize("step", list(STEPS))
def test_the_pipeline_parameters_have_the_defined_defaults(step):
    inputs = (build_batch_predict_pipeline() if step == "predict" else build_pipeline()).component_spec.inputs
    for p in STEPS[step].params:
        if p.pipeline is None:
            continue
        assert p.pipeline in inputs, f"{step}.{p.name}: the pipeline has no parameter {p.pipeline}"
        spec = inputs[p.pipeline]
        assert spec.type == KFP_TYPES[p.type], p.pipeline
        if p.required:
            assert spec.default is None and not spec.optional, p.pipeline
        else:
            assert spec.default == kfp_default(p), f"{p.pipeline}: pipeline {spec.default!r}, defined {p.default!r}"


def test_every_pipeline_parameter_is_defined_once_and_the_definitions_agree():
    fed: dict[str, list[Param]] = {}
    for p in (*HEAD, *FINE_TUNE, *(q for s in STEPS.values() if s.task for q in s.params)):
        if p.pipeline:
            fed.setdefault(p.pipeline, []).append(p)
    inputs = build_pipeline().component_spec.inputs
    undefined = sorted(set(inputs) - set(fed))
    assert not undefined, f"pipeline parameters no step defines (so nobody says if they are training settings): " \
                          f"{undefined}"
    for name, ps in fed.items():
        assert len({kfp_default(p) for p in ps}) == 1, f"{name}: the steps it feeds disagree on its default"
        assert len({p.training for p in ps}) == 1, f"{name}: the steps it feeds disagree on `training`"


def test_the_training_settings_are_derived_from_the_definitions(tmp_path):
    ir = yaml.safe_load(compile_pipeline(tmp_path / "p.yaml", CompileOptions()).read_text())
    settings = ir["root"]["dag"]["tasks"]["fingerprint"]["inputs"]["parameters"]["training_settings"]
    compared = set(settings["runtimeValue"]["constant"])
    compared.discard("compare_recipes")  # a compile-time option, recorded beside them
    assert compared == set(training_parameters())
    # what shapes the model is compared; what decides where it goes or whether it ships is not
    assert {"image_size", "backbone", "seed", "val_fraction", "fine_tune_learning_rate"} <= compared
    assert not compared & {"source", "push_to", "min_accuracy", "checkpoint_dir", "tflite", "force_retrain"}


def _wired(ir: dict, task: str) -> dict:
    if task in ir["root"]["dag"]["tasks"]:
        return ir["root"]["dag"]["tasks"][task]["inputs"]["parameters"]
    dags = [c["dag"]["tasks"] for c in ir["components"].values() if task in c.get("dag", {}).get("tasks", {})]
    assert len(dags) == 1, task
    return dags[0][task]["inputs"]["parameters"]


def test_the_compiled_pipeline_wires_every_parameter_to_its_step(tmp_path):
    ir = yaml.safe_load(compile_pipeline(tmp_path / "p.yaml", CompileOptions()).read_text())
    for step, s in STEPS.items():
        if s.task is None:
            continue
        wired = _wired(ir, s.task)
        for p in s.params:
            if p.pipeline is None:
                continue
            assert wired[p.name] in ({"componentInputParameter": f"pipelinechannel--{p.pipeline}"},
                                     {"componentInputParameter": p.pipeline}), f"{step}.{p.name}"
            assert ir["root"]["inputDefinitions"]["parameters"][p.pipeline]["parameterType"] == IR_TYPES[p.type]


def _doc_signature(text: str, op_name: str) -> str:
    start = text.index(f"`{op_name}(")
    return " ".join(text[start:text.index("`", start + 1)].split())


@pytest.mark.parametrize("step", list(STEPS))
def test_docs_interfaces_writes_the_signatures_as_defined(step):
    text = (REPO / "docs" / "interfaces.md").read_text()
    for op in STEPS[step].ops:
        if op is ingest_beam_op:
            continue  # documented as "the same arguments as ingest_op"
        sig = _doc_signature(text, op.python_func.__name__)
        for p in STEPS[step].params:
            spelled = f"{p.name}: {p.type.__name__}" if p.required else \
                f"{p.name}: {p.type.__name__} = {kfp_default(p)!r}".replace("'", '"')
            assert spelled in sig, f"docs/interfaces.md {op.python_func.__name__}: expected `{spelled}`"


def _other(p: Param) -> Any:
    """A valid value that is not the default."""
    special = {"name": "mobilenet", "split": "validation", "source": "src2", "weights": "none",
               "weights_sha256": "a" * 64, "run_id": "run-7"}
    if p.name in special:
        return special[p.name]
    if p.choices:
        return next(c for c in p.choices if c != p.default)
    if p.type is bool:
        return not p.default
    if p.type is str:
        return "/tmp/elsewhere"
    if p.type is float:
        return 0.05 if p.default in (None, 0.0) else p.default / 2
    return (p.default or 0) + 2


@pytest.mark.parametrize("step", ["ingest", "evaluate", "export", "predict"])
def test_the_cli_and_the_component_hand_every_value_to_the_function(step, monkeypatch, tmp_path):
    import kfp_finetune.components.evaluate.step as evaluate_module
    import kfp_finetune.components.export.step as export_module
    import kfp_finetune.components.ingest.step as ingest_module
    import kfp_finetune.components.predict.step as predict_module
    from kfp_finetune.pipelines.cli import main

    s = STEPS[step]
    seen: list = []

    def capture(config, *args, **kwargs):
        seen.append(config)
        if step == "evaluate":
            return EvaluateResult(output="o", blessed=True, metrics={k: 0.0 for k in (
                "accuracy", "loss", "top_k_accuracy", "macro_f1", "weighted_f1", "num_examples")}, class_names=["a"],
                confusion_matrix=[[0]], evaluation={"calibration": {"temperature": 1.0, "before": {"ece": 0.0},
                                                                    "after": {"ece": 0.0}}})
        if step == "export":
            return ExportResult(saved_model_dir="o")
        return types.SimpleNamespace(class_names=("a",), num_examples={}, predicted=0, skipped=0, skip_counts={},
                                     report={})

    module = {"ingest": ingest_module, "evaluate": evaluate_module, "export": export_module,
              "predict": predict_module}[step]
    monkeypatch.setattr(module, step, capture)
    values = {p.name: _other(p) for p in s.params}
    if step == "ingest":
        values["val_fraction"], values["test_fraction"] = 0.2, 0.15
    images = tmp_path / "images"
    images.mkdir()
    paths = {"ingest": ["--output", "o"], "evaluate": ["--dataset", "d", "--model", "m", "--output", "o"],
             "export": ["--model", "m", "--output", "o"],
             "predict": ["--model", "m", "--input", str(images), "--output", "p.jsonl"]}[step]
    argv = [s.command, *paths]
    for p in s.params:
        v = values[p.name]
        argv += [p.flag if v else "--no-" + p.flag[2:]] if isinstance(v, bool) else [p.flag, str(v)]
    assert main(argv) == 0
    assert {k: getattr(seen[-1], k) for k in values} == values

    def artifact(path):
        return types.SimpleNamespace(path=str(tmp_path / path), metadata={})

    if step == "evaluate":
        import shutil

        monkeypatch.setattr(shutil, "copyfile", lambda *a: None)
        io = {"dataset": artifact("d"), "model": artifact("m"), "metrics": types.SimpleNamespace(log_metric=print),
              "classification_metrics": types.SimpleNamespace(log_confusion_matrix=lambda *a: None),
              "report": artifact("r"), "evaluation": artifact("e")}
    elif step == "export":
        io = {"model": artifact("m"), "evaluation": artifact("e"), "exported_model": artifact("x")}
    elif step == "ingest":
        io = {"dataset": artifact("ds")}
    else:
        io = {"model_uri": "m", "input_uri": str(images), "predictions": artifact("pred")}
    s.ops[0].python_func(**io, **values)
    assert {k: getattr(seen[-1], k) for k in values} == values
