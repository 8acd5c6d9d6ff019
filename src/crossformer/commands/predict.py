"""``crossformer predict``: a checkpoint's predictions for images or folders, for any task.

``KEY=VALUE`` items among the inputs set configuration values. It runs in one process: under
``torchrun`` with several it stops at once (each would predict every image into the same files).
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
    from crossformer.engine.distributed import launched_processes
    from crossformer.errors import UserInputError

    if launched_processes() > 1:
        raise UserInputError(f"predict runs in one process, but torchrun started {launched_processes()}: "
                             "run it without torchrun")
    args.images, overrides = split_overrides(args.inputs)
    if not args.images:
        raise UserInputError("no images given")
    return run_task_verb(args, VERB, overrides)
