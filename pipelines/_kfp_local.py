"""Setting up kfp.local for this project, and one fix for kfp 2.17's local runner.

kfp.local (2.17.3) cannot evaluate a `dsl.If` on a named output of a task with several outputs: the condition's
channel is `pipelinechannel--<task>-<output>` and its resolver only understands `<task>--<output>` and
`<task>-Output`, so `dsl.If(evaluate.outputs["blessed"] == True)` is always False locally (it logs "Could not
resolve parent input"). `fix_condition_resolution` teaches the resolver the `<task>-<output>` form by looking the
name up among the outputs the tasks actually produced. KFP and Vertex backends are unaffected: they never see this.
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


def fix_oneof_artifacts() -> bool:
    """kfp 2.17.3's local runner rejects a pipeline output artifact that is a `dsl.OneOf` ("Expected 1 artifact in
    ArtifactSelectorSpec"), although it handles OneOf parameters. Teach it the same rule for artifacts: the output
    is the one branch that produced it. (The "no new data" branch of the retraining loop needs this.)"""
    try:
        from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils
    except ImportError:
        return False
    original = OrchestratorUtils.__dict__.get("get_dag_output_artifacts")
    if original is None:
        return False
    if getattr(original.__func__, _PATCHED, False):
        return True

    def get_dag_output_artifacts(cls: Any, dag_outputs_spec: Any, io_store: Any) -> dict[str, Any]:
        outputs = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            found = []
            for selector in spec.artifact_selectors:
                try:
                    found.append(io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key))
                except (KeyError, ValueError):  # a branch that did not run
                    continue
            if len(found) != 1:
                raise ValueError(f"output artifact {key!r}: expected exactly one branch to produce it, got "
                                 f"{len(found)}")
            outputs[key] = found[0]
        return outputs

    setattr(get_dag_output_artifacts, _PATCHED, True)
    OrchestratorUtils.get_dag_output_artifacts = classmethod(get_dag_output_artifacts)
    return True


def python_first_on_path() -> None:
    """kfp.local runs components as `python3 -m kfp.dsl.executor_main`: make `python3` this interpreter.

    That keeps `.venv/bin/kfp-finetune run` (and pytest run as `.venv/bin/python -m pytest`) working without an
    activated venv.
    """
    here = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([here] + [p for p in parts if p and p != here])


def init_local(pipeline_root: str, *, enable_caching: bool = False, raise_on_error: bool = True) -> None:
    """`kfp.local.init` with SubprocessRunner(use_venv=False) in this interpreter's environment."""
    from kfp import local

    python_first_on_path()
    fix_condition_resolution()
    fix_oneof_artifacts()
    # Our image is the very environment we run in; kfp.local's per-task "custom base image" warning is noise here.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom",
                            category=RuntimeWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=raise_on_error, enable_caching=enable_caching)
