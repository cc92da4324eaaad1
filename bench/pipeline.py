"""Benchmark of the whole pipeline on the default recipe; writes bench/results/pipeline.json and pipeline.md.

Measured on the same data and parameters (the pipeline's defaults with `run`'s local ones: MobileNet v1 alpha=0.25
at 160 px, mirror weights; the default recipe's epochs, augmentation and label smoothing), each in a fresh child
process so that each pays its own imports:
1. pipeline: `kfp-finetune run --source FLOWERS` (compiles, then kfp.local runs the compiled YAML: one subprocess per
   step, artifacts on disk);
2. direct: the same components' Python functions (ingest_op ... export_op, the very bodies the steps run, with the
   same defaults) called one after another in a single Python process;
3. docker, when an engine answers and the image exists: `kfp-finetune run --runner docker --image IMAGE` (every
   step a container of the image, kfp.local.DockerRunner; Docker or podman).
Overhead = (pipeline - direct) / pipeline: orchestration, per-step interpreter start and imports, artifact I/O.
Goals: overhead <= 10% of the pipeline's wall time on the default recipe. Also the wall time of
`kfp-finetune compile` (goal < 3 s). With --repeats N pipeline and direct run N times each, alternating which goes
first (the machine is shared: order and neighbours matter), and medians are reported.

    python bench/pipeline.py [--source ../shared/data/flowers] [--weights ../shared/data/weights] [--repeats 1]
                             [--image ghcr.io/kfp-finetune/kfp-finetune:VERSION]
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "data"

# Beyond the pipeline's defaults: `run`'s local ones (pipelines/local.py LOCAL_DEFAULTS) and a fixed seed.
PARAMS = {
    "backbone": "mobilenet",
    "backbone_alpha": 0.25,
    "image_size": 160,
    "seed": 0,
    "min_accuracy": 0.5,
}
STEPS = ["ingest", "backbone", "train-head", "fine-tune", "evaluate", "export"]

# The components' own functions (the bodies the pipeline's steps run), artifacts as local folders laid out as
# kfp.local lays them out; every other input keeps its default, as in the pipeline.
DIRECT = r"""
import json, sys, time
from pathlib import Path
start = time.perf_counter()
out, source, p = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
from kfp import dsl
from kfp_finetune.components.backbone.step import backbone_op
from kfp_finetune.components.evaluate.step import evaluate_op
from kfp_finetune.components.export.step import export_op
from kfp_finetune.components.ingest.step import ingest_op
from kfp_finetune.components.train import fine_tune_op, train_head_op
steps = {}
def artifact(cls, step, name):
    (out / step).mkdir(parents=True, exist_ok=True)
    return cls(name=name, uri=str(out / step / name))
def step(label, op, /, **kwargs):
    t = time.perf_counter(); result = op.python_func(**kwargs); steps[label] = round(time.perf_counter() - t, 2)
    return result
dataset = artifact(dsl.Dataset, "ingest", "dataset")
step("ingest", ingest_op, source=source, dataset=dataset, seed=p["seed"])
backbone = artifact(dsl.Model, "backbone", "model")
step("backbone", backbone_op, name=p["backbone"], model=backbone, alpha=p["backbone_alpha"],
     image_size=p["image_size"])
head = artifact(dsl.Model, "train-head", "model")
step("train-head", train_head_op, dataset=dataset, backbone=backbone, model=head, seed=p["seed"])
tuned = artifact(dsl.Model, "fine-tune", "tuned_model")
step("fine-tune", fine_tune_op, dataset=dataset, model=head, tuned_model=tuned, seed=p["seed"])
evaluation = artifact(dsl.Artifact, "evaluate", "evaluation")
result = step("evaluate", evaluate_op, dataset=dataset, model=tuned,
              metrics=artifact(dsl.Metrics, "evaluate", "metrics"),
              classification_metrics=artifact(dsl.ClassificationMetrics, "evaluate", "classification_metrics"),
              report=artifact(dsl.HTML, "evaluate", "report"), evaluation=evaluation,
              min_accuracy=p["min_accuracy"])
if result.blessed:
    step("export", export_op, model=tuned, evaluation=evaluation,
         exported_model=artifact(dsl.Model, "export", "exported_model"))
print(json.dumps({"steps": steps, "accuracy": result.accuracy, "blessed": result.blessed,
                  "in_process_s": round(time.perf_counter() - start, 2)}))
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{cmd[:3]} failed with exit code {proc.returncode}")
    return elapsed, proc


def pipeline_steps(out: str) -> dict[str, float]:
    """Per-step wall seconds from `run`'s step lines ("[3/6] train-head     SUCCESS    61.2 s  ...")."""
    pattern = r"(?m)^\[\d+(?:/\d+)?\] (\S+) +SUCCESS +([0-9.]+) s"
    return {m[1]: float(m[2]) for m in re.finditer(pattern, out)}


def docker_image(image: str | None) -> str | None:
    """The image to bench `--runner docker` with, when an engine answers and has it; else None."""
    sys.path.insert(0, str(REPO))  # this checkout's pipelines/, as the child processes get it
    from kfp_finetune.components.core import settings

    image = image or settings.component_image()
    try:
        from kfp_finetune.pipelines import containers

        client = containers.client()
        try:
            client.images.get(image)
        finally:
            client.close()
    except Exception as exc:  # no docker package, no engine, no image: the row is left out, and why is said
        print(f"docker row skipped: {image}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
              file=sys.stderr)
        return None
    return image


def summary_value(out: str, key: str) -> str:
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] == key:
            return parts[1].strip()
    return ""


def markdown(result: dict) -> str:
    runs = result["runs"]
    rows = [
        ("`kfp-finetune compile`", f"{result['compile_s']:.2f} s", "< 3 s"),
        ("default recipe: `kfp-finetune run` (kfp.local, compiled YAML), median", f"{result['pipeline_s']:.1f} s",
         ""),
        ("default recipe: the components' functions in one process, median", f"{result['direct_s']:.1f} s", ""),
        ("**default recipe: overhead (run - one process) / run**", f"**{100 * result['overhead_fraction']:.1f} %**",
         "<= 10 %"),
    ]
    if runs.get("docker"):
        rows += [
            (f"default recipe: `run --runner docker` ({result['engine']}), median", f"{result['docker_s']:.1f} s",
             ""),
            ("container cost (docker - run) / run", f"{100 * result['docker_fraction']:.1f} %", ""),
        ]
    for kind in ("pipeline", "direct", "docker"):
        if runs.get(kind):
            rows.append((f"every run, {kind} (s)", ", ".join(str(r["seconds"]) for r in runs[kind]), ""))
            rows.append((f"test accuracy, {kind}", ", ".join(f"{r['accuracy']:.3f}" for r in runs[kind]),
                         "above 0.7" if kind == "pipeline" else ""))
    columns = [(kind, i, r) for kind in ("pipeline", "direct", "docker") for i, r in enumerate(runs.get(kind, []))]
    lines = [
        "# Pipeline benchmark",
        "",
        f"{result['date']}, {result['machine']}; source {result['source']}; parameters {result['params']} (every",
        "other one at the pipeline's default: the default recipe). "
        f"{result['repeats']} run(s) of pipeline and direct, alternating which goes",
        "first. Per-step times include each step's interpreter start and imports in the pipeline, not in the direct",
        "process. Regenerate with `python bench/pipeline.py`.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "| step | " + " | ".join(f"{kind} #{i + 1} (s)" for kind, i, _ in columns) + " |",
        "|---" * (1 + len(columns)) + "|",
        *[f"| {s} | " + " | ".join(str(r["steps"].get(s, "-")) for _, _, r in columns) + " |" for s in STEPS],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(SHARED / "flowers"))
    parser.add_argument("--weights", default=str(SHARED / "weights"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--image", help="image for the --runner docker row (default: the release image)")
    parser.add_argument("--no-docker", action="store_true", help="leave the --runner docker row out")
    args = parser.parse_args()
    python = sys.executable
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "KFP_FINETUNE_WEIGHTS_MIRROR": str(Path(args.weights).resolve()),
           "PATH": os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "")}
    cli = [python, "-m", "kfp_finetune.pipelines.cli"]
    param_args = [a for k, v in PARAMS.items() for a in ("--param", f"{k}={v}")]
    image = None if args.no_docker else docker_image(args.image)
    runs: dict[str, list] = {"pipeline": [], "direct": [], "docker": []}

    def pipeline_run(kind: str, out: Path, extra: list[str]) -> None:
        seconds, proc = timed([*cli, "run", "--source", args.source, "--output", str(out), *param_args, *extra], env)
        runs[kind].append({"seconds": round(seconds, 1),
                           "accuracy": float(summary_value(proc.stdout, "accuracy") or "nan"),
                           "steps": pipeline_steps(proc.stdout)})

    # Under /tmp (not pytest-style private folders): a container's uid 1000 must be able to enter it.
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)
        compile_s, _ = timed([*cli, "compile", "--output", str(tmp / "p.yaml")], env)
        for i in range(args.repeats):
            order = ("pipeline", "direct") if i % 2 == 0 else ("direct", "pipeline")
            for kind in order:
                out = tmp / f"{kind}-{i}"
                if kind == "pipeline":
                    pipeline_run(kind, out, [])
                else:
                    seconds, proc = timed([python, "-c", DIRECT, str(out), args.source, json.dumps(PARAMS)], env)
                    direct = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs[kind].append({"seconds": round(seconds, 1), "accuracy": direct["accuracy"],
                                       "steps": direct["steps"]})
                print(f"{kind} #{i + 1}: {runs[kind][-1]['seconds']} s", file=sys.stderr)
        engine = ""
        if image:
            from kfp_finetune.pipelines import containers

            client = containers.client()
            engine = str(containers.engine(client)).split(" (")[0]
            client.close()
            pipeline_run("docker", tmp / "docker-0", ["--runner", "docker", "--image", image])
            print(f"docker #1: {runs['docker'][-1]['seconds']} s", file=sys.stderr)
    pipeline_s = statistics.median(r["seconds"] for r in runs["pipeline"])
    direct_s = statistics.median(r["seconds"] for r in runs["direct"])
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}",
        "source": args.source,
        "params": PARAMS,
        "repeats": args.repeats,
        "compile_s": round(compile_s, 2),
        "pipeline_s": pipeline_s,
        "direct_s": direct_s,
        "overhead_fraction": round((pipeline_s - direct_s) / pipeline_s, 3),
        "runs": runs,
    }
    if runs["docker"]:
        docker_s = statistics.median(r["seconds"] for r in runs["docker"])
        result.update(image=image, engine=engine, docker_s=docker_s,
                      docker_fraction=round((docker_s - pipeline_s) / pipeline_s, 3))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "pipeline.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
