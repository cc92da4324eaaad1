"""Every patch of a private Keras, KFP or Apache Beam internal, in one place.

Each patch names the upstream issue it works around and the version it was written for; it refuses to install on
another version (RuntimeError), so an upgrade fails loudly at the patch instead of misbehaving quietly. setup.cfg pins
the versions tested here (keras==3.15.*, kfp==2.17.*, apache-beam==2.77.0). When upgrading: check whether the
upstream issue is fixed, then either delete the patch or re-check it against the new internals and update the
version it accepts.

Where there is a public API, the code uses it instead (the backbone's layers are walked through `.layers`; the epoch
BackupAndRestore restored is read from its `training_metadata.json`, the file it writes).
"""

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

KERAS_VERSION = "3.15."
KFP_VERSION = "2.17."
BEAM_VERSION = "2.77."
_PATCHED = "_kfp_finetune_patched"


def _require(package: str, wanted: str, patch: str) -> None:
    """Refuse to patch a version of `package` the patch was not written for."""
    import importlib.metadata

    found = importlib.metadata.version(package)
    if not found.startswith(wanted):
        raise RuntimeError(
            f"components/core/compat.py: the patch {patch} was written for {package} {wanted}x, this is {package} "
            f"{found}; check the upstream issue and update or remove the patch (and the pin in setup.cfg)"
        )


# --- Keras: weights files of keras.applications -------------------------------------------------------------------


@contextlib.contextmanager
def keras_get_file(handler: Callable[..., str]) -> Iterator[None]:
    """While inside, keras.applications' requests for weights files are answered by `handler` instead of Keras's
    downloader (which has no timeout, no mirror and no sha256 check of ours). Restored on exit.

    Keras has no hook for this: `keras.src.utils.file_utils.get_file` is what the application constructors call.
    """
    _require("keras", KERAS_VERSION, "keras_get_file")
    from keras.src.utils import file_utils

    original = file_utils.get_file
    file_utils.get_file = handler
    try:
        yield
    finally:
        file_utils.get_file = original


# --- Keras: the input sizes of keras.applications -----------------------------------------------------------------


class _SizeProbe(Exception):
    def __init__(self, default_size: int, min_size: int) -> None:
        super().__init__(default_size, min_size)
        self.default_size, self.min_size = default_size, min_size


def keras_application_sizes(keras_name: str) -> tuple[int, int]:
    """(default input size, minimum input size) that `keras.applications.<keras_name>` passes to Keras's
    obtain_input_shape; (224, 32) for a constructor that checks its input itself (MobileNetV3).

    Keras has no public API for either: the constructor is called once with
    `keras.src.applications.imagenet_utils.obtain_input_shape` replaced by a probe that stops it with the values it
    was given (no weights are built or loaded). Restored on exit.
    """
    _require("keras", KERAS_VERSION, "keras_application_sizes")
    import keras
    from keras.src.applications import imagenet_utils

    def probe(*args: Any, default_size: int | None = None, min_size: int | None = None, **kwargs: Any) -> Any:
        raise _SizeProbe(int(default_size or 224), int(min_size or 32))

    original = imagenet_utils.obtain_input_shape
    imagenet_utils.obtain_input_shape = probe
    try:
        getattr(keras.applications, keras_name)(include_top=False, weights=None)
    except _SizeProbe as found:
        return found.default_size, found.min_size
    except Exception:  # a constructor that validates differently: fall through to the common defaults
        pass
    finally:
        imagenet_utils.obtain_input_shape = original
    return 224, 32  # MobileNetV3 checks its input itself: default 224, minimum 32


# --- Keras: multi-worker training ---------------------------------------------------------------------------------


@contextlib.contextmanager
def multi_worker_fit(model: Any, strategy: Any) -> Iterator[None]:
    """Work around two Keras 3 bugs of `fit()` under MultiWorkerMirroredStrategy, for the `fit` inside; restored on
    exit.

    - keras#20329: `fit()` first builds the model symbolically from one batch, reducing that batch's (x, y, weight)
      tuple with `strategy.reduce` as if it were one tensor; with several workers the values are PerReplica and the
      reduce fails ("unsupported type PerReplica"). Build from this worker's local values instead; every worker
      does the same, so variables are created in the same order everywhere. (Patched on this model only.)
    - tensorflow#72388: each scalar log is reduced with `strategy.reduce("MEAN", v, axis=0)`, which fails on 0-d
      values. Reduce those over replicas only. (Patched in keras's TensorFlow trainer module.)
    """
    _require("keras", KERAS_VERSION, "multi_worker_fit")
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    def local(value: Any) -> Any:
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator: Any = None, data_batch: Any = None) -> None:
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(local, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    original = trainer.reduce_per_replica

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            def mean(v: Any) -> Any:
                if isinstance(v, tf.distribute.DistributedValues):
                    rank = strategy.experimental_local_results(v)[0].shape.rank
                    return strategy.reduce("MEAN", v, axis=None if rank == 0 else 0)
                return v

            return tf.nest.map_structure(mean, values)
        return original(values, strategy, reduction)

    model._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        trainer.reduce_per_replica = original
        del model._maybe_symbolic_build


# --- Beam: GCS credentials against an emulator ---------------------------------------------------------------------


def beam_anonymous_gcs() -> None:
    """Make Beam's GCS filesystem connect anonymously in this process (idempotent, not restored): against a GCS
    emulator (STORAGE_EMULATOR_HOST) it would otherwise look for credentials first (~20 s of retries per process).

    Beam has no option for this: its per-process credentials cache (`apache_beam.internal.gcp.auth._Credentials`) is
    filled with "none", and google-cloud-storage then talks to the emulator.
    """
    _require("apache-beam", BEAM_VERSION, "beam_anonymous_gcs")
    from apache_beam.internal.gcp import auth

    with auth._Credentials._credentials_lock:
        if not auth._Credentials._credentials_init:
            auth._Credentials._credentials, auth._Credentials._credentials_init = None, True


# --- KFP: compile-time names at run time ---------------------------------------------------------------------------


def kfp_component_decorator_at_runtime() -> bool:
    """Put `kfp.dsl.component` back when KFP runs a component body (idempotent; returns whether it patched).

    KFP runs component bodies with _KFP_RUNTIME=true, which leaves compile-time names (`dsl.component`) out of
    `kfp.dsl`. Our step modules define their components at import time, and component bodies import those very
    modules, so put the decorator back; without this every step fails under kfp.local, KFP and Vertex alike with
    "module 'kfp.dsl' has no attribute 'component'". Called by `components.core` on import, only under _KFP_RUNTIME.
    """
    from kfp import dsl

    if hasattr(dsl, "component"):
        return False
    _require("kfp", KFP_VERSION, "kfp_component_decorator_at_runtime")
    from kfp.dsl.component_decorator import component

    dsl.component = component
    return True


# --- KFP: the local runner ----------------------------------------------------------------------------------------


def kfp_local_condition_resolution() -> bool:
    """Teach kfp.local's condition evaluator the `<task>-<output>` channel form (idempotent). Not restored: it
    only changes kfp.local, whose configuration is process-wide anyway; KFP and Vertex backends never see it.

    kfp.local (2.17.3) cannot evaluate a `dsl.If` on a named output of a task with several outputs: the condition's
    channel is `pipelinechannel--<task>-<output>` and its resolver only understands `<task>--<output>` and
    `<task>-Output`, so `dsl.If(evaluate.outputs["blessed"] == True)` is always False locally (it logs "Could not
    resolve parent input"). The fix looks the name up among the outputs the tasks actually produced.
    """
    _require("kfp", KFP_VERSION, "kfp_local_condition_resolution")
    from kfp.local.orchestrator import enhanced_dag_orchestrator as orch

    evaluator = orch.ConditionEvaluator
    original = evaluator._resolve_pipeline_channel
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


def kfp_local_oneof_artifacts() -> bool:
    """Teach kfp.local to return a pipeline output artifact that is a `dsl.OneOf` (idempotent; kfp.local only).

    kfp 2.17.3's local runner resolves `dsl.OneOf` for output parameters but rejects it for output artifacts
    ("Expected 1 artifact in ArtifactSelectorSpec. Got: 2"). The retraining loop's outputs come from either the
    new-data branch or the no-new-data branch; the fix applies the parameters' rule to artifacts: the output is
    the one branch that produced it.
    """
    _require("kfp", KFP_VERSION, "kfp_local_oneof_artifacts")
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    original = OrchestratorUtils.__dict__["get_dag_output_artifacts"]
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


def kfp_local_docker_exit_code() -> bool:
    """Make kfp.local's DockerRunner report a step's real exit code on podman too (idempotent, not restored).

    kfp.local (2.17.3) starts each step's container with `auto_remove=True`, then asks it for its exit code. podman
    removes an auto-removed container as soon as it exits, before `wait()` reads the code; kfp takes the NotFound
    for success (docker_task_handler.run_docker_container), so a failed step is reported as SUCCESS and the run goes
    on. The fix runs the container without auto-remove, streams its logs, waits for the exit code, then removes the
    container: the same behaviour on Docker and podman. Returns False when the `docker` package is missing (then
    DockerRunner cannot run at all).
    """
    _require("kfp", KFP_VERSION, "kfp_local_docker_exit_code")
    try:
        from kfp.local import docker_task_handler as handler
    except ImportError:
        return False
    original = handler.run_docker_container
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
