"""``crossformer train``: train any task from a config (classification: also from ``--model``).

The flags come from the task's configuration fields (``--config`` decides the task);
``KEY=VALUE`` sets any setting. Many processes: ``torchrun --nproc-per-node N -m crossformer train ...``.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..cli import INTERRUPTED
from .common import add_config_argument, add_config_arguments

TASK_AWARE = True


def add_arguments(parser: argparse.ArgumentParser, task: str, shown_config: Any | None = None) -> None:
    from crossformer.engine.registry import config_module

    add_config_argument(parser)
    add_config_arguments(parser, config_module(task).CONFIG, shown_config=shown_config)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="any setting, e.g. optimizer.lr=1e-3 model.kwargs.embed_dim=32 (bare names when unique: epochs=5)")


def resume_command(argv: list[str], overwrite_configured: bool = False) -> str:
    """The command line that continues the run ``argv`` started: its ``--resume``/``--overwrite``
    dropped, ``--resume auto`` added, and ``--no-overwrite`` where the run's config turned
    overwriting on (``overwrite_configured``: a config file's ``run.overwrite: true`` would
    otherwise have the resume refused)."""
    import shlex

    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith(("--resume=", "--overwrite", "--no-overwrite", "resume=", "overwrite=", "run.resume=",
                                 "run.overwrite=")):
            kept.append(arg)
    return shlex.join(["crossformer", *kept, "--resume", "auto", *(["--no-overwrite"] if overwrite_configured else [])])


def refuse_unreadable_files(given: dict[str, Any]) -> None:
    """A one-line error for the checkpoint the settings (``given``: the config file's and the
    command line's, as ``section.field`` keys) name to resume from (``run.resume``) or, starting
    afresh, to start from (``model.pretrained``, ``model.init_from``) that is not there, a folder
    or no checkpoint: said as training would say it, before the config's checks and the task
    import torch (seconds)."""
    from crossformer.checkpoint_files import START_FILES, errors_said_as, readable_checkpoint, readable_start_file

    resume = given.get("run.resume")
    if resume:  # every weight comes from the checkpoint, so the start files are not read
        if resume != "auto":  # auto: the output folder's last.pth, where there is one
            with errors_said_as("cannot resume"):
                readable_checkpoint(resume)
        return
    for setting in START_FILES:
        if isinstance(given.get(f"model.{setting}"), str):
            readable_start_file(setting, given[f"model.{setting}"])


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from crossformer.engine.launch import launched_by_torchrun, launched_rank
    from crossformer.engine.registry import resolve_config

    from .common import command_line_settings

    settings = command_line_settings(args, args.overrides)
    # the config file's start files too, before its checks build the model (they were said after torch's import)
    resolved = resolve_config(args.config, settings, check_given=refuse_unreadable_files)
    check = getattr(resolved.module, "check_train_command", None)  # the task's own refusals, if any
    if check is not None:
        check(resolved.config, resolved.given)
    from crossformer.engine import (InterruptedWhileStopping, NonFiniteLossError, PeerLostError,  # torch: once the
                                    RunInterrupted, train)  # config is right

    says = launched_rank() == 0  # under torchrun every rank stops the same way; rank 0 says it
    launcher = "torchrun ... -m " if launched_by_torchrun() else ""
    from crossformer.engine.registry import flatten_settings

    # run.overwrite from the config file, not from the command line (whose flag the line drops)
    configured = resolved.config.run.overwrite and "run.overwrite" not in flatten_settings(
        type(resolved.config), settings, "overrides")
    resume = f"resume with: {launcher}{resume_command(sys.argv[1:], configured)}"
    try:
        metrics = train(resolved.module.TASK, resolved.config)
    except NonFiniteLossError as err:
        if says:
            print(f"crossformer train: stopped: {err}")
        return 1
    except RunInterrupted as err:
        if says:
            print(f"crossformer train: {err}\n{resume}", file=sys.stderr)
        return INTERRUPTED
    except InterruptedWhileStopping:  # a second Ctrl-C while the first one's stop was under way
        last = Path(resolved.config.run.output) / "last.pth"
        if says and last.is_file():  # written atomically: the last checkpoint before the stop, whole
            print(f"crossformer train: interrupted again while stopping; {last} holds the run up to its last "
                  f"checkpoint\n{resume}", file=sys.stderr)
        elif says:
            print("crossformer train: interrupted again while stopping, before any checkpoint was written",
                  file=sys.stderr)
        return INTERRUPTED
    except PeerLostError as err:  # said by every rank left: rank 0 may be the one that ended
        print(f"crossformer train: stopped on rank {launched_rank()}: {err}\n{resume}", file=sys.stderr)
        return 1
    return 0 if metrics else 1
