"""The wheel installs under one name of its own, `kfp_finetune`, and never the generic `components` / `pipelines`:
installed into a fresh virtualenv beside a user's pipeline repository that has its own `pipelines` and `components`
packages, both the user's packages and ours import, and the CLI, `python -m`, the pytest plugin's entry point and
the pipeline's compilation work from the wheel alone.

The wheel is built by images/install.sh from the files the Dockerfile's builder stage copies (as the image is). The
virtualenv sees this checkout's dependencies through a .pth line to .venv's site-packages (only its dependencies:
the editable install of this checkout is a finder that .pth lines do not load), and gets the wheel with --no-deps,
so nothing is downloaded but the build backend."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from kfp_finetune.components import __version__
from tests.integration.test_image_install import INSTALL_SH, REPO, _builder_context, _clean_env, _run

USER_PROJECT = {
    "pipelines/__init__.py": 'WHO = "the user\'s pipelines"\n',
    "pipelines/training.py": "from components.preprocess import STEP\n\nPIPELINE = f'uses {STEP}'\n",
    "components/__init__.py": 'WHO = "the user\'s components"\n',
    "components/preprocess.py": 'STEP = "preprocess"\n',
}

CHECK = r"""
import importlib.metadata, json, sys
import components, pipelines, pipelines.training
import kfp_finetune.components, kfp_finetune.pipelines, kfp_finetune.pipelines.pipeline
from kfp_finetune.components.ingest.step import ingest_op
from kfp_finetune.components.train import train_head_op
plugins = [ep.value for ep in importlib.metadata.entry_points(group="pytest11") if ep.name.startswith("kfp_finetune")]
print(json.dumps({
    "user": [components.WHO, pipelines.WHO, pipelines.training.PIPELINE],
    "ours": [kfp_finetune.components.__file__, kfp_finetune.pipelines.__file__],
    "version": kfp_finetune.components.__version__,
    "plugins": plugins,
}))
"""


def test_the_wheel_installs_beside_a_users_own_pipelines_and_components(tmp_path: Path):
    env = _clean_env()
    src = _builder_context(tmp_path / "src")
    dist = tmp_path / "dist"
    _run(["bash", str(INSTALL_SH), "wheel", str(src), str(dist)], tmp_path, {**env, "PYTHON": sys.executable})
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("kfp_finetune-")}
    assert tops == {"kfp_finetune"}, f"the wheel installs other top-level names: {tops}"
    assert "kfp_finetune/__init__.py" not in names  # a namespace package: nothing of ours claims more
    packages = sorted(str(p.parent.relative_to(REPO)) for top in ("components", "pipelines")
                      for p in (REPO / top).rglob("__init__.py"))
    missing = [p for p in packages if f"kfp_finetune/{p}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (add them to setup.cfg's packages): {missing}"
    # the demo's embedded sample and its license travel with the code that reads them
    assert {"kfp_finetune/pipelines/sample/digits.csv.gz", "kfp_finetune/pipelines/sample/DIGITS.md"} <= set(names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    (purelib,) = venv.glob("lib/python*/site-packages")
    (purelib / "checkout-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-deps",
          str(wheel)], tmp_path, env)

    user = tmp_path / "user-project"
    for name, text in USER_PROJECT.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(text)
    python = str(venv / "bin" / "python")
    out = _run([python, "-c", CHECK], user, env).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found["user"] == ["the user's components", "the user's pipelines", "uses preprocess"]
    assert all(path.startswith(str(purelib)) for path in found["ours"]), found["ours"]
    assert found["version"] == __version__
    assert found["plugins"] == ["kfp_finetune.pipelines.testing"]

    assert _run([str(venv / "bin" / "kfp-finetune"), "--version"], user, env).stdout.strip() == \
        f"kfp-finetune {__version__}"
    assert _run([python, "-m", "kfp_finetune.pipelines", "--version"], user, env).stdout.strip() == \
        f"kfp-finetune {__version__}"
    _run([str(venv / "bin" / "kfp-finetune"), "compile", "--output", str(tmp_path / "pipeline.yaml")], user, env)
    # the executors' code as KFP runs it (the YAML text may fold a long line anywhere)
    spec = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    code = "\n".join(part for executor in spec["deploymentSpec"]["executors"].values()
                      for part in executor["container"].get("command", []) + executor["container"].get("args", []))
    assert "from kfp_finetune.components.train import" in code and "from components." not in code
