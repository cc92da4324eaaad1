"""`run --runner docker` without an engine: the DockerRunner exit-code fix, engine detection, mounts, permissions."""

import stat
import tempfile
from pathlib import Path

import pytest

docker = pytest.importorskip("docker", reason="the dev extra installs the docker package")

from kfp.local import docker_task_handler  # noqa: E402

from kfp_finetune.components.core import compat  # noqa: E402
from kfp_finetune.components.core.errors import UserError  # noqa: E402
from kfp_finetune.pipelines import containers  # noqa: E402


class FakeContainer:
    """Behaves like podman with auto_remove=True: once it has exited, an auto-removed container is gone."""

    def __init__(self, code: int, auto_remove: bool, events: list):
        self.code, self.auto_remove, self.events, self.id = code, auto_remove, events, "c0ffee"

    def logs(self, stream: bool, follow: bool = False):
        self.events.append("logs")
        yield b"step output\n"

    def wait(self):
        self.events.append("wait")
        if self.auto_remove:
            raise docker.errors.NotFound("no such container")
        return {"StatusCode": self.code}

    def remove(self, force: bool = False):
        self.events.append("remove")


class FakeClient:
    def __init__(self, code: int):
        self.code, self.events, self.run_kwargs = code, [], {}
        self.images = self
        self.containers = self

    def list(self):
        class Image:
            tags, attrs = ["localhost/kfp-finetune:0.1.0"], {"RepoDigests": []}

        return [Image()]

    def run(self, **kwargs):
        self.run_kwargs = kwargs
        return FakeContainer(self.code, kwargs["auto_remove"], self.events)


@pytest.fixture
def original_handler(monkeypatch):
    """Undo the patch after each test (it patches a module attribute of kfp)."""
    monkeypatch.setattr(docker_task_handler, "run_docker_container", docker_task_handler.run_docker_container)
    return docker_task_handler.run_docker_container


def test_kfp_unpatched_reports_a_failed_step_as_success_on_podman(original_handler):
    """The bug being fixed, shown on kfp's own code: exit code 1, reported 0."""
    client = FakeClient(code=1)
    assert original_handler(client, "localhost/kfp-finetune:0.1.0", ["false"], {}) == 0


def test_fixed_runner_reports_the_exit_code_and_removes_the_container(original_handler):
    assert compat.kfp_local_docker_exit_code()
    assert compat.kfp_local_docker_exit_code()  # idempotent
    run = docker_task_handler.run_docker_container
    failing = FakeClient(code=3)
    assert run(failing, "localhost/kfp-finetune:0.1.0", ["false"], {}, auto_remove=True) == 3
    assert failing.run_kwargs["auto_remove"] is False
    assert failing.events == ["logs", "wait", "remove"]
    ok = FakeClient(code=0)
    assert run(ok, "localhost/kfp-finetune:0.1.0", ["true"], {}) == 0 and ok.events[-1] == "remove"


def test_fix_refuses_a_kfp_it_was_not_written_for(original_handler, monkeypatch):
    monkeypatch.setattr(compat, "KFP_VERSION", "2.99.")
    with pytest.raises(RuntimeError, match="kfp_local_docker_exit_code was written for kfp 2.99.x"):
        compat.kfp_local_docker_exit_code()
    assert docker_task_handler.run_docker_container is original_handler


def test_engine_names_podman_and_docker():
    class Client:
        def __init__(self, info):
            self.info = info

        def version(self):
            return self.info

    podman = Client({"Version": "4.3.1", "Components": [{"Name": "Podman Engine", "Version": "4.3.1"}]})
    dockerd = Client({"Version": "28.2.2", "Components": [{"Name": "Engine"}, {"Name": "containerd"}]})
    assert containers.engine(podman).name == "podman"
    assert containers.engine(dockerd).name == "Docker" and containers.engine(dockerd).version == "28.2.2"


def test_no_engine_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(UserError, match="does not answer.*podman system service"):
        containers.client()


def test_host_paths_are_mounted_at_the_same_path(tmp_path, monkeypatch):
    source = tmp_path / "images"
    source.mkdir()
    mirror = tmp_path / "weights"
    mirror.mkdir()
    monkeypatch.setenv("KFP_FINETUNE_WEIGHTS_MIRROR", str(mirror))
    root = tmp_path / "out" / "pipeline_root"
    args = containers.runner_args({"source": str(source), "push_to": str(tmp_path / "models"),
                                   "baseline_model": "gs://bucket/model", "weights": "imagenet"}, root)
    mounts = {m["Target"]: m for m in args["mounts"]}
    assert mounts[str(source)]["Source"] == str(source) and mounts[str(source)]["ReadOnly"]
    assert mounts[str(mirror)]["ReadOnly"]
    assert not mounts[str(tmp_path / "models")]["ReadOnly"] and (tmp_path / "models").is_dir()
    assert len(mounts) == 3  # nothing for gs:// or "imagenet"
    assert args["environment"] == {"KFP_FINETUNE_WEIGHTS_MIRROR": str(mirror)}


def test_pipeline_root_is_writable_by_the_image_user():
    # pytest's tmp_path sits in folders only their owner may enter: the check would (rightly) refuse it.
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        outer = Path(tmp) / "outer"
        outer.mkdir()
        Path(tmp).chmod(0o755)
        root = outer / "pipeline_root"
        containers.prepare_pipeline_root(root)
        mode = root.stat().st_mode
        assert mode & stat.S_IWOTH and mode & stat.S_ISVTX
        outer.chmod(0o700)
        try:
            with pytest.raises(UserError, match=f"cannot enter {outer}"):
                containers.prepare_pipeline_root(root)
        finally:
            outer.chmod(0o755)
