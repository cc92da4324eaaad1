"""train_head and fine_tune: one training loop serving both transfer-learning phases.

train_head
    Loads the `feature_extractor` built by `kfp-finetune backbone`, freezes it, and puts a new head on top:
    pixels -> [augment] -> feature_extractor -> Dropout `dropout` -> Dense softmax `head` (model `classifier`).
    With augmentation off (the `auto` default of `--cache-features`), the frozen backbone runs once over train
    and validation and the head trains on those cached features: a frozen backbone yields the same features
    every epoch, so running it every epoch (what plain Keras does) costs ~10x for nothing. The saved model is the
    full pixels -> probabilities classifier all the same, because the head-only model shares its layers.

fine_tune
    Loads a train_head (or fine_tune) model in safe mode, unfreezes the nested `backbone` (all of it by default;
    or its top N layers, or all from a named layer), and trains with AdamW, linear warmup then cosine decay (peak
    lr 1e-3 by default: measured better than the usual 1e-4 on MobileNet α=0.25, docs/fine-tuning.md).
    BatchNormalization follows `--batch-norm`: `frozen` sets each BN layer `trainable=False` one by one, which in
    Keras 3 makes it run in inference mode even though `fit()` passes `training=True` down (keras#20285): the
    moving statistics then never move, and the pretrained features survive the small fine-tuning set.

Both phases: a tf.data pipeline (parallel reads, AUTOTUNE decode+resize, an in-memory cache when the split fits,
shuffle, batch, prefetch); a distribution strategy picked from the environment; one log line per epoch;
TensorBoard logs; history of every phase in model.json. With a checkpoint folder both phases save their exact
position every epoch (or N steps) and on SIGTERM, which ends the step with status 75 (`Preempted`); a re-run
resumes mid-epoch (preempt).

The package by concern: config (typed, validated inputs), distribute (strategy, chief, mixed precision), data
(tf.data input, class weights), model (classifier, loss, unfreeze, save), callbacks (epoch log, TensorBoard,
history), preempt (SIGTERM, resume), checkpoint (the atomic checkpoint folder), head and finetune (the two phases),
cli (the subcommands) and ops (the KFP components). The names below are the package's public API.
"""

from kfp_finetune.components.train.cli import add_cli
from kfp_finetune.components.train.config import (
    BATCH_NORM_MODES,
    CACHE_FEATURE_MODES,
    CLASS_WEIGHT_MODES,
    FineTuneConfig,
    HeadConfig,
    TrainResult,
)
from kfp_finetune.components.train.data import class_weights_from_counts, make_dataset
from kfp_finetune.components.train.distribute import Cluster, mixed_precision_wanted, pick_strategy, with_policy
from kfp_finetune.components.train.finetune import fine_tune
from kfp_finetune.components.train.head import train_head
from kfp_finetune.components.train.model import build_classifier, sparse_crossentropy, trainable_layer_names, unfreeze
from kfp_finetune.components.train.ops import fine_tune_op, train_head_op
from kfp_finetune.components.train.preempt import EXIT_PREEMPTED, Preempted

__all__ = [
    "BATCH_NORM_MODES",
    "CACHE_FEATURE_MODES",
    "CLASS_WEIGHT_MODES",
    "EXIT_PREEMPTED",
    "Cluster",
    "FineTuneConfig",
    "HeadConfig",
    "Preempted",
    "TrainResult",
    "add_cli",
    "build_classifier",
    "class_weights_from_counts",
    "fine_tune",
    "fine_tune_op",
    "make_dataset",
    "mixed_precision_wanted",
    "pick_strategy",
    "sparse_crossentropy",
    "train_head",
    "train_head_op",
    "trainable_layer_names",
    "unfreeze",
    "with_policy",
]
