"""Argument helpers shared by several subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserInputError


def add_model_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--model", required=required, metavar="NAME",
        help="a registered variant (crossformer_tiny ... crossformer_pp_huge) or any timm model",
    )


def add_img_size_argument(parser: argparse.ArgumentParser, default: int | None = 224) -> None:
    parser.add_argument(
        "--img-size", type=int, nargs="+", default=None if default is None else [default],
        metavar="N", help=f"input size: N (square) or H W (default {default})",
    )


def img_size(args: argparse.Namespace, default: int = 224) -> tuple[int, int]:
    """``--img-size`` as ``(height, width)``."""
    size = args.img_size or [default]
    if len(size) not in (1, 2):
        raise UserInputError(f"--img-size takes N or H W, got {' '.join(map(str, size))}")
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def add_model_arg_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-arg", action="append", default=[], metavar="KEY=VALUE",
        help="a model constructor setting for files that do not record theirs, e.g. embed_dim=32 (repeatable)",
    )


def model_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-arg`` values as keyword arguments (values read as YAML: 32, [2,2,4,2])."""
    from ..engine.config import parse_overrides

    return parse_overrides(args.model_arg)
