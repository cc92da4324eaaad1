"""The image's install steps, reproduced without Docker: the builder's wheel from the files the Dockerfile copies,
then the runtime stage's pinned install (images/install.sh, the same script the Dockerfile runs) into a fresh
virtualenv, then the package, its pipelines and the CLI from that virtualenv only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kfp_finetune.components import __version__

# pip: downloads, and unpacking TensorFlow (CPU too). CI runs these beside the other slow tests (`make test-image`).
pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "images" / "Dockerfile"
INSTALL_SH = REPO / "images" / "install.sh"


def _clean_env() -> dict[str, str]:
    """The environment of a container: no PYTHONPATH pointing at this checkout, no active virtualenv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _builder_context(dest: Path) -> Path:
    """Copy what the builder stage's COPY instructions copy (and nothing else) into `dest`."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    builder = text.split(" AS builder", 1)[1].split("\nFROM ", 1)[0]
    copied = 0
    for line in builder.splitlines():
        parts = line.split()
        if not parts or parts[0] != "COPY" or any(p.startswith("--from") for p in parts):
            continue
        *sources, target = parts[1:]
        if target.startswith("/"):  # the recipe script itself, run from the checkout below
            continue
        for source in sources:
            src = REPO / source
            out = dest / target / src.name if target.endswith("/") else dest / target
            if src.is_dir():
                shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)
            copied += 1
    assert copied >= 4, "the builder stage copies the project files"
    return dest


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.mark.slow
def test_runtime_install_in_a_fresh_virtualenv(tmp_path: Path):
    env = _clean_env()
    src = _builder_context(tmp_path / "src")
    assert not (src / "tests").exists() and (src / "setup.cfg").is_file()
    venv, dist = tmp_path / "venv", tmp_path / "dist"
    python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"

    # Builder stage: the wheel. Runtime stage: the venv, then the pinned install of the wheel's `cpu` extra.
    _run(["bash", str(INSTALL_SH), "venv", str(python), str(venv)], tmp_path, env)
    _run(["bash", str(INSTALL_SH), "wheel", str(src), str(dist)], tmp_path, {**env, "PYTHON": str(venv / "bin/python")})
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    assert wheels == [f"kfp_finetune-{__version__}-py3-none-any.whl"]
    install = _run(
        ["bash", str(INSTALL_SH), "install", str(venv), str(dist), str(REPO / "constraints.txt"), "cpu", __version__],
        tmp_path,
        env,
    )
    assert f"kfp-finetune {__version__} [cpu] installed" in install.stdout

    # A wrong image version fails the install step (the Dockerfile passes VERSION from make / Cloud Build).
    wrong = subprocess.run(
        ["bash", str(INSTALL_SH), "install", str(venv), str(dist), str(REPO / "constraints.txt"), "cpu", "9.9.9"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrong.returncode == 2 and "image version 9.9.9 != package version" in wrong.stderr

    bin_dir = venv / "bin"
    where = _run(
        [str(bin_dir / "python"), "-c",
         "import kfp_finetune.components as c, kfp_finetune.pipelines as p; print(c.__file__, p.__file__)"],
        tmp_path,
        env,
    ).stdout
    site = str(venv / "lib")
    assert all(path.startswith(site) for path in where.split()), f"imported from outside the venv: {where}"

    help_text = _run([str(bin_dir / "kfp-finetune"), "--help"], tmp_path, env).stdout
    assert "usage: kfp-finetune" in help_text
    version = _run([str(bin_dir / "kfp-finetune"), "--version"], tmp_path, env).stdout
    assert version.strip() == f"kfp-finetune {__version__}"

    # The pins held: what the image gets is what constraints.txt says.
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    frozen = _run([str(bin_dir / "python"), "-m", "pip", "freeze"], tmp_path, env).stdout
    installed = dict(line.split("==", 1) for line in frozen.splitlines() if "==" in line)
    norm = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}
    for name, got in installed.items():
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in norm:
            assert got == norm[key], f"{name}=={got} but constraints.txt pins {norm[key]}"
    for must in ("tensorflow-cpu", "keras", "kfp", "tensorflow-datasets"):
        assert must in {re.sub(r"[-_.]+", "-", n).lower() for n in installed}, must


# Packages the `gpu` target may take unpinned: TensorFlow's `and-cuda` extra names the CUDA wheels by range only and
# constraints.txt (generated from the CPU dev venv) does not list them yet. Anything else must be pinned.
GPU_UNPINNED_OK = re.compile(r"nvidia-.*-cu12|setuptools|wheel|pip")


@pytest.mark.slow
def test_gpu_target_resolves_under_the_constraints(tmp_path: Path):
    """The gpu target's install, as a dry run (no CUDA download): it resolves, takes TensorFlow 2.21 with CUDA, and
    every package outside the CUDA wheels is pinned by constraints.txt."""
    import json

    env = _clean_env()
    src = _builder_context(tmp_path / "src")
    venv, dist, report = tmp_path / "venv", tmp_path / "dist", tmp_path / "report.json"
    python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    _run(["bash", str(INSTALL_SH), "venv", str(python), str(venv)], tmp_path, env)
    _run(["bash", str(INSTALL_SH), "wheel", str(src), str(dist)], tmp_path, {**env, "PYTHON": str(venv / "bin/python")})
    _run(
        ["bash", str(INSTALL_SH), "resolve", str(venv), str(dist), str(REPO / "constraints.txt"), "gpu", str(report)],
        tmp_path,
        env,
    )
    resolved = {
        re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    pins = {
        re.sub(r"[-_.]+", "-", line.split("==", 1)[0]).lower(): line.split("==", 1)[1].strip()
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert resolved.get("tensorflow") == pins["tensorflow"]
    assert "tensorflow-cpu" not in resolved, "the gpu target must not pull tensorflow-cpu as well"
    assert any(name.startswith("nvidia-cudnn") for name in resolved), sorted(resolved)
    unpinned = sorted(n for n in resolved if n not in pins and n != "kfp-finetune" and not GPU_UNPINNED_OK.fullmatch(n))
    assert unpinned == [], f"not pinned in constraints.txt: {unpinned}"
    for name, version in resolved.items():
        if name in pins:
            assert version == pins[name], f"{name}=={version} but constraints.txt pins {pins[name]}"
