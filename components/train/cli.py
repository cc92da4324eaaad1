"""`kfp-finetune train-head` and `kfp-finetune fine-tune`: the paths, then one option per parameter definition."""

import argparse

from components.train.config import FineTuneConfig, HeadConfig
from components.train.params import FINE_TUNE, HEAD, add_arguments, config_kwargs


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    head = subparsers.add_parser(
        "train-head", help="train a new classification head on the frozen backbone",
        description="Train dropout + dense softmax on top of a frozen backbone (output of `backbone`).",
    )
    head.add_argument("--dataset", required=True, help="Dataset artifact directory (output of `ingest`)")
    head.add_argument("--backbone", required=True, help="Model artifact directory (output of `backbone`)")
    head.add_argument("--output", required=True, help="new directory for the Model artifact")
    add_arguments(head, HEAD)
    head.set_defaults(func=_run_head)

    tune = subparsers.add_parser(
        "fine-tune", help="unfreeze the top of the backbone and train at a low learning rate",
        description="Fine-tune a train-head model: AdamW, linear warmup then cosine decay, early stopping.",
    )
    tune.add_argument("--dataset", required=True, help="Dataset artifact directory (output of `ingest`)")
    tune.add_argument("--model", required=True, help="Model artifact directory (output of `train-head`)")
    tune.add_argument("--output", required=True, help="new directory for the Model artifact")
    add_arguments(tune, FINE_TUNE)
    tune.set_defaults(func=_run_fine_tune)


def _run_head(args: argparse.Namespace) -> int:
    from components.train.head import train_head

    train_head(HeadConfig(dataset=args.dataset, backbone=args.backbone, output=args.output,
                          **config_kwargs(HEAD, args)))
    return 0


def _run_fine_tune(args: argparse.Namespace) -> int:
    from components.train.finetune import fine_tune

    fine_tune(FineTuneConfig(dataset=args.dataset, model=args.model, output=args.output,
                             **config_kwargs(FINE_TUNE, args)))
    return 0
