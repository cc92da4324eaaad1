"""Fixtures shared by every test: a real GCS emulator, an image factory, and the shared offline data."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import imagegen

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KFP_FINETUNE_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


# The default suite's heaviest modules, heaviest first (seconds per module from `pytest --durations=0`, idle 2-core
# machine, 2026-12-03). `make test` hands whole modules to its two workers (--dist loadfile) in collection order
# (--no-loadscope-reorder): these go first, so that no 20-50 s module is handed out last while the other worker
# idles. A stale list costs only balance, never a result.
HEAVY_MODULES = (
    "test_train.py",  # ~125 s
    "test_serving.py",  # ~50 s: builds the shared evaluation chain's export
    "test_preemption.py",  # ~40 s
    "test_evaluate.py",  # ~32 s
    "test_registry_races.py",  # ~30 s
    "test_calibration.py",  # ~28 s
    "test_export.py",  # ~25 s
    "test_ingest_flowers.py",  # ~24 s
    "test_predict.py",  # ~24 s
    "test_serving_edges.py",  # ~22 s
    "test_champion.py",  # ~20 s
    "test_pipeline_compile.py",  # ~18 s
)


@pytest.hookimpl(trylast=True)  # after -m/-k have deselected: the short tests it interleaves are ones that run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that declare a timeout above the ini default (the long end-to-end runs) go first, longest first, each
    followed by one ordinary test, so that they start at the beginning on different workers instead of being handed
    out last (setting the stage's wall time alone) or one after another on one worker. `make test-slow` runs xdist
    with `--maxschedchunk 1`: each worker starts with two consecutive tests (one long, one short), then gets one test
    at a time as it frees up. The other tests follow, the HEAVY_MODULES first, each module's tests in collected
    order."""
    default = float(config.getini("timeout") or 0)

    def declared(item: pytest.Item) -> float:
        marker = item.get_closest_marker("timeout")
        value = float(marker.args[0]) if marker and marker.args else 0.0
        return value if value > default else 0.0

    long_first = sorted((item for item in items if declared(item)), key=declared, reverse=True)
    heavy = {name: rank for rank, name in enumerate(HEAVY_MODULES)}
    others = sorted((item for item in items if not declared(item)),  # stable: collected order within a module
                    key=lambda item: heavy.get(item.path.name, len(heavy)))
    ordered: list[pytest.Item] = []
    for i, item in enumerate(long_first):
        ordered.append(item)
        if i < len(others):
            ordered.append(others[i])
    ordered += others[len(long_first):]
    items[:] = ordered


# --- shared offline data -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $KFP_FINETUNE_SHARED_DATA): the flowers photos and the MobileNet weights."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set KFP_FINETUNE_SHARED_DATA to point at it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def flowers_dir(shared_data: Path) -> Path:
    path = shared_data / "flowers"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def weights_mirror(shared_data: Path) -> Path:
    """The folder holding mobilenet_2_5_224_tf_no_top.h5, usable as KFP_FINETUNE_WEIGHTS_MIRROR."""
    path = shared_data / "weights"
    if not (path / "mobilenet_2_5_224_tf_no_top.h5").is_file():
        pytest.skip(f"{path}/mobilenet_2_5_224_tf_no_top.h5 is absent")
    return path


@pytest.fixture(scope="session")
def mini_flowers(flowers_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20-per-class copy of the flowers set (real photos, 100 files) for faster integration tests."""
    root = tmp_path_factory.mktemp("mini_flowers")
    for class_dir in sorted(p for p in flowers_dir.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir()
        for image in sorted(class_dir.iterdir())[:20]:
            shutil.copy(image, root / class_dir.name / image.name)
    shutil.copy(flowers_dir / "ATTRIBUTION.txt", root / "ATTRIBUTION.txt")
    return root


@pytest.fixture(scope="session", autouse=True)
def _session_keras_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Keras cache of this test session's own: tests never read weights a previous run (or the developer) left in
    ~/.keras, nor leave any there. A test that needs ImageNet weights names `weights_mirror`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras-home")))
        yield


@pytest.fixture
def offline_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty Keras cache, no mirror, and no way out: a proxy on a closed port makes every download fail at once
    (so the tests behave offline on a CI machine that has internet too)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.delenv("KFP_FINETUNE_WEIGHTS_MIRROR", raising=False)
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")


# --- generated images ------------------------------------------------------------------------------------------


@pytest.fixture
def image_factory(tmp_path: Path) -> imagegen.ImageFactory:
    """Writes small images of every kind ingest must handle (see tests/imagegen.py)."""
    return imagegen.ImageFactory(tmp_path / "images")


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-per-folder dataset of 3 easily separable classes, 30 JPEGs each (64x64)."""
    root = tmp_path_factory.mktemp("synthetic")
    imagegen.write_class_folder(root, classes=("circle", "square", "stripes"), per_class=30, size=64)
    return root


# --- GCS emulator ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Emulator:
    """A running gcp-storage-emulator; `host` is what STORAGE_EMULATOR_HOST is set to.

    In memory by default; with `storage` it keeps objects on disk there, so it can be stopped mid-transfer and
    started again on the same port with the same objects.
    """

    def __init__(self, storage: Path | None = None) -> None:
        self.port = _free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self.storage = storage
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        # The emulator with atomic writes of its own files (tests/emulator_main.py), so a stop never corrupts it.
        cmd = [sys.executable, str(Path(__file__).with_name("emulator_main.py")), "start", "--host", "127.0.0.1",
               "--port", str(self.port), "--quiet"]
        env = dict(os.environ)
        if self.storage is None:
            cmd.append("--in-memory")
        else:
            env["STORAGE_BASE"] = str(self.storage)
        self.log = tempfile.NamedTemporaryFile(prefix="gcs-emulator-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        # A restart on disk reads back every stored object first: on a loaded 2-core machine that takes a while.
        wait = 30 if self.storage is None else 120
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = Path(self.log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"gcp-storage-emulator exited with {self.process.returncode}:\n{tail}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"gcp-storage-emulator did not start within {wait} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[Emulator]:
    """A real GCS emulator on 127.0.0.1, with STORAGE_EMULATOR_HOST set for the whole session; stopped after."""
    emulator = Emulator()
    emulator.start()
    old = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
    os.environ["GOOGLE_CLOUD_PROJECT"] = "test"
    yield emulator
    emulator.stop()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def gcs_bucket(gcs_emulator: Emulator, request: pytest.FixtureRequest):
    """A fresh, empty bucket on the emulator (a google.cloud.storage.Bucket)."""
    from kfp_finetune.components.core import gcs

    name = "b-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    name = f"{name}-{_free_port()}"
    return gcs.client().create_bucket(name)


def upload_folder(bucket, local: Path, prefix: str) -> str:
    """Copy a local folder into the bucket below `prefix`; returns its gs:// URI."""
    from kfp_finetune.components.core import gcs

    uri = f"gs://{bucket.name}/{prefix}".rstrip("/")
    gcs.upload_directory(local, uri)
    return uri


@pytest.fixture
def gcs_upload():
    """upload_folder(bucket, local_path, prefix) -> 'gs://bucket/prefix'."""
    return upload_folder
