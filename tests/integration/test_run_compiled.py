"""`kfp-finetune run` executes the compiled YAML (what `submit` sends), not the Python DSL function.

The proof: a compiled pipeline whose ingest step is edited *in the YAML* to fail with a marker. The DSL function
knows nothing of the edit, so only a run of the YAML can fail that way. The same run checks the failure report (the
failed step's log tail and path) and the quiet output (one line per step).
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from kfp_finetune.components.train import family
from kfp_finetune.pipelines import cli, commands

MARKER = "edited in the compiled YAML"
STEP_LINE = re.compile(r"\[(\d+/\d+|-)\] \S+ +[A-Z]+\b.*$")
# A small backbone, so that the step that may run before ingest is quick.
SMALL = ["--param", "backbone=mobilenet", "--param", "backbone_alpha=0.25", "--param", "image_size=96"]


def _edit_ingest(package: Path) -> Path:
    spec = yaml.safe_load(package.read_text())
    command = spec["deploymentSpec"]["executors"]["exec-ingest"]["container"]["command"]
    program = command[-1]
    assert "    from kfp_finetune.components.ingest.step import" in program
    line = "    from kfp_finetune.components.ingest.step import"
    command[-1] = program.replace(line, f"    raise SystemExit({MARKER!r})\n{line}", 1)
    package.write_text(yaml.safe_dump(spec, sort_keys=False))
    return package


@pytest.fixture(autouse=True)
def _weights(weights_mirror, monkeypatch):
    """The backbone step of these runs loads ImageNet weights: from the shared mirror, never from the network."""
    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(weights_mirror))


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_failed_in_yaml_edit(code: int, out: str, err: str, output: Path) -> None:
    assert code == 2, (out, err)
    assert "step ingest failed" in err
    log = output / "logs" / "ingest.log"
    assert MARKER in log.read_text()
    assert MARKER in out and f"full log: {log}" in out  # the tail of the failed step's log, then its path
    step_lines = [line for line in out.splitlines() if line.startswith("[")]
    # ingest and backbone have no dependency between them: either may run first.
    assert any(re.match(r"\[[23]/8\] ingest +FAILURE", line) for line in step_lines), out  # 8: with data-drift
    assert "Executing task" not in out and '"executor_input"' not in out  # quiet: kfp.local's stream is filed


@pytest.mark.slow  # ~40 s here: the backbone step may run before ingest fails
def test_run_package_executes_the_yaml(tmp_path, synthetic_folder, capsys):
    package = commands.compile_pipeline(tmp_path / "pipeline.yaml", commands.CompileOptions(retries=0))
    _edit_ingest(package)
    output = tmp_path / "out"
    code, out, err = _run(["run", "--package", str(package), "--source", str(synthetic_folder),
                           "--output", str(output), *SMALL], capsys)
    _assert_failed_in_yaml_edit(code, out, err, output)


def test_run_without_package_executes_what_it_compiled(tmp_path, synthetic_folder, capsys, monkeypatch):
    real_compile = commands.compile_pipeline
    compiled: list[Path] = []

    def compile_then_edit(path, options):
        compiled.append(_edit_ingest(real_compile(path, options)))
        return compiled[-1]

    monkeypatch.setattr(commands, "compile_pipeline", compile_then_edit)
    output = tmp_path / "out"
    code, out, err = _run(["run", "--source", str(synthetic_folder), "--output", str(output), *SMALL], capsys)
    # Compiled aside, then moved beside the artifacts once the parameters passed, ready for `submit --package`.
    assert len(compiled) == 1 and not compiled[0].exists()
    assert "head_epochs" in (output / "pipeline.yaml").read_text()
    _assert_failed_in_yaml_edit(code, out, err, output)


def test_run_package_checks_params_against_the_package(tmp_path, synthetic_folder, capsys):
    package = commands.compile_pipeline(tmp_path / "pipeline.yaml", commands.CompileOptions())
    code, _, err = _run(["run", "--package", str(package), "--source", str(synthetic_folder),
                         "--output", str(tmp_path / "out"), "--param", "head_epochz=1"], capsys)
    assert code == 2 and "head_epochz: the pipeline has no such parameter" in err
    code, _, err = _run(["run", "--package", str(package), "--image", "x:1", "--output", str(tmp_path)], capsys)
    assert code == 2 and "compiled into the package" in err
    code, _, err = _run(["run", "--package", str(tmp_path / "nope.yaml"), "--output", str(tmp_path)], capsys)
    assert code == 2 and "not found" in err


@pytest.mark.slow
def test_run_package_tiny_pipeline_end_to_end(tmp_path, synthetic_folder, capsys):
    """A whole (tiny) run of a compiled package: every step's line and log, the summary, the blessed export."""
    package = commands.compile_pipeline(tmp_path / "pipeline.yaml", commands.CompileOptions(retries=0))
    output = tmp_path / "out"
    params = ["backbone=mobilenet", "backbone_alpha=0.25", "image_size=96", "head_epochs=1", "fine_tune_epochs=1",
              "min_accuracy=0", "batch_size=16", "augment=false"]
    code, out, err = _run(["run", "--package", str(package), "--source", str(synthetic_folder), "--output",
                           str(output), *[a for p in params for a in ("--param", p)]], capsys)
    assert code == 0, (out[-3000:], err[-3000:])
    # A step's line may follow text another thread of this test process left without a newline: find it in the line.
    step_lines = [m.group(0) for m in (STEP_LINE.search(line) for line in out.splitlines()) if m]
    skipped = [line for line in step_lines if line.startswith("[-] ")]
    assert all("SKIPPED" in line for line in skipped), out  # a group that did not run (no-new-data) is not a step
    step_lines = [line for line in step_lines if not line.startswith("[-] ")]
    names = [line.split()[1] for line in step_lines]
    # The backbone depends on nothing; ingest waits for the fingerprint, the data-drift check for ingest: the first
    # four come in any such order, and training waits for all of them.
    assert set(names[:4]) == {"fingerprint", "ingest", "data-drift", "backbone"}, out
    assert names.index("fingerprint") < names.index("ingest") < names.index("data-drift"), out
    assert names[4:] == ["train-head", "fine-tune", "evaluate", "export"], out
    assert all("SUCCESS" in line for line in step_lines)
    by_name = dict(zip(names, step_lines, strict=True))
    assert "images ingested" in by_name["ingest"] and "val_accuracy" in by_name["train-head"]
    assert "no baseline: drift not checked" in by_name["data-drift"]
    assert "blessed" in by_name["evaluate"] and "not pushed" in by_name["export"]
    for step in ("ingest", "data-drift", "backbone", "train-head", "fine-tune", "evaluate", "export"):
        assert (output / "logs" / f"{step}.log").stat().st_size > 0
    assert "kfp-finetune run: summary" in out and "blessed            True" in out
    assert len(out.splitlines()) < 40, out
    exported = next((output / "pipeline_root").glob("*/export/exported_model"))
    assert (exported / "saved_model.pb").is_file() or any(exported.rglob("saved_model.pb"))
    assert json.loads(next((output / "pipeline_root").glob("*/evaluate/executor_output.json")).read_text())


@pytest.mark.slow
def test_production_default_backbone_runs_end_to_end_with_random_weights(tmp_path, synthetic_folder, capsys):
    """The compiled pipeline's own defaults (MobileNetV2 at 224 px; no such weights here, so weights=none) through
    every step: the backbone's shapes and preprocessing mode, every layer unfrozen, a blessed, served export."""
    package = commands.compile_pipeline(tmp_path / "pipeline.yaml", commands.CompileOptions(retries=0))
    defaults = {name: spec.get("defaultValue") for name, spec in
                yaml.safe_load(package.read_text())["root"]["inputDefinitions"]["parameters"].items()}
    # 0 and 0: the family's own width and size (MobileNetV2: 1.0 at 224 px, checked in model.json below)
    assert (defaults["backbone"], defaults["backbone_alpha"], defaults["image_size"]) == ("mobilenet_v2", 0.0, 0)
    # `run` puts its laptop defaults (MobileNet α=0.25 at 160 px) first: name the package's own defaults again.
    params = [f"backbone={defaults['backbone']}", f"backbone_alpha={defaults['backbone_alpha']}",
              f"image_size={int(defaults['image_size'])}", "weights=none", "head_epochs=1", "fine_tune_epochs=1",
              "min_accuracy=0", "batch_size=16"]
    output = tmp_path / "out"
    code, out, err = _run(["run", "--package", str(package), "--source", str(synthetic_folder), "--output",
                           str(output), *[a for p in params for a in ("--param", p)]], capsys)
    assert code == 0, (out[-3000:], err[-3000:])
    run_dir = next((output / "pipeline_root").iterdir())
    tuned = json.loads((run_dir / "fine-tune" / "tuned_model" / "model.json").read_text())
    backbone = tuned["backbone"]
    assert (backbone["name"], backbone["keras_name"], backbone["input_size"]) == ("mobilenet_v2", "MobileNetV2", 224)
    assert backbone["preprocessing"] == "tf"  # keras.applications.mobilenet_v2.preprocess_input: pixels to [-1, 1]
    assert backbone["weights"]["source"] == "none" and backbone["output_dim"] == 1280
    assert tuned["training"]["train_head"]["augment"] is True  # the production default, not the demo's setting
    # unfreeze_top=0 (the default): every backbone convolution trains, from the stem to the last 1x1 conv; the
    # MobileNetV2 family's BatchNorm policy (batch_norm=auto -> frozen, components/train/family.py) keeps BN layers
    # in inference mode.
    trainable = {name.rsplit("/", 1)[-1] for name in tuned["trainable_layers"]}
    assert {"Conv1", "expanded_conv_depthwise", "block_16_project", "Conv_1"} <= trainable
    assert not {"bn_Conv1", "block_16_project_BN", "Conv_1_bn"} & trainable
    assert len(trainable) >= 50
    assert tuned["training"]["fine_tune"]["effective"] == family.FAMILY_DEFAULTS["mobilenet_v2"].settings()
    export = json.loads((run_dir / "export" / "exported_model" / "export.json").read_text())
    assert export["input_size"] == 224 and export["serving_check"]["passed"], export["serving_check"]
    assert export["outputs"]["probabilities"].startswith("float32 [None, 3]")  # calibrated: softmax(logits / T)


@pytest.mark.slow  # ~10 min alone on 2 idle cores: 1,500 photos at 224 px, 5 head + 10 fine-tune epochs
@pytest.mark.timeout(2700)  # beside another training test (-n 2) on a loaded CI machine: 15-25 min (900 s was hit)
def test_production_pipeline_with_mobilenet_v2_imagenet_weights_on_flowers(tmp_path, flowers_dir, capsys):
    """The production family with real ImageNet weights (MobileNetV2 α=0.5 from the mirror) and the default recipe,
    end to end through export: blessed, fine-tune not below its own head phase on validation, test accuracy above
    0.85. Sanity floors, not a benchmark (bench/quality.py measures the recipe over splits and seeds)."""
    package = commands.compile_pipeline(tmp_path / "pipeline.yaml", commands.CompileOptions(retries=0))
    # Only the backbone is named: every training setting is the compiled pipeline's default.
    params = ["backbone=mobilenet_v2", "backbone_alpha=0.5", "image_size=224", "weights=imagenet"]
    output = tmp_path / "out"
    code, out, err = _run(["run", "--package", str(package), "--source", str(flowers_dir), "--output",
                           str(output), *[a for p in params for a in ("--param", p)]], capsys)
    assert code == 0, (out[-3000:], err[-3000:])
    run_dir = next((output / "pipeline_root").iterdir())
    head = json.loads((run_dir / "train-head" / "model" / "model.json").read_text())
    tuned = json.loads((run_dir / "fine-tune" / "tuned_model" / "model.json").read_text())
    assert tuned["backbone"]["weights"]["source"] == "mirror" and tuned["backbone"]["weights"]["sha256"]
    assert (tuned["backbone"]["keras_name"], tuned["backbone"]["alpha"]) == ("MobileNetV2", 0.5)
    head_val = head["history"]["train_head"]["val_accuracy"][-1]
    guard = tuned["training"]["fine_tune"]["guard"]
    kept = {"final": guard["final"], "start": guard["start"]}.get(guard["kept"]) or guard["best"]
    n_val = tuned["training"]["fine_tune"]["dataset_examples"]["validation"]
    # The guard's start is the head model measured again: equal to the head's last epoch up to one image's numerics.
    assert abs(guard["start"]["accuracy"] - head_val) <= 1 / n_val + 1e-9, (guard, head_val)
    assert kept["accuracy"] >= head_val - 1 / n_val - 1e-9, (guard, head_val)
    evaluation = json.loads(next(run_dir.glob("evaluate/*/evaluation.json")).read_text())
    assert evaluation["blessed"], evaluation["blessing"]
    assert evaluation["metrics"]["accuracy"] > 0.85, evaluation["metrics"]
    assert evaluation["fine_tune_guard"] == guard
    export = json.loads((run_dir / "export" / "exported_model" / "export.json").read_text())
    assert export["serving_check"]["passed"], export["serving_check"]
