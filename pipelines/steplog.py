"""Quiet, live output for `kfp-finetune run`: one line per step on the terminal, each step's full log in a file.

kfp.local prints everything (its own log lines, each step's executor input JSON, the step's output) to
`sys.stdout`. `StepLogs` stands in for `sys.stdout` while the pipeline runs: it follows kfp.local's "Executing task
'X'" and "Task 'X' finished with status S" lines, writes every line of step X to `LOGS/X.log` (lines outside a step to
`LOGS/pipeline.log`), and when a step ends writes one line to the terminal:

    [3/6] train-head   SUCCESS    61.2 s  5 epochs, val_accuracy 0.806

The key result comes from the step's executor_output.json (its path is in the step's executor input). With
`verbose`, the full stream goes to the terminal too, as kfp.local prints it. Steps that run in parallel threads
(ParallelFor) each keep their own log: the current step is tracked per thread.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXECUTING = re.compile(r"Executing task '([^']+)'")
FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
CACHED = re.compile(r"Task (\S+) cache hit")
SKIPPED = re.compile(r"Skipping (?:conditional )?task (\S+)(?::| \()\s*(.*)")
# The executor input names one outputFile per output parameter too; the step's own file is executor_output.json.
OUTPUT_FILE = re.compile(r'"outputFile":\s*"([^"]+/executor_output\.json)"')
TAIL_LINES = 30


@dataclass
class Step:
    """One executed step: where its log is, how it ended, what it produced."""

    number: int
    name: str
    log: Path
    started: float
    status: str = "RUNNING"
    seconds: float = 0.0
    output_file: str | None = None
    result: str = ""
    file: IO[str] | None = field(default=None, repr=False)
    tail: deque = field(default_factory=lambda: deque(maxlen=TAIL_LINES), repr=False)


def _fmt_float(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def _epochs(model_dir: str) -> int | None:
    """Epochs run, from the Model artifact's model.json (its training history)."""
    meta = Path(model_dir) / "model.json"
    try:
        history = json.loads(meta.read_text()).get("history") or {}
    except (OSError, ValueError):
        return None
    if isinstance(history, dict):
        phase = history.get("fine_tune") or history.get("train_head") or history
        if isinstance(phase, dict):
            lengths = [len(v) for v in phase.values() if isinstance(v, list)]
            return max(lengths) if lengths else None
    return None


def key_result(step: str, output: dict[str, Any]) -> str:
    """The one thing worth seeing about a finished step, from its executor_output.json ("" when unknown)."""
    artifacts = {name: (entry.get("artifacts") or [{}])[0] for name, entry in (output.get("artifacts") or {}).items()}
    params = output.get("parameterValues") or {}
    meta = {name: a.get("metadata") or {} for name, a in artifacts.items()}
    if "dataset" in meta and "num_examples" in meta["dataset"]:
        counts = {k: int(v) for k, v in meta["dataset"]["num_examples"].items()}
        classes = len(meta["dataset"].get("class_names") or [])
        split = " / ".join(f"{counts[k]} {k}" for k in ("train", "validation", "test") if k in counts)
        leak = meta["dataset"].get("leakage") or {}
        moved = f"; {int(leak['moved'])} near-duplicate(s) moved" if leak.get("moved") else ""
        return f"{sum(counts.values())} images ingested ({split}), {classes} classes{moved}"
    if "line" in (meta.get("drift") or {}):  # the data-drift step: its one line (pass, warn, or no baseline)
        return str(meta["drift"]["line"])
    for name in ("tuned_model", "model"):
        model = meta.get(name) or {}
        if "val_accuracy" in model:
            epochs = _epochs(str(artifacts[name].get("uri", "")))
            done = f"{epochs} epochs, " if epochs else ""
            return f"{done}val_accuracy {_fmt_float(model['val_accuracy'])}"
    if "blessed" in params:
        accuracy = params.get("accuracy", (meta.get("metrics") or {}).get("accuracy"))
        verdict = "blessed" if params["blessed"] else "NOT blessed"
        return f"test accuracy {_fmt_float(accuracy)}, {verdict}"
    if "pushed_uri" in params or "exported_model" in meta:
        pushed = params.get("pushed_uri") or params.get("pushed_version")
        return f"pushed {pushed}" if pushed else "exported (push_to empty: not pushed)"
    if "model" in meta and meta["model"].get("name"):
        return str(meta["model"]["name"])
    return ""


class StepLogs(io.TextIOBase):
    """A text stream that files kfp.local's output per step and reports each step in one line (see the module)."""

    def __init__(self, logs_dir: str | Path, terminal: IO[str], *, total: int | None = None,
                 verbose: bool = False) -> None:
        super().__init__()
        self.logs_dir = Path(logs_dir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.terminal = terminal
        self.total = total
        self.verbose = verbose
        self.steps: list[Step] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pipeline_log = (self.logs_dir / "pipeline.log").open("w", encoding="utf-8", buffering=1)
        self.started = time.perf_counter()
        self._formatter = logging.Formatter("%(asctime)s - %(levelname)s - %(message)s", "%H:%M:%S")

    # --- the stream ---------------------------------------------------------------------------------------------

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # keeps progress bars in the logs plain
        return False

    def write(self, text: str) -> int:
        if self.verbose:
            with self._lock:
                self.terminal.write(text)
        pending = getattr(self._local, "pending", "") + text
        *lines, rest = pending.split("\n")
        self._local.pending = rest
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        if self.verbose:
            self.terminal.flush()

    def close(self) -> None:
        rest = getattr(self._local, "pending", "")
        if rest:
            self._local.pending = ""
            self._line(rest)
        with self._lock:
            for step in self.steps:
                if step.file and not step.file.closed:
                    step.file.close()
            if not self._pipeline_log.closed:
                self._pipeline_log.close()
        super().close()

    # --- kfp.local's own log records ----------------------------------------------------------------------------

    def filter(self, record: logging.LogRecord) -> bool:
        """A root-logger filter: files kfp.local's records (`logging.info(...)`) here, in the thread that logs them.

        kfp.local swaps the root logger's handlers for each task, and branches of a ParallelFor swap them from several
        threads, so a record may reach a stdout handler, the CLI's stderr handler, or none; a filter sees every
        record logged on the root logger, whatever its handlers. Records are dropped after filing (returns False).
        """
        self.write(self._formatter.format(record) + "\n")
        return False

    @contextlib.contextmanager
    def capturing(self) -> Iterator[StepLogs]:
        """While the pipeline runs: stdout (steps' output) and the root logger's records (kfp.local's) come here."""
        root = logging.getLogger()
        root.addFilter(self)
        try:
            with contextlib.redirect_stdout(self):
                yield self
        finally:
            root.removeFilter(self)

    # --- following kfp.local ------------------------------------------------------------------------------------

    def _line(self, line: str) -> None:
        plain = ANSI.sub("", line).replace("\r", "")
        started = EXECUTING.search(plain)
        if started:
            self._local.step = self._start(started.group(1))
        step: Step | None = getattr(self._local, "step", None)
        if step is not None and step.file is not None:
            step.file.write(plain + "\n")
            step.tail.append(plain)
            if step.output_file is None:
                found = OUTPUT_FILE.search(plain)
                if found:
                    step.output_file = found.group(1)
        else:
            with self._lock:
                self._pipeline_log.write(plain + "\n")
        finished = FINISHED.search(plain)
        if finished and step is not None and finished.group(1) == step.name:
            self.finish(step, finished.group(2))
            return
        cached = CACHED.search(plain)
        if cached:
            self._report_other(cached.group(1), "CACHED", "result from the local cache")
            return
        skipped = SKIPPED.search(plain)
        if skipped:
            why = skipped.group(2).strip().rstrip(".").strip("()")
            if why == "condition evaluated to False":
                why = "its condition is false (not blessed, or the other branch of new data / no new data ran)"
            self._report_other(skipped.group(1), "SKIPPED", why)

    def _start(self, name: str) -> Step:
        with self._lock:
            taken = {s.log.name for s in self.steps}
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            log, n = self.logs_dir / f"{stem}.log", 2
            while log.name in taken:
                log, n = self.logs_dir / f"{stem}-{n}.log", n + 1
            step = Step(number=len(self.steps) + 1, name=name, log=log, started=time.perf_counter())
            step.file = log.open("w", encoding="utf-8", buffering=1)  # line-buffered: `tail -f` works
            self.steps.append(step)
        return step

    def finish(self, step: Step, status: str) -> None:
        """Mark `step` ended with `status` (SUCCESS, FAILURE) and write its line to the terminal."""
        if step.status != "RUNNING":
            return
        step.status = status
        step.seconds = time.perf_counter() - step.started
        if status == "SUCCESS" and step.output_file:
            try:
                step.result = key_result(step.name, json.loads(Path(step.output_file).read_text()))
            except (OSError, ValueError, TypeError, AttributeError, KeyError):
                step.result = ""
        if step.file is not None:
            step.file.flush()
        self._report(step.number, step.name, status, f"{step.seconds:6.1f} s", step.result)

    def _report_other(self, name: str, status: str, note: str) -> None:
        if status == "SKIPPED":  # a condition's group that did not run: not a step, so it takes no number
            self._report(None, name, status, " " * 8, note)
            return
        with self._lock:
            number = len(self.steps) + 1
            self.steps.append(Step(number=number, name=name, log=self.logs_dir / "pipeline.log",
                                   started=time.perf_counter(), status=status, result=note))
        self._report(number, name, status, " " * 8, note)

    def _report(self, number: int | None, name: str, status: str, seconds: str, result: str) -> None:
        if number is None:
            line = f"[-] {name:<14} {status:<8} {seconds}  {result}".rstrip()
            with self._lock:
                self.terminal.write(line + "\n")
                self.terminal.flush()
            return
        total = f"/{self.total}" if self.total else ""
        line = f"[{number}{total}] {name:<14} {status:<8} {seconds}  {result}".rstrip()
        with self._lock:
            self.terminal.write(line + "\n")
            self.terminal.flush()

    # --- after the run ------------------------------------------------------------------------------------------

    def running(self) -> list[Step]:
        return [s for s in self.steps if s.status == "RUNNING"]

    def failed(self) -> Step | None:
        """The last step that ended in FAILURE (a failed step inside a condition is reported by kfp under the name of
        its enclosing DAG, e.g. condition-branches-1)."""
        return next((s for s in reversed(self.steps) if s.status == "FAILURE"), None)

    def step(self, name: str) -> Step | None:
        """The last step of that name."""
        for step in reversed(self.steps):
            if step.name == name:
                return step
        return None

    def failure_report(self, step: Step) -> str:
        """The last lines of a failed step's log and the path of the whole log."""
        lines = [f"--- last {len(step.tail)} lines of {step.log} ---", *step.tail, f"--- full log: {step.log}"]
        return "\n".join(lines)
