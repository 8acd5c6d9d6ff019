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
    """``--img-size`` as ``(height, width)``, at least the model's minimum input size."""
    from ..models.crossformer import MIN_INPUT_SIZE

    size = args.img_size or [default]
    if len(size) not in (1, 2):
        raise UserInputError(f"--img-size takes N or H W, got {' '.join(map(str, size))}")
    height, width = (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
    if min(height, width) < MIN_INPUT_SIZE:
        raise UserInputError(f"--img-size must be at least {MIN_INPUT_SIZE}, got {height}x{width}")
    return height, width


def require_model(name: str, variants_only: bool = False) -> None:
    """Fail with one line unless ``name`` is a registered variant (or, by default, any timm model)."""
    import timm

    from ..models import VARIANTS

    known = VARIANTS if variants_only else timm.list_models()
    if name not in known:
        raise UserInputError(f"unknown model {name!r}; try one of {', '.join(VARIANTS)}")


def add_model_arg_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-arg", action="append", default=[], metavar="KEY=VALUE",
        help="a model constructor setting for files that do not record theirs, e.g. embed_dim=32 (repeatable)",
    )


def model_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-arg`` values as keyword arguments (values read as YAML: 32, [2,2,4,2])."""
    from ..engine.config import parse_overrides

    return parse_overrides(args.model_arg)
