"""Stopping a local run with SIGTERM (a CI timeout, `kill`, a stopped container) stops its running step too: the step
cleans up and exits, the run exits 75 with one line, and no step process is left behind as an orphan."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kfp_finetune.components.core import faults


def _step_processes(marker: str) -> list[int]:
    """Live processes whose command line names `marker` (the run's own folder: every step's executor input does)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "executor_main" in cmdline and faults.alive(int(name)):
            found.append(int(name))
    return found


@pytest.mark.slow  # a local run of the demo pipeline, stopped in its first steps
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the step processes")
def test_sigterm_to_a_local_run_stops_its_running_step(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "kfp_finetune.pipelines", "run", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        steps: list[int] = []
        while not steps and time.monotonic() < deadline and proc.poll() is None:
            steps = [pid for pid in _step_processes(str(out)) if pid in faults.child_pids(proc.pid)]
            time.sleep(0.05)
        assert steps, "no step started within 120 s"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == faults.EXIT_TERMINATED, output[-3000:]
    assert "terminated (SIGTERM) during the local run" in output
    assert not any(faults.alive(pid) for pid in steps), f"the running step outlived the run: {_describe(steps)}"
    left = _step_processes(str(out))
    assert left == [], f"step processes left after the run exited: {_describe(left)}\n{output[-3000:]}"


def _describe(pids: list[int]) -> str:
    """Each pid's state and command line, for a failure message."""
    described = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            state, cmdline = "gone", ""
        described.append(f"{pid} [{state}] {cmdline[:300]}")
    return "; ".join(described)
