"""compare: which recipe wins on my data? Pick the winner of a recipe comparison on the validation split only.

The pipeline's compare mode (`kfp-finetune compile|run --compare-recipes NAMES`) trains every named recipe
(components/compare/recipes.py) as a parallel branch (`dsl.ParallelFor`) and evaluates each on the **validation** split.
This module is the plain-function side of that mode:

- `branch_settings(recipe, ...)`: a recipe's settings for one branch, with the pipeline's epoch budget as a cap;
- `read_candidate(recipe, evaluation_dir)`: one branch's result, read from evaluate's evaluation.json;
- `pick_winner(candidates)`: the highest validation accuracy; ties go to the lower validation loss, then to the
  recipe listed first. Anything measured on another split (test!) is refused: choosing on test would leak it;
- `compare(config)`: all of the above on local paths, writing comparison.json/.md/.html and a copy of the winning
  model (which then goes on to the test-split evaluate, blessing and export).

Three doors: these functions, `kfp-finetune pick-winner`, and the KFP components `recipe_op`, `candidate_op` and
`pick_winner_op` that the pipeline wires up. No TensorFlow here.
"""

import argparse
import html
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, make_dataclass
from pathlib import Path
from typing import List, NamedTuple  # noqa: UP035 (KFP reads typing.List in component signatures)

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Model, Output

from kfp_finetune.components.core import faults, settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import atomic_directory, check_output_dir, file_sha256, write_json
from kfp_finetune.components.train.params import FINE_TUNE, branch_outputs, defaults

log = logging.getLogger(__name__)

SELECTION_SPLIT = "validation"
EVALUATION_FILE = "evaluation.json"  # evaluate's file name (components.evaluate.step.EVALUATION_FILE)
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
COMPARISON_HTML = "comparison.html"
WIN_CLASS = ' class="win"'


# --- one branch's settings ----------------------------------------------------------------------------------------


# The step arguments of one compare branch: the backbone's weights and size, then every recipe setting of both phases
# (components/train/params.py `branch_outputs`; 0 / "" mean "not set", as in the KFP component signatures).
BranchSettings = make_dataclass(
    "BranchSettings",
    [("recipe", str), ("weights", str), ("image_size", int),
     *[(name, p.type) for _, p, name in branch_outputs()]],
    frozen=True,
)


def parse_recipe_names(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'a,b' or ['a', 'b'] -> ('a', 'b'), checked against RECIPES; 'all' means every recipe."""
    from kfp_finetune.components.compare.recipes import RECIPES, get

    raw = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in raw if n.strip()]
    if names == ["all"]:
        return tuple(RECIPES)
    if len(names) < 2:
        raise UserError(f"--compare-recipes {spec!r}: name at least two recipes (or 'all'); "
                        f"known: {', '.join(RECIPES)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"--compare-recipes lists {', '.join(duplicates)} twice; name each recipe once")
    for name in names:
        get(name)  # a UserError naming the known recipes
    return tuple(names)


def branch_settings(recipe: str, *, weights: str = "imagenet", image_size: int = 0, max_head_epochs: int = 0,
                    max_fine_tune_epochs: int = 0) -> BranchSettings:
    """The settings of `recipe` for one branch of the comparison.

    The recipe decides how to train (initial weights, phases, learning rates, BN policy, unfreeze depth). The
    pipeline keeps what is about the data and the budget: `weights` is where ImageNet weights come from when the
    recipe wants them (a recipe with weights "none" starts from random init); `image_size` applies when the recipe
    has none; `max_*_epochs` (0: no cap) cap each phase so that every recipe gets the same budget.
    """
    from kfp_finetune.components.compare.recipes import get

    r = get(recipe)

    def cap(epochs: int, most: int) -> int:
        if most < 0:
            raise UserError(f"epoch caps must be 0 (no cap) or more (got {most})")
        return min(epochs, most) if most else epochs

    head = r.head_kwargs()
    head["epochs"] = cap(head["epochs"], max_head_epochs)
    tune = r.fine_tune_kwargs()
    if tune is None:  # head-only: fine_tune passes the head model through
        tune = {**defaults(FINE_TUNE, recipe_only=True), "epochs": 0, "warmup_epochs": 0}
    else:
        tune["epochs"] = cap(tune["epochs"], max_fine_tune_epochs)
        tune["warmup_epochs"] = min(tune["warmup_epochs"], tune["epochs"])
    chosen = {"train_head": head, "fine_tune": tune}
    values = {}
    for phase, p, name in branch_outputs():
        value = chosen[phase][p.name]
        values[name] = p.unset if value is None else value
    return BranchSettings(
        recipe=r.name,
        weights="none" if r.weights == "none" else weights,
        image_size=int(r.image_size or image_size or 0),
        **values,
    )


# --- candidates and the winner --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One branch's result: the recipe and its metrics on the selection split (from evaluation.json)."""

    recipe: str
    accuracy: float
    loss: float
    split: str
    model_sha256: str = ""
    macro_f1: float | None = None
    num_examples: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Candidate":
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"not a compare candidate: {text[:200]!r} ({exc})") from exc


def read_candidate(recipe: str, evaluation_dir: str | Path) -> Candidate:
    """The candidate for `recipe` from an evaluate output directory (its evaluation.json)."""
    path = Path(evaluation_dir) / EVALUATION_FILE
    if not path.is_file():
        raise UserError(f"--candidate {recipe}: {path} not found; give an `evaluate` output directory")
    data = json.loads(path.read_text())
    metrics = data.get("metrics") or {}
    if "accuracy" not in metrics:
        raise UserError(f"--candidate {recipe}: {path} has no metrics.accuracy")
    return Candidate(
        recipe=recipe,
        accuracy=float(metrics["accuracy"]),
        loss=float(metrics.get("loss", math.nan)),
        split=str(data.get("split", "")),
        model_sha256=str(data.get("model_sha256", "")),
        macro_f1=float(metrics["macro_f1"]) if "macro_f1" in metrics else None,
        num_examples=int(metrics["num_examples"]) if "num_examples" in metrics else None,
    )


def pick_winner(candidates: Sequence[Candidate]) -> Candidate:
    """The best candidate on the validation split: highest accuracy, then lowest loss, then listed first.

    Raises UserError when there is no candidate, a recipe appears twice, or any candidate was measured on another
    split than validation (choosing on the test split would make its accuracy an optimistic estimate).
    """
    if not candidates:
        raise UserError("no candidates to compare; the comparison needs at least one evaluated recipe")
    names = [c.recipe for c in candidates]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"recipe(s) {', '.join(duplicates)} appear twice among the candidates")
    wrong = [f"{c.recipe} ({c.split or 'unknown split'})" for c in candidates if c.split != SELECTION_SPLIT]
    if wrong:
        raise UserError(f"the winner is picked on the {SELECTION_SPLIT} split only, never on test; "
                        f"measured elsewhere: {', '.join(wrong)}; evaluate each branch with split={SELECTION_SPLIT}")

    def key(item: tuple[int, Candidate]) -> tuple[float, float, int]:
        index, c = item
        accuracy = c.accuracy if math.isfinite(c.accuracy) else -math.inf  # a diverged run never wins
        loss = c.loss if math.isfinite(c.loss) else math.inf
        return (-accuracy, loss, index)

    return min(enumerate(candidates), key=key)[1]


def comparison_table(candidates: Sequence[Candidate], winner: Candidate) -> str:
    """A Markdown table of the candidates, best first, the winner marked."""
    ranked = sorted(candidates, key=lambda c: (-(c.accuracy if math.isfinite(c.accuracy) else -1.0),
                                                c.loss if math.isfinite(c.loss) else math.inf))
    lines = [
        f"# Recipe comparison ({SELECTION_SPLIT} split)",
        "",
        f"Winner: **{winner.recipe}** ({SELECTION_SPLIT} accuracy {winner.accuracy:.4f}). It goes on to the "
        "test-split evaluation, blessing and export; the test split played no part in this choice.",
        "",
        f"| rank | recipe | {SELECTION_SPLIT} accuracy | {SELECTION_SPLIT} loss | macro F1 | images |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for rank, c in enumerate(ranked, 1):
        name = f"**{c.recipe}** (winner)" if c.recipe == winner.recipe else c.recipe
        f1 = f"{c.macro_f1:.4f}" if c.macro_f1 is not None else "-"
        n = str(c.num_examples) if c.num_examples is not None else "-"
        lines.append(f"| {rank} | {name} | {c.accuracy:.4f} | {c.loss:.4f} | {f1} | {n} |")
    return "\n".join(lines) + "\n"


def comparison_html(candidates: Sequence[Candidate], winner: Candidate) -> str:
    """The same table as a self-contained HTML page (the KFP / Vertex UI shows HTML artifacts)."""
    ranked = sorted(candidates, key=lambda c: -(c.accuracy if math.isfinite(c.accuracy) else -1.0))
    rows = "".join(
        f"<tr{WIN_CLASS if c.recipe == winner.recipe else ''}><td>{html.escape(c.recipe)}</td>"
        f"<td>{c.accuracy:.4f}</td><td>{c.loss:.4f}</td>"
        f"<td><div class=\"bar\" style=\"width:{max(c.accuracy, 0.0) * 100:.1f}%\"></div></td></tr>"
        for c in ranked
    )
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Recipe comparison</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:4px 10px;"
        "border-bottom:1px solid #ddd;text-align:left}.win{font-weight:bold;background:#eef7ee}"
        ".bar{background:#4a90d9;height:12px;min-width:1px}td:last-child{width:240px}</style></head><body>"
        f"<h1>Recipe comparison ({SELECTION_SPLIT} split)</h1>"
        f"<p>Winner: <b>{html.escape(winner.recipe)}</b>, {SELECTION_SPLIT} accuracy {winner.accuracy:.4f}. "
        "The test split played no part in this choice.</p>"
        f"<table><tr><th>recipe</th><th>{SELECTION_SPLIT} accuracy</th><th>{SELECTION_SPLIT} loss</th>"
        f"<th></th></tr>{rows}</table></body></html>\n"
    )


@dataclass(frozen=True)
class CompareConfig:
    """compare's inputs: (recipe, evaluation dir) pairs, the models to pick from, and where to write."""

    candidates: tuple[tuple[str, str], ...]
    models: tuple[str, ...]
    output: str
    winner_model: str | None = None

    def __post_init__(self) -> None:
        if not self.candidates:
            raise UserError("--candidate is required (RECIPE EVALUATION_DIR MODEL_DIR, once per recipe)")
        if not str(self.output or "").strip():
            raise UserError("--output is required")
        if not self.models:
            raise UserError("no models to pick the winner from")


@dataclass
class CompareResult:
    winner: Candidate
    candidates: list[Candidate]
    winner_model_source: str
    output: str
    table: str = ""
    winner_model: str | None = None



def winner_model_dir(winner: Candidate, models: Sequence[str]) -> str:
    """The model directory that `winner` evaluated, matched by model.keras's SHA-256 (not by list position)."""
    for model in models:
        path = Path(model) / "model.keras"
        if path.is_file() and file_sha256(path) == winner.model_sha256:
            return str(model)
    raise UserError(f"no model among {len(models)} matches the evaluation of recipe {winner.recipe} "
                    f"(model.keras sha256 {winner.model_sha256[:12]}...)")


@faults.stops_cleanly("pick-winner")
def compare(config: CompareConfig) -> CompareResult:
    """Read every candidate, pick the winner on validation, write the comparison and a copy of the winning model."""
    check_output_dir(config.output)
    if config.winner_model:
        check_output_dir(config.winner_model, "--winner-model")
    candidates = [read_candidate(recipe, directory) for recipe, directory in config.candidates]
    winner = pick_winner(candidates)
    source = winner_model_dir(winner, config.models)
    table = comparison_table(candidates, winner)
    with atomic_directory(config.output) as tmp:
        write_json(tmp / COMPARISON_JSON, {
            "split": SELECTION_SPLIT,
            "winner": asdict(winner),
            "winner_model": source,
            "candidates": [asdict(c) for c in candidates],
        })
        (tmp / COMPARISON_MD).write_text(table, encoding="utf-8")
        (tmp / COMPARISON_HTML).write_text(comparison_html(candidates, winner), encoding="utf-8")
    if config.winner_model:
        with atomic_directory(config.winner_model, "--winner-model") as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
    log.info("compare: %s wins on %s (accuracy %.4f) among %s", winner.recipe, SELECTION_SPLIT, winner.accuracy,
             ", ".join(f"{c.recipe} {c.accuracy:.4f}" for c in candidates))
    return CompareResult(winner=winner, candidates=candidates, winner_model_source=source, output=config.output,
                         table=table, winner_model=config.winner_model)


# --- CLI ----------------------------------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pick-winner", help="pick the best recipe on the validation split and write a comparison table",
        description="Given each recipe's `evaluate --split validation` output and model, pick the winner "
                    "(highest validation accuracy; ties: lower loss, then the recipe listed first), write "
                    "comparison.json/.md/.html and optionally copy the winning model. Test-split evaluations "
                    "are refused.",
    )
    p.add_argument("--candidate", nargs=3, action="append", metavar=("RECIPE", "EVALUATION_DIR", "MODEL_DIR"),
                   required=True, help="one recipe's evaluate output and model directory (repeat per recipe)")
    p.add_argument("--output", required=True, help="new directory for the comparison")
    p.add_argument("--winner-model", help="new directory for a copy of the winning model (optional)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    result = compare(CompareConfig(
        candidates=tuple((r, e) for r, e, _ in args.candidate), models=tuple(m for _, _, m in args.candidate),
        output=args.output, winner_model=args.winner_model,
    ))
    print(result.table, end="")
    return 0


# --- KFP components -------------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def recipe_op(
    recipe: str,
    weights: str = "imagenet",
    image_size: int = 0,
    max_head_epochs: int = 0,
    max_fine_tune_epochs: int = 0,
) -> NamedTuple(  # noqa: UP014 (KFP needs the functional form)
    "RecipeOutputs",
    # BranchSettings' fields in order (KFP reads this list from the source; the parity test holds it to them).
    [("weights", str), ("image_size", int), ("head_epochs", int), ("head_learning_rate", float),
     ("dropout", float), ("augment", bool), ("augment_strength", float), ("class_weights", str),
     ("head_label_smoothing", float),
     ("unfreeze_top", int), ("unfreeze_from", str), ("fine_tune_epochs", int), ("fine_tune_learning_rate", float),
     ("warmup_epochs", int), ("batch_norm", str), ("ema_momentum", float), ("layer_lr_ratio", float),
     ("mixup_alpha", float), ("cutmix_alpha", float), ("early_stopping_patience", int),
     ("fine_tune_label_smoothing", float)],
):
    """One compare branch's step arguments: the recipe's settings, with the pipeline's epoch budget as a cap.

    Args:
        recipe: a recipe name from components/compare/recipes.py.
        weights: where ImageNet weights come from when the recipe wants them ("imagenet", a path or gs:// URI).
        image_size: input size when the recipe sets none; 0 = the backbone's default.
        max_head_epochs: cap on the head phase's epochs; 0 = the recipe's own.
        max_fine_tune_epochs: cap on the fine-tune phase's epochs; 0 = the recipe's own.
    """
    from collections import namedtuple
    from dataclasses import astuple

    from kfp_finetune.components.compare.step import BranchSettings, branch_settings

    s = branch_settings(recipe, weights=weights, image_size=image_size, max_head_epochs=max_head_epochs,
                        max_fine_tune_epochs=max_fine_tune_epochs)
    names = [f for f in BranchSettings.__dataclass_fields__ if f != "recipe"]
    return namedtuple("RecipeOutputs", names)(*astuple(s)[1:])


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def candidate_op(recipe: str, evaluation: Input[Artifact]) -> str:
    """One branch's result as JSON (recipe, accuracy, loss, split, model SHA-256), for `pick_winner_op`.

    Args:
        recipe: the branch's recipe name.
        evaluation: the branch's evaluate output (evaluation.json on the validation split).
    """
    from kfp_finetune.components.compare.step import read_candidate

    return read_candidate(recipe, evaluation.path).to_json()


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def pick_winner_op(
    candidates: List[str],  # noqa: UP006 (KFP reads typing.List)
    models: Input[List[Model]],  # noqa: UP006
    winner: Output[Model],
    comparison: Output[Markdown],
    comparison_html: Output[HTML],
    metrics: Output[Metrics],
) -> NamedTuple("PickWinnerOutputs", [("recipe", str), ("accuracy", float)]):  # noqa: UP014
    """Pick the best recipe on the validation split; write the comparison and a copy of the winning model.

    Args:
        candidates: every branch's `candidate_op` output (dsl.Collected).
        models: every branch's trained model (dsl.Collected); the winner's is found by SHA-256, not position.
        winner: Output Model: a copy of the winning model (it goes on to the test-split evaluate and export).
        comparison: Output Markdown: the comparison table.
        comparison_html: Output HTML: the same table as a page.
        metrics: Output Metrics: each recipe's validation accuracy and the winner's.
    """
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from kfp_finetune.components.compare.step import Candidate, comparison_table, pick_winner, winner_model_dir
    from kfp_finetune.components.compare.step import comparison_html as render_html

    parsed = [Candidate.from_json(c) for c in candidates]
    best = pick_winner(parsed)
    source = winner_model_dir(best, [m.path for m in models])
    Path(comparison.path).write_text(comparison_table(parsed, best), encoding="utf-8")
    Path(comparison_html.path).write_text(render_html(parsed, best), encoding="utf-8")
    # Copy through a sibling temp folder so that a half-copied winner never appears at winner.path.
    parent = Path(winner.path).parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        shutil.copytree(source, Path(tmp) / "model")
        if Path(winner.path).exists():
            Path(winner.path).rmdir()  # KFP may pre-create it empty
        shutil.move(str(Path(tmp) / "model"), winner.path)
    for c in parsed:
        metrics.log_metric(f"validation_accuracy_{c.recipe}", float(c.accuracy))
    metrics.log_metric("winner_validation_accuracy", float(best.accuracy))
    winner.metadata.update({"recipe": best.recipe, "validation_accuracy": float(best.accuracy)})
    comparison.metadata["winner"] = best.recipe
    return namedtuple("PickWinnerOutputs", ["recipe", "accuracy"])(best.recipe, float(best.accuracy))
