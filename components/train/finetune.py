"""fine_tune: unfreeze the backbone (all of it by default, or its top) and train it (AdamW, warmup then cosine decay),
checkpointing every epoch (or N steps) and on SIGTERM, and resuming mid-epoch (components/train/preempt.py).
"""

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from kfp_finetune.components.core import settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import atomic_directory, check_output_dir
from kfp_finetune.components.core.modelio import input_size
from kfp_finetune.components.train import family, guard, layerwise, mixing
from kfp_finetune.components.train.callbacks import (
    _checkpoint_subdir,
    _epoch_logger,
    _tensorboard,
    _verbose,
    epochs_run,
)
from kfp_finetune.components.train.config import FineTuneConfig, TrainResult
from kfp_finetune.components.train.data import _split_sizes, class_weights_from_counts, make_dataset
from kfp_finetune.components.train.distribute import (
    Cluster,
    _output_scope,
    fit_scope,
    mixed_precision_wanted,
    pick_strategy,
    seed_everything,
    to_mixed_precision,
)
from kfp_finetune.components.train.model import (
    _backbone_size,
    _compile,
    _feature_extractor,
    unfreeze,
)
from kfp_finetune.components.train.phase import finish, log_done
from kfp_finetune.components.train.preempt import Preemption

if TYPE_CHECKING:  # pragma: no cover
    from kfp_finetune.components.core.dataset import DatasetInfo

log = logging.getLogger("kfp_finetune.train")

def _pass_through(config: FineTuneConfig) -> TrainResult:
    """fine_tune with epochs=0: copy the train_head model to the output as it is."""
    import shutil

    from kfp_finetune.components.core import modelio

    meta = modelio.read_meta(config.model)
    with atomic_directory(config.output) as tmp:
        shutil.copytree(config.model, tmp, dirs_exist_ok=True)
    log.info("fine_tune: epochs=0, the model passes through unchanged to %s", config.output)
    return TrainResult(phase=str(meta.get("phase", "train_head")), output=str(config.output),
                       class_names=list(meta.get("class_names") or []), history={}, epochs_run=0)


def _early_stopping(patience: int, averaged: bool) -> Any:
    """Keras's EarlyStopping on val_loss, restoring the best epoch. `averaged` (ema_momentum): the epoch's val_loss
    is the moving average's, so the average is what it keeps (fit writes the average into the model before the
    callbacks' on_train_end restores the best epoch)."""
    import keras

    class EarlyStopping(keras.callbacks.EarlyStopping):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            super().on_epoch_end(epoch, logs)
            if averaged and self.best_weights is not None and self.best_epoch == epoch:
                self.best_weights = guard.averaged_weights(self.model)

    return EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)


def fine_tune(config: FineTuneConfig) -> TrainResult:
    """Unfreeze the backbone (all of it, or the top `unfreeze_top` layers) and train; write a Model artifact.

    With `epochs=0` nothing trains: the input model is copied to the output unchanged (phase stays train_head).
    With a checkpoint folder (`checkpoint_dir`, else $AIP_CHECKPOINT_DIR) the state is saved every epoch (and every
    `checkpoint_every_steps` steps), and a re-run with the same arguments resumes where it stopped, mid-epoch.
    SIGTERM (preemption) saves the state after the current batch and raises `preempt.Preempted`, a SystemExit with
    status 75; the previous SIGTERM handler is back when this returns or raises (components/train/preempt.py).
    """
    from kfp_finetune.components.core import dataset

    if config.epochs == 0:
        return _pass_through(config)
    started = time.perf_counter()
    info = dataset.load_info(config.dataset)
    n_train, _ = _split_sizes(info)
    check_output_dir(config.output)
    checkpoint_root = config.checkpoint_dir or settings.vertex_checkpoint_dir()
    cluster = pick_strategy()
    ckpt = _checkpoint_subdir(config, checkpoint_root, cluster) if checkpoint_root else None
    with Preemption("fine_tune", ckpt, config.checkpoint_every_steps, config.epochs) as preemption:
        result = _fine_tune(config, info, n_train, cluster, preemption, started)
        preemption.finished()  # the output is in place: nothing left to resume
    return result


def _fine_tune(config: FineTuneConfig, info: "DatasetInfo", n_train: int, cluster: Cluster, preemption: Preemption,
               started: float) -> TrainResult:
    import keras

    from kfp_finetune.components.core import modelio

    seed_everything(config.seed, config.determinism)
    mixed = mixed_precision_wanted()
    with cluster.strategy.scope():
        model, meta = modelio.load_model(config.model)
        _feature_extractor(model, f"--model {config.model}")
        if meta.get("class_names") is not None and list(meta["class_names"]) != list(info.class_names):
            raise UserError(f"class names differ: the dataset has {list(info.class_names)}, the model "
                            f"{config.model} was trained on {list(meta['class_names'])}; use the same dataset")
        if model.output_shape[-1] != info.num_classes:
            raise UserError(f"--model outputs {model.output_shape[-1]} classes, the dataset has {info.num_classes}")
        chosen, sources = family.resolve(
            {"learning_rate": config.learning_rate, "batch_norm": config.batch_norm}, family.backbone_family(meta))
        learning_rate, batch_norm = chosen["learning_rate"], chosen["batch_norm"]
        unfrozen = unfreeze(model, config.unfreeze_top, config.unfreeze_from, batch_norm)
        if mixed:
            model = to_mixed_precision(model)
        size = input_size(model)
        steps_per_epoch = math.ceil(n_train / config.batch_size)
        warmup = config.warmup_epochs * steps_per_epoch
        total = config.epochs * steps_per_epoch
        if warmup:
            schedule = keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=max(1, total - warmup), warmup_target=learning_rate, warmup_steps=warmup)
        else:
            schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, total))
        ema = {"use_ema": True, "ema_momentum": config.ema_momentum} if config.ema_momentum else {}
        mixed_batches = mixing.enabled(config.mixup_alpha, config.cutmix_alpha)
        _compile(model, layerwise.layerwise_adamw(model, config.layer_lr_ratio, learning_rate=schedule, **ema),
                 label_smoothing=config.label_smoothing, soft_targets=mixed_batches)

    head_training = (meta.get("training") or {}).get("train_head") or {}
    class_weight = class_weights_from_counts(info) if head_training.get("class_weights", "auto") == "auto" else None
    history: dict[str, list[float]] = {}
    val_ds = make_dataset(info, "validation", size, config.batch_size, training=False)
    # The guard's epoch 0: the starting model, measured before any checkpoint is restored into it (this also builds
    # the compiled metrics, whose running sums a mid-epoch checkpoint restores).
    with fit_scope(model, cluster):
        start = guard.measure(model, val_ds)
    keeper = guard.best_epoch_keeper(start, model.get_weights(), averaged=bool(config.ema_momentum))
    log.info("fine_tune starts from validation accuracy %.4f, loss %.4f", start.accuracy, start.loss)
    stopper = (_early_stopping(config.early_stopping_patience, averaged=bool(config.ema_momentum))
               if config.early_stopping_patience else None)
    # Weights, optimizer (and so the LR schedule), seed generators, the epoch's metric sums, history, guard and
    # early stopping: the position of the newest checkpoint, mid-epoch included.
    preemption.attach(model, steps_per_epoch, history, keeper=keeper, early_stopping=stopper)
    resumed = preemption.resume()
    initial_epoch = resumed.epoch if resumed else 0
    if resumed is not None and resumed.step:
        preemption.wrap(model)

    epoch_seconds: list[float] = []
    with _output_scope(config.output, cluster) as tmp:
        callbacks: list[Any] = [
            _epoch_logger("fine_tune", config.epochs, history, epoch_seconds),
            keeper,
            *_tensorboard("fine_tune", tmp, cluster.is_chief),
        ]
        if config.ema_momentum:
            # Validation scores the averaged weights (swapped in around it); fit ends by writing the average into
            # the model, so the guard's final score, like every epoch's, is the average's.
            callbacks.insert(0, keras.callbacks.SwapEMAWeights())
        if stopper is not None:
            callbacks.append(stopper)
        callbacks.append(preemption.callback())  # last: the history and the guard have seen the epoch it saves
        log.info("fine_tune: top %d of %d backbone layers unfrozen, batch norm %s (%s), lr %.3g (%s; warmup %d "
                 "epochs%s), %d epochs%s%s", len(unfrozen), _backbone_size(model), batch_norm, sources["batch_norm"],
                 learning_rate, sources["learning_rate"], config.warmup_epochs,
                 f"; layer-wise down to {config.layer_lr_ratio:g}x at the first backbone layer"
                 if config.layer_lr_ratio != 1.0 else "", config.epochs,
                 f", weights averaged (EMA momentum {config.ema_momentum})" if config.ema_momentum else "",
                 f", batches mixed ({mixing.describe(config.mixup_alpha, config.cutmix_alpha)})"
                 if mixed_batches else "")
        # One worker: each epoch's order is a function of (seed, epoch), so a resumed run sees the same batches.
        train_ds = make_dataset(info, "train", size, config.batch_size, training=True, seed=config.seed,
                                ordered=config.determinism != "off",
                                epoch=preemption.epoch if cluster.num_workers == 1 else None)
        if mixed_batches:  # soft targets; the class weights become each mixed example's sample weight
            train_ds = mixing.mix_batches(train_ds, num_classes=info.num_classes, mixup_alpha=config.mixup_alpha,
                                          cutmix_alpha=config.cutmix_alpha, seed=config.seed,
                                          epoch=preemption.epoch if cluster.num_workers == 1 else None,
                                          class_weight=class_weight)
        with fit_scope(model, cluster):
            model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                      class_weight=None if mixed_batches else class_weight, callbacks=callbacks, verbose=_verbose(),
                      shuffle=False)
            decision = guard.apply(model, val_ds, start, keeper)

        result = finish("fine_tune", config, model, info=info, cluster=cluster, history=history,
                        epoch_seconds=epoch_seconds, started=started, mixed=mixed, meta=meta, directory=tmp,
                        training={"unfrozen_layers": len(unfrozen), "class_weight": class_weight,
                                  **preemption.summary(), "effective": chosen,
                                  "effective_from": sources, "guard": decision.to_dict()},
                        epochs_run=epochs_run(history, initial_epoch), initial_epoch=initial_epoch,
                        guard=decision.to_dict())
    if decision.kept != guard.KEPT_FINAL:  # the metrics of the model returned, not of the last epoch
        kept = decision.start if decision.kept == guard.KEPT_START else decision.best
        result.metrics.update(val_accuracy=kept.accuracy, val_loss=kept.loss)
    log_done(result, config.output, cluster)
    return result
