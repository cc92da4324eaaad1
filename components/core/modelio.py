"""Reading and writing the Model artifact: DIR/model.keras + DIR/model.json.

model.keras is written so that plain Keras opens it: `keras.saving.load_model(path)` in an environment without
this package, in safe mode (built-in layers only, see components.core.layers) and without compile information (the
model is saved uncompiled, so no custom loss or optimizer state travels in the file; every training step compiles
its own).

Models written before the built-in preprocessing block hold the custom `kfp_finetune>Preprocess` layer. They
still load here (the layer is swapped for the built-in block on load), and

    python -m kfp_finetune.components.core.modelio upgrade OLD_MODEL_DIR NEW_MODEL_DIR

writes the plain-Keras form of one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import atomic_directory, read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    import keras

log = logging.getLogger("kfp_finetune.modelio")

MODEL_FILE = "model.keras"
META_FILE = "model.json"
PIXEL_ENDPOINT = "predict_pixels"  # an export's second endpoint: decoded pixels in, probabilities out (predict)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """model.json of a Model artifact."""
    return read_json(Path(path) / META_FILE, f"model {path}")


def load_model(path: str | os.PathLike, compile: bool = False) -> tuple[keras.Model, dict[str, Any]]:
    """Load model.keras in safe mode (no arbitrary code) and its model.json.

    A model with the legacy custom preprocessing layer comes back with the built-in block in its place.
    """
    import keras

    from kfp_finetune.components.core import layers  # registers the legacy layer before loading

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
    if layers.has_legacy(model):
        log.info("model %s holds the legacy kfp_finetune>Preprocess layer: using the built-in block instead "
                 "(`python -m kfp_finetune.components.core.modelio upgrade` rewrites the file for plain Keras)", file)
        model = layers.upgrade_legacy(model)
    return model, meta


def uncompiled(model: keras.Model) -> keras.Model:
    """`model` without compile information or optimizer state (a weight-sharing-free copy when it was compiled)."""
    if not getattr(model, "compiled", False) and getattr(model, "optimizer", None) is None:
        return model
    # from_config, not keras.models.clone_model: a clone of a compiled model is compiled again
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def save_model(model: keras.Model, meta: dict[str, Any], directory: str | os.PathLike) -> None:
    """Write model.keras and model.json into `directory` (normally the temp dir of `atomic_directory`).

    The file is plain Keras: legacy preprocessing is replaced by the built-in block, and the model is saved
    uncompiled (no custom loss in the compile config, no optimizer state).
    """
    from kfp_finetune.components.core import layers

    directory = Path(directory)
    uncompiled(layers.upgrade_legacy(model)).save(directory / MODEL_FILE)
    write_json(directory / META_FILE, meta)


def upgrade(source: str | os.PathLike, output: str | os.PathLike) -> None:
    """Rewrite a Model artifact (model.keras + model.json) in the plain-Keras form into the new folder `output`."""
    model, meta = load_model(source)
    with atomic_directory(output) as tmp:
        save_model(model, meta, tmp)
    log.info("wrote the plain-Keras form of %s to %s", source, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfp_finetune.components.core.modelio",
                                     description="Model artifact maintenance.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help="rewrite a model written by an older version so plain Keras loads it")
    up.add_argument("source", help="Model artifact directory (model.keras + model.json)")
    up.add_argument("output", help="new directory to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        upgrade(args.source, args.output)
    except UserError as exc:
        print(f"modelio: error: {exc}", file=sys.stderr)
        return 2
    return 0


def input_size(model: keras.Model, what: str | None = None) -> int:
    """S of a model taking square RGB images [None, S, S, 3]; a UserError naming `what` (or the model) otherwise."""
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[1] and shape[1] == shape[2] and shape[3] == 3):
        raise UserError(f"{what or 'model ' + model.name}: expected a square image input [None, S, S, 3], got {shape}")
    return int(shape[1])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
