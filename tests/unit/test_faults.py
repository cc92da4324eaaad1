"""Full disks and SIGTERM (issue 20): one line, exit 75 on SIGTERM, and nothing partial or temporary left behind.

Real processes, real signals, a real full disk: a small tmpfs mounted for the test (skipped with the reason where
the machine does not allow mounting). Nothing of our own I/O is mocked. The export's share (a model, a serving
check) is in tests/unit/test_export_faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kfp_finetune.components.core import faults
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.registry import registry
from tests import imagegen
from tests.conftest import REPO
from tests.unit.test_registry import make_version_dir


def mount_tmpfs(where: Path, size: str) -> Path:
    """A tmpfs of `size` at `where` (unmounted by the caller); pytest.skip with the reason when mounting fails."""
    where.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux":
        pytest.skip("tmpfs needs Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()[:200]}")
    return where


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB disk."""
    disk = mount_tmpfs(tmp_path / "disk", "256k")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> None:
    """Fill `disk` to the last byte."""
    try:
        with open(disk / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError:
        pass
    assert faults.free_bytes(disk) == 0


def cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kfp_finetune.pipelines", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kwargs)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("kfp-finetune: error:")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """~1 MB of JPEGs in 3 classes: more than the small disk holds."""
    return imagegen.write_class_folder(tmp_path_factory.mktemp("photos") / "src", classes=("a", "b", "c"),
                                       per_class=40, size=128, seed=0)


def test_ingest_on_a_full_disk_is_one_line_and_leaves_nothing(photos, small_disk, tmp_path):
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    proc = cli("ingest", "--source", str(photos), "--output", str(small_disk / "dataset"),
               env={**os.environ, "TMPDIR": str(systmp)})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    line = one_line(err)
    assert f"--output {small_disk / 'dataset'}: no space left on device (needs about" in line
    assert "KiB free there); nothing partial was left" in line
    assert sorted(os.listdir(small_disk)) == []  # no dataset, no .dataset.tmp-* sibling
    assert sorted(os.listdir(systmp)) == []  # no kfp-finetune-ingest-* staging folder


def test_sigterm_during_ingest_exits_75_and_leaves_nothing(tmp_path):
    """SIGTERM while the Dataset is being written: the partial folder, the staging folder and the worker processes
    are gone, one line says so, exit status 75."""
    src = imagegen.write_class_folder(tmp_path / "src", classes=("a", "b"), per_class=150, size=160, seed=3)
    systmp, out = tmp_path / "systmp", tmp_path / "out"
    systmp.mkdir()
    out.mkdir()
    proc = cli("ingest", "--source", str(src), "--output", str(out / "dataset"), "--max-side", "48",
               env={**os.environ, "TMPDIR": str(systmp)})
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".dataset.tmp-") for p in out.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "ingest ended before it wrote anything"
        time.sleep(0.005)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == faults.EXIT_TERMINATED, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "terminated (SIGTERM) during ingest: temporary files removed, nothing partial left; exiting with " \
           "status 75" in err
    assert sorted(os.listdir(out)) == []
    assert sorted(os.listdir(systmp)) == []
    deadline = time.monotonic() + 10  # the workers die with their parent; on a loaded machine that takes a moment
    while [pid for pid in workers if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in workers if _alive(pid)] == []


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_push_on_a_full_disk_is_one_line_and_gives_the_claim_back(small_disk, tmp_path):
    dest = small_disk / "models"
    registry.push(make_version_dir(tmp_path, "v1"), str(dest), "v1")
    big = make_version_dir(tmp_path, "v2")
    (big / "variables").mkdir()
    (big / "variables" / "data").write_bytes(os.urandom(400 << 10))
    with pytest.raises(UserError) as err:
        registry.push(big, str(dest), "v2")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"push to {dest / 'v2'} failed, LATEST not changed: no space left on device (needs "
                              "about 40") and "free there); nothing partial was left" in message
    assert sorted(os.listdir(dest)) == [".LATEST.lock", "LATEST", "v1"]  # no v2, no .v2.tmp-*
    assert registry.read_latest(str(dest)) == "v1"
    assert [v.version for v in registry.list_versions(str(dest))] == ["v1"]


def test_a_latest_write_on_a_full_disk_is_one_line_and_latest_stays(small_disk, tmp_path):
    dest = small_disk / "models"
    for name in ("v1", "v2"):
        registry.push(make_version_dir(tmp_path, name), str(dest), name)
    fill(small_disk)
    proc = cli("rollback", "--push-to", str(dest), "--to", "v1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    line = one_line(err)
    assert f"cannot write {dest / 'LATEST'} (No space left on device: needs 3 B, 0 B free); LATEST unchanged" in line
    assert (dest / "LATEST").read_text() == "v2\n"
    assert not [n for n in os.listdir(dest) if n.startswith(".LATEST.tmp")]


def test_fetching_a_version_without_its_model_is_one_line(tmp_path):
    dest = tmp_path / "models"
    registry.push(make_version_dir(tmp_path, "v1"), str(dest), "v1")
    (dest / "v1" / registry.MODEL_DIR / "model.keras").unlink()
    champion = registry.resolve_champion(str(dest))
    with pytest.raises(UserError, match=r"^version v1 at .*/v1: .*/v1/model has no model.keras; that version "):
        registry.fetch_model(champion, tmp_path / "staging")


def test_fetching_a_gcs_version_that_is_gone_names_it(tmp_path, gcs_bucket):
    dest = f"gs://{gcs_bucket.name}/models"
    registry.push(make_version_dir(tmp_path, "v1"), dest, "v1")
    champion = registry.resolve_champion(dest)
    for blob in gcs_bucket.list_blobs(prefix="models/v1/model/"):
        blob.delete()
    with pytest.raises(UserError) as err:
        registry.fetch_model(champion, tmp_path / "staging")
    assert str(err.value).startswith(f"version v1 at {dest}/v1: cannot fetch its model/ folder (version v1: ")
    assert "no objects under that prefix" in str(err.value) and "\n" not in str(err.value)


def test_sigterm_raises_terminated_only_inside_and_puts_the_handler_back():
    script = r"""
import os, signal, sys, time
from kfp_finetune.components.core import faults
marker = []
signal.signal(signal.SIGTERM, lambda *a: marker.append("previous"))
try:
    with faults.sigterm_raises("demo"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
except faults.Terminated as exc:
    print("terminated", exc.code)
os.kill(os.getpid(), signal.SIGTERM)
print(marker)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.stdout.split("\n")[:2] == ["terminated 75", "['previous']"], done.stderr
    assert "terminated (SIGTERM) during demo" in done.stderr


def test_a_step_started_after_a_stop_is_stopped_too():
    """kfp.local launches steps from worker threads, which go on while the stopped run unwinds: a step process
    (`executor_main` in its command line) that starts after the stop gets SIGTERM too; other children are left."""
    script = r"""
import os, signal, subprocess, sys, time
from kfp_finetune.components.core import faults
SLEEP = [sys.executable, "-c", "import time; time.sleep(20)"]
first = subprocess.Popen(SLEEP + ["executor_main"])
try:
    with faults.forwards_sigterm("demo", grace=2.0):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
except faults.Terminated:
    print("terminated", first.wait(timeout=10))
late = subprocess.Popen(SLEEP + ["executor_main"])  # as a kfp.local worker thread would, after the stop
other = subprocess.Popen(SLEEP)  # not a step: a Python caller's own child
print("late", late.wait(timeout=10))
time.sleep(0.5)
print("other", other.poll())
other.kill()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    lines = done.stdout.split("\n")
    assert lines[:3] == [f"terminated {-signal.SIGTERM}", f"late {-signal.SIGTERM}", "other None"], done.stderr


def test_a_step_that_ignores_the_stop_is_dead_when_the_run_has_exited():
    """The exit's last sweep SIGKILLs a step that ignored its SIGTERM (and waits until it is dead): once the run's
    process has exited, that step is not running, and the exit did not wait out the 30 s grace first."""
    script = r"""
import os, signal, subprocess, sys, time
from kfp_finetune.components.core import faults
# "executor" "_main": the step marker, kept out of this script's own command line (which its forks inherit)
STUBBORN = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)", "executor" "_main"]
try:
    with faults.forwards_sigterm("demo", grace=30.0):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
except faults.Terminated:
    pass
# SIGTERM ignored from its first instruction on (inherited across exec), so the sweeps' SIGTERM never ends it
late = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
assert late.stdout.readline() == "ready\n"
print(late.pid, flush=True)
"""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    assert not faults.alive(pid), "the step that ignored SIGTERM outlived the run"
    assert time.monotonic() - started < 30, "the exit waited for the grace instead of killing"


def test_a_sigterm_during_a_fork_is_delivered_after_it_not_lost():
    """A SIGTERM whose handler would run inside a fork's at-fork hooks (where Python drops what it raises: "Exception
    ignored in: <function _releaseLock>", and the step ran on) is sent again once the fork is done. Part 1 holds the
    fork mark by hand around the signal: nothing is raised while it is up, Terminated comes after. Part 2 forks
    while the signal lands in an at-fork hook registered before faults (as logging's): a handler raising there would
    be dropped."""
    script = r"""
import os, signal, sys, time
armed = []
def hook():  # registered before faults (as logging's are): the signal lands and is handled inside an at-fork hook
    if armed:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
os.register_at_fork(after_in_parent=hook)
from kfp_finetune.components.core import faults
try:
    with faults.sigterm_raises("demo"):
        faults._FORKING.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(20):
            time.sleep(0.01)
        print("not raised during the fork")
        faults._FORKING.pop()
        time.sleep(5)
        print("lost")
except faults.Terminated as exc:
    print("terminated", exc.code)
try:
    with faults.sigterm_raises("demo"):
        armed.append(1)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(5)
        print("lost")
except faults.Terminated as exc:
    print("terminated", exc.code)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.stdout.split("\n")[:3] == ["not raised during the fork", "terminated 75", "terminated 75"], (
        done.stdout, done.stderr)
    assert "Exception ignored" not in done.stderr, done.stderr


def test_is_disk_full_reads_python_and_tensorflow_errors():
    import errno

    assert faults.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not faults.is_disk_full(OSError(errno.EACCES, "Permission denied"))

    class ResourceExhaustedError(Exception):  # TF's class name; TF itself is tested through export
        pass

    assert faults.is_disk_full(ResourceExhaustedError("/x/variables.data; No space left on device"))
    assert not faults.is_disk_full(ResourceExhaustedError("OOM when allocating tensor"))
    oom = faults.resource_error(ResourceExhaustedError("OOM when allocating tensor\nmore"), "/out", "--output")
    assert str(oom) == ("--output /out: TensorFlow ran out of a resource (OOM when allocating tensor); nothing partial "
                        "was left; give the step more memory or a smaller batch")
    assert json.loads(json.dumps(faults.human(3 << 20))) == "3.0 MiB"


CLAIMER = r"""
import os, signal, sys, time
from kfp_finetune.components.registry import store
assert store.claim(sys.argv[1], sys.argv[2])
open(os.path.join(sys.argv[1], sys.argv[2], "half-copied.bin"), "wb").write(b"x" * 1000)
print("claimed", flush=True)
if sys.argv[3] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(120)
"""


def test_a_run_id_claimed_by_a_killed_push_is_taken_over_and_one_in_flight_is_not(tmp_path):
    """`push --run-id R` after a push of R was SIGKILLed half-way: the claim (its lock free) is taken over and the
    push completes; while the first push is alive, R stays its own."""
    dest = tmp_path / "models"
    alive = subprocess.Popen([sys.executable, "-c", CLAIMER, str(dest), "r1", "live"], cwd=REPO, text=True,
                             stdout=subprocess.PIPE)
    try:
        assert alive.stdout.readline().strip() == "claimed"
        with pytest.raises(UserError, match="version r1 already exists there .* claimed by a push in flight"):
            registry.push(make_version_dir(tmp_path, "a"), str(dest), "r1")
        assert os.listdir(dest / "r1") == ["half-copied.bin"]  # the live push's files are untouched
    finally:
        alive.kill()
        alive.wait()
    # Now that push is gone (killed mid-way): its claim is taken over.
    pushed = registry.push(make_version_dir(tmp_path, "b"), str(dest), "r1")
    assert pushed.version == "r1" and pushed.promoted and registry.read_latest(str(dest)) == "r1"
    assert "half-copied.bin" not in os.listdir(dest / "r1")
    dead = subprocess.run([sys.executable, "-c", CLAIMER, str(dest), "r2", "die"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert dead.returncode == -signal.SIGKILL and dead.stdout.strip() == "claimed"
    assert registry.push(make_version_dir(tmp_path, "c"), str(dest), "r2").promoted
    assert [v.version for v in registry.list_versions(str(dest))] == ["r1", "r2"]
    assert sorted(n for n in os.listdir(dest) if n.startswith(".")) == [".LATEST.lock"]  # no lock files left


def test_every_step_function_stops_cleanly_on_sigterm():
    """The behaviour is tested on ingest (above) and export (test_export_faults.py); the others share the wrapper."""
    from kfp_finetune.components.backbone.step import build_backbone
    from kfp_finetune.components.compare.step import compare
    from kfp_finetune.components.evaluate.step import evaluate
    from kfp_finetune.components.export.step import export
    from kfp_finetune.components.ingest.step import ingest
    from kfp_finetune.components.predict.step import predict
    from kfp_finetune.components.train import Preempted

    for step in (ingest, build_backbone, evaluate, export, predict, compare):
        assert step.__code__.co_name == "wrapper" and hasattr(step, "__wrapped__"), step.__name__
    assert issubclass(Preempted, faults.Terminated)
