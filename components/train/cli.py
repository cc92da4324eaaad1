"""`kfp-finetune train-head` and `kfp-finetune fine-tune`."""

import argparse

from components.train.config import (
    BATCH_NORM_MODES,
    CACHE_FEATURE_MODES,
    CLASS_WEIGHT_MODES,
    FineTuneConfig,
    HeadConfig,
)
from components.train.finetune import fine_tune
from components.train.head import train_head


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    head = subparsers.add_parser(
        "train-head", help="train a new classification head on the frozen backbone",
        description="Train dropout + dense softmax on top of a frozen backbone (output of `backbone`).",
    )
    head.add_argument("--dataset", required=True, help="Dataset artifact directory (output of `ingest`)")
    head.add_argument("--backbone", required=True, help="Model artifact directory (output of `backbone`)")
    head.add_argument("--output", required=True, help="new directory for the Model artifact")
    head.add_argument("--epochs", type=int, default=5,
                      help="0 writes the untrained classifier, for recipes that train everything in fine-tune")
    head.add_argument("--learning-rate", type=float, default=1e-3)
    head.add_argument("--batch-size", type=int, default=32)
    head.add_argument("--dropout", type=float, default=0.2)
    head.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                      help="flip/rotation/zoom/contrast layers inside the model, active in training only")
    head.add_argument("--class-weights", choices=CLASS_WEIGHT_MODES, default="auto",
                      help="auto: balanced weights from the train split's counts")
    head.add_argument("--cache-features", choices=CACHE_FEATURE_MODES, default="auto",
                      help="run the frozen backbone once and train the head on its features (auto: when no augment)")
    head.add_argument("--label-smoothing", type=float, default=0.1,
                      help="mix the one-hot targets with the uniform distribution by this much (e.g. 0.1)")
    head.add_argument("--seed", type=int, default=0)
    head.set_defaults(func=_run_head)

    tune = subparsers.add_parser(
        "fine-tune", help="unfreeze the top of the backbone and train at a low learning rate",
        description="Fine-tune a train-head model: AdamW, linear warmup then cosine decay, early stopping.",
    )
    tune.add_argument("--dataset", required=True, help="Dataset artifact directory (output of `ingest`)")
    tune.add_argument("--model", required=True, help="Model artifact directory (output of `train-head`)")
    tune.add_argument("--output", required=True, help="new directory for the Model artifact")
    which = tune.add_mutually_exclusive_group()
    which.add_argument("--unfreeze-top", type=int, default=None, help="unfreeze the top N backbone layers")
    which.add_argument("--unfreeze-from", default=None, metavar="LAYER",
                       help="unfreeze every backbone layer from LAYER up (default: all layers)")
    tune.add_argument("--epochs", type=int, default=10)
    tune.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    tune.add_argument("--warmup-epochs", type=int, default=1)
    tune.add_argument("--batch-size", type=int, default=32)
    tune.add_argument("--batch-norm", choices=BATCH_NORM_MODES, default="train",
                      help="train: BN statistics adapt to the new data (the study's best, docs/fine-tuning.md); "
                           "frozen: BN layers keep their ImageNet statistics")
    tune.add_argument("--early-stopping-patience", type=int, default=0,
                      help="stop after this many epochs without val_loss gain and keep the best; 0 (default): off, "
                           "the cosine schedule runs to its end")
    tune.add_argument("--checkpoint-dir", default=None,
                      help="save state every epoch and resume from it (default: $AIP_CHECKPOINT_DIR when set)")
    tune.add_argument("--label-smoothing", type=float, default=0.1,
                      help="mix the one-hot targets with the uniform distribution by this much (e.g. 0.1)")
    tune.add_argument("--seed", type=int, default=0)
    tune.set_defaults(func=_run_fine_tune)


def _run_head(args: argparse.Namespace) -> int:
    train_head(HeadConfig(
        dataset=args.dataset, backbone=args.backbone, output=args.output, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size, dropout=args.dropout, augment=args.augment,
        class_weights=args.class_weights, cache_features=args.cache_features,
        label_smoothing=args.label_smoothing, seed=args.seed,
    ))
    return 0


def _run_fine_tune(args: argparse.Namespace) -> int:
    fine_tune(FineTuneConfig(
        dataset=args.dataset, model=args.model, output=args.output, unfreeze_top=args.unfreeze_top,
        unfreeze_from=args.unfreeze_from, epochs=args.epochs, learning_rate=args.learning_rate,
        warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, batch_norm=args.batch_norm,
        early_stopping_patience=args.early_stopping_patience, checkpoint_dir=args.checkpoint_dir,
        label_smoothing=args.label_smoothing, seed=args.seed,
    ))
    return 0
