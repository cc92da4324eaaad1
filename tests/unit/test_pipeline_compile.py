"""The compiled pipeline: loads back, one pinned image everywhere, GPU/custom-job wiring, and no structural drift.

Regenerate the golden file after a reviewed change to the pipeline's structure:

    KFP_FINETUNE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_pipeline_compile.py -k golden

then read `git diff tests/golden/` and commit it with the change.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kfp_finetune.components.core import settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.pipelines.cli import main
from kfp_finetune.pipelines.pipeline import CompileOptions, CustomJob, Gpu, compile_pipeline, mutable_tag_warning
from tests.pipeline_shape import pipeline_structure

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pipeline_structure.json"
IMAGE = "registry.example.com/team/kfp-finetune:1.2.3"
GCPC_LAUNCHER = "gcr.io/ml-pipeline/google-cloud-pipeline-components"


def compiled(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--output", str(out), *args]) == 0
    return yaml.safe_load(out.read_text())


def find_task(tasks: dict, name: str) -> str:
    """The path of the one task called `name`, at whatever depth of conditions it sits (e.g. the new-data branch)."""
    found = [path for path in tasks if path == name or path.endswith("/" + name)]
    assert len(found) == 1, (name, found)
    return found[0]


def executor_images(ir: dict) -> dict[str, str]:
    return {name: e["container"]["image"] for name, e in ir["deploymentSpec"]["executors"].items()}


def test_compiled_pipeline_loads_back_with_every_executor_on_the_given_image(tmp_path):
    from kfp.components import load_component_from_file

    ir = compiled(tmp_path, "--image", IMAGE)
    component = load_component_from_file(str(tmp_path / "pipeline.yaml"))
    assert component.name == "kfp-finetune"
    assert "source" in component.component_spec.inputs
    images = executor_images(ir)
    assert len(images) == 9  # fingerprint, ingest, data-drift, backbone, train-head, fine-tune, evaluate, export,
    # no-new-data
    assert set(images.values()) == {IMAGE}


def test_default_image_is_this_releases_versioned_image(tmp_path, monkeypatch):
    monkeypatch.delenv("KFP_FINETUNE_IMAGE", raising=False)
    ir = compiled(tmp_path)
    assert set(executor_images(ir).values()) == {settings.RELEASE_IMAGE}
    assert mutable_tag_warning(settings.RELEASE_IMAGE) is None


def test_compile_does_not_import_tensorflow():
    """What keeps `compile` fast (well under 3 s): no TensorFlow/Keras import on the way."""
    code = (
        "import sys, tempfile, os; from kfp_finetune.pipelines.cli import main; d = tempfile.mkdtemp(); "
        "assert main(['compile', '--output', os.path.join(d, 'p.yaml')]) == 0; "
        "heavy = [m for m in ('tensorflow', 'keras', 'tensorflow_datasets') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.parametrize(
    "image, warned",
    [
        ("registry.example.com/team/kfp-finetune:latest", True),
        ("registry.example.com/team/kfp-finetune", True),
        ("localhost:5000/kfp-finetune:main", True),
        ("localhost:5000/kfp-finetune", True),
        ("registry.example.com/team/kfp-finetune:1.2.3", False),
        ("registry.example.com/team/kfp-finetune@sha256:" + "a" * 64, False),
    ],
)
def test_mutable_tags_draw_a_warning(image, warned, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        ir = compiled(tmp_path, "--image", image)
    assert set(executor_images(ir).values()) == {image}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == warned, warnings
    if warned:
        assert image in warnings[0] and "pin" in warnings[0]


def test_gpu_goes_to_the_training_steps_only(tmp_path):
    ir = compiled(tmp_path, "--image", IMAGE, "--gpu", "NVIDIA_TESLA_T4:2", "--cpu", "8", "--memory", "32G")
    tasks = pipeline_structure(ir)["tasks"]
    for name in ("train-head", "fine-tune"):
        resources = tasks[find_task(tasks, name)]["resources"]
        assert resources["accelerator"]["resourceCount"] == "2"
        assert resources["accelerator"]["resourceType"] == "NVIDIA_TESLA_T4"
        assert resources["cpuRequest"] == 8.0 and resources["memoryRequest"] == 32.0
        assert tasks[find_task(tasks, name)]["retries"] == 2
    for name in ("fingerprint", "ingest", "backbone", "evaluate", "export", "no-new-data"):
        assert "resources" not in tasks[find_task(tasks, name)]


def test_custom_job_wraps_both_training_steps_with_the_given_image(tmp_path):
    ir = compiled(tmp_path, "--image", IMAGE, "--custom-job", "--machine-type", "a2-highgpu-2g",
                  "--accelerator-type", "NVIDIA_TESLA_A100", "--accelerator-count", "2", "--replica-count", "3")
    images = executor_images(ir)
    launchers = {k for k, v in images.items() if v.startswith(GCPC_LAUNCHER)}
    assert launchers == {"exec-train-head", "exec-fine-tune"}
    assert {v for k, v in images.items() if k not in launchers} == {IMAGE}
    for name in ("comp-train-head", "comp-fine-tune"):
        params = ir["components"][name]["inputDefinitions"]["parameters"]
        pools = params["worker_pool_specs"]["defaultValue"]
        assert len(pools) == 2  # chief + workers
        assert int(pools[1]["replica_count"]) == 2  # 3 replicas: 1 chief + 2 workers
        for pool in pools:
            assert pool["container_spec"]["image_uri"] == IMAGE
            assert pool["machine_spec"] == {"machine_type": "a2-highgpu-2g", "accelerator_type": "NVIDIA_TESLA_A100",
                                            "accelerator_count": 2}


def test_export_runs_only_when_blessed(tmp_path):
    tasks = pipeline_structure(compiled(tmp_path, "--image", IMAGE))["tasks"]
    export = find_task(tasks, "export")
    condition = tasks[export.rsplit("/", 1)[0]]["condition"]
    assert "evaluate-blessed" in condition and condition.endswith("== true")
    assert tasks[export]["artifacts"] == {
        "evaluation": "param:pipelinechannel--evaluate-evaluation",
        "model": "param:pipelinechannel--fine-tune-tuned_model",
    }
    assert not tasks[export]["caching"]
    ingest, backbone = find_task(tasks, "ingest"), find_task(tasks, "backbone")
    assert tasks[ingest]["caching"] and tasks[backbone]["caching"]
    assert tasks[ingest]["after"] == [] and tasks[backbone]["after"] == []  # they run in parallel


def test_training_runs_only_with_new_data_and_ingest_takes_the_fingerprint(tmp_path):
    """The retraining loop: fingerprint first (never cached); everything else only when its status is not
    "no new data"; otherwise the no-new-data branch; ingest's cache key includes the fingerprint."""
    tasks = pipeline_structure(compiled(tmp_path, "--image", IMAGE))["tasks"]
    assert not tasks["fingerprint"]["caching"] and tasks["fingerprint"]["after"] == []
    ingest, skip = find_task(tasks, "ingest"), find_task(tasks, "no-new-data")
    train_branch, skip_branch = ingest.rsplit("/", 1)[0], skip.rsplit("/", 1)[0]
    assert tasks[train_branch]["condition"].endswith("fingerprint-status'] != 'no new data'")
    assert tasks[skip_branch]["condition"].startswith("!(")
    for name in ("backbone", "train-head", "fine-tune", "evaluate", "export"):
        assert find_task(tasks, name).startswith(train_branch + "/")
    assert tasks[ingest]["parameters"]["fingerprint"] == "param:pipelinechannel--fingerprint-fingerprint"
    evaluate = tasks[find_task(tasks, "evaluate")]["parameters"]
    assert evaluate["champion_from"] == "param:pipelinechannel--push_to"


def test_docstring_documents_every_parameter(tmp_path):
    ir = compiled(tmp_path, "--image", IMAGE)
    params = ir["root"]["inputDefinitions"]["parameters"]
    undocumented = sorted(name for name, p in params.items() if not p.get("description"))
    assert not undocumented


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "T4:zero"], "COUNT must be a whole number"),
        (["--gpu", ":2"], "expected TYPE[:COUNT]"),
        (["--image", "has space:1"], "not an image reference"),
        (["--memory", "lots"], "Kubernetes quantity"),
        (["--accelerator-type", "NVIDIA_L4"], "need --custom-job"),
        (["--custom-job", "--replica-count", "0"], "at least 1"),
    ],
)
def test_bad_compile_options_are_one_line_errors_and_write_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--output", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gpu_spec_parsing():
    assert Gpu.parse("NVIDIA_L4") == Gpu("NVIDIA_L4", 1)
    assert Gpu.parse("nvidia.com/gpu:4") == Gpu("nvidia.com/gpu", 4)
    with pytest.raises(UserError, match="at least 1"):
        Gpu.parse("NVIDIA_L4:0")


def test_golden_structure(tmp_path):
    """Fails on any unreviewed change of task names, edges, parameters, images (see the module docstring)."""
    out = compile_pipeline(tmp_path / "p.yaml", CompileOptions(image=IMAGE))
    actual = pipeline_structure(yaml.safe_load(out.read_text()), image=IMAGE)
    text = json.dumps(actual, indent=2, sort_keys=True) + "\n"
    if os.environ.get("KFP_FINETUNE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert GOLDEN.is_file(), "no golden file: run with KFP_FINETUNE_UPDATE_GOLDEN=1 once and commit it"
    expected = json.loads(GOLDEN.read_text())
    assert actual == expected, (
        "the compiled pipeline's structure changed; if intended, regenerate with "
        "KFP_FINETUNE_UPDATE_GOLDEN=1 and review `git diff tests/golden/`"
    )


def test_custom_job_settings_are_validated():
    with pytest.raises(UserError, match="machine type"):
        CustomJob(machine_type="")


@pytest.mark.parametrize("demo", [False, True])
def test_weights_fallback_is_compiled_in_only_for_the_demo(demo, tmp_path):
    """Missing weights are an error everywhere but the no-argument demo (`run` without --source)."""
    out = compile_pipeline(tmp_path / "p.yaml", CompileOptions(image=IMAGE, demo_fallback=demo))
    tasks = pipeline_structure(yaml.safe_load(out.read_text()))["tasks"]
    params = tasks[find_task(tasks, "backbone")]["parameters"]
    assert params["fallback_to_random"] == f"const:{demo}"
    assert "fallback" not in " ".join(pipeline_structure(yaml.safe_load(out.read_text()))["parameters"])
