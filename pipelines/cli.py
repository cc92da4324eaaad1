"""`kfp-finetune` (also `python -m kfp_finetune.pipelines`): the steps' subcommands (fingerprint, ingest, profile,
drift, backbone, train-head, fine-tune, evaluate, export, predict, pick-winner), the registry's (versions, rollback)
and the operator commands (compile, run, submit, schedule); `kfp-finetune --help` lists them all.

Each module of COMMAND_MODULES exposes `add_cli(subparsers)`, which registers its parser and sets `func` to a handler
that takes the parsed namespace, builds the step's typed config (validating it) and calls the step's function.
Bad input raises `UserError`: printed as one line `kfp-finetune: error: ...`, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kfp_finetune.components import __version__
from kfp_finetune.components.core.errors import UserError

# Modules that register subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "kfp_finetune.components.ingest.fingerprint",
    "kfp_finetune.components.ingest.step",
    "kfp_finetune.components.ingest.profile_cli",
    "kfp_finetune.components.datacheck.step",
    "kfp_finetune.components.backbone.step",
    "kfp_finetune.components.train",
    "kfp_finetune.components.evaluate.step",
    "kfp_finetune.components.export.step",
    "kfp_finetune.components.registry.registry",
    "kfp_finetune.components.predict.step",
    "kfp_finetune.components.compare.step",
    "kfp_finetune.pipelines.commands",
)

log = logging.getLogger("kfp_finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kfp-finetune",
        description="Fine-tune Keras image classifiers by transfer learning, step by step or as a KFP pipeline.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # TensorFlow's C++ banner lines are noise for users of a CLI.
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"kfp-finetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kfp-finetune: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
