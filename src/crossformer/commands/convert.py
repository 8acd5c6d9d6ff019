"""``crossformer convert``: any readable checkpoint -> safetensors weights."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="official .pth, crossformer training checkpoint or state dict")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")


def run(args: argparse.Namespace) -> int:
    from crossformer.models import convert_to_safetensors

    path = convert_to_safetensors(args.checkpoint, args.output, use_ema=args.ema)
    print(f"wrote {path}")
    return 0
