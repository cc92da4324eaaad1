"""Vertex AI Model Registry: register a pushed gs:// version (`Model.upload`, a new version of `parent_model` when
given, the prebuilt TensorFlow serving container). export calls it after a push; its arguments are built and checked
offline (`vertex_upload_args`), so only `vertex_upload` touches the network.
"""

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from kfp_finetune.components.core.errors import UserError

log = logging.getLogger("kfp_finetune.export")

# Vertex AI's prebuilt TensorFlow prediction image: 2.15 is the newest TF line Vertex offers, and it loads this
# SavedModel (checked: every op of the export is in TF 2.15.1's registry, tests/golden/tf2.15_ops.txt, and the
# serving check passes with tensorflow-cpu 2.15.1 as the server; docs/serving.md).
DEFAULT_SERVING_IMAGE = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"
VERTEX_REGION_PATTERN = re.compile(r"^[a-z]+-[a-z]+\d+$")


@dataclass(frozen=True)
class VertexConfig:
    """Where and how to register the pushed version in Vertex AI Model Registry."""

    project: str
    region: str
    display_name: str
    parent_model: str | None = None
    serving_image: str = DEFAULT_SERVING_IMAGE
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not str(self.project or "").strip():
            raise UserError("--vertex-project is required with --vertex-upload")
        if not VERTEX_REGION_PATTERN.match(str(self.region or "")):
            raise UserError(f"--vertex-region must be a region like us-central1 (got {self.region!r})")
        if not str(self.display_name or "").strip() or len(self.display_name) > 128:
            raise UserError("--vertex-display-name must be 1..128 characters")
        if not str(self.serving_image or "").strip():
            raise UserError("--vertex-serving-image is empty")
        if self.parent_model is not None and not str(self.parent_model).strip():
            object.__setattr__(self, "parent_model", None)



def vertex_upload_args(vertex: VertexConfig, artifact_uri: str, version: str, class_names: list[str],
                       evaluation: dict[str, Any] | None, default_version: bool = True) -> dict[str, Any]:
    """`aiplatform.Model.upload`'s arguments, built and checked offline (default_version: False when not promoted)."""
    if not artifact_uri.startswith("gs://"):
        raise UserError(f"Vertex AI needs a gs:// artifact URI (got {artifact_uri!r})")
    labels = {"kfp-finetune-version": re.sub(r"[^a-z0-9_-]", "-", version.lower())[:63], **vertex.labels}
    accuracy = (evaluation or {}).get("metrics", {}).get("accuracy")
    description = (f"{len(class_names)} classes: {', '.join(class_names)}"
                   + (f"; test accuracy {accuracy:.4f}" if accuracy is not None else ""))
    args: dict[str, Any] = {
        "display_name": vertex.display_name,
        "artifact_uri": artifact_uri,
        "serving_container_image_uri": vertex.serving_image,
        "description": description[:2048],
        "labels": labels,
        "version_aliases": [f"v{re.sub(r'[^a-z0-9-]', '-', version.lower())}"[:128]],
        "is_default_version": default_version,
        "sync": True,
    }
    if vertex.parent_model:
        args["parent_model"] = vertex.parent_model
    return args


def vertex_upload(vertex: VertexConfig, args: dict[str, Any], credentials: Any = None,
                  api_endpoint: str | None = None) -> str:
    """Upload to Vertex AI Model Registry; returns the model's resource name (with version)."""
    from google.cloud import aiplatform

    init: dict[str, Any] = {"project": vertex.project, "location": vertex.region}
    if credentials is not None:
        init["credentials"] = credentials
    if api_endpoint:
        init["api_endpoint"] = api_endpoint
    aiplatform.init(**init)
    try:
        model = aiplatform.Model.upload(**args)
    except Exception as exc:  # google.api_core errors, auth errors, network errors
        raise UserError(f"Vertex AI Model.upload of {args['artifact_uri']} failed: {exc}") from exc
    name = f"{model.resource_name}@{model.version_id}" if getattr(model, "version_id", None) else model.resource_name
    log.info("registered in Vertex AI Model Registry: %s", name)
    return name
