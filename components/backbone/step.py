"""The backbone step: any keras.applications image backbone, frozen-ready, as a Model artifact.

    kfp-finetune backbone --name NAME [--alpha A] [--image-size N] [--weights imagenet|none|URI]
                          [--weights-sha256 HEX] --output DIR

The output model (`feature_extractor`) takes raw RGB pixels (0..255) of the chosen size, applies the family's
preprocessing (`components.core.layers.preprocessing_block`: built-in Keras layers in the nested model `preprocess`, so
model.keras loads with plain Keras), runs the keras.applications model without its
top (the nested model `backbone`, Keras's own layer names inside) and pools to a vector (layer `pool`).

The registry of backbones is derived from `keras.applications` itself: every public constructor taking
`include_top` and `weights`. Each family's preprocessing is found by probing the family's own `preprocess_input`,
its default/minimum input size by asking Keras's `obtain_input_shape`, and its ImageNet weights file name and hash by
letting Keras's constructor ask for the file (`file_utils.get_file`), which we answer from, in order, the Keras cache,
the mirror (KFP_FINETUNE_WEIGHTS_MIRROR) and the public URL (with a short timeout).
"""

# No `from __future__ import annotations`: KFP reads backbone_op's annotations as real types.
import argparse
import functools
import inspect
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp import dsl
from kfp.dsl import Model, Output

from kfp_finetune.components.backbone.params import BACKBONE
from kfp_finetune.components.backbone.weights import (  # noqa: F401  (_check: tested through this module)
    WeightsFile,
    _answer_get_file,
    _check,
    resolve_imagenet,
    resolve_uri,
)
from kfp_finetune.components.core import compat, faults, settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import atomic_directory
from kfp_finetune.components.core.params import add_arguments, by_name

log = logging.getLogger(__name__)

WEIGHT_SOURCES = ("imagenet", "none")
# Alphas for which Keras publishes ImageNet weights (mirrors the checks in keras/src/applications/mobilenet*.py;
# with --weights none any positive alpha builds).
IMAGENET_ALPHAS: dict[str, tuple[float, ...]] = {
    "mobilenet": (0.25, 0.5, 0.75, 1.0),
    "mobilenet_v2": (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
    "mobilenet_v3": (0.75, 1.0),
}


# --- the registry ------------------------------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """'MobileNetV2', 'mobilenet_v2', 'mobilenet-v2' -> 'mobilenetv2'."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


@dataclass(frozen=True)
class BackboneSpec:
    """One keras.applications constructor and what we know about its family."""

    keras_name: str
    family: str  # the keras.applications submodule, e.g. "mobilenet_v2"
    constructor: Callable[..., Any] = field(repr=False, compare=False)
    has_alpha: bool

    @property
    def module(self) -> Any:
        import importlib

        return importlib.import_module(self.constructor.__module__)

    @property
    def preprocessing(self) -> str:
        return _probe_preprocessing(self.family, self.module.preprocess_input)

    @property
    def default_size(self) -> int:
        return _probe_sizes(self.keras_name)[0]

    @property
    def min_size(self) -> int:
        return _probe_sizes(self.keras_name)[1]

    @property
    def imagenet_alphas(self) -> tuple[float, ...] | None:
        return IMAGENET_ALPHAS.get(self.family) if self.has_alpha else None


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, BackboneSpec]:
    """Every keras.applications image backbone, keyed by normalized name."""
    import keras

    specs: dict[str, BackboneSpec] = {}
    for attr in sorted(dir(keras.applications)):
        ctor = getattr(keras.applications, attr)
        if attr.startswith("_") or inspect.ismodule(ctor) or not callable(ctor):
            continue
        try:
            params = inspect.signature(ctor).parameters
        except (TypeError, ValueError):
            continue
        if "include_top" not in params or "weights" not in params:
            continue
        family = ctor.__module__.rsplit(".", 1)[-1]
        specs[normalize_name(attr)] = BackboneSpec(attr, family, ctor, "alpha" in params)
    return specs


def valid_names() -> list[str]:
    return sorted(spec.keras_name for spec in registry().values())


def lookup(name: str) -> BackboneSpec:
    """The spec for NAME (case-insensitive, Keras spelling or snake case); UserError listing valid names."""
    spec = registry().get(normalize_name(name))
    if spec is None:
        raise UserError(
            f"--name {name!r} is not a keras.applications backbone; valid names (case-insensitive, snake case too): "
            + ", ".join(valid_names())
        )
    return spec


def _reference_preprocessing(x: Any, mode: str) -> Any:
    import numpy as np

    from kfp_finetune.components.core import layers

    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        return (x / 255.0 - np.array(layers.TORCH_MEAN)) / np.array(layers.TORCH_STD)
    if mode == "caffe":
        return x[..., ::-1] - np.array(layers.CAFFE_MEAN_BGR)
    return x


@functools.cache
def _probe_preprocessing(family: str, preprocess_input: Callable[..., Any]) -> str:
    """Which of our modes the family's own `preprocess_input` computes (checked on a probe array)."""
    import numpy as np

    from kfp_finetune.components.core.layers import PREPROCESSING_MODES

    probe = np.array([[[[0.0, 128.0, 255.0], [10.0, 20.0, 30.0], [200.0, 100.0, 50.0]]]], dtype="float32")
    got = np.asarray(preprocess_input(probe.copy()), dtype="float64")
    for mode in PREPROCESSING_MODES:
        if np.allclose(got, _reference_preprocessing(probe.astype("float64"), mode), atol=1e-4):
            return mode
    raise UserError(f"backbone family {family!r}: its preprocess_input matches none of {PREPROCESSING_MODES}")


@functools.cache
def _probe_sizes(keras_name: str) -> tuple[int, int]:
    """(default input size, minimum input size) as the constructor passes them to Keras's obtain_input_shape."""
    return compat.keras_application_sizes(keras_name)


# --- configuration -----------------------------------------------------------------------------------------------


_DEFAULT = {name: p.default for name, p in by_name(BACKBONE).items()}


@dataclass(frozen=True)
class BackboneConfig:
    """What to build. `alpha`/`image_size` None = the family's default; weights: imagenet | none | a URI."""

    output: str
    # The parameters (components/backbone/params.py defines their defaults, help and checks).
    name: str = _DEFAULT["name"]
    alpha: float | None = _DEFAULT["alpha"]
    image_size: int | None = _DEFAULT["image_size"]
    weights: str = _DEFAULT["weights"]
    weights_sha256: str | None = _DEFAULT["weights_sha256"]
    fallback_to_random: bool = _DEFAULT["fallback_to_random"]

    def __post_init__(self) -> None:
        spec = lookup(self.name)
        weights = str(self.weights or "").strip()
        if not weights:
            raise UserError("--weights is empty; use imagenet, none, or a weights file URI (path, gs://, https://)")
        if weights.lower() in WEIGHT_SOURCES:
            weights = weights.lower()
        object.__setattr__(self, "weights", weights)

        if self.alpha is not None:
            if not spec.has_alpha:
                raise UserError(f"--alpha: {spec.keras_name} has no width multiplier; leave --alpha out")
            alpha = float(self.alpha)
            if not alpha > 0:
                raise UserError(f"--alpha {self.alpha} must be positive")
            allowed = spec.imagenet_alphas
            if weights == "imagenet" and allowed and not any(abs(alpha - a) < 1e-9 for a in allowed):
                raise UserError(
                    f"--alpha {alpha:g}: {spec.keras_name} ImageNet weights exist for alpha "
                    f"{', '.join(f'{a:g}' for a in allowed)}; pick one or use --weights none"
                )
            object.__setattr__(self, "alpha", alpha)
        elif spec.has_alpha:
            object.__setattr__(self, "alpha", 1.0)

        if self.image_size is None:
            object.__setattr__(self, "image_size", spec.default_size)
        else:
            size = int(self.image_size)
            if size != self.image_size or size < spec.min_size:
                raise UserError(
                    f"--image-size {self.image_size}: {spec.keras_name} needs a whole number of at least "
                    f"{spec.min_size} (default {spec.default_size})"
                )
            object.__setattr__(self, "image_size", size)

        if self.weights_sha256 is not None:
            digest = str(self.weights_sha256).strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise UserError(f"--weights-sha256 {self.weights_sha256!r} is not 64 hex digits")
            if weights == "none":
                raise UserError("--weights-sha256 makes no sense with --weights none; leave it out")
            object.__setattr__(self, "weights_sha256", digest)
        if weights not in WEIGHT_SOURCES and not re.match(r"^(gs|https?|file)://", weights):
            if not Path(weights).expanduser().is_file():
                raise UserError(
                    f"--weights {weights}: no such file (use imagenet, none, a local file, gs:// or https:// URI)"
                )
        if not str(self.output).strip():
            raise UserError("--output is empty; give the directory to write the Model artifact to")

    @property
    def spec(self) -> BackboneSpec:
        return lookup(self.name)


@dataclass(frozen=True)
class BackboneResult:
    output: Path
    keras_name: str
    input_size: int
    preprocessing: str
    weights_source: str
    weights_sha256: str | None
    param_count: int
    layer_count: int
    meta: dict[str, Any] = field(repr=False)
    model: Any = field(default=None, repr=False, compare=False)  # the in-memory keras.Model that was saved


# --- building ----------------------------------------------------------------------------------------------------


def _construct(spec: BackboneSpec, config: BackboneConfig, weights: str | None) -> Any:
    kwargs: dict[str, Any] = dict(
        include_top=False, weights=weights, input_shape=(config.image_size, config.image_size, 3), name="backbone"
    )
    if spec.has_alpha:
        kwargs["alpha"] = config.alpha
    try:
        return spec.constructor(**kwargs)
    except UserError:
        raise
    except ValueError as exc:
        raise UserError(
            f"{spec.keras_name} (alpha {config.alpha}, size {config.image_size}, weights {config.weights}) "
            f"cannot be built: {' '.join(str(exc).split())}"
        ) from exc


def _load_weights_file(base: Any, spec: BackboneSpec, config: BackboneConfig, weights: WeightsFile) -> None:
    suffix = weights.path.name
    if not suffix.endswith((".h5", ".hdf5", ".keras")):
        raise UserError(f"--weights {weights.uri}: expected a .h5, .weights.h5 or .keras weights file")
    try:
        base.load_weights(weights.path)
    except Exception as exc:  # ValueError for mismatched layers/shapes, OSError for a non-HDF5 file
        raise UserError(
            f"--weights {weights.uri} does not fit {spec.keras_name} (alpha {config.alpha}, size "
            f"{config.image_size}, no top): {' '.join(str(exc).split())[:300]}"
        ) from exc


@faults.stops_cleanly("backbone")
def build_backbone(config: BackboneConfig) -> BackboneResult:
    """Build the feature extractor for `config` and write it (model.keras + model.json) to `config.output`."""
    import keras

    from kfp_finetune.components.core import modelio
    from kfp_finetune.components.core.layers import preprocessing_block

    spec = config.spec
    size = config.image_size
    preprocessing = spec.preprocessing
    log.info(
        "building %s (family %s, alpha %s, %dx%d, preprocessing %s, weights %s)",
        spec.keras_name, spec.family, config.alpha, size, size, preprocessing, config.weights,
    )
    with atomic_directory(config.output) as tmp:
        resolved: list[WeightsFile] = []
        warning = None
        if config.weights == "imagenet":

            def handler(fname: str | None = None, origin: str | None = None, file_hash: str | None = None,
                        md5_hash: str | None = None, **_: Any) -> str:
                hit = resolve_imagenet(str(fname), str(origin), file_hash or md5_hash, spec.family,
                                       config.weights_sha256)
                log.info("weights %s from %s (%s)", hit.file, hit.source, hit.uri)
                resolved.append(hit)
                return str(hit.path)

            try:
                with _answer_get_file(handler):
                    base = _construct(spec, config, "imagenet")
            except UserError as exc:
                if not config.fallback_to_random or resolved:
                    raise
                warning = f"no ImageNet weights could be had, so the backbone is RANDOMLY INITIALISED: {exc}"
                log.warning("!!! %s", warning)
                base = _construct(spec, config, None)
        elif config.weights == "none":
            base = _construct(spec, config, None)
        else:
            with tempfile.TemporaryDirectory(prefix="weights-", dir=tmp) as workdir:
                hit = resolve_uri(config.weights, Path(workdir), config.weights_sha256)
                base = _construct(spec, config, None)
                _load_weights_file(base, spec, config, hit)
            resolved.append(hit)

        pixels = keras.Input(shape=(size, size, 3), dtype="float32", name="pixels")
        x = preprocessing_block(preprocessing, size)(pixels)
        x = base(x)
        features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        model = keras.Model(pixels, features, name="feature_extractor")

        if resolved:
            hit = resolved[-1]
            weights_meta = dict(source=hit.source, file=hit.file, uri=hit.uri, sha256=hit.sha256,
                                verified=hit.verified, note=hit.note)
        else:
            source = "random-fallback" if warning else "none"
            weights_meta = dict(source=source, file=None, uri=None, sha256=None, verified=False,
                                note="random initialisation")
            if warning:
                weights_meta["warning"] = warning
        meta = {
            "phase": "backbone",
            "input_size": size,
            "class_names": None,
            "backbone": {
                "name": config.name,
                "keras_name": spec.keras_name,
                "family": spec.family,
                "alpha": config.alpha,
                "input_size": size,
                "preprocessing": preprocessing,
                "layer_count": len(base.layers),
                "param_count": int(model.count_params()),
                "output_dim": int(features.shape[-1]),
                "weights": weights_meta,
            },
        }
        modelio.save_model(model, meta, tmp)
    log.info("wrote %s (%d parameters, %d backbone layers)", config.output, meta["backbone"]["param_count"],
             meta["backbone"]["layer_count"])
    return BackboneResult(
        output=Path(config.output), keras_name=spec.keras_name, input_size=size, preprocessing=preprocessing,
        weights_source=weights_meta["source"], weights_sha256=weights_meta["sha256"],
        param_count=meta["backbone"]["param_count"], layer_count=meta["backbone"]["layer_count"], meta=meta,
        model=model,
    )


# --- CLI -----------------------------------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "backbone",
        help="build a frozen-ready keras.applications feature extractor (Model artifact)",
        description="Build a keras.applications backbone without its top, with its preprocessing inside, pooled to "
        "a feature vector; write model.keras + model.json to --output. ImageNet weights come from the Keras cache, "
        "then KFP_FINETUNE_WEIGHTS_MIRROR (a folder or gs:// prefix with Keras's file names), then the public URL.",
    )
    add_arguments(parser, BACKBONE)
    parser.add_argument("--output", required=True, help="directory to write (must not exist or be empty)")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    config = BackboneConfig(
        name=args.name, output=args.output, alpha=args.alpha, image_size=args.image_size, weights=args.weights,
        weights_sha256=args.weights_sha256, fallback_to_random=args.fallback_to_random,
    )
    result = build_backbone(config)
    weights = result.meta["backbone"]["weights"]
    log.info("backbone %s %dx%d weights=%s %s sha256=%s -> %s", result.keras_name, result.input_size,
             result.input_size, weights["source"], weights["file"] or "", weights["sha256"] or "-", result.output)
    return 0


# --- KFP component -------------------------------------------------------------------------------------------------


@dsl.component(base_image=settings.component_image(), install_kfp_package=False)
def backbone_op(
    model: Output[Model],
    name: str = "mobilenet_v2",
    alpha: float = 0.0,
    image_size: int = 0,
    weights: str = "imagenet",
    weights_sha256: str = "",
    fallback_to_random: bool = False,
) -> None:
    """Build a keras.applications feature extractor as a Model artifact.

    Args:
        name: keras.applications backbone name (case-insensitive, Keras spelling or snake case).
        model: output Model artifact directory (model.keras + model.json).
        alpha: width multiplier for MobileNet families; 0 = the family's default.
        image_size: input size in pixels; 0 = the family's default.
        weights: "imagenet", "none", or a weights file URI (local path, gs://, https://).
        weights_sha256: expected SHA-256 of the weights file; "" = not checked beyond Keras's own hash.
        fallback_to_random: demo only: if ImageNet weights cannot be had, warn and use random init.
    """
    from kfp_finetune.components.backbone.step import BackboneConfig, build_backbone

    result = build_backbone(
        BackboneConfig(
            name=name, output=model.path, alpha=alpha or None, image_size=image_size or None, weights=weights,
            weights_sha256=weights_sha256 or None, fallback_to_random=fallback_to_random,
        )
    )
    model.metadata.update(
        {
            "backbone": result.keras_name,
            "input_size": result.input_size,
            "preprocessing": result.preprocessing,
            "weights_source": result.weights_source,
            "weights_sha256": result.weights_sha256 or "",
            "param_count": result.param_count,
        }
    )
