"""Benchmark of the whole pipeline; writes bench/results/pipeline.json and pipeline.md.

Measured in one run, on the same data and parameters (mirror weights, MobileNet v1 alpha=0.25, 160 px, a few
epochs), each in a fresh child process so that both pay their own imports:
1. pipeline: `kfp-finetune run --source FLOWERS` (kfp.local, one subprocess per step, artifacts on disk);
2. direct: the same step functions (ingest, build_backbone, train_head, fine_tune, evaluate, export) called one
   after another in a single Python process.
Overhead = (pipeline - direct) / pipeline: orchestration, per-step interpreter start and imports, artifact I/O.
Goals: overhead <= 20% of the pipeline's wall time; the whole pipeline run <= 10 minutes on this machine.
Also the wall time of `kfp-finetune compile` (goal < 3 s). With --repeats N the two are run N times each,
alternating which goes first (the machine is shared: order and neighbours matter), and medians are reported.

    python bench/pipeline.py [--source ../shared/data/flowers] [--weights ../shared/data/weights] [--repeats 2]
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

PARAMS = {
    "backbone": "mobilenet",
    "backbone_alpha": 0.25,
    "image_size": 160,
    "head_epochs": 3,
    "fine_tune_epochs": 2,
    "batch_size": 32,
    "seed": 0,
    "min_accuracy": 0.5,
}

DIRECT = r"""
import json, sys, time
from pathlib import Path
start = time.perf_counter()
out, source, p = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
from components.ingest import IngestConfig, ingest
from components.backbone import BackboneConfig, build_backbone
from components.train import HeadConfig, FineTuneConfig, train_head, fine_tune
from components.evaluate import EvaluateConfig, evaluate
from components.export import ExportConfig, export
steps = {}
def step(name, fn, cfg):
    t = time.perf_counter(); result = fn(cfg); steps[name] = round(time.perf_counter() - t, 2); return result
step("ingest", ingest, IngestConfig(source=source, output=str(out / "dataset"), seed=p["seed"]))
step("backbone", build_backbone, BackboneConfig(name=p["backbone"], output=str(out / "backbone"),
     alpha=p["backbone_alpha"], image_size=p["image_size"]))
step("train-head", train_head, HeadConfig(dataset=str(out / "dataset"), backbone=str(out / "backbone"),
     output=str(out / "head"), epochs=p["head_epochs"], batch_size=p["batch_size"], seed=p["seed"]))
step("fine-tune", fine_tune, FineTuneConfig(dataset=str(out / "dataset"), model=str(out / "head"),
     output=str(out / "tuned"), epochs=p["fine_tune_epochs"], batch_size=p["batch_size"], seed=p["seed"]))
result = step("evaluate", evaluate, EvaluateConfig(dataset=str(out / "dataset"), model=str(out / "tuned"),
              output=str(out / "evaluation"), min_accuracy=p["min_accuracy"]))
if result.blessed:
    step("export", export, ExportConfig(model=str(out / "tuned"), output=str(out / "export"),
         evaluation=str(out / "evaluation")))
print(json.dumps({"steps": steps, "accuracy": result.metrics.get("accuracy"), "blessed": result.blessed,
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


def pipeline_steps(log: str) -> dict[str, float]:
    """Per-step wall seconds from `run`'s "Task 'X' finished with status SUCCESS in N s" lines."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)
    pattern = r"Task '([^']+)' finished with status SUCCESS in ([0-9.]+) s"
    return {m[1]: float(m[2]) for m in re.finditer(pattern, plain)}


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
        ("`kfp-finetune run` (kfp.local), median", f"{result['pipeline_s']:.1f} s", "<= 600 s"),
        ("step functions in one process, median", f"{result['direct_s']:.1f} s", ""),
        ("overhead (pipeline - direct) / pipeline", f"{100 * result['overhead_fraction']:.1f} %", "<= 20 %"),
        ("every run, pipeline (s)", ", ".join(str(r["seconds"]) for r in runs["pipeline"]), ""),
        ("every run, direct (s)", ", ".join(str(r["seconds"]) for r in runs["direct"]), ""),
        ("test accuracy, pipeline", ", ".join(f"{r['accuracy']:.3f}" for r in runs["pipeline"]), "well above 0.2"),
        ("test accuracy, direct", ", ".join(f"{r['accuracy']:.3f}" for r in runs["direct"]), ""),
    ]
    steps = sorted({s for kind in runs.values() for r in kind for s in r["steps"]},
                   key=["ingest", "backbone", "train-head", "fine-tune", "evaluate", "export"].index)
    lines = [
        "# Pipeline benchmark",
        "",
        f"{result['date']}, {result['machine']}; source {result['source']}; parameters {result['params']};",
        f"{result['repeats']} run(s) of each, alternating which goes first. Per-step times include each step's",
        "interpreter start and imports in the pipeline, not in the direct process. Regenerate with",
        "`python bench/pipeline.py`.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "| step | " + " | ".join(f"pipeline #{i + 1} (s)" for i in range(len(runs["pipeline"])))
        + " | " + " | ".join(f"direct #{i + 1} (s)" for i in range(len(runs["direct"]))) + " |",
        "|---" * (1 + len(runs["pipeline"]) + len(runs["direct"])) + "|",
        *[f"| {s} | " + " | ".join(str(r["steps"].get(s, "-")) for r in runs["pipeline"] + runs["direct"]) + " |"
          for s in steps],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(SHARED / "flowers"))
    parser.add_argument("--weights", default=str(SHARED / "weights"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    python = sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO), "KFP_FINETUNE_WEIGHTS_MIRROR": str(Path(args.weights).resolve()),
           "PATH": os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "")}
    cli = [python, "-m", "components.cli"]
    param_args = [a for k, v in PARAMS.items() for a in ("--param", f"{k}={v}")]
    runs: dict[str, list] = {"pipeline": [], "direct": []}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        tmp = Path(tmp)
        compile_s, _ = timed([*cli, "compile", "--output", str(tmp / "p.yaml")], env)
        for i in range(args.repeats):
            order = ("pipeline", "direct") if i % 2 == 0 else ("direct", "pipeline")
            for kind in order:
                out = tmp / f"{kind}-{i}"
                if kind == "pipeline":
                    seconds, proc = timed([*cli, "run", "--source", args.source, "--output", str(out), *param_args],
                                          env)
                    runs[kind].append({"seconds": round(seconds, 1),
                                       "accuracy": float(summary_value(proc.stdout, "accuracy") or "nan"),
                                       "steps": pipeline_steps(proc.stdout + proc.stderr)})
                else:
                    seconds, proc = timed([python, "-c", DIRECT, str(out), args.source, json.dumps(PARAMS)], env)
                    direct = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs[kind].append({"seconds": round(seconds, 1), "accuracy": direct["accuracy"],
                                       "steps": direct["steps"]})
                print(f"{kind} #{i + 1}: {runs[kind][-1]['seconds']} s", file=sys.stderr)
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "pipeline.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
