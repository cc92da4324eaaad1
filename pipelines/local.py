"""`kfp-finetune run`: the whole pipeline locally through `kfp.local.SubprocessRunner(use_venv=False)`, offline;
with no `--source` it runs on an embedded sample (the UCI handwritten digits, pipelines/sample/, written out as images).
"""

import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.evaluate.report import format_value
from kfp_finetune.pipelines.pipeline import CompileOptions

log = logging.getLogger("kfp_finetune.pipelines")

# `run` is for a laptop: unless --param says otherwise it trains a small backbone (the recipe study's: MobileNet
# α=0.25 at 160 px) with the default recipe's epochs, ~4.5 min of training on the flowers set on 2 cores. The compiled
# pipeline keeps its production defaults (see pipelines/pipeline.py).
LOCAL_DEFAULTS: dict[str, Any] = {
    "backbone": "mobilenet",
    "backbone_alpha": 0.25,
    "image_size": 160,
    "min_accuracy": 0.5,
}
# The no-argument demo: the embedded 8x8 digits, upscaled, with the default recipe's epochs (a shorter fine-tune
# with BatchNorm training scored 0.2: 2 epochs are too few steps for the moving statistics to follow the new data).
DEMO_DEFAULTS: dict[str, Any] = {
    **LOCAL_DEFAULTS,
    "image_size": 128,
    # Mirrored or rotated digits are other digits (or none): the default recipe's flips would teach wrong labels.
    "augment": False,
}
DEMO_PER_CLASS = 100
SAMPLE_DIGITS = Path(__file__).parent / "sample" / "digits.csv.gz"
DEMO_PIXELS = 32


def write_demo_dataset(folder: str | os.PathLike, per_class: int = DEMO_PER_CLASS, pixels: int = DEMO_PIXELS) -> Path:
    """The UCI handwritten digits embedded in this package (pipelines/sample/DIGITS.md: the copy scikit-learn ships,
    no download) as PNGs, one folder per digit, the first `per_class` of each in the file's order.

    The 8x8, 17-level images are stretched to 0..255 and upscaled (nearest) to `pixels` x `pixels`.
    """
    import gzip

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    with gzip.open(SAMPLE_DIGITS, "rt") as f:
        rows = np.loadtxt(f, delimiter=",")
    images, targets = rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)
    counts: dict[int, int] = {}
    for image, label in zip(images, targets, strict=True):
        label = int(label)
        if counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels_u8 = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        out = folder / str(label) / f"digit_{label}_{counts[label]:03d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels_u8, mode="L").resize((pixels, pixels), Image.NEAREST).save(out)
    (folder / "SOURCE.txt").write_text(
        "The UCI ML hand-written digits (Alpaydin and Kaynak, 1998; CC BY 4.0; the copy scikit-learn ships), "
        "written out as PNG by `kfp-finetune run`. Source and license: pipelines/sample/DIGITS.md in kfp-finetune.\n"
    )
    return folder


@dataclass
class RunSummary:
    """What `run` reports at the end."""

    pipeline_root: Path
    blessed: bool | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    model: Path | None = None
    report: Path | None = None
    evaluation: Path | None = None
    export: Path | None = None
    winner_recipe: str | None = None
    comparison: Path | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    status: str = ""  # the fingerprint step's status: "no new data" ends the run before training
    decision: str = ""  # evaluate's champion decision (evaluation.json `champion.decision`)
    logs: Path | None = None

    def lines(self) -> list[str]:
        out = ["", "kfp-finetune run: summary"]
        if self.status:
            out.append(f"  {'status':<18} {self.status}")
        if self.decision:
            out.append(f"  {'decision':<18} {self.decision}")
        out += [f"  {k:<18} {format_value(v)}" for k, v in sorted(self.metrics.items())]
        out.append(f"  {'blessed':<18} {self.blessed}")
        if self.winner_recipe:
            out.append(f"  {'winner recipe':<18} {self.winner_recipe} (picked on the validation split)")
            out.append(f"  {'comparison':<18} {self.comparison}")
        for label, path in (("model", self.model), ("report", self.report), ("evaluation", self.evaluation),
                            ("export", self.export)):
            shown = str(path) if path else ("-" if label != "export" else "(nothing trained: no new data)"
                                            if self.status == "no new data" else "(not exported: model not blessed)")
            out.append(f"  {label:<18} {shown}")
        out.append(f"  {'pipeline root':<18} {self.pipeline_root}")
        if self.logs:
            out.append(f"  {'step logs':<18} {self.logs}")
        out.append(f"  {'wall time':<18} {self.seconds:.0f} s")
        out += [f"  WARNING: {w}" for w in self.warnings]
        return out



def step_error(tail: Iterable[str]) -> str:
    """The one-line message of an error of ours that ended a step (e.g. the data-drift step's refusal), or ''."""
    for line in reversed(list(tail)):
        found = re.match(r"\s*kfp_finetune\.[\w.]+\.\w+: (.+)$", line)
        if found:
            return found.group(1).strip()
    return ""


def _failed_step(message: str) -> str:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", message)
    found = re.findall(r"'([^']+)'", plain.split("Inner task failed:")[-1])
    return found[-1] if found else "unknown"


def local_options(*, demo_fallback: bool = False, compare_recipes: Sequence[str] | str = ()) -> CompileOptions:
    """The compile options of a local run: no retries (a failure is reported at once; retries are for preempted
    cloud machines)."""
    return CompileOptions(demo_fallback=demo_fallback, retries=0, compare_recipes=compare_recipes or ())


def run_local(
    params: dict[str, Any],
    pipeline_root: str | os.PathLike,
    *,
    demo_fallback: bool = False,
    enable_caching: bool = False,
    compare_recipes: Sequence[str] | str = (),
    pipeline: Any = None,
    runner: str = "subprocess",
    image: str | None = None,
    verbose: bool = False,
    terminal: IO[str] | None = None,
) -> RunSummary:
    """Compile the pipeline with `local_options(...)` (or compile `pipeline`, one already built with them), then run
    the compiled YAML with kfp.local: see run_package.

    Raises UserError naming the failed step.
    """
    import dataclasses
    import tempfile

    from kfp import compiler

    from kfp_finetune.components.core import settings
    from kfp_finetune.pipelines.pipeline import build_pipeline

    options = dataclasses.replace(local_options(demo_fallback=demo_fallback, compare_recipes=compare_recipes),
                                  image=image or settings.component_image())
    with tempfile.TemporaryDirectory(prefix="kfp-finetune-") as tmp:
        package = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline or build_pipeline(options), package_path=str(package))
        return run_package(package, params, pipeline_root, enable_caching=enable_caching, runner=runner,
                           verbose=verbose, terminal=terminal)


def count_steps(package: str | os.PathLike) -> int | None:
    """How many steps a run of the compiled pipeline executes at most (ParallelFor over a fixed list counted)."""
    import json

    import yaml

    try:
        spec = yaml.safe_load(Path(package).read_text())
        components = spec["components"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None

    def walk(dag: dict[str, Any], exclusive: bool = False) -> int:
        # `exclusive`: the tasks of a dsl.If/Else group (comp-condition-branches-*), of which one runs.
        total = 0
        for task in (dag.get("tasks") or {}).values():
            component = components.get(task.get("componentRef", {}).get("name", ""), {})
            times = 1
            raw = task.get("parameterIterator", {}).get("items", {}).get("raw")
            if raw:
                try:
                    times = len(json.loads(raw))
                except ValueError:
                    times = 1
            name = task.get("componentRef", {}).get("name", "")
            steps = times * (walk(component["dag"], name.startswith("comp-condition-branches")) if "dag" in component
                             else 1)
            total = max(total, steps) if exclusive else total + steps
        return total

    return walk(spec.get("root", {}).get("dag", {})) or None


def run_package(
    package: str | os.PathLike,
    params: dict[str, Any],
    pipeline_root: str | os.PathLike,
    *,
    enable_caching: bool = False,
    runner: str = "subprocess",
    logs_dir: str | os.PathLike | None = None,
    verbose: bool = False,
    terminal: IO[str] | None = None,
) -> RunSummary:
    """Run a compiled pipeline (IR YAML, loaded with `kfp.components.load_component_from_file`) under kfp.local.

    This is the very spec that `submit` sends. `runner` "subprocess" runs each step as a subprocess of this
    interpreter's environment; "docker" runs each step in the image the YAML names (kfp.local.DockerRunner on Docker
    or podman, pipelines/containers.py). One line per step goes to `terminal` (default stdout); each step's full log
    to LOGS/STEP.log (default: `logs` beside the pipeline root); `verbose` streams the logs to the terminal too.
    On failure: the last lines of the failed step's log, then a UserError naming the step and its log.
    """
    import sys

    from kfp import components as kfp_components

    from kfp_finetune.components.core import faults
    from kfp_finetune.pipelines._kfp_local import init_local
    from kfp_finetune.pipelines.steplog import StepLogs

    root = Path(pipeline_root).resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"--output {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    logs = Path(logs_dir) if logs_dir else root.parent / "logs"
    terminal = terminal or sys.stdout
    pipeline = kfp_components.load_component_from_file(str(package))
    docker_runner = None
    if runner == "docker":
        from kfp_finetune.pipelines.containers import docker_runner as make_docker_runner

        docker_runner, engine = make_docker_runner(params, root, _package_image(package))
        log.info("steps run in %s on %s", _package_image(package), engine)
    elif runner != "subprocess":
        raise UserError(f"--runner {runner}: expected subprocess or docker")
    init_local(str(root), enable_caching=enable_caching, runner=docker_runner)
    log.info("running %s locally (%s runner); artifacts under %s, step logs under %s", package, runner, root, logs)
    steps = StepLogs(logs, terminal, total=count_steps(package), verbose=verbose)
    try:
        # SIGTERM (a CI timeout, `kill`, a stopped container) stops the running step too, which cleans up.
        with faults.forwards_sigterm("the local run"), steps.capturing():
            task = pipeline(**params)
    except faults.Terminated as exc:
        log.error("%s", exc)
        raise
    except RuntimeError as exc:
        name = _failed_step(str(exc))
        failed = steps.step(name) or steps.failed() or next(iter(steps.running()), None)
        if failed is None:
            raise UserError(f"step {name} failed; logs under {logs}; artifacts so far under {root}") from exc
        steps.finish(failed, "FAILURE")
        terminal.write(steps.failure_report(failed) + "\n")
        reason = step_error(failed.tail)
        raise UserError(f"step {failed.name} failed{': ' + reason if reason else ''} (log: {failed.log}); "
                        f"artifacts so far under {root}") from exc
    finally:
        steps.close()
    summary = summarize(task.outputs, root)
    summary.seconds = time.perf_counter() - steps.started
    summary.logs = logs
    return summary


def _package_image(package: str | os.PathLike) -> str:
    """The image of the compiled pipeline's executors (compile puts every step on one image)."""
    import yaml

    executors = yaml.safe_load(Path(package).read_text()).get("deploymentSpec", {}).get("executors", {})
    images = sorted({e.get("container", {}).get("image", "") for e in executors.values()} - {""})
    if len(images) != 1:
        raise UserError(f"--package {package}: expected one image for every step, found {images or 'none'}")
    return images[0]


def summarize(outputs: dict[str, Any], root: Path) -> RunSummary:
    """Read the pipeline's outputs (and export's artifact on disk) into a RunSummary."""
    summary = RunSummary(pipeline_root=root)
    summary.blessed = bool(outputs.get("blessed"))
    if outputs.get("winner_recipe"):
        summary.winner_recipe = str(outputs["winner_recipe"])
        comparison = outputs.get("comparison")
        summary.comparison = Path(comparison.path) if comparison is not None else None
    metrics = outputs.get("metrics")
    if metrics is not None:
        # kfp.local hands metadata numbers back as floats: show whole numbers (counts) as ints again.
        summary.metrics = {
            k: int(v) if isinstance(v, float) and v.is_integer() and k.startswith("num_") else v
            for k, v in dict(metrics.metadata).items()
            if k not in ("display_name", "blessed")
        }
    model = outputs.get("model")
    if model is not None:
        summary.model = Path(model.path)
        meta_file = summary.model / "model.json"
        if meta_file.is_file():
            import json

            weights = json.loads(meta_file.read_text()).get("backbone", {}).get("weights", {}) or {}
            if weights.get("source") == "random-fallback":
                summary.warnings.append(
                    weights.get("warning")
                    or "no ImageNet weights could be had: the backbone was randomly initialised (demo only)"
                )
        run_dir = summary.model.parent.parent
        exported = run_dir / "export" / "exported_model"
        if exported.exists():
            summary.export = exported
    summary.status = str(outputs.get("status") or "")
    evaluation = outputs.get("evaluation")
    if evaluation is not None:
        summary.evaluation = Path(evaluation.path)
        evaluation_file = summary.evaluation / "evaluation.json"
        if summary.status != "no new data" and evaluation_file.is_file():
            import json

            summary.decision = str((json.loads(evaluation_file.read_text()).get("champion") or {})
                                   .get("decision") or "")
    report = outputs.get("report")
    # The HTML artifact is a file named `report` (no extension); evaluate's folder has the same page as report.html,
    # which a browser opens by double-click.
    if summary.evaluation and (summary.evaluation / "report.html").is_file():
        summary.report = summary.evaluation / "report.html"
    elif report is not None:
        summary.report = Path(report.path)
    return summary


def _local_or_uri(source: str) -> str:
    if "://" in source:
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"--source {source} does not exist; give a folder, a CSV manifest or a gs:// URI")
    return str(path.resolve())
