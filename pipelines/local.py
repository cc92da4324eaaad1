"""`kfp-finetune run`: the whole pipeline locally through `kfp.local.SubprocessRunner(use_venv=False)`, offline;
with no `--source` it runs on an embedded sample (scikit-learn's handwritten digits written out as images).
"""

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.errors import UserError
from pipelines.pipeline import CompileOptions

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
# The no-argument demo: scikit-learn's 8x8 digits, upscaled, with the default recipe's epochs (a shorter fine-tune
# with BatchNorm training scored 0.2: 2 epochs are too few steps for the moving statistics to follow the new data).
DEMO_DEFAULTS: dict[str, Any] = {
    **LOCAL_DEFAULTS,
    "image_size": 128,
    # Mirrored or rotated digits are other digits (or none): the default recipe's flips would teach wrong labels.
    "augment": False,
}
DEMO_PER_CLASS = 100
DEMO_PIXELS = 32


def write_demo_dataset(folder: str | os.PathLike, per_class: int = DEMO_PER_CLASS, pixels: int = DEMO_PIXELS) -> Path:
    """scikit-learn's handwritten digits (shipped with scikit-learn, no download) as PNGs, one folder per digit.

    The 8x8, 17-level images are stretched to 0..255 and upscaled (nearest) to `pixels` x `pixels`.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = Path(folder)
    digits = load_digits()
    counts: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target, strict=True):
        label = int(label)
        if counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels_u8 = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        out = folder / str(label) / f"digit_{label}_{counts[label]:03d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels_u8, mode="L").resize((pixels, pixels), Image.NEAREST).save(out)
    (folder / "SOURCE.txt").write_text(
        "scikit-learn's copy of the UCI ML hand-written digits dataset (sklearn.datasets.load_digits), "
        "written out as PNG by `kfp-finetune run`.\n"
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

    def lines(self) -> list[str]:
        out = ["", "kfp-finetune run: summary"]
        out += [f"  {k:<18} {_fmt(v)}" for k, v in sorted(self.metrics.items())]
        out.append(f"  {'blessed':<18} {self.blessed}")
        if self.winner_recipe:
            out.append(f"  {'winner recipe':<18} {self.winner_recipe} (picked on the validation split)")
            out.append(f"  {'comparison':<18} {self.comparison}")
        for label, path in (("model", self.model), ("report", self.report), ("evaluation", self.evaluation),
                            ("export", self.export)):
            shown = str(path) if path else ("(not exported: model not blessed)" if label == "export" else "-")
            out.append(f"  {label:<18} {shown}")
        out.append(f"  {'pipeline root':<18} {self.pipeline_root}")
        out.append(f"  {'wall time':<18} {self.seconds:.0f} s")
        out += [f"  WARNING: {w}" for w in self.warnings]
        return out


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _failed_step(message: str) -> str:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", message)
    found = re.findall(r"'([^']+)'", plain.split("Inner task failed:")[-1])
    return found[-1] if found else "unknown"


def run_local(
    params: dict[str, Any],
    pipeline_root: str | os.PathLike,
    *,
    demo_fallback: bool = False,
    enable_caching: bool = False,
    compare_recipes: Sequence[str] = (),
) -> RunSummary:
    """Run the whole pipeline locally with kfp.local (subprocesses, this interpreter's environment).

    Raises UserError naming the failed step.
    """
    from pipelines._kfp_local import init_local
    from pipelines.pipeline import build_pipeline

    root = Path(pipeline_root).resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"--output {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    # No retries locally: a failure is reported at once (retries are for preempted cloud machines).
    options = CompileOptions(demo_fallback=demo_fallback, retries=0, compare_recipes=tuple(compare_recipes))
    pipeline = build_pipeline(options)
    init_local(str(root), enable_caching=enable_caching)
    log.info("running the pipeline locally; artifacts under %s", root)
    # Compare mode: ingest, then per recipe 7 steps (settings, backbone, head, fine-tune, validate, candidate),
    # then pick-winner, evaluate, export.
    n = len(options.compare_recipes)
    progress = StepProgress(total=6 if not n else 1 + 6 * n + 3)
    logging.getLogger().addFilter(progress)
    try:
        task = pipeline(**params)
    except RuntimeError as exc:
        step = _failed_step(str(exc))
        raise UserError(f"step {step} failed (its log is above); artifacts so far under {root}") from exc
    finally:
        logging.getLogger().removeFilter(progress)
    summary = summarize(task.outputs, root)
    summary.seconds = progress.elapsed()
    return summary


class StepProgress(logging.Filter):
    """Numbers kfp.local's "Executing task" lines ([3/6] ...) and times each step."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self.step_started = self.started

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Executing task"):
            self.done += 1
            self.step_started = time.perf_counter()
            record.msg = f"[{self.done}/{self.total}, {self.elapsed():.0f} s] {message}"
        elif message.startswith("Task ") and " finished with status " in message:
            record.msg = f"{message} in {time.perf_counter() - self.step_started:.1f} s"
        return True

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


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
    evaluation = outputs.get("evaluation")
    if evaluation is not None:
        summary.evaluation = Path(evaluation.path)
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
