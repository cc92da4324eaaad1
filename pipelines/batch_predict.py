"""The batch-prediction pipeline (`kfp-finetune compile --batch-predict`): one step, `predict`, that classifies
every image under `input_uri` with the model `push_to/LATEST` names (or `model_uri`, when given) and writes the
predictions as a Dataset artifact (predictions.jsonl or .csv).

It is the batch counterpart of the training pipeline's push: the training pipeline moves LATEST, and a scheduled
batch-prediction run picks the new version up by itself.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as real types.

import os
from pathlib import Path
from typing import Any

from kfp_finetune.pipelines.pipeline import CompileOptions, _with_image, write_compiled

PIPELINE_NAME = "kfp-finetune-batch-predict"


def build_batch_predict_pipeline(options: CompileOptions | None = None) -> Any:
    """The batch-prediction pipeline function, its step on `options.image`."""
    from kfp import dsl

    from kfp_finetune.components.predict.step import predict_op

    options = options or CompileOptions()
    predict_step = _with_image(predict_op, options.image, "predict")

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Classify every image under input_uri with the model push_to/LATEST names "
                              "(or model_uri); one row per file in a predictions Dataset.")
    def batch_predict_pipeline(input_uri: str, push_to: str = "", model_uri: str = "", top_k: int = 3,
                               output_format: str = "jsonl") -> None:
        # model_uri wins when given; otherwise the push destination, whose LATEST predict_op resolves itself.
        with dsl.If(model_uri != "", name="explicit-model"):
            explicit = predict_step(model_uri=model_uri, input_uri=input_uri, top_k=top_k,
                                    output_format=output_format)
            explicit.set_display_name("predict (model_uri)")
            explicit.set_cpu_request(options.cpu).set_memory_request(options.memory)
        with dsl.Else(name="latest-model"):
            latest = predict_step(model_uri=push_to, input_uri=input_uri, top_k=top_k, output_format=output_format)
            latest.set_display_name("predict (push_to/LATEST)")
            latest.set_cpu_request(options.cpu).set_memory_request(options.memory)

    return batch_predict_pipeline


def compile_batch_predict(output: str | os.PathLike, options: CompileOptions | None = None) -> Path:
    """Compile the batch-prediction pipeline to IR YAML at `output` (written atomically); returns the path."""
    return write_compiled(build_batch_predict_pipeline(options), output, "batch_predict.yaml")
