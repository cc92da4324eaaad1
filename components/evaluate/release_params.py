"""The parameters of the release steps (evaluate's calibration, export's TFLite/LiteRT models), each defined once.

Same form as the training parameters (`components.train.params.Param`): the step configs take their defaults and
checks from here, the CLI options are generated from here (`add_arguments`), and the KFP components and the
pipeline spell them out (KFP reads signatures from the source), held to these definitions by
tests/unit/test_release_params.py. `Param.pipeline` names the pipeline parameter that feeds each one.

No TensorFlow here: the pipeline imports this module at compile time.
"""

import math
from typing import Any

from kfp_finetune.components.train.params import Param

TFLITE_MODES = ("none", "fp16", "int8", "both")


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _ratio(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


EVALUATE: tuple[Param, ...] = (
    Param("calibrate", bool, True,
          "fit a temperature T on the validation split (minimising NLL); export serves softmax(log(p) / T)",
          _bool, "true or false", recipe=False, pipeline="calibrate"),
    Param("max_ece", float, 1.0,
          "bless only if the expected calibration error (15 equal-width bins, test split) of the served "
          "probabilities is at most this; 1: no such rule", _ratio, "a number in [0, 1]", recipe=False,
          pipeline="max_ece"),
)

EXPORT: tuple[Param, ...] = (
    Param("tflite", str, "none",
          "also write LiteRT models for phones: fp16 (float16 weights), int8 (full-integer, uint8 image input), both",
          choices=TFLITE_MODES, recipe=False, pipeline="tflite"),
    Param("max_tflite_drop", float, 0.01,
          "push a .tflite with the version only if its test accuracy is at most this below the Keras model's",
          _ratio, "a number in [0, 1]", recipe=False, pipeline="max_tflite_drop"),
    Param("tflite_required", bool, False,
          "fail the export (nothing pushed) when a requested .tflite fails to convert or to pass max_tflite_drop; "
          "default: the SavedModel ships without it and export.json says why", _bool, "true or false", recipe=False,
          pipeline="tflite_required"),
)


def tflite_variants(mode: str) -> tuple[str, ...]:
    """The LiteRT models a `tflite` mode asks for."""
    return {"none": (), "fp16": ("fp16",), "int8": ("int8",), "both": ("fp16", "int8")}[mode]
