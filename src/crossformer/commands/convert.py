"""``crossformer convert``: any readable checkpoint -> safetensors weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="official .pth, crossformer training checkpoint or state dict")
    # positional as cp takes it, or --output as export and predict take it
    parser.add_argument("output", nargs="?", default=None,
                        help="the .safetensors file to write (default: CHECKPOINT with the suffix .safetensors)")
    parser.add_argument("--output", "-o", dest="output_option", metavar="FILE", help="the same, as an option")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")


def output_path(args: argparse.Namespace) -> Path:
    """Where the weights go: the positional output, ``--output``, or beside the checkpoint."""
    from crossformer.errors import UserInputError

    if args.output is not None and args.output_option is not None and args.output != args.output_option:
        raise UserInputError(f"two outputs given ({args.output} and --output {args.output_option}): give one")
    given = args.output if args.output is not None else args.output_option
    if given is not None:
        return Path(given)
    default = Path(args.checkpoint).with_suffix(".safetensors")
    if default == Path(args.checkpoint):
        raise UserInputError(f"{args.checkpoint} is already a .safetensors file: give the file to write (--output FILE)")
    return default


def run(args: argparse.Namespace) -> int:
    from crossformer.models import convert_to_safetensors

    path = convert_to_safetensors(args.checkpoint, output_path(args), use_ema=args.ema,
                                  note=lambda message: print(f"warning: {message}", file=sys.stderr))
    print(f"wrote {path}")
    return 0
