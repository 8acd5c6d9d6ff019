"""``crossformer evaluate``: the metrics of a checkpoint on a data set, for any task.

The task's own flags come from its ``evaluate`` handler and the configuration fields it
reads (``--config`` decides the task; classification by default).
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_task_verb, run_task_verb

TASK_AWARE = True
VERB = "evaluate"


def add_arguments(parser: argparse.ArgumentParser, task: str, shown_config: Any | None = None) -> None:
    add_task_verb(parser, task, VERB, shown_config)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any setting of the config but training's (optimizer.*, epochs, ...)")


def run(args: argparse.Namespace) -> int:
    return run_task_verb(args, VERB, args.overrides)
