"""Reading and writing the Model artifact: DIR/model.keras (loads with safe_mode=True) + DIR/model.json."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.errors import UserError
from components.fsutil import read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    import keras

MODEL_FILE = "model.keras"
META_FILE = "model.json"


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """model.json of a Model artifact."""
    return read_json(Path(path) / META_FILE, f"model {path}")


def load_model(path: str | os.PathLike, compile: bool = False) -> tuple[keras.Model, dict[str, Any]]:
    """Load model.keras in safe mode (no arbitrary code) and its model.json."""
    import keras

    import components.layers  # noqa: F401  (registers our serializable layers before loading)

    path = Path(path)
    file = path / MODEL_FILE
    if not file.is_file():
        raise UserError(f"model {path}: {MODEL_FILE} not found (expected a Model artifact directory)")
    meta = read_meta(path)
    try:
        model = keras.saving.load_model(file, compile=compile, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise UserError(
                f"model {file} needs safe_mode=False to load (it holds a Lambda layer or other arbitrary code); "
                "rebuild it with `kfp-finetune backbone`"
            ) from exc
        raise UserError(f"model {file} cannot be loaded: {exc}") from exc
    return model, meta


def save_model(model: keras.Model, meta: dict[str, Any], directory: str | os.PathLike) -> None:
    """Write model.keras and model.json into `directory` (normally the temp dir of `atomic_directory`)."""
    directory = Path(directory)
    model.save(directory / MODEL_FILE)
    write_json(directory / META_FILE, meta)


def input_size(model: keras.Model, what: str | None = None) -> int:
    """S of a model taking square RGB images [None, S, S, 3]; a UserError naming `what` (or the model) otherwise."""
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[1] and shape[1] == shape[2] and shape[3] == 3):
        raise UserError(f"{what or 'model ' + model.name}: expected a square image input [None, S, S, 3], got {shape}")
    return int(shape[1])
