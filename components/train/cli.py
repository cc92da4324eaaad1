"""`kfp-finetune train-head` and `kfp-finetune fine-tune`: the paths, then one option per parameter definition."""

import argparse
from typing import Any

from kfp_finetune.components.train.config import FineTuneConfig, HeadConfig
from kfp_finetune.components.train.params import FINE_TUNE, HEAD, Param, add_arguments, config_kwargs

# (command, help, description, the input model's option and its help, config, parameters, phase function)
_COMMANDS: tuple[tuple[str, str, str, str, str, Any, tuple[Param, ...], str], ...] = (
    ("train-head", "train a new classification head on the frozen backbone",
     "Train dropout + dense softmax on top of a frozen backbone (output of `backbone`).",
     "backbone", "Model artifact directory (output of `backbone`)", HeadConfig, HEAD, "head.train_head"),
    ("fine-tune", "unfreeze the backbone (all of it, or its top) and train it with the head",
     "Fine-tune a train-head model: AdamW, linear warmup then cosine decay, optional early stopping.",
     "model", "Model artifact directory (output of `train-head`)", FineTuneConfig, FINE_TUNE, "finetune.fine_tune"),
)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    for command, help, description, model_option, model_help, config, params, function in _COMMANDS:
        p = subparsers.add_parser(command, help=help, description=description)
        p.add_argument("--dataset", required=True, help="Dataset artifact directory (output of `ingest`)")
        p.add_argument(f"--{model_option}", required=True, help=model_help)
        p.add_argument("--output", required=True, help="new directory for the Model artifact")
        add_arguments(p, params)
        p.set_defaults(func=_runner(model_option, config, params, function))


def _runner(model_option: str, config: Any, params: tuple[Param, ...], function: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        import importlib

        module, name = function.split(".")
        phase = getattr(importlib.import_module(f"kfp_finetune.components.train.{module}"), name)
        phase(config(dataset=args.dataset, output=args.output, **{model_option: getattr(args, model_option)},
                     **config_kwargs(params, args)))
        return 0

    return run
