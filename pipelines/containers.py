"""`kfp-finetune run --runner docker`: every step in the component image, through `kfp.local.DockerRunner`.

It talks to whatever answers the Docker API: Docker's daemon, or podman's Docker-compatible service
(`podman system service --time=0 unix:///run/podman/podman.sock`). The `docker` client reads DOCKER_HOST; when that
is unset and Docker's socket is absent, the usual podman sockets are tried. `engine()` says which engine answered.

What a step needs from the host is mounted at the same path, so that the compiled pipeline's parameters stay valid
inside the container: the pipeline root (kfp.local mounts it, read-write), a local `source` folder and the weights
mirror (read-only), a local `push_to` folder (read-write). The image runs as uid 1000, not as the host's user:
`prepare_pipeline_root` makes the root writable by it and checks that every folder above it can be entered.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.components.core import settings
from kfp_finetune.components.core.errors import UserError

log = logging.getLogger("kfp_finetune.pipelines")

# Tried in this order when DOCKER_HOST is unset and /var/run/docker.sock does not exist.
PODMAN_SOCKETS = ("/run/podman/podman.sock", "{xdg}/podman/podman.sock")
START_HINT = (
    "start Docker, or podman's Docker-compatible service: `podman system service --time=0 "
    "unix:///run/podman/podman.sock &` then `export DOCKER_HOST=unix:///run/podman/podman.sock`"
)


@dataclass(frozen=True)
class Engine:
    """The container engine behind the Docker API socket."""

    name: str  # "Docker" | "podman"
    version: str
    host: str

    def __str__(self) -> str:
        return f"{self.name} {self.version} ({self.host})"


def docker_host() -> str | None:
    """DOCKER_HOST, else Docker's default socket when present, else the first podman socket found."""
    explicit = settings.docker_host()
    if explicit:
        return explicit
    if Path("/var/run/docker.sock").exists():
        return "unix:///var/run/docker.sock"
    for candidate in PODMAN_SOCKETS:
        path = Path(candidate.format(xdg=settings.runtime_dir()))
        if path.is_socket():
            return f"unix://{path}"
    return None


def client() -> Any:
    """A `docker.DockerClient` on docker_host(); UserError when the package or the engine is missing."""
    try:
        import docker
    except ImportError:
        raise UserError("--runner docker needs the `docker` Python package: pip install docker "
                        "(the dev extra has it)") from None
    host = docker_host()
    if host is None:
        raise UserError(f"--runner docker: no Docker engine found (DOCKER_HOST unset, no socket); {START_HINT}")
    # kfp.local's DockerTaskHandler calls docker.from_env(): it must find the same engine.
    os.environ["DOCKER_HOST"] = host
    try:
        found = docker.DockerClient(base_url=host)
        found.ping()
    except Exception as exc:  # connection refused, permission denied, a stale socket...
        raise UserError(f"--runner docker: the engine at {host} does not answer ({type(exc).__name__}); "
                        f"{START_HINT}") from exc
    return found


def engine(docker_client: Any) -> Engine:
    """Which engine answers: podman names itself in the version's components, Docker does not."""
    info = docker_client.version()
    names = " ".join(str(c.get("Name", "")) for c in info.get("Components", []) or [])
    name = "podman" if "podman" in names.lower() else "Docker"
    return Engine(name=name, version=str(info.get("Version", "?")), host=settings.docker_host() or "")


def ensure_image(docker_client: Any, image: str) -> None:
    """The image is there, or can be pulled; else a UserError that says how to build it."""
    import docker

    try:
        docker_client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    log.info("image %s not found locally: pulling it", image)
    try:
        docker_client.images.pull(image)
    except docker.errors.APIError as exc:
        raise UserError(f"--image {image} is neither built here nor pullable ({str(exc).splitlines()[0][:200]}); "
                        f"build it with `make image TARGETS=cpu` or pass --image NAME:TAG") from exc


def prepare_pipeline_root(root: Path) -> None:
    """Let the image's user (uid 1000) write under `root`, and check it can reach it.

    The root is made world-writable (with the sticky bit, like /tmp); it holds this run's artifacts only.
    """
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(root.stat().st_mode | stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO | stat.S_ISVTX)
    for parent in root.resolve().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise UserError(f"--output {root}: the container's user (uid 1000) cannot enter {parent}; "
                            f"choose an --output outside it, or `chmod o+x {parent}`")


def _local_dir(value: Any) -> Path | None:
    if not isinstance(value, str) or not value or "://" in value:
        return None
    path = Path(value).expanduser()
    return path.resolve() if path.exists() else None


def runner_args(params: dict[str, Any], pipeline_root: Path) -> dict[str, Any]:
    """`DockerRunner(**args)`: bind mounts for the host paths a step reads or writes, and the weights mirror."""
    from docker.types import Mount

    mounts: dict[str, Mount] = {}

    def mount(path: Path, read_only: bool) -> None:
        path = path if path.is_dir() else path.parent
        if path == pipeline_root or pipeline_root in path.parents:
            return  # kfp.local mounts the pipeline root itself
        mounts[str(path)] = Mount(target=str(path), source=str(path), type="bind", read_only=read_only)

    source = _local_dir(params.get("source"))
    if source is not None:
        mount(source, read_only=True)
    for name in ("baseline_model", "weights"):
        found = _local_dir(params.get(name))
        if found is not None:
            mount(found, read_only=True)
    push_to = params.get("push_to")
    if isinstance(push_to, str) and push_to and "://" not in push_to:
        target = Path(push_to).expanduser().resolve()
        target.mkdir(parents=True, exist_ok=True)
        mount(target, read_only=False)
    environment: dict[str, str] = {}
    mirror = settings.weights_mirror()
    if mirror:
        environment["KFP_FINETUNE_WEIGHTS_MIRROR"] = mirror
        local_mirror = _local_dir(mirror)
        if local_mirror is not None:
            mount(local_mirror, read_only=True)
    args: dict[str, Any] = {"mounts": list(mounts.values())}
    if environment:
        args["environment"] = environment
    return args


def docker_runner(params: dict[str, Any], pipeline_root: Path, image: str) -> tuple[Any, Engine]:
    """A ready `kfp.local.DockerRunner` for this run, and the engine it talks to (checked, image present)."""
    from kfp import local

    docker_client = client()
    try:
        found = engine(docker_client)
        ensure_image(docker_client, image)
    finally:
        docker_client.close()
    prepare_pipeline_root(pipeline_root)
    return local.DockerRunner(**runner_args(params, pipeline_root)), found
