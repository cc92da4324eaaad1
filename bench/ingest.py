"""Benchmark of the ingest step on ../shared/data/flowers; writes bench/results/ingest.json and ingest.md.

Measured in one run, on the same files, each the median of --repeats runs:
1. ours: `components.ingest.step.ingest()` (hash, full decode on a process pool, TFRecord writing, metadata, report);
2. the decode limit: the same files read and fully decoded by Pillow in parallel on all cores, nothing written;
3. the TFDS writer: what a user would write with `tfds.dataset_builders.store_as_tfds_dataset` over the same files
   and splits, in three variants (file paths; paths after a Pillow check loop; decoded arrays), timed in a child
   process that imports TensorFlow before the clock starts, so its ~7 s import is not counted against TFDS.
Then the peak RSS of an ingest run in a child process (the process and its workers, sampled with psutil) on the
folder and on 10x the folder (ten copies under other names, each with distinct bytes so none is deduplicated).
Goals: ours >= 0.8x the decode limit, >= 2x the TFDS writer; peak RSS at 10x <= 1.3x peak RSS at 1x.

With --beam (needs the beam extra), the Beam row instead: `ingest --runner direct` (DirectRunner, multi-process,
2 workers) against the local ingest on 10x the folder, --repeats interleaved runs each, medians (throughput goal
>= 0.5x: on one machine Beam's overhead dominates), the Beam run at 1x (its fixed cost), and the Beam runs' peak RSS
(launcher + its worker processes) at 1x and at 10x (goal <= 1.3x).
It is merged into the existing results under "beam".

    python bench/ingest.py [--source ../shared/data/flowers] [--repeats 3] [--skip-rss] [--beam]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kfp_finetune.components.core import imagecheck  # noqa: E402
from kfp_finetune.components.ingest.step import IngestConfig, _cpu_count, _start_method, ingest  # noqa: E402

RESULTS = REPO / "bench" / "results"
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "flowers"


def image_files(root: Path) -> list[tuple[str, str]]:
    """(path, class) of every image below the class folders, as ingest sees them."""
    out = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and imagecheck.is_image_name(path.name) and not path.name.startswith("."):
                out.append((str(path), class_dir.name))
    return out


def _decode(paths: list[str]) -> int:
    from PIL import Image

    for path in paths:
        with Image.open(path) as im:
            im.load()
    return len(paths)


def decode_limit(files: list[tuple[str, str]]) -> float:
    """Seconds to read and fully decode every file on all cores (no writing), pool start-up included."""
    import multiprocessing

    paths = [p for p, _ in files]
    chunks = [paths[i : i + 16] for i in range(0, len(paths), 16)]
    start = time.perf_counter()
    with ProcessPoolExecutor(_cpu_count(), mp_context=multiprocessing.get_context(_start_method())) as pool:
        assert sum(pool.map(_decode, chunks)) == len(paths)
    return time.perf_counter() - start


def ours(source: Path, work: Path) -> tuple[float, dict]:
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = ingest(IngestConfig(source=str(source), output=str(out)))
    seconds = time.perf_counter() - start
    return seconds, result.num_examples


def tfds_writer(files: list[tuple[str, str]], work: Path, check: bool = False, arrays: bool = False) -> float:
    """store_as_tfds_dataset over the same files, split 80/10/10 by content hash as a careful user would.

    Fed file paths, TFDS copies the bytes without decoding them (a corrupt file reaches training); with `check`,
    the user first decodes every file with Pillow in a plain loop to drop broken ones (the same guarantee as ours);
    with `arrays`, the user hands TFDS the decoded pixels (as the TFDS docs do for in-memory images), which TFDS
    re-encodes as PNG.
    """
    import numpy as np
    import tensorflow_datasets as tfds
    from PIL import Image

    class_names = sorted({c for _, c in files})
    out = work / "tfds"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if check:
        good = []
        for path, label in files:
            try:
                with Image.open(path) as im:
                    im.load()
                good.append((path, label))
            except Exception:
                pass
        files = good
    splits: dict[str, list] = {"train": [], "validation": [], "test": []}
    for i, (path, label) in enumerate(files):
        u = int(hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8], 16) / 16**8
        split = "test" if u < 0.1 else "validation" if u < 0.2 else "train"
        image = np.asarray(Image.open(path).convert("RGB")) if arrays else path
        splits[split].append((str(i), {"image": image, "label": label}))
    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(names=class_names)}
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name="flowers_bench", version="1.0.0", features=features, split_datasets=splits, data_dir=str(out)
    )
    return time.perf_counter() - start


def tfds_writers_in_child(source: Path, work: Path) -> dict[str, float]:
    """The TFDS writer variants, timed in a child process that imports TensorFlow before the clock starts.

    Kept out of this process so that TensorFlow is never loaded here: ours would then (rightly) avoid forking.
    """
    proc = subprocess.run(
        [sys.executable, __file__, "--tfds-child", "--source", str(source), "--work", str(work)],
        capture_output=True, text=True, check=False, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    if proc.returncode:
        raise RuntimeError(f"TFDS writer child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tfds_child(source: Path, work: Path) -> None:
    import tensorflow  # noqa: F401  (imported before the clock starts: its ~7 s are not charged to TFDS)

    files = image_files(source)
    times = {
        "tfds_writer": tfds_writer(files, work),
        "tfds_writer_checked": tfds_writer(files, work, check=True),
        "tfds_writer_arrays": tfds_writer(files, work, arrays=True),
    }
    print(json.dumps(times))


def make_copies(source: Path, dest: Path, times: int) -> Path:
    """`times` copies of every image under other names; copy k gets k-specific trailing bytes (decoders ignore
    them), so no copy is a byte duplicate of another and ingest does `times` x the work."""
    for path, label in image_files(source):
        data = Path(path).read_bytes()
        for k in range(times):
            target = dest / label / f"copy{k:02d}_{Path(path).name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data + f"kfp-finetune-bench-copy-{k}".encode())
    return dest


CHILD = """
import sys
from kfp_finetune.components.ingest.step import IngestConfig, ingest
if __name__ == "__main__":
    runner = sys.argv[3] if len(sys.argv) > 3 else "local"
    options = ("direct_num_workers=2", "direct_running_mode=multi_processing") if runner == "direct" else ()
    ingest(IngestConfig(source=sys.argv[1], output=sys.argv[2], runner=runner, beam_options=options))
"""


def peak_rss(source: Path, out: Path, runner: str = "local") -> dict:
    """Run one ingest in a child process; sample RSS of it and its descendants every 20 ms."""
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    script = out.parent / "rss_child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), str(source), str(out), runner], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    peak_main = peak_total = 0
    while proc.poll() is None:
        try:
            main = parent.memory_info().rss
            total = main
            for child in parent.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            break
        peak_main, peak_total = max(peak_main, main), max(peak_total, total)
        time.sleep(0.02)
    if proc.returncode:
        raise RuntimeError(f"ingest child failed with {proc.returncode}")
    report = json.loads((out / "ingest_report.json").read_text())
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "images": sum(report["num_examples"].values()),
        "peak_rss_main_mib": round(peak_main / 2**20, 1),
        "peak_rss_total_mib": round(peak_total / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--tfds-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--beam", action="store_true", help="only the Beam row (DirectRunner vs local on 10x)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.tfds_child:
        return tfds_child(args.source, args.work)
    if args.beam:
        return beam_row(args.source, args.work, args.repeats)
    if not args.source.is_dir():
        sys.exit(f"{args.source} not found; pass --source")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    files = image_files(args.source)
    num_bytes = sum(Path(p).stat().st_size for p, _ in files)
    print(f"{len(files)} images, {num_bytes / 2**20:.1f} MiB, {_cpu_count()} cores", flush=True)

    load_before = [round(x, 2) for x in os.getloadavg()]
    times: dict[str, list[float]] = {"ours": [], "decode_limit": [], "tfds_writer": [], "tfds_writer_checked": [],
                                    "tfds_writer_arrays": []}
    num_examples = {}
    for r in range(args.repeats):  # interleaved, so background load hits all three alike
        times["decode_limit"].append(decode_limit(files))
        seconds, num_examples = ours(args.source, work)
        times["ours"].append(seconds)
        for variant, seconds in tfds_writers_in_child(args.source, work).items():
            times[variant].append(seconds)
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "source": str(args.source),
        "images": len(files),
        "mib": round(num_bytes / 2**20, 1),
        "cores": _cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "repeats": args.repeats,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 3) for k, v in median.items()},
        "images_per_second": {k: round(len(files) / v, 1) for k, v in median.items()},
        "ours_vs_decode_limit": round(median["decode_limit"] / median["ours"], 3),
        "ours_vs_tfds_writer": round(median["tfds_writer"] / median["ours"], 3),
        "ours_vs_tfds_writer_checked": round(median["tfds_writer_checked"] / median["ours"], 3),
        "ours_vs_tfds_writer_arrays": round(median["tfds_writer_arrays"] / median["ours"], 3),
        "load_average_before_after": [load_before, [round(x, 2) for x in os.getloadavg()]],
        "num_examples": num_examples,
        "goals": {"ours_vs_decode_limit": 0.8, "ours_vs_tfds_writer": 2.0, "rss_10x_over_1x": 1.3},
    }
    if not args.skip_rss:
        big = make_copies(args.source, work / "x10", 10)
        one = peak_rss(args.source, work / "rss1")
        ten = peak_rss(big, work / "rss10")
        result["rss"] = {
            "1x": one, "10x": ten,
            "ratio_main": round(ten["peak_rss_main_mib"] / one["peak_rss_main_mib"], 3),
            "ratio_total": round(ten["peak_rss_total_mib"] / one["peak_rss_total_mib"], 3),
        }
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "ingest.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    if "beam" in previous:  # the Beam row is measured on its own (--beam): keep it
        result["beam"] = previous["beam"]
    path.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "ingest.md").write_text(markdown(result))
    print(markdown(result))


def _median_run(runs: list[dict]) -> dict:
    """The run with the median seconds, with its seconds list and the peak RSS over all runs."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["all_seconds"] = [r["seconds"] for r in runs]
    out["peak_rss_main_mib"] = max(r["peak_rss_main_mib"] for r in runs)
    out["peak_rss_total_mib"] = max(r["peak_rss_total_mib"] for r in runs)
    return out


def beam_row(source: Path, work_arg: Path | None, repeats: int = 3) -> None:
    """The Beam row: local vs DirectRunner (2 worker processes) on 10x, `repeats` interleaved runs each (medians),
    all in child processes sampled for peak RSS; Beam also at 1x for its fixed cost and RSS growth. Merged into the
    existing results."""
    work = work_arg or Path(tempfile.mkdtemp(prefix="bench-ingest-beam-"))
    big = make_copies(source, work / "x10", 10)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict]] = {"local10": [], "beam10": [], "beam1": []}
    for r in range(repeats):  # interleaved, so background load hits both alike
        runs["local10"].append(peak_rss(big, work / "local10"))
        runs["beam10"].append(peak_rss(big, work / "beam10", runner="direct"))
        runs["beam1"].append(peak_rss(source, work / "beam1", runner="direct"))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]['seconds']:.2f} s" for k, v in runs.items()), flush=True)
    local10, beam10, beam1 = (_median_run(runs[k]) for k in ("local10", "beam10", "beam1"))
    same = all((work / "local10" / name).read_bytes() == (work / "beam10" / name).read_bytes()
               for name in os.listdir(work / "local10") if name != "ingest_report.json")
    beam = {
        "runner": "DirectRunner multi_processing, direct_num_workers=2",
        "repeats": repeats,
        "cores": _cpu_count(),
        "local_10x": local10, "beam_10x": beam10, "beam_1x": beam1,
        "throughput_ratio_10x": round(local10["seconds"] / beam10["seconds"], 3),
        "beam_images_per_second_10x": round(beam10["images"] / beam10["seconds"], 1),
        "local_images_per_second_10x": round(local10["images"] / local10["seconds"], 1),
        "rss_ratio_total": round(beam10["peak_rss_total_mib"] / beam1["peak_rss_total_mib"], 3),
        "rss_ratio_main": round(beam10["peak_rss_main_mib"] / beam1["peak_rss_main_mib"], 3),
        "same_dataset_bytes": same,
        "load_average_before_after": [load_before, [round(x, 2) for x in os.getloadavg()]],
        "goals": {"throughput_ratio_10x": 0.5, "rss_ratio": 1.3},
    }
    if work_arg is None:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "ingest.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result["beam"] = beam
    path.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result) if "median_seconds" in result else beam_markdown(beam)
    (RESULTS / "ingest.md").write_text(text)
    print(beam_markdown(beam))


def beam_markdown(b: dict) -> str:
    rows = [("local ingest, 10x", b["local_10x"]), ("Beam DirectRunner, 10x", b["beam_10x"]),
            ("Beam DirectRunner, 1x", b["beam_1x"])]
    lines = [
        f"## Beam row ({b['runner']}, {b['cores']} cores, median of {b.get('repeats', 1)} interleaved runs each, "
        "in child processes; peak RSS: the highest of the runs)",
        "",
        "| run | images | seconds | images/s | peak RSS main (MiB) | peak RSS main + workers (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, x in rows:
        lines.append(f"| {name} | {x['images']} | {x['seconds']} | {x['images'] / x['seconds']:.0f} "
                     f"| {x['peak_rss_main_mib']} | {x['peak_rss_total_mib']} |")
    lines += [
        "",
        f"Beam / local throughput at 10x: {b['throughput_ratio_10x']:.2f}x (goal >= 0.5x). "
        f"Beam peak RSS 10x / 1x: {b['rss_ratio_total']:.2f} with workers, {b['rss_ratio_main']:.2f} launcher "
        f"(goal <= 1.3). Same shards and metadata byte for byte: {b['same_dataset_bytes']}. "
        f"Load average before / after: {b['load_average_before_after']}.",
    ]
    return "\n".join(lines) + "\n"


def markdown(r: dict) -> str:
    med, ips = r["median_seconds"], r["images_per_second"]
    lines = [
        f"# Ingest benchmark ({r['images']} images, {r['mib']} MiB, {r['cores']} cores, median of {r['repeats']})",
        "",
        "| method | seconds | images/s | ours is |",
        "|---|---:|---:|---|",
        f"| ours (`kfp-finetune ingest`) | {med['ours']:.2f} | {ips['ours']:.0f} | |",
        f"| decode limit (Pillow, all cores, no writing) | {med['decode_limit']:.2f} | {ips['decode_limit']:.0f} "
        f"| {r['ours_vs_decode_limit']:.2f}x of it (goal >= 0.8x) |",
        f"| TFDS writer (`store_as_tfds_dataset`) | {med['tfds_writer']:.2f} | {ips['tfds_writer']:.0f} "
        f"| {r['ours_vs_tfds_writer']:.2f}x as fast (goal >= 2x; TFDS copies the bytes, decodes nothing) |",
        f"| TFDS writer after a Pillow decode check in a loop | {med['tfds_writer_checked']:.2f} "
        f"| {ips['tfds_writer_checked']:.0f} | {r['ours_vs_tfds_writer_checked']:.2f}x as fast (goal >= 2x) |",
        f"| TFDS writer fed decoded arrays (re-encodes PNG) | {med['tfds_writer_arrays']:.2f} "
        f"| {ips['tfds_writer_arrays']:.0f} | {r['ours_vs_tfds_writer_arrays']:.2f}x as fast (goal >= 2x) |",
        "",
        f"Load average (1, 5, 15 min) before / after: {r['load_average_before_after']}.",
    ]
    if "rss" in r:
        rss = r["rss"]
        lines += [
            "",
            "| data | images | seconds | peak RSS main (MiB) | peak RSS main + workers (MiB) |",
            "|---|---:|---:|---:|---:|",
        ]
        for key in ("1x", "10x"):
            x = rss[key]
            lines.append(f"| {key} | {x['images']} | {x['seconds']} | {x['peak_rss_main_mib']} "
                         f"| {x['peak_rss_total_mib']} |")
        lines.append(f"| 10x / 1x | | | {rss['ratio_main']:.2f} | {rss['ratio_total']:.2f} (goal <= 1.3) |")
    if "beam" in r:
        lines += ["", beam_markdown(r["beam"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
