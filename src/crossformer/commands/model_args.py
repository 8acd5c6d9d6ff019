"""``--model-arg KEY=VALUE``: constructor settings for checkpoints of a non-standard size
(shared by ``evaluate`` and ``predict``)."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arg_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-arg", action="append", default=[], metavar="KEY=VALUE",
        help="a model constructor setting for files that do not record theirs, e.g. embed_dim=32 (repeatable)",
    )


def model_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-arg`` values as keyword arguments (values read as YAML: 32, [2,2,4,2])."""
    from ..engine.config import parse_overrides

    return parse_overrides(args.model_arg)
