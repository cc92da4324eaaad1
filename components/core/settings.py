"""The only module that reads environment variables. Everything else asks here.

Variables:
    KFP_FINETUNE_WEIGHTS_MIRROR  local folder or gs:// prefix holding backbone weights under Keras's file names.
    KFP_FINETUNE_IMAGE           container image used for components (default: this release's versioned image).
    KERAS_HOME                   Keras's cache root (weights live in $KERAS_HOME/models; default ~/.keras).
    STORAGE_EMULATOR_HOST        a GCS emulator endpoint; google-cloud-storage then talks to it anonymously.
    AIP_CHECKPOINT_DIR           set by Vertex AI custom jobs: default checkpoint folder for training.
    AIP_TENSORBOARD_LOG_DIR      set by Vertex AI: where TensorBoard logs go.
    TF_CONFIG                    cluster spec for multi-worker training (set by Vertex AI / the user).
    GOOGLE_CLOUD_PROJECT         default project for google-cloud-storage.
    DOCKER_HOST                  the Docker API endpoint for `run --runner docker` (Docker, or podman's service).
    XDG_RUNTIME_DIR              where a rootless podman keeps its socket.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kfp_finetune.components import __version__

IMAGE_REPOSITORY = "ghcr.io/kfp-finetune/kfp-finetune"
RELEASE_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"


def _get(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def kfp_runtime() -> bool:
    """True inside a running KFP component (the executor sets _KFP_RUNTIME=true)."""
    return (_get("_KFP_RUNTIME") or "false").lower() == "true"


def component_image() -> str:
    """The image that every component runs in: the versioned release image unless overridden."""
    return _get("KFP_FINETUNE_IMAGE") or RELEASE_IMAGE


def weights_mirror() -> str | None:
    return _get("KFP_FINETUNE_WEIGHTS_MIRROR")


def keras_cache_dir() -> Path:
    """Where `keras.utils.get_file` keeps downloaded weights."""
    home = _get("KERAS_HOME")
    return Path(home).expanduser() / "models" if home else Path("~/.keras/models").expanduser()


def storage_emulator_host() -> str | None:
    return _get("STORAGE_EMULATOR_HOST")


def docker_host() -> str | None:
    return _get("DOCKER_HOST")


def runtime_dir() -> Path:
    """The user's runtime folder ($XDG_RUNTIME_DIR, else /run/user/UID)."""
    return Path(_get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}")


def gcp_project() -> str | None:
    return _get("GOOGLE_CLOUD_PROJECT") or _get("GCLOUD_PROJECT")


def vertex_checkpoint_dir() -> str | None:
    return _get("AIP_CHECKPOINT_DIR")


def vertex_tensorboard_dir() -> str | None:
    return _get("AIP_TENSORBOARD_LOG_DIR")


def tf_config() -> dict:
    """The parsed TF_CONFIG, or {} when unset."""
    raw = _get("TF_CONFIG")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        from kfp_finetune.components.core.errors import UserError

        raise UserError(f"TF_CONFIG is not valid JSON ({exc}); unset it or fix it") from exc


def serving_python() -> str | None:
    """KFP_FINETUNE_SERVING_PYTHON: the Python (with the serving image's TensorFlow, e.g. 2.15) that export's
    serving check runs the model server side with; unset = this interpreter."""
    return _get("KFP_FINETUNE_SERVING_PYTHON")
