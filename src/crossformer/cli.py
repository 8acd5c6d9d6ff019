"""The ``crossformer`` command line: one subcommand per job.

Each subcommand lives in ``crossformer.commands.<name>`` and provides
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run`` so
that ``crossformer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import UserInputError

# name -> one-line help
COMMANDS: dict[str, str] = {
    "flops": "parameters and multiply-accumulates in the papers' convention",
    "convert": "convert any readable checkpoint to safetensors weights",
    "train": "train a classifier on an image folder (torchrun for many GPUs)",
    "evaluate": "top-1 / top-5 accuracy and loss of a checkpoint on an image folder",
    "predict": "top-k labels with scores for images",
    "demo": "train, evaluate and predict on the built-in digits in a few minutes",
    "export": "a model as ONNX (dynamic height and width), TorchScript or safetensors",
    "benchmark": "images/s and peak memory, side by side with a peer model",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossformer", description="CrossFormer and CrossFormer++ for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"crossformer.commands.{name}")
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserInputError as err:
        print(f"crossformer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crossformer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
