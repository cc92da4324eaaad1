"""export under SIGTERM, SIGKILL and a full disk (issue 20): nothing partial, no orphaned serving check, and a
re-run after a kill succeeds with the registry consistent.

Each test runs the real `kfp-finetune export` in its own process and signals it for real; the full disk is a real
tmpfs (skipped with the reason where mounting is not allowed). A push is held at a precise point by holding the
destination's own LATEST lock (the flock every local push takes before it moves LATEST), not by any mock.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kfp_finetune.components.core import faults
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.registry import registry
from tests import evalchain
from tests.unit.test_faults import _alive, _children, cli, mount_tmpfs

pytestmark = pytest.mark.slow  # each test starts TensorFlow in a process or two (~15-40 s)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_folder, weights_mirror) -> evalchain.Chain:
    return evalchain.get(tmp_path_factory, synthetic_folder, weights_mirror)


def evaluation_for(chain: evalchain.Chain, dest: Path, tmp_path: Path) -> Path:
    """A blessed evaluation that looked for a champion at `dest` (none yet)."""
    from kfp_finetune.components.evaluate.step import EvaluateConfig, evaluate

    out = tmp_path / "evaluation"
    assert evaluate(EvaluateConfig(dataset=str(chain.dataset), model=str(chain.strong), output=str(out),
                                   min_accuracy=0.8, champion_from=str(dest))).blessed
    return out


def export_cli(chain, evaluation: Path, out: Path, dest: Path, systmp: Path):
    return cli("export", "--model", str(chain.strong), "--evaluation", str(evaluation), "--output", str(out),
               "--push-to", str(dest), env={**os.environ, "TMPDIR": str(systmp)})


def wait_for(what: str, condition, proc: subprocess.Popen, seconds: float = 180) -> object:
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"export ended ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def serving_check_child(pid: int) -> int | None:
    for child in _children(pid):
        try:
            if b"serving check" in Path(f"/proc/{child}/cmdline").read_bytes() or \
                    b"tf_serving_warmup" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    return None


def consistent(dest: Path) -> list[registry.Version]:
    """Every complete version is whole; LATEST names a complete version; nothing half-written is visible."""
    versions = registry.list_versions(str(dest))
    latest = registry.read_latest(str(dest))
    assert latest in {v.version for v in versions}
    for v in versions:
        assert (Path(v.uri) / "saved_model.pb").is_file() and (Path(v.uri) / "model" / "model.keras").is_file()
    return versions


def _export_in_its_serving_check(chain, tmp_path):
    """An export CLI process stopped in its serving check: (dest, out, systmp, evaluation, process, check's pid)."""
    dest, out, systmp = tmp_path / "models", tmp_path / "export", tmp_path / "systmp"
    systmp.mkdir()
    evaluation = evaluation_for(chain, dest, tmp_path)
    proc = export_cli(chain, evaluation, out, dest, systmp)
    child = wait_for("the serving check", lambda: serving_check_child(proc.pid), proc)
    return dest, out, systmp, evaluation, proc, child


def test_sigterm_during_the_serving_check_leaves_nothing_and_ends_the_check(chain, tmp_path):
    dest, out, systmp, evaluation, proc, child = _export_in_its_serving_check(chain, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == faults.EXIT_TERMINATED, err[-2000:]
    assert "Traceback" not in err and "terminated (SIGTERM) during export" in err
    time.sleep(0.5)
    assert not _alive(child)
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".export.tmp-", ".export.push")) or n == "export"]
    assert os.listdir(systmp) == []  # no serving-check-* folder
    assert registry.list_versions(str(dest)) == []


def test_sigkill_during_the_serving_check_then_a_rerun_succeeds(chain, tmp_path):
    dest, out, systmp, evaluation, proc, child = _export_in_its_serving_check(chain, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    time.sleep(1.0)
    assert not _alive(child)  # PR_SET_PDEATHSIG: the check dies with the export
    rerun = export_cli(chain, evaluation, out, dest, systmp)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    versions = consistent(dest)
    assert len(versions) == 1 and versions[0].promoted


def test_killed_during_the_push_then_a_rerun_reuses_the_export_and_promotes_once(chain, tmp_path):
    """The first attempt is SIGKILLed while its push waits for LATEST (the version is complete, --output too): the
    re-run does not fail on the existing --output, does not push a second copy, and promotes the one pushed."""
    dest, out, systmp = tmp_path / "models", tmp_path / "export", tmp_path / "systmp"
    systmp.mkdir()
    evaluation = evaluation_for(chain, dest, tmp_path)
    dest.mkdir()
    lock = os.open(dest / registry.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        proc = export_cli(chain, evaluation, out, dest, systmp)
        wait_for("a complete version", lambda: [n for n in os.listdir(dest)
                                                if (dest / n / registry.VERSION_FILE).is_file()], proc)
        time.sleep(0.2)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        os.close(lock)
    assert (out / "export.json").is_file()
    first = registry.list_versions(str(dest))
    assert len(first) == 1 and first[0].promoted is False and registry.read_latest(str(dest)) is None

    rerun = export_cli(chain, evaluation, out, dest, systmp)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert "already holds this export" in err and "already pushed by an earlier attempt; promoted it" in err
    versions = consistent(dest)
    assert [v.version for v in versions] == [first[0].version] and versions[0].promoted
    assert registry.read_latest(str(dest)) == first[0].version
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export.push")]


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(chain, tmp_path):
    from kfp_finetune.components.export.step import ExportConfig, export

    disk = mount_tmpfs(tmp_path / "disk", "1m")
    try:
        with pytest.raises(UserError) as err:
            export(ExportConfig(model=str(chain.strong), output=str(disk / "export")))
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"--output {disk / 'export'}: no space left on device (needs about ")
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_different_request_never_reuses_an_earlier_output(chain, tmp_path):
    """The re-run shortcut takes only an export of the same model, evaluation and settings."""
    from kfp_finetune.components.export.step import ExportConfig, export

    out = tmp_path / "export"
    export(ExportConfig(model=str(chain.strong), output=str(out)))
    done = json.loads((out / "export.json").read_text())
    assert done["request"]["model_sha256"] and done["serving_check"]["passed"]
    with pytest.raises(UserError, match="exists and is not empty"):
        export(ExportConfig(model=str(chain.strong), output=str(out), tflite="fp16"))
    assert export(ExportConfig(model=str(chain.strong), output=str(out))).saved_model_dir == str(out)
