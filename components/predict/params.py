"""The predict step's parameters, each defined once (`components.core.params.Param`).

`PredictConfig` takes its defaults from here; the `predict` CLI options, `predict_op` and the batch-prediction
pipeline are held to them by tests/unit/test_step_parameters.py. Predict trains nothing: none is a training setting.

No TensorFlow here: the pipelines import this module at compile time.
"""

from kfp_finetune.components.core.params import Param, int_at_least

MAX_BATCH = 4096

PREDICT: tuple[Param, ...] = (
    Param("top_k", int, 3, "classes (with probabilities) per row", int_at_least(1), "a whole number >= 1",
          recipe=False, pipeline="top_k", training=False),
    Param("batch_size", int, 32, "images per forward pass", lambda v: int_at_least(1)(v) and v <= MAX_BATCH,
          f"1..{MAX_BATCH}", recipe=False, training=False),
    Param("workers", int, 0, "reader threads (0: the CPU count)", int_at_least(0), "an integer >= 0",
          recipe=False, training=False),
)
