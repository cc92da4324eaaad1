"""The README's "Step by step" runs as written: its command lines are parsed from README.md and executed in order, with
their relative paths, in a fresh working directory whose `../shared/data` is the shared test data (a symlink to it,
so `KFP_FINETUNE_SHARED_DATA` is honoured too). `kfp-finetune` is this checkout's
CLI (`python -m kfp_finetune.pipelines`)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Step by step"


def readme_commands(readme: Path = REPO / "README.md") -> list[str]:
    """The indented command lines (`export ...`, `kfp-finetune ...`) of the README's step-by-step section."""
    text = readme.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines()
            if line.startswith("    ") and line.strip().startswith(("export ", "kfp-finetune "))]


def test_the_readme_lists_every_step():
    steps = [shlex.split(c)[1] for c in readme_commands() if c.startswith("kfp-finetune ")]
    assert steps == ["profile", "ingest", "drift", "backbone", "train-head", "fine-tune", "evaluate", "export",
                     "predict"]


@pytest.mark.slow  # trains on the 1,500 flower photos (2 + 2 epochs): ~2 minutes on 2 cores
def test_readme_step_by_step_runs_as_written(shared_data: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)  # ../shared/data, as the README expects
    env = {k: v for k, v in os.environ.items() if k not in ("KFP_FINETUNE_WEIGHTS_MIRROR", "TF_CONFIG")}
    env.update(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    timings = {}
    for command in readme_commands():
        argv = shlex.split(command)
        if argv[0] == "export":
            key, _, value = argv[1].partition("=")
            env[key] = value
            continue
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "kfp_finetune.pipelines", *argv[1:]], cwd=work, env=env,
                              capture_output=True, text=True, timeout=1800)
        timings[argv[1]] = round(time.monotonic() - started, 1)
        assert done.returncode == 0, f"`{command}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    print("README step-by-step timings (s):", timings)

    out = work / "out"
    export = json.loads((out / "export" / "export.json").read_text())
    assert export["serving_check"]["passed"] is True
    latest = (out / "registry" / "LATEST").read_text().strip()
    assert (out / "registry" / latest / "version.json").is_file()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    photos = sorted(p for p in (shared_data / "flowers").rglob("*.jpg"))
    assert len(rows) == len(photos) and all(r["skip_reason"] is None and len(r["classes"]) == 2 for r in rows)
    right = sum(r["classes"][0] == Path(r["file"]).parent.name for r in rows)
    assert right / len(rows) > 0.6, f"top-1 {right / len(rows):.3f} on the flowers"
