"""Setting up kfp.local for this project (with the fix for kfp 2.17's local runner from components/core/compat.py).

The fix, `components.core.compat.kfp_local_condition_resolution`, is needed only by kfp.local: KFP and Vertex backends
never see it. With a DockerRunner, `compat.kfp_local_docker_exit_code` makes a failed step fail on podman too.
"""

import logging
import os
import sys
import warnings
from typing import Any

from kfp_finetune.components.core.compat import (
    kfp_local_condition_resolution,
    kfp_local_docker_exit_code,
    kfp_local_oneof_artifacts,
)

log = logging.getLogger(__name__)


def python_first_on_path() -> None:
    """kfp.local runs components as `python3 -m kfp.dsl.executor_main`: make `python3` this interpreter.

    That keeps `.venv/bin/kfp-finetune run` (and pytest run as `.venv/bin/python -m pytest`) working without an
    activated venv.
    """
    here = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([here] + [p for p in parts if p and p != here])


def init_local(pipeline_root: str, *, enable_caching: bool = False, raise_on_error: bool = True,
               runner: Any = None) -> None:
    """`kfp.local.init` with SubprocessRunner(use_venv=False) in this interpreter's environment, or `runner` (a
    `kfp.local.DockerRunner`, with the exit-code fix installed)."""
    from kfp import local

    python_first_on_path()
    kfp_local_condition_resolution()
    kfp_local_oneof_artifacts()
    if isinstance(runner, local.DockerRunner):
        kfp_local_docker_exit_code()
    # Our image is the very environment we run in; kfp.local's per-task "custom base image" warning is noise here.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom",
                            category=RuntimeWarning)
    # CPU/memory requests, retries' display names: compile options for KFP and Vertex, which kfp.local ignores.
    warnings.filterwarnings("ignore", message=r"Task '.*': settings \[.*\] have no effect in the current local runner",
                            category=UserWarning)
    logging.getLogger("kfp.local.pip_install_manager").setLevel(logging.WARNING)
    local.init(runner=runner or local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=raise_on_error, enable_caching=enable_caching)
