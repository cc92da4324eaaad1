"""train_head: a new classification head on the frozen backbone (on cached features when nothing augments)."""

import logging
import math
import time
from typing import TYPE_CHECKING

from kfp_finetune.components.core import settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.core.fsutil import check_output_dir
from kfp_finetune.components.core.modelio import input_size
from kfp_finetune.components.train.callbacks import (
    _checkpoint_subdir,
    _epoch_logger,
    _tensorboard,
    _verbose,
    epochs_run,
)
from kfp_finetune.components.train.config import HeadConfig, TrainResult
from kfp_finetune.components.train.data import _split_sizes, class_weights_from_counts, make_dataset, shuffled_by_epoch
from kfp_finetune.components.train.distribute import (
    Cluster,
    _output_scope,
    fit_scope,
    mixed_precision_wanted,
    pick_strategy,
    seed_everything,
    to_mixed_precision,
)
from kfp_finetune.components.train.model import _compile, build_classifier
from kfp_finetune.components.train.phase import finish, log_done
from kfp_finetune.components.train.preempt import Preemption

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import tensorflow as tf

    from kfp_finetune.components.core.dataset import DatasetInfo

log = logging.getLogger("kfp_finetune.train")


def _extract_features(extractor: "keras.Model", datasets: dict[str, "tf.data.Dataset"]) -> dict[str, tuple]:
    """One forward pass of the frozen extractor over each dataset: {name: (features [N, D], labels [N])}.

    One tf.function with a batch-polymorphic signature serves every split and the short last batches, so the
    backbone is traced once (each extra trace of MobileNet costs about a second here).
    """
    import tensorflow as tf
    from tqdm import tqdm

    size = input_size(extractor)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def forward(x: "tf.Tensor") -> "tf.Tensor":
        return extractor(x, training=False)

    out = {}
    for name, ds in datasets.items():
        feats, labels = [], []
        for x, y in tqdm(ds, desc=f"features {name}", unit="batch", disable=None, leave=False):
            feats.append(forward(x))
            labels.append(y)
        out[name] = (tf.concat(feats, 0), tf.concat(labels, 0))
    return out


def train_head(config: HeadConfig) -> TrainResult:
    """Train a new classification head on the frozen backbone; write a Model artifact to `config.output`.

    With a checkpoint folder (`checkpoint_dir`, else $AIP_CHECKPOINT_DIR) the state is saved every epoch (and every
    `checkpoint_every_steps` steps) and on SIGTERM, and a re-run with the same arguments resumes mid-epoch; SIGTERM
    raises `preempt.Preempted` (status 75) as in fine_tune. With the feature cache a resumed run computes the
    features again (one pass of the backbone) before it resumes the head's training.
    """
    from kfp_finetune.components.core import dataset

    started = time.perf_counter()
    info = dataset.load_info(config.dataset)
    n_train, _ = _split_sizes(info)
    check_output_dir(config.output)
    checkpoint_root = config.checkpoint_dir or settings.vertex_checkpoint_dir()
    cluster = pick_strategy()
    ckpt = (_checkpoint_subdir(config, checkpoint_root, cluster, "train_head")
            if checkpoint_root and config.epochs > 0 else None)
    with Preemption("train_head", ckpt, config.checkpoint_every_steps, config.epochs) as preemption:
        result = _train_head(config, info, n_train, cluster, preemption, started)
        preemption.finished()  # the output is in place: nothing left to resume
    return result


def _train_head(config: HeadConfig, info: "DatasetInfo", n_train: int, cluster: Cluster, preemption: Preemption,
                started: float) -> TrainResult:
    import keras
    import tensorflow as tf

    from kfp_finetune.components.core import modelio

    seed_everything(config.seed, config.determinism)
    mixed = mixed_precision_wanted()
    with cluster.strategy.scope():
        extractor, backbone_meta = modelio.load_model(config.backbone)
        if extractor.name != "feature_extractor":
            raise UserError(f"--backbone {config.backbone}: expected the output of `kfp-finetune backbone` "
                            f"(a model named feature_extractor), got a model named {extractor.name!r}")
        size = input_size(extractor)
        if mixed:
            extractor = to_mixed_precision(extractor)
        model = build_classifier(extractor, info.num_classes, config.dropout, config.augment, config.seed,
                                 config.augment_strength)

    use_cache = config.use_feature_cache and cluster.num_workers == 1 and config.epochs > 0
    if not use_cache and config.epochs > 0:
        # Only a model that trains itself is compiled: with the feature cache the head trains as `head_only` (the
        # same layers), and saving an uncompiled model needs no compile-free copy (modelio.uncompiled: from_config
        # + set_weights, measured 0.45 s of a 4.3 s train_head on flowers).
        with cluster.strategy.scope():
            _compile(model, keras.optimizers.Adam(config.learning_rate), label_smoothing=config.label_smoothing)
    if config.use_feature_cache and cluster.num_workers > 1:
        log.info("feature cache off: not supported with several workers; the backbone runs every epoch")
    class_weight = class_weights_from_counts(info) if config.class_weights == "auto" else None
    history: dict[str, list[float]] = {}
    steps_per_epoch = math.ceil(n_train / config.batch_size)

    with _output_scope(config.output, cluster) as tmp:
        epoch_seconds: list[float] = []
        callbacks = [_epoch_logger("train_head", config.epochs, history, epoch_seconds),
                     *_tensorboard("train_head", tmp, cluster.is_chief)]
        log.info("train_head: %d classes, %d train / %d validation images at %d px, %d epochs, feature cache %s",
                 info.num_classes, info.num_examples["train"], info.num_examples["validation"], size, config.epochs,
                 "on" if use_cache else "off")
        initial_epoch = 0
        if config.epochs == 0:
            log.info("train_head: --epochs 0: writing the untrained classifier (fine_tune trains it)")
        elif use_cache:
            # The backbone is frozen and no augmentation changes its input: its features are the same every
            # epoch. Compute them once (train read in a fixed order) and train only dropout+dense on them.
            features = _extract_features(extractor, {
                split: make_dataset(info, split, size, config.batch_size, training=False, cache=False)
                for split in ("train", "validation")})
            (train_x, train_y), (val_x, val_y) = features["train"], features["validation"]
            with cluster.strategy.scope():
                feats = keras.Input(shape=train_x.shape[1:], name="features")
                head_only = keras.Model(feats, model.get_layer("head")(model.get_layer("dropout")(feats)),
                                        name="head_only")
                # Head steps on feature vectors take microseconds: run many per call so that Keras's per-step
                # Python overhead does not dominate (it was ~30% of the whole train_head on flowers).
                _compile(head_only, keras.optimizers.Adam(config.learning_rate), steps_per_execution=32,
                         label_smoothing=config.label_smoothing)
            n = int(train_x.shape[0])
            # Each epoch's order is a function of (seed, epoch) (a resumed run sees the same batches).
            train_ds = shuffled_by_epoch(tf.data.Dataset.from_tensor_slices((train_x, train_y)), n,
                                         config.batch_size, config.seed, preemption.epoch)
            val_ds = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(config.batch_size)
            initial_epoch = _resume(preemption, head_only, steps_per_epoch, history)
            head_only.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                          class_weight=class_weight, callbacks=[*callbacks, preemption.callback()],
                          verbose=_verbose(), shuffle=False)
        else:
            train_ds = make_dataset(info, "train", size, config.batch_size, training=True, seed=config.seed,
                                    ordered=config.determinism != "off",
                                    epoch=preemption.epoch if cluster.num_workers == 1 else None)
            val_ds = make_dataset(info, "validation", size, config.batch_size, training=False)
            initial_epoch = _resume(preemption, model, steps_per_epoch, history)
            with fit_scope(model, cluster):
                model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                          class_weight=class_weight, callbacks=[*callbacks, preemption.callback()],
                          verbose=_verbose(), shuffle=False)

        meta = {k: v for k, v in backbone_meta.items() if k not in ("history", "training", "trainable_layers")}
        result = finish("train_head", config, model, info=info, cluster=cluster, history=history,
                        epoch_seconds=epoch_seconds, started=started, mixed=mixed, meta=meta, directory=tmp,
                        training={"feature_cache": use_cache, "class_weight": class_weight, **preemption.summary()},
                        epochs_run=epochs_run(history, initial_epoch), initial_epoch=initial_epoch,
                        feature_cache=use_cache)
    log_done(result, config.output, cluster)
    return result


def _resume(preemption: Preemption, model: "keras.Model", steps_per_epoch: int,
            history: dict[str, list[float]]) -> int:
    """Restore the newest checkpoint into `model` (if any); the epoch fit starts from."""
    preemption.attach(model, steps_per_epoch, history)
    resumed = preemption.resume()
    if resumed is None:
        return 0
    if resumed.step:
        preemption.wrap(model)
    return resumed.epoch
