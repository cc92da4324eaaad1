"""What the environment does to a step, turned into one line and a clean exit: SIGTERM, a full disk, TF resources.

SIGTERM (`stops_cleanly`). Kubernetes, Spot VMs and Vertex AI stop a step with SIGTERM, then SIGKILL about 30 s
later. Python's default for SIGTERM ends the process at once: no `finally`, no `with` exit, so `atomic_directory`'s
hidden `.name.tmp-*` sibling, a `kfp-finetune-ingest-*` download folder and a serving-check subprocess were left
behind. Inside `stops_cleanly`, SIGTERM raises `Terminated` (a SystemExit with status 75, EX_TEMPFAIL: "retry"), so
every context manager on the way out runs (temporary folders are deleted, `subprocess.run` kills its child, a
process pool is shut down), one line is logged, and the process exits 75. The training steps' `Preempted`
(components/train/preempt.py) is a `Terminated` too: it saves the state first.

Full disks and TF's resource errors (`resource_errors`). ENOSPC/EDQUOT from Python or from TensorFlow (whose file
systems turn ENOSPC into `ResourceExhaustedError`), and TensorFlow running out of memory, become one `UserError`
naming the path, the space needed and the space free. Wrap the block *outside* the step's `atomic_directory`, so the
partial output is gone by the time the line is printed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kfp_finetune.components.core.errors import UserError

log = logging.getLogger("kfp_finetune")

EXIT_TERMINATED = 75  # os.EX_TEMPFAIL ("temporary failure; the user is invited to retry"), on every platform
_FULL = (errno.ENOSPC, errno.EDQUOT)

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(SystemExit):
    """SIGTERM stopped a step: a SystemExit with status 75 (no traceback from a CLI or a KFP component), raised in
    the main thread so that every cleanup on the way out runs. `str()` is the one line that was logged."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_TERMINATED)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- SIGTERM --------------------------------------------------------------------------------------------------------

# A fork runs Python's at-fork hooks (logging's lock release, ...); an exception a signal handler raises inside one is
# printed and dropped ("Exception ignored in: <function _releaseLock>"), so a SIGTERM that lands during a process
# pool's fork would be lost and the step would run on. While a fork is under way the handler re-sends the signal a
# moment later instead of raising. The marks are set and cleared by C callables (list methods), in which no Python
# signal handler can run; registered after logging's hooks, the mark is up before theirs run and down after.
_FORKING: list[int] = []
_RESEND_SECONDS = 0.01
os.register_at_fork(before=functools.partial(_FORKING.append, 1), after_in_parent=_FORKING.pop,
                    after_in_child=_FORKING.clear)


@contextlib.contextmanager
def on_sigterm(first: Callable[[], None]) -> Iterator[None]:
    """While the block runs, the first SIGTERM calls `first` in the main thread (which raises, typically); a second
    one, during the cleanup, is ignored. The previous handler is put back on the way out. Outside the main thread (a
    notebook's worker, a server) signals cannot be handled there: the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    seen = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal seen
        if _FORKING:  # inside a fork's hooks a raise would be dropped: deliver it again once the fork is done
            threading.Timer(_RESEND_SECONDS, os.kill, (os.getpid(), signal.SIGTERM)).start()
        elif not seen:
            seen = True
            first()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def sigterm_raises(step: str) -> contextlib.AbstractContextManager[None]:
    """While the block runs, SIGTERM raises `Terminated` in the main thread (`on_sigterm`)."""

    def stop() -> None:
        message = (f"terminated (SIGTERM) during {step}: temporary files removed, nothing partial left; exiting "
                   f"with status {EXIT_TERMINATED}, a retry with the same arguments starts the step again")
        log.error("%s", message)
        raise Terminated(message)

    return on_sigterm(stop)


def stops_cleanly(step: str) -> Callable[[F], F]:
    """Decorate a step's function: SIGTERM during it cleans up and exits 75 (`sigterm_raises`)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with sigterm_raises(step):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def child_pids(pid: int | None = None) -> list[int]:
    """The direct children of `pid` (default: this process), read from /proc; [] where there is no /proc."""
    parent = os.getpid() if pid is None else pid
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if name.isdigit() and _stat(int(name))[1] == parent:
            found.append(int(name))
    return sorted(found)


def _stat(pid: int) -> tuple[str, int]:
    """(state, parent pid) of `pid` from /proc/PID/stat; ("", -1) when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return "", -1


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, which has exited but is not reaped yet, does not)."""
    return _stat(pid)[0] not in ("", "Z", "X")


def forwards_sigterm(what: str, grace: float = 25.0) -> contextlib.AbstractContextManager[None]:
    """While the block runs, SIGTERM is passed on to this process's children (the steps a local run started as
    subprocesses: each cleans up and exits 75), which get `grace` seconds (then SIGKILL); then `Terminated` is raised
    here (the caller logs its line, once its own log handlers are back). Without it, stopping `kfp-finetune run`
    left the running step alive as an orphan."""

    def stop() -> None:
        # A step may start while this runs (kfp.local's orchestrator can launch the next one as the last exits), so
        # the children are listed again until none is left: each new one gets SIGTERM too, and the same deadline.
        stopped: set[int] = set()
        deadline = time.monotonic() + grace
        while True:
            running = [pid for pid in child_pids() if alive(pid)]
            for pid in running:
                if pid not in stopped:
                    stopped.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            if not running or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        _kill_children()
        _keep_stopping_new_children(grace)
        raise Terminated(f"terminated (SIGTERM) during {what}: the running step(s) stopped and cleaned up "
                         f"({len(stopped)} process(es)); exiting with status {EXIT_TERMINATED}")

    return on_sigterm(stop)


def _keep_stopping_new_children(grace: float) -> None:
    """After a stop, a step that starts anyway (kfp.local launches steps from its own worker threads, which go on
    while the main thread unwinds) gets SIGTERM, then SIGKILL after `grace` seconds. A daemon thread sweeps for
    `grace` + 60 s (the interpreter joins those threads before it exits); a last sweep runs at exit. Only kfp step
    processes (`executor_main` in the command line) are touched: a caller from Python keeps its other children."""
    import atexit

    termed: dict[int, float] = {}

    def is_step(pid: int) -> bool:
        try:
            return b"executor_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    def sweep() -> None:
        now = time.monotonic()
        for pid in child_pids():
            if not alive(pid) or not is_step(pid):
                continue
            with contextlib.suppress(ProcessLookupError):
                if pid not in termed:
                    termed[pid] = now
                    os.kill(pid, signal.SIGTERM)
                elif now - termed[pid] >= grace:
                    os.kill(pid, signal.SIGKILL)

    def for_a_while() -> None:
        until = time.monotonic() + grace + 60.0
        while time.monotonic() < until:
            sweep()
            time.sleep(0.05)

    threading.Thread(target=for_a_while, name="stop-new-steps", daemon=True).start()
    atexit.register(_kill_children, is_step)  # the last ones get no grace: this process is leaving


def _kill_children(which: Callable[[int], bool] = lambda pid: True, wait: float = 5.0) -> None:
    """SIGKILL this process's live children that `which` selects, and wait (up to `wait` seconds) until they are
    dead: a killed process runs on for a moment (it is still listed, not yet a zombie), and this is also the last
    thing the run does before it exits, so an exit that did not wait could leave it briefly running."""
    killed = []
    for pid in child_pids():
        if alive(pid) and which(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    deadline = time.monotonic() + wait
    while any(alive(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.01)


def default_sigterm() -> None:
    """For forked worker processes: SIGTERM kills them as usual instead of running the parent's handler."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --- full disks and TensorFlow's resource errors ---------------------------------------------------------------------


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT from Python (also inside shutil.Error's list), or TF's ResourceExhaustedError for a file."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        return any("No space left" in str(item) or "Disk quota" in str(item) for item in exc.args[0])
    text = str(exc)
    return _is_tf_resource_error(exc) and ("No space left" in text or "quota" in text.lower())


def _is_tf_resource_error(exc: BaseException) -> bool:
    return any(c.__name__ == "ResourceExhaustedError" for c in type(exc).__mro__)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the disk holding `path` (its nearest existing parent); None when unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def tree_bytes(path: str | os.PathLike) -> int:
    """The size of a file, or of every file under a folder (0 when it does not exist)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def human(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def resource_error(exc: BaseException, path: str | os.PathLike, what: str,
                   needed: int | Callable[[], int | None] | None = None) -> UserError | None:
    """The one-line UserError for a full disk or a TF resource error while writing `path`; None for other errors."""
    if is_disk_full(exc):
        try:
            need = needed() if callable(needed) else needed
        except Exception:  # an estimate must never hide the real error
            need = None
        need_text = f"needs about {human(need)}, " if need else ""
        return UserError(f"{what} {path}: no space left on device ({need_text}{human(free_bytes(path))} free there); "
                         "nothing partial was left; free some space or choose another disk")
    if _is_tf_resource_error(exc):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return UserError(f"{what} {path}: TensorFlow ran out of a resource ({first}); nothing partial was left; "
                         "give the step more memory or a smaller batch")
    return None


@contextlib.contextmanager
def resource_errors(path: str | os.PathLike, what: str,
                    needed: int | Callable[[], int | None] | None = None) -> Iterator[None]:
    """Turn a full disk / TF resource error inside the block into `resource_error`'s one line (others pass)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        error = resource_error(exc, path, what, needed)
        if error is None:
            raise
        raise error from exc
