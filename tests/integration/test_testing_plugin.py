"""The `kfp_local` fixture used the way pipelines/testing.py tells users to: in a separate project of their own, with
its own conftest.py, run by pytest in a subprocess (the repository's own conftest and pytest settings do not apply).
"""

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

USER_TEST = '''
from pathlib import Path

import numpy as np
from kfp import dsl
from kfp.dsl import Dataset, Input
from PIL import Image

from kfp_finetune.components.ingest.step import ingest_op


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def count_classes(dataset: Input[Dataset]) -> int:
    return len(dataset.metadata["class_names"])


@dsl.pipeline(name="my-pipeline")
def my_pipeline(source: str) -> int:
    ingest = ingest_op(source=source, seed=1)
    return count_classes(dataset=ingest.outputs["dataset"]).output


def test_my_pipeline(kfp_local, tmp_path):
    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("light", 210)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(level, 10, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    assert my_pipeline(source=str(tmp_path / "images")).output == 2
    assert any(Path(kfp_local).iterdir())  # the artifacts landed under the fixture's root
'''

DOUBLE_TEST = '''
from kfp import dsl


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def double(x: int) -> int:
    return 2 * x


def test_double(kfp_local):
    assert double(x=21).output == 42
'''


def _user_project(tmp_path: Path, conftest: str, test: str) -> Path:
    project = tmp_path / "my_project"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "conftest.py").write_text(textwrap.dedent(conftest))
    (project / "tests" / "test_mine.py").write_text(test)
    return project


def _pytest(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    # The package as installed (make setup), or this checkout when it is only on PYTHONPATH.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "tests"],
                          cwd=project, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": path, **env})


def _entry_point_name() -> str | None:
    for ep in metadata.entry_points(group="pytest11"):
        if ep.value == "kfp_finetune.pipelines.testing":
            return ep.name
    return None


def test_fixture_works_with_no_setup(tmp_path):
    """The documented usage: nothing in conftest.py; a user's own pipeline of our ingest and their component."""
    if _entry_point_name() is None:
        pytest.fail("kfp-finetune's pytest11 entry point is not installed: run `make setup`")
    project = _user_project(tmp_path, "# the user's conftest: nothing about kfp-finetune\n", USER_TEST)
    proc = _pytest(project)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_conftest_line_with_autoload_off(tmp_path):
    """With plugin autoloading off, the conftest line of the docs loads the fixture."""
    project = _user_project(tmp_path, 'pytest_plugins = ["kfp_finetune.pipelines.testing"]\n', DOUBLE_TEST)
    proc = _pytest(project, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
    # And without the line, nothing loads it: the fixture is missing (the check above is not vacuous).
    (project / "tests" / "conftest.py").write_text("")
    proc = _pytest(project, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    assert proc.returncode != 0 and "fixture 'kfp_local' not found" in proc.stdout


def test_conftest_line_with_autoload_on(tmp_path):
    """The line users copy from older docs no longer crashes pytest ("already registered under a different name")."""
    name = _entry_point_name()
    if name != "kfp_finetune.pipelines.testing":
        pytest.skip(f"the installed entry point is still named {name!r}: reinstall kfp-finetune (make setup)")
    project = _user_project(tmp_path, 'pytest_plugins = ["kfp_finetune.pipelines.testing"]\n', DOUBLE_TEST)
    proc = _pytest(project)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "already registered" not in proc.stdout + proc.stderr
