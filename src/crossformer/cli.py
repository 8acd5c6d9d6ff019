"""The ``crossformer`` command line: one subcommand per job, for every task.

Each subcommand lives in ``crossformer.commands.<name>`` and provides ``add_arguments(parser)``
and ``run(args) -> int``; task-aware ones (``TASK_AWARE = True``) take the task too (and the
``--config`` file's settings, for ``--help`` to show), so their
flags come from that task's configuration: ``--config NAME_OR_FILE`` names it (classification
by default). Heavy imports happen inside ``run`` so that ``crossformer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .errors import PerformanceWarning, UserInputError

# name -> one-line help
COMMANDS: dict[str, str] = {
    "train": "train a model from a config (classification: also --model NAME; torchrun for many GPUs)",
    "evaluate": "the metrics of a checkpoint on a data set",
    "predict": "a checkpoint's predictions for images",
    "benchmark": "images/s and peak memory, side by side with a peer model",
    "flops": "parameters and multiply-accumulates in the papers' convention",
    "export": "a classifier, backbone, segmentor or detector as ONNX (dynamic height and width), TorchScript "
              "or safetensors",
    "convert": "convert any readable checkpoint to safetensors weights",
    "demo": "train, evaluate and predict on built-in data in a few minutes (--task classification|detection|segmentation|all)",
    "make-data": "write a synthetic data set in a standard layout (coco: detection, ade: segmentation)",
}
_RANK_0_GRACE_S = 3.0
INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it
# commands with their own flags that also take --config (the task's handler fills in the rest)
_CONFIG_DISPATCH = ("benchmark", "flops", "export")
# commands that run a model over data: with CROSSFORMER_KEEP_FREED_MEMORY=1 their process keeps
# the memory malloc frees (engine/memory.py)
_KEEP_FREED_MEMORY = ("train", "evaluate", "predict", "demo")
# commands that split their work over torchrun's processes; the others run in one
_MANY_PROCESSES = ("train", "evaluate")


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, with its errors (an unknown flag, a bad choice, a missing value) in one line
    that points at ``--help``, rather than after the whole usage block (tens of lines here)."""

    # why the --checkpoint the task (and so the flags) was to come from cannot be read, where it cannot
    missing_checkpoint: str | None = None
    # the --config or --checkpoint that chose the flags: the help to see lists those
    flags_from: str = ""

    def error(self, message: str) -> NoReturn:
        if self.missing_checkpoint and message.startswith("unrecognized arguments"):
            raise UserInputError(f"{self.missing_checkpoint} (so the flags of its task are unknown: {message})")
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog}{self.flags_from} --help)\n")


def build_parsers(argv: Sequence[str] = ()) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and each command's own; the task-aware commands get the flags of the task
    ``--config`` in ``argv`` names."""
    from .commands.common import add_config_argument, config_task, default_task_chosen, help_config, task_flags_source

    argv = list(argv)
    task = config_task(argv)
    shown_config = help_config(argv, task)
    from . import __version__

    parser = _OneLineErrors(prog="crossformer", description="CrossFormer and CrossFormer++ for PyTorch.")
    parser.add_argument("--version", action="version", version=f"crossformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, argparse.ArgumentParser] = {}
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"crossformer.commands.{name.replace('-', '_')}")
        # No abbreviated flags: the command line is read for whole flags before parsing (--config,
        # --img-size), so "--img 256" would be taken as a size yet not seen as one given.
        summary = " ".join((module.__doc__ or help_text).strip().split("\n\n")[0].split())  # the first paragraph
        command = sub.add_parser(name, help=help_text, description=summary, allow_abbrev=False)
        if getattr(module, "TASK_AWARE", False):
            module.add_arguments(command, task, shown_config)
            command.flags_from = task_flags_source(argv)
            if default_task_chosen(argv):  # the flags shown are the default task's: say whose, and how to see another's
                command.epilog = (f"The flags above are {task}'s (the default task). Another task's: add its --config "
                                  f"(e.g. --config upernet_crossformer_small) or a --checkpoint of ours to --help.")
        else:
            module.add_arguments(command)
        command.set_defaults(_run=module.run)
        if name in _CONFIG_DISPATCH:
            add_config_argument(command)
            command.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                                 help="with --config: any setting of the config, e.g. model.backbone=crossformer_base")
        commands[name] = command
    return parser, commands


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _is_list_value(token: str, kind: type) -> bool:
    """Whether ``token`` is one more value of a flag taking several of ``kind``: a number, or a
    word that is no flag and no ``KEY=VALUE`` setting (``--classes road car``)."""
    return _is_number(token) if kind in (int, float) else not token.startswith("-") and "=" not in token


def _value_lists_last(command: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """``args`` with every flag that takes several values (``--img-size H W``, ``--classes a b``)
    moved, with its values, behind the rest, in order.

    argparse gives such a flag every positional-looking token that follows it, so a ``KEY=VALUE``
    setting or an image right after ``--img-size 224`` would be read as one more size. At the end
    nothing follows them; the other arguments keep their order.
    """
    value_lists = {
        option: action.type
        for action in command._actions
        if action.nargs in ("+", "*") and action.type in (int, float, str)
        for option in action.option_strings
    }
    kept: list[str] = []
    moved: list[str] = []
    position = 0
    while position < len(args):
        token = args[position]
        position += 1
        if token == "--":  # everything after it is positional
            kept.extend(args[position - 1:])
            break
        if token not in value_lists:
            kept.append(token)
            continue
        moved.append(token)
        while position < len(args) and _is_list_value(args[position], value_lists[token]):
            moved.append(args[position])
            position += 1
    return kept + moved


def _refuse_abbreviations(command: argparse.ArgumentParser, args: list[str]) -> None:
    """Raise :class:`~crossformer.errors.UserInputError` naming the whole flag for a shortened
    one (``--img`` for ``--img-size``), which argparse would only call unrecognised."""
    options = [option for action in command._actions for option in action.option_strings if option.startswith("--")]
    for token in args:
        if token == "--":
            return
        flag = token.split("=", 1)[0]
        if not flag.startswith("--") or flag in options:
            continue
        matches = [option for option in options if option.startswith(flag)]
        if matches:
            raise UserInputError(f"{flag}: give the whole flag ({' or '.join(matches)})")


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed; a command's positional arguments (``KEY=VALUE`` settings, images) may stand
    anywhere among its flags, right after ``--img-size H W`` included: argparse on its own takes
    only their first run, rejects the rest, and reads those after a list of numbers as numbers.

    Raises :class:`~crossformer.errors.UserInputError` when the ``--config`` named cannot be read.
    """
    from .commands.common import missing_task_checkpoint, refuse_classification_model

    argv = list(argv)
    parser, commands = build_parsers(argv)
    if not argv or argv[0] not in commands:  # --help, --version, a missing or unknown command: argparse says so
        return parser.parse_args(argv)
    command = commands[argv[0]]
    command.missing_checkpoint = missing_task_checkpoint(argv)
    _refuse_abbreviations(command, argv[1:])
    refuse_classification_model(command, argv[1:])
    args = command.parse_intermixed_args(_value_lists_last(command, argv[1:]))
    args.command = argv[0]
    return args


def _run_with_config(args: argparse.Namespace, argv: list[str]) -> int:
    """benchmark / flops with ``--config``: the task's handler for the verb."""
    from .commands.common import run_task_verb

    args.img_size_given = any(a == "--img-size" or a.startswith("--img-size=") for a in argv)
    return int(run_task_verb(args, args.command, args.overrides) or 0)


def _say(message: str) -> None:
    """One line on stderr; under ``torchrun`` from rank 0 only (every rank stops with the same error)."""
    from .engine.launch import launched_rank

    if launched_rank() == 0:
        print(message, file=sys.stderr)


def _leave_after_rank_0(code: int) -> int:
    """``code``; under ``torchrun`` a rank other than 0 stopping with an error first gives rank
    0 a moment to print the shared message: torchrun ends every process once one exits with an
    error, and the message must not be lost to that race (rank 0 prints right after the agreement)."""
    from .engine.launch import launched_processes, launched_rank

    if code and launched_rank() != 0 and launched_processes() > 1:
        time.sleep(_RANK_0_GRACE_S)
    return code


def started_as_command() -> bool:
    """Whether this process is the ``crossformer`` command (its console script, or ``python -m
    crossformer`` while Python imports the package to find ``__main__``), not a program that
    imports the package."""
    if sys.argv[:1] == ["-m"]:  # python -m: the module named is still being found
        given = list(getattr(sys, "orig_argv", ()))
        named = [after for before, after in zip(given, given[1:]) if before == "-m"]
        named += [arg[2:] for arg in given if arg.startswith("-m") and len(arg) > 2]
        return any(name.split(".")[0] == "crossformer" for name in named)
    return bool(sys.argv) and Path(sys.argv[0]).name in ("crossformer", "crossformer.exe", "crossformer-script.py")


class _CtrlC:
    """Ctrl-C in the ``crossformer`` command. Before the command's work begins, and whenever a
    module is being imported, the process ends at once with status 130 and no traceback: a
    KeyboardInterrupt raised inside a library's import can leave it half set up (numpy then
    fails its next import with "cannot load module more than once per process"), or reach C++
    that cannot pass it on (torch aborts: "terminate called after throwing an instance of
    'pybind11::error_already_set'"). Otherwise KeyboardInterrupt, which the command answers by
    stopping cleanly (training saves a checkpoint first)."""

    def __init__(self) -> None:
        self.process = os.getpid()  # a forked process (a loader worker) keeps Python's usual Ctrl-C
        self.said: bytes | None = None  # the command's line, once its work began (None: say nothing)
        self.work_began = False

    def __call__(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.process or (self.work_began and not _running_an_import(frame)):
            raise KeyboardInterrupt
        if self.said:
            for stream in (sys.stdout, sys.stderr):  # what the command printed so far
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - interrupted inside a write: its lines stay lost
                    pass
            os.write(sys.stderr.fileno(), self.said)
        os._exit(INTERRUPTED)


def _running_an_import(frame: Any) -> bool:
    """Whether the import system is running a module's code (or an extension's set-up) in the
    call stack that ``frame`` ends."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_call_with_frames_removed" and code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def quiet_start() -> None:
    """From the package's first import on, for the ``crossformer`` command: Ctrl-C while it
    starts (importing torch, timm and the commands takes seconds), or later inside an import,
    ends it with status 130 and no traceback (:class:`_CtrlC`). A program that imports the
    package, and a process that ignores Ctrl-C (a shell's background job), are left as they are."""
    if (started_as_command() and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _CtrlC())


def _work_begins(command: str) -> None:
    """The command's work begins: from now on Ctrl-C outside an import raises KeyboardInterrupt,
    and one inside an import says that the command was interrupted before it ends the process."""
    handler = signal.getsignal(signal.SIGINT)
    if isinstance(handler, _CtrlC):
        from .engine.launch import launched_rank

        handler.said = f"crossformer {command}: interrupted\n".encode() if launched_rank() == 0 else None
        handler.work_began = True


def _refuse_unreadable_checkpoint(args: argparse.Namespace) -> None:
    """A one-line error for the command's checkpoint (``--checkpoint``, ``convert``'s first
    argument) that is not there, a folder, cannot be opened or is no checkpoint, said as its
    reader would say it but before the command's work imports torch (seconds)."""
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint:
        from .checkpoint_files import readable_checkpoint

        readable_checkpoint(checkpoint)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _launch_variables_read(argv):
        return 2
    try:
        with warnings.catch_warnings():  # restores the default display when main returns (tests call it)
            warnings.simplefilter("always", PerformanceWarning)  # shown once by _show_warning itself
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning, set())
            return _leave_after_rank_0(_main(argv))
    except BrokenPipeError:  # piped into `head`: the reader has what it wanted, the work stops
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0


def _show_warning(otherwise: Any, said: set[str], message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings (:class:`.PerformanceWarning`) as one "warning:" line on stderr, once per
    command (``said``: Python's own once-per-place record is reset whenever a filter changes, as
    reading an image does), from rank 0 only under torchrun; any other warning by ``otherwise``
    (Python's display)."""
    if issubclass(category, PerformanceWarning):
        if str(message) not in said:
            said.add(str(message))
            _say(f"warning: {message}")
    else:
        otherwise(message, category, filename, lineno, file, line)


def _command_name(argv: list[str]) -> str:
    """The command ``argv`` names (its first word that is no flag), for error lines."""
    return next((a for a in argv if not a.startswith("-")), "crossformer")


def _launch_variables_read(argv: list[str]) -> bool:
    """Whether torchrun's numbers in the environment read as numbers; if not, says so in one
    line, from every process: which one is rank 0 is unknown, and every later step asks it."""
    from .engine.launch import check_launch_variables

    try:
        check_launch_variables()
    except UserInputError as err:
        print(f"crossformer {_command_name(argv)}: error: {err}", file=sys.stderr)
        return False
    return True


def _main(argv: list[str]) -> int:
    command = _command_name(argv)
    try:
        args = parse_command_line(argv)
    except UserInputError as err:
        _say(f"crossformer {command}: error: {err}")
        return 2
    if args.command not in _MANY_PROCESSES:
        from .engine.launch import launched_processes

        if launched_processes() > 1:  # each would do all the work, into the same files
            _say(f"crossformer {args.command}: error: it runs in one process, but torchrun started "
                 f"{launched_processes()}: run it without torchrun")
            return 2
    _work_begins(args.command)
    if args.command in _KEEP_FREED_MEMORY:
        from .engine.memory import keep_freed_memory, wanted_by_environment

        if wanted_by_environment():
            keep_freed_memory()
    try:
        _refuse_unreadable_checkpoint(args)
        if args.command in _CONFIG_DISPATCH:
            if args.config:
                return _run_with_config(args, argv)
            if args.overrides:
                raise UserInputError(f"{' '.join(args.overrides)}: KEY=VALUE settings change a config: "
                                     f"name one with --config, or use the flags alone")
        return int(args._run(args) or 0)
    except UserInputError as err:
        _say(f"crossformer {args.command}: error: {err}")
        return 2
    except KeyboardInterrupt:
        _say(f"crossformer {args.command}: interrupted")
        return INTERRUPTED
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        asked = _memory_asked(err)
        if asked is None:
            raise
        _say(f"crossformer {args.command}: error: out of memory{asked}: lower --batch-size or --img-size, or free "
             f"memory")
        return 1


def _memory_asked(err: BaseException) -> str | None:
    """``" (N GB asked for)"``, ``""`` where the size is not said, for an allocation that failed
    (CPU allocator, CUDA, Python); None for any other error."""
    import re

    text = str(err)
    if not (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    found = re.search(r"(?:tried to )?allocate (\d+(?:\.\d+)?) ?(bytes|[KMG]iB)", text)
    if found is None:
        return ""
    number, unit = float(found.group(1)), found.group(2)
    size = number / 1e9 if unit == "bytes" else number * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit] / 1e9
    return f" ({size:.1f} GB asked for)"


if __name__ == "__main__":
    sys.exit(main())
