"""Setting up kfp.local for this project, and one fix for kfp 2.17's local runner.

kfp.local (2.17.3) cannot evaluate a `dsl.If` on a named output of a task with several outputs: the condition's
channel is `pipelinechannel--<task>-<output>` and its resolver only understands `<task>--<output>` and
`<task>-Output`, so `dsl.If(evaluate.outputs["blessed"] == True)` is always False locally (it logs "Could not
resolve parent input"). `fix_condition_resolution` teaches the resolver the `<task>-<output>` form by looking the
name up among the outputs the tasks actually produced. KFP and Vertex backends are unaffected: they never see this.

kfp.local's DockerRunner (2.17.3) starts each step with `auto_remove=True` and then asks the container for its exit
code. podman removes an auto-removed container as soon as it exits, before `wait()` reads the code; kfp then takes
the NotFound for success, so a failed step is reported as SUCCESS and the run goes on. `fix_docker_exit_code` runs
the container without auto-remove, waits for its exit code, then removes it: the same behaviour on Docker and podman.
"""

import logging
import os
import sys
import warnings
from typing import Any

log = logging.getLogger(__name__)
_PATCHED = "_kfp_finetune_patched"


def fix_condition_resolution() -> bool:
    """Install the resolver fix (idempotent). Returns False when this kfp has no such resolver to fix."""
    try:
        from kfp.local.orchestrator import enhanced_dag_orchestrator as orch
    except ImportError:  # a kfp without the enhanced orchestrator
        return False
    evaluator = getattr(orch, "ConditionEvaluator", None)
    original = getattr(evaluator, "_resolve_pipeline_channel", None)
    if original is None:
        return False
    if getattr(original, _PATCHED, False):
        return True

    def resolve(channel_ref: str, io_store: Any) -> Any:
        name = channel_ref.replace("pipelinechannel--", "", 1)
        store = io_store
        while store is not None:
            for task, outputs in getattr(store, "_task_output_data", {}).items():
                if name.startswith(task + "-") and name[len(task) + 1 :] in outputs:
                    return outputs[name[len(task) + 1 :]]
            store = getattr(store, "_parent", None)
        return original(channel_ref, io_store)

    setattr(resolve, _PATCHED, True)
    evaluator._resolve_pipeline_channel = staticmethod(resolve)
    return True


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
    fix_condition_resolution()
    if isinstance(runner, local.DockerRunner):
        fix_docker_exit_code()
    # Our image is the very environment we run in; kfp.local's per-task "custom base image" warning is noise here.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom",
                            category=RuntimeWarning)
    # CPU/memory requests, retries' display names: compile options for KFP and Vertex, which kfp.local ignores.
    warnings.filterwarnings("ignore", message=r"Task '.*': settings \[.*\] have no effect in the current local runner",
                            category=UserWarning)
    logging.getLogger("kfp.local.pip_install_manager").setLevel(logging.WARNING)
    local.init(runner=runner or local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=raise_on_error, enable_caching=enable_caching)


# kfp releases whose docker_task_handler.run_docker_container this fix was written against (and read).
DOCKER_FIX_KFP_VERSIONS = ("2.17.3",)


def fix_docker_exit_code() -> bool:
    """Make kfp.local's DockerRunner report a step's real exit code on podman too (idempotent).

    Returns False, with a warning, on a kfp this fix was not written for: that kfp's own code then runs.
    """
    import kfp

    try:
        from kfp.local import docker_task_handler as handler
    except ImportError:  # the `docker` package is missing: DockerRunner cannot run at all
        return False
    original = getattr(handler, "run_docker_container", None)
    if original is None or kfp.__version__ not in DOCKER_FIX_KFP_VERSIONS:
        log.warning("kfp %s: DockerRunner exit-code fix not applied (written for kfp %s); on podman a failed step "
                    "may be reported as SUCCESS", kfp.__version__, ", ".join(DOCKER_FIX_KFP_VERSIONS))
        return False
    if getattr(original, _PATCHED, False):
        return True

    def run_docker_container(client: Any, image: str, command: list[str], volumes: dict[str, Any],
                             **container_run_args: Any) -> int:
        import docker

        image = handler.add_latest_tag_if_not_present(image=image)
        known = any(image in (found.tags + found.attrs.get("RepoDigests", [])) for found in client.images.list())
        if known:
            print(f"Found image {image!r}\n")
        else:
            print(f"Pulling image {image!r}")
            client.images.pull(image)
        container_run_args.pop("auto_remove", None)
        container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                          volumes=volumes, auto_remove=False, **container_run_args)
        try:
            for line in container.logs(stream=True, follow=True):
                print(line.decode(errors="replace"), end="")
            return int(container.wait()["StatusCode"])
        finally:
            try:
                container.remove(force=True)
            except docker.errors.APIError as exc:  # already gone: nothing left to clean
                log.debug("could not remove container %s: %s", getattr(container, "id", "?"), exc)

    setattr(run_docker_container, _PATCHED, True)
    handler.run_docker_container = run_docker_container
    return True
