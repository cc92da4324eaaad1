"""registry under overlapping runs and broken records (issue 20), locally and on the GCS emulator.

Real processes race for real: pushes and rollbacks run as separate Python processes against the same destination.
On gs:// every request goes through tests/gcsproxy.py, because the emulator ignores `ifGenerationMatch`: the proxy
applies GCS's documented precondition (412) atomically, injects 403s, and holds a request where an interleaving must
be exact. Nothing of our own I/O is mocked: the registry talks to a real server through google-cloud-storage.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.registry import registry
from tests.conftest import REPO
from tests.gcsproxy import GcsProxy
from tests.unit.test_registry import make_version_dir

# One push or rollback in its own process: imports first, waits for the start signal, prints its outcome as JSON.
WORKER = r"""
import json, sys, time
from pathlib import Path
from kfp_finetune.components.registry import registry
from kfp_finetune.components.core.errors import UserError
kind, dest, go, arg, version, expect = sys.argv[1:7]
while not Path(go).exists():
    time.sleep(0.002)
try:
    if kind == "push":
        expect = registry.CURRENT if expect == "CURRENT" else (None if expect == "-" else expect)
        p = registry.push(arg, dest, version if version != "-" else None, expect=expect)
        out = {"ok": True, "version": p.version, "promoted": p.promoted, "old": p.expected, "latest": p.latest}
    else:
        old, new = registry.rollback(dest, to=arg)
        out = {"ok": True, "version": new, "promoted": True, "old": old}
except UserError as exc:
    out = {"ok": False, "error": str(exc)}
print(json.dumps(out))
"""


@pytest.fixture(params=["local", "gcs"])
def dest(request, tmp_path, monkeypatch) -> str:
    """A push destination: a local folder, or a gs:// prefix reached through the precondition proxy."""
    if request.param == "local":
        return str(tmp_path / "registry")
    emulator = request.getfixturevalue("gcs_emulator")
    proxy = GcsProxy(emulator.host).start()
    request.addfinalizer(proxy.stop)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.host)
    request.node.proxy = proxy
    bucket = request.getfixturevalue("gcs_bucket")
    return f"gs://{bucket.name}/models"


@pytest.fixture
def proxied_gcs(request, tmp_path, monkeypatch) -> tuple[GcsProxy, str]:
    emulator = request.getfixturevalue("gcs_emulator")
    proxy = GcsProxy(emulator.host).start()
    request.addfinalizer(proxy.stop)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.host)
    bucket = request.getfixturevalue("gcs_bucket")
    return proxy, f"gs://{bucket.name}/models"


def run_workers(tmp_path: Path, dest: str, jobs: list[tuple[str, str, str, str]]) -> list[dict]:
    """Start one process per (kind, arg, version, expect), release them together, return their outcomes."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, kind, dest, str(go), arg, version, expect],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for kind, arg, version, expect in jobs]
    time.sleep(1.0)  # let them import
    go.write_text("go")
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0 and out.strip(), err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def assert_one_chain(start: str, results: list[dict], final: str | None) -> None:
    """The swaps reported as done form one chain start -> ... -> final: no two of them replaced the same LATEST."""
    swaps = [(r["old"], r["version"]) for r in results if r["ok"] and r["promoted"]]
    olds = [old for old, _ in swaps]
    assert len(olds) == len(set(olds)), f"two writers both replaced the same LATEST (last writer wins): {swaps}"
    following, current = dict(swaps), start
    while current in following:
        current = following.pop(current)
    assert not following and current == final, (swaps, final)


def cli_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kfp_finetune.pipelines", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture
def cli(capsys, monkeypatch):
    """The CLI's main() in this process (the entry point's own process is tested in test_commands and the README
    test); returns what a subprocess run would: the exit code, stdout and stderr."""
    from kfp_finetune.pipelines.cli import main

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))  # main() sets it

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["kfp-finetune", *args], code, out, err)

    return run


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    # Log lines ("12:00:00 INFO name: ...") are progress, not the error.
    errors = [line for line in proc.stderr.splitlines() if line.strip() and not re.match(r"\d\d:\d\d:\d\d ", line)]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("kfp-finetune: error: ")
    return errors[0]


def seed(tmp_path: Path, dest: str, *names: str) -> None:
    for name in names:
        assert registry.push(make_version_dir(tmp_path, name), dest, name).promoted


# --- the proxy is GCS's precondition, not a no-op ---------------------------------------------------------------


def test_proxy_applies_gcs_generation_preconditions(proxied_gcs):
    from google.api_core.exceptions import PreconditionFailed

    from kfp_finetune.components.core import gcs

    proxy, dest = proxied_gcs
    bucket, prefix = gcs.split_uri(dest)
    blob = gcs.client().bucket(bucket).blob(f"{prefix}/x")
    blob.upload_from_string("1", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        blob.upload_from_string("2", if_generation_match=0)
    blob.reload()
    generation = blob.generation
    blob.upload_from_string("3", if_generation_match=generation)
    with pytest.raises(PreconditionFailed):
        blob.upload_from_string("4", if_generation_match=generation)  # stale
    assert blob.download_as_text() == "3" and proxy.precondition_failures == 2


# --- two challengers evaluated against the same champion -------------------------------------------------------


def test_second_challenger_against_a_moved_champion_is_kept_not_promoted(dest, cli, tmp_path):
    """evaluate A and B against v1, push A, push B: A is promoted, B is kept but not promoted (it was not compared
    with A), and `versions` says so."""
    seed(tmp_path, dest, "v1")
    a = registry.push(make_version_dir(tmp_path, "a"), dest, expect="v1")
    b = registry.push(make_version_dir(tmp_path, "b"), dest, expect="v1")
    assert a.promoted and not b.promoted and registry.read_latest(dest) == a.version
    assert a.version.isdigit() and int(b.version) > int(a.version)  # named at push time, in order
    assert f"version {b.version} was pushed" in b.message and "from v1" in b.message
    assert f"to {a.version} meanwhile" in b.message and "\n" not in b.message
    statuses = {row["version"]: row["status"] for row in registry.version_rows(dest)}
    assert statuses == {"v1": "promoted", a.version: "LATEST", b.version: "not promoted"}
    listing = cli("versions", "--push-to", dest)
    assert listing.returncode == 0 and "not promoted" in listing.stdout and f"* {a.version}" in listing.stdout
    # Rollback skips the never-promoted B; naming it promotes it.
    assert registry.rollback(dest) == (a.version, "v1")
    assert registry.rollback(dest, to=b.version) == ("v1", b.version)
    assert {r["version"]: r["status"] for r in registry.version_rows(dest)}[a.version] == "promoted"


def test_concurrent_challengers_promote_exactly_one(dest, tmp_path):
    seed(tmp_path, dest, "v1")
    jobs = [("push", str(make_version_dir(tmp_path, f"c{i}")), "-", "v1") for i in range(4)]
    results = run_workers(tmp_path, dest, jobs)
    assert all(r["ok"] for r in results), results
    winners = [r for r in results if r["promoted"]]
    assert len(winners) == 1, results
    assert registry.read_latest(dest) == winners[0]["version"]
    assert all(r["latest"] != "v1" for r in results if not r["promoted"])
    names = [r["version"] for r in results]
    assert len(set(names)) == 4 and all(n.isdigit() for n in names)  # four claims, four distinct names
    assert_one_chain("v1", results, winners[0]["version"])
    rows = registry.version_rows(dest)
    assert sorted(r["status"] for r in rows) == ["LATEST", "not promoted", "not promoted", "not promoted", "promoted"]


# --- rollback racing in-flight pushes --------------------------------------------------------------------------


def test_rollback_then_push_evaluated_before_it(dest, cli, tmp_path):
    """The push was evaluated against v2; the operator rolls back to v1 before its swap: the rollback stands."""
    seed(tmp_path, dest, "v1", "v2")
    rolled = cli("rollback", "--push-to", dest)
    assert rolled.returncode == 0 and "LATEST: v2 -> v1" in rolled.stdout, rolled.stderr[-2000:]
    late = registry.push(make_version_dir(tmp_path, "bad"), dest, expect="v2")
    assert not late.promoted and registry.read_latest(dest) == "v1"
    assert "from v2" in late.message and "to v1 meanwhile" in late.message


def test_rollback_racing_pushes_in_processes(dest, tmp_path):
    seed(tmp_path, dest, "v1", "v2")
    jobs = [("push", str(make_version_dir(tmp_path, f"p{i}")), "-", "v2") for i in range(3)]
    jobs.insert(1, ("rollback", "v1", "-", "-"))
    results = run_workers(tmp_path, dest, jobs)
    final = registry.read_latest(dest)
    assert_one_chain("v2", results, final)
    rollback = results[1]
    if rollback["ok"]:  # it printed success: nothing may have moved LATEST after it
        assert final == "v1", results
    else:
        assert "while rolling back; nothing changed" in rollback["error"], results


def test_rollback_during_a_held_gcs_push(proxied_gcs, tmp_path):
    """Exact interleaving on gs://: the push is held just before its version.json; a rollback process runs; the push
    completes and must not move LATEST."""
    proxy, dest = proxied_gcs
    seed(tmp_path, dest, "v1", "v2")
    held = proxy.hold("POST", r"/models/\d+/version\.json$")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(
        pushed=registry.push(make_version_dir(tmp_path, "bad"), dest, expect="v2")))
    thread.start()
    assert held.reached.wait(60), "the push never reached its version.json"
    rolled = cli_process("rollback", "--push-to", dest)
    held.release()
    thread.join(60)
    assert rolled.returncode == 0 and "LATEST: v2 -> v1" in rolled.stdout, rolled.stderr[-2000:]
    assert not outcome["pushed"].promoted and registry.read_latest(dest) == "v1"


# --- the same --run-id twice ----------------------------------------------------------------------------------


def test_same_run_id_in_two_processes_never_mixes(dest, tmp_path):
    seed(tmp_path, dest, "v1")
    folders = [make_version_dir(tmp_path / f"s{i}", "run-1", big_files=1) for i in range(2)]
    results = run_workers(tmp_path, dest, [("push", str(f), "run-1", "v1") for f in folders])
    assert sorted(r["ok"] for r in results) == [False, True], results
    loser = next(r for r in results if not r["ok"])
    assert "version run-1 already exists" in loser["error"] and dest in loser["error"] and "\n" not in loser["error"]
    winner = folders[[r["ok"] for r in results].index(True)]
    assert registry.read_latest(dest) == "run-1"
    assert version_files(dest, "run-1") == {p.relative_to(winner).as_posix(): p.read_bytes()
                                             for p in winner.rglob("*") if p.is_file() and p.name != "version.json"}


def test_same_run_id_while_the_first_push_is_in_flight_on_gcs(proxied_gcs, tmp_path):
    proxy, dest = proxied_gcs
    first, second = (make_version_dir(tmp_path / f"s{i}", "run-1") for i in range(2))
    held = proxy.hold("POST", r"/models/run-1/version\.json$")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(pushed=registry.push(first, dest, "run-1")))
    thread.start()
    assert held.reached.wait(60)
    with pytest.raises(UserError, match=r"version run-1 already exists there \(pushed, or claimed by a push in"):
        registry.push(second, dest, "run-1")
    held.release()
    thread.join(60)
    assert outcome["pushed"].promoted and registry.read_latest(dest) == "run-1"
    assert version_files(dest, "run-1") == {p.relative_to(first).as_posix(): p.read_bytes()
                                             for p in first.rglob("*") if p.is_file() and p.name != "version.json"}


def test_a_claimed_local_folder_is_taken(tmp_path):
    dest = tmp_path / "registry"
    (dest / "run-1").mkdir(parents=True)  # what an in-flight local push holds
    with pytest.raises(UserError, match="version run-1 already exists"):
        registry.push(make_version_dir(tmp_path, "run-1"), str(dest), "run-1")
    assert list((dest / "run-1").iterdir()) == [] and registry.read_latest(str(dest)) is None


def version_files(dest: str, version: str) -> dict[str, bytes]:
    """Every file of a pushed version but version.json and the registry's own markers."""
    skip = {registry.VERSION_FILE, registry.CLAIM_FILE, registry.PROMOTED_FILE}
    if dest.startswith("gs://"):
        from kfp_finetune.components.core import gcs

        base = f"{dest}/{version}/"
        bucket, prefix = gcs.split_uri(base)
        return {b.name[len(prefix):]: b.download_as_bytes() for b in gcs.list_blobs(base)
                if b.name[len(prefix):] not in skip}
    root = Path(dest) / version
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).as_posix() not in skip}


# --- names taken at push time, ordered --------------------------------------------------------------------------


def test_version_names_are_taken_at_push_time_above_every_number(dest, tmp_path):
    future = "99999999999999990"  # a version from a machine whose clock runs ahead
    seed(tmp_path, dest, future)
    first = registry.push(make_version_dir(tmp_path, "n1"), dest)
    second = registry.push(make_version_dir(tmp_path, "n2"), dest)
    assert (first.version, second.version) == ("99999999999999991", "99999999999999992")
    assert registry.read_latest(dest) == second.version
    record = registry.resolve_champion(dest).record
    assert record["version"] == second.version and record["expected_latest"] == first.version


# --- a failed LATEST write ----------------------------------------------------------------------------------------


def test_failed_latest_write_leaves_a_complete_version_marked_not_promoted(proxied_gcs, tmp_path):
    proxy, dest = proxied_gcs
    seed(tmp_path, dest, "v1")
    fault = proxy.fail("POST", r"/models/LATEST$", 403)
    with pytest.raises(UserError) as raised:
        registry.push(make_version_dir(tmp_path, "new"), dest, "v2", expect="v1")
    message = str(raised.value)
    assert fault.hits and "\n" not in message and "version v2 is complete" in message and "403" in message
    assert "rollback --push-to" in message and "--to v2" in message
    proxy.faults.clear()
    assert registry.read_latest(dest) == "v1"
    assert {r["version"]: r["status"] for r in registry.version_rows(dest)} == {"v1": "LATEST", "v2": "not promoted"}
    assert registry.rollback(dest, to="v2") == ("v1", "v2")  # once the cause is fixed
    assert registry.version_rows(dest)[-1]["status"] == "LATEST"


# --- unreadable records are one line ----------------------------------------------------------------------------


BROKEN = {"not JSON": "{'version': 'v2',", "not an object": "[1, 2]"}


@pytest.mark.parametrize("damage", ["not JSON", "not an object", "403"])
def test_an_unreadable_version_json_is_one_line(dest, cli, damage, tmp_path, request):
    from tests.imagegen import write_class_folder

    seed(tmp_path, dest, "v1", "v2")
    uri = f"{dest}/v2/{registry.VERSION_FILE}"
    if damage == "403" and dest.startswith("gs://"):
        request.node.proxy.fail("GET", r"/models/v2/version\.json$", 403)
    elif damage == "403":
        if os.geteuid() == 0:
            pytest.skip("file permissions do not stop root")
        Path(uri).chmod(0)
    elif dest.startswith("gs://"):
        from kfp_finetune.components.core import gcs

        gcs.write_text(uri, BROKEN[damage])
    else:
        Path(uri).write_text(BROKEN[damage])
    expected = {"not JSON": "is not valid JSON", "not an object": "not a JSON object",
                "403": "403" if dest.startswith("gs://") else "Permission denied"}[damage]
    source = write_class_folder(tmp_path / "src", classes=("a", "b"), per_class=2, size=16)
    for args in (["versions"], ["rollback"], ["fingerprint", "--source", str(source)]):  # the last: champion lookup
        line = one_line_error(cli(*args, "--push-to", dest))
        assert "v2/version.json" in line and expected in line, line
    from kfp_finetune.components.evaluate.step import EvaluateConfig, _resolve_baseline

    with pytest.raises(UserError, match=expected) as raised:  # evaluate's champion lookup
        _resolve_baseline(EvaluateConfig("d", "m", "o", champion_from=dest))
    assert "\n" not in str(raised.value)
    assert registry.read_latest(dest) == "v2"


def test_push_expects_the_champion_evaluation_compared(tmp_path):
    dest = str(tmp_path / "reg")
    compared = {"champion": {"status": "compared", "version": "v7", "push_to": dest + "/"}}
    assert registry.evaluated_champion(compared, dest) == "v7"
    first = {"champion": {"status": "no champion yet", "push_to": dest, "latest": None}}
    assert registry.evaluated_champion(first, dest) is None
    assert registry.evaluated_champion(compared, str(tmp_path / "other")) is registry.CURRENT
    assert registry.evaluated_champion({"champion": {"status": "off"}}, dest) is registry.CURRENT
    assert registry.evaluated_champion(None, dest) is registry.CURRENT
