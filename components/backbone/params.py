"""The backbone step's parameters, each defined once (`components.core.params.Param`).

`BackboneConfig` takes its defaults from here; the `backbone` CLI options, `backbone_op` and the pipeline's
parameters are held to them by tests/unit/test_step_parameters.py. Every one shapes the model, so each pipeline
parameter feeding them is a training setting.

No TensorFlow here: the pipeline imports this module at compile time.
"""

from kfp_finetune.components.core.params import Param, int_at_least, positive

DEFAULT_BACKBONE = "mobilenet_v2"  # the production family (docs/fine-tuning.md)

BACKBONE: tuple[Param, ...] = (
    Param("name", str, DEFAULT_BACKBONE, "keras.applications backbone, e.g. mobilenet_v2, MobileNet, EfficientNetB0, "
          "resnet50 (case-insensitive)", recipe=False, pipeline="backbone"),
    Param("alpha", float, None, "width multiplier of MobileNet families, e.g. 0.25, 0.5, 1.0 (unset: the family's "
          "default; backbones without one take none)", positive, "a number > 0", optional=True, recipe=False,
          pipeline="backbone_alpha"),
    Param("image_size", int, None, "square input size in pixels the model is built for (unset: the family's "
          "default, e.g. 224)", int_at_least(1), "a positive number of pixels", optional=True, recipe=False,
          pipeline="image_size"),
    Param("weights", str, "imagenet", "imagenet | none | a weights file: local path, gs://, https://", recipe=False,
          pipeline="weights"),
    Param("weights_sha256", str, None, "expected SHA-256 of the weights file (unset: the known digest when there "
          "is one)", optional=True, recipe=False, pipeline="weights_sha256"),
    Param("fallback_to_random", bool, False, "if no ImageNet weights can be had, warn and use random init (demos "
          "only; the pipeline sets it at compile time)", recipe=False),
)
