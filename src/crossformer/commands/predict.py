"""``crossformer predict``: a checkpoint's predictions for images or folders, for any task.

``KEY=VALUE`` items among the inputs set configuration values.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_task_verb, run_task_verb, split_overrides

TASK_AWARE = True
VERB = "predict"


def add_arguments(parser: argparse.ArgumentParser, task: str, shown_config: Any | None = None) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images or folders (and KEY=VALUE settings)")
    add_task_verb(parser, task, VERB, shown_config)


def run(args: argparse.Namespace) -> int:
    args.images, overrides = split_overrides(args.inputs)
    if not args.images:
        from crossformer.errors import UserInputError

        raise UserInputError("no images given")
    return run_task_verb(args, VERB, overrides)
