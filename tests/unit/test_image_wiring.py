"""The compiled pipeline runs on the image it was compiled for: `kfp-finetune compile --image X` puts X in every
executor, and a mutable tag (`:latest`) draws a warning, since KFP's cache key is the image string
(kubeflow/pipelines#13862): a moved tag would serve cached results computed by older code."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PINNED = "registry.example.com/team/kfp-finetune:1.2.3"
STEPS = ("ingest", "backbone", "train-head", "fine-tune", "evaluate", "export")

if importlib.util.find_spec("pipelines.commands") is None:
    pytest.skip(
        "pipelines.commands (the `compile --image` command, branch `pipeline`) is not in this checkout yet",
        allow_module_level=True,
    )


def _compile(tmp_path: Path, image: str) -> tuple[dict, str]:
    output = tmp_path / "pipeline.yaml"
    env = {k: v for k, v in os.environ.items() if k != "KFP_FINETUNE_IMAGE"}  # the flag alone decides
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "components", "compile", "--output", str(output), "--image", image],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(output.read_text()), proc.stderr


def _container_images(spec: dict) -> dict[str, str]:
    executors = spec["deploymentSpec"]["executors"]
    return {name: ex["container"]["image"] for name, ex in executors.items() if "container" in ex}


def test_every_executor_uses_the_given_image(tmp_path: Path):
    spec, stderr = _compile(tmp_path, PINNED)
    images = _container_images(spec)
    # One executor per step at least (KFP names them exec-<component name>).
    for step in STEPS:
        assert any(step in name for name in images), f"no executor for {step}: {sorted(images)}"
    assert set(images.values()) == {PINNED}, images
    assert "WARNING" not in stderr, stderr


@pytest.mark.parametrize(
    "image",
    ["registry.example.com/team/kfp-finetune:latest", "registry.example.com/team/kfp-finetune"],
    ids=["latest", "no-tag"],
)
def test_a_mutable_tag_warns(tmp_path: Path, image: str):
    spec, stderr = _compile(tmp_path, image)
    assert set(_container_images(spec).values()) == {image}
    warnings = [line for line in stderr.splitlines() if "WARNING" in line]
    assert any(image in line and ("latest" in line or "mutable" in line) for line in warnings), stderr
