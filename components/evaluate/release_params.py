"""The release steps' parameters (evaluate: blessing, champion, calibration; export: push, LiteRT), each defined once.

Same form as the training parameters (`components.core.params.Param`): the step configs take their defaults and
checks from here, the CLI options are generated from here (`add_arguments`), and the KFP components and the
pipeline spell them out (KFP reads signatures from the source), held to these definitions by
tests/unit/test_step_parameters.py. `Param.pipeline` names the pipeline parameter that feeds each one.

No TensorFlow here: the pipeline imports this module at compile time.
"""

from kfp_finetune.components.core.params import Param, boolean, ratio

TFLITE_MODES = ("none", "fp16", "int8", "both")
CLASS_CHANGE_POLICIES = ("bless", "refuse")

# Every parameter here decides whether or where a model ships, not how it is trained: none is a training setting.
PUSH_TO = Param("push_to", str, None,
                "where a blessed export is pushed as a new version (local folder or gs:// prefix); its LATEST is the "
                "champion", optional=True, recipe=False, pipeline="push_to", training=False)

EVALUATE: tuple[Param, ...] = (
    Param("split", str, "test", "the split to evaluate on", recipe=False, training=False),
    Param("min_accuracy", float, 0.7, "bless only at or above this accuracy", ratio, "a number in [0, 1]",
          recipe=False, pipeline="min_accuracy", training=False),
    Param("baseline_model", str, None,
          "a Model artifact or pushed version (local or gs://) the candidate must not fall behind; none: no "
          "comparison (unset: champion_from's LATEST)", optional=True, recipe=False, pipeline="baseline_model",
          training=False),
    Param("max_regression", float, 0.0, "how far below the baseline's accuracy the candidate may be and still be "
          "blessed", ratio, "a number in [0, 1]", recipe=False, pipeline="max_regression", training=False),
    Param("champion_from", str, None, "a push destination: its LATEST version is the baseline unless "
          "baseline_model names one", optional=True, recipe=False, pipeline="push_to", training=False),
    Param("class_change", str, "bless", "when the champion's classes differ from the dataset's: bless on "
          "thresholds, or refuse", choices=CLASS_CHANGE_POLICIES, recipe=False, pipeline="class_change",
          training=False),
    Param("max_class_regression", float, 1.0, "how far any class's recall may drop against the baseline (1: no "
          "per-class rule)", ratio, "a number in [0, 1]", recipe=False, pipeline="max_class_regression",
          training=False),
    Param("calibrate", bool, True,
          "fit a temperature T on the validation split (minimising NLL); export serves softmax(log(p) / T)",
          boolean, "true or false", recipe=False, pipeline="calibrate", training=False),
    Param("max_ece", float, 1.0,
          "bless only if the expected calibration error (15 equal-width bins, test split) of the served "
          "probabilities is at most this; 1: no such rule", ratio, "a number in [0, 1]", recipe=False,
          pipeline="max_ece", training=False),
)

EXPORT: tuple[Param, ...] = (
    PUSH_TO,
    Param("run_id", str, None, "the pushed version's folder name (unset: named at push time, a UTC timestamp in ms)",
          optional=True, recipe=False, training=False),
    Param("tflite", str, "none",
          "also write LiteRT models for phones: fp16 (float16 weights), int8 (full-integer, uint8 image input), both",
          choices=TFLITE_MODES, recipe=False, pipeline="tflite", training=False),
    Param("max_tflite_drop", float, 0.01,
          "push a .tflite with the version only if its test accuracy is at most this below the Keras model's",
          ratio, "a number in [0, 1]", recipe=False, pipeline="max_tflite_drop", training=False),
    Param("tflite_required", bool, False,
          "fail the export (nothing pushed) when a requested .tflite fails to convert or to pass max_tflite_drop; "
          "default: the SavedModel ships without it and export.json says why", boolean, "true or false",
          recipe=False, pipeline="tflite_required", training=False),
)


def tflite_variants(mode: str) -> tuple[str, ...]:
    """The LiteRT models a `tflite` mode asks for."""
    return {"none": (), "fp16": ("fp16",), "int8": ("int8",), "both": ("fp16", "int8")}[mode]
