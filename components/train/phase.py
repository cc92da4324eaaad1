"""What both training phases do when the model has trained: the TrainResult, model.json and the float32 save."""

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.train.callbacks import _final_metrics, _format_logs
from kfp_finetune.components.train.config import TrainResult
from kfp_finetune.components.train.distribute import Cluster
from kfp_finetune.components.train.model import _save, trainable_layer_names

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from kfp_finetune.components.core.dataset import DatasetInfo

log = logging.getLogger("kfp_finetune.train")


def finish(
    phase: str, config: Any, model: "keras.Model", *, info: "DatasetInfo", cluster: Cluster,
    history: dict[str, list[float]], epoch_seconds: list[float], started: float, mixed: bool, meta: dict[str, Any],
    directory: Path, training: dict[str, Any], **result_fields: Any,
) -> TrainResult:
    """Build the phase's TrainResult and save `model` with `meta` updated for this phase into `directory`.

    `meta`: the input model's model.json; `training`: this phase's entries in model.json `training` besides its
    config and the environment; `result_fields`: TrainResult fields besides the common ones.
    """
    result = TrainResult(
        phase=phase, output=config.output if cluster.is_chief else "", class_names=list(info.class_names),
        history=history, metrics=_final_metrics(history), trainable_layers=trainable_layer_names(model),
        strategy=cluster.name, replicas=cluster.strategy.num_replicas_in_sync, epoch_seconds=epoch_seconds,
        **result_fields,
    )
    out = dict(meta)
    out.update(
        phase=phase,
        class_names=list(info.class_names),
        trainable_layers=result.trainable_layers,
        history={**(meta.get("history") or {}), phase: history},
        training={**(meta.get("training") or {}), phase: {
            **asdict(config), **training, "strategy": cluster.name, "replicas": result.replicas,
            "mixed_precision": mixed, "dataset_examples": info.num_examples}},
    )
    result.seconds = time.perf_counter() - started
    out["training"][phase]["seconds"] = round(result.seconds, 2)
    # The data this model was trained on (the retraining loop's fingerprint, recorded by ingest).
    out.update(data_fingerprint=info.report.get("data_fingerprint"), data_source=info.report.get("source"))
    _save(model, out, directory, mixed)
    return result


def log_done(result: TrainResult, output: str, cluster: Cluster) -> None:
    log.info("%s done in %.1fs: %s%s", result.phase, result.seconds, _format_logs(result.metrics),
             f" -> {output}" if cluster.is_chief else " (not the chief: nothing written)")
