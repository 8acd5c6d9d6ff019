"""What ``torchrun`` told this process through its environment, read without torch: the command
line refuses a one-process command that torchrun started many times before it imports torch.

These are the only readers of torchrun's ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and ``TORCHELASTIC_RUN_ID``: one default for each, whichever module asks (a test
holds the others to it). A number that is no whole number, or one torchrun never sets (a count
under 1, a negative rank, a rank not below its count, more processes on the node than in the
job), is a one-line
:class:`~crossformer.errors.UserInputError` naming the variable."""

from __future__ import annotations

import os

from ..errors import UserInputError

__all__ = ["launched_processes", "launched_node_processes", "launched_rank", "launched_local_rank",
           "launched_by_torchrun", "launched_by_torchrun_agent", "check_launch_variables"]


def _whole_number(name: str, default: int, least: int) -> int:
    """The environment variable ``name`` as an int of at least ``least``; ``default`` when it is unset."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:  # set by hand or by another launcher: say which, not int()'s traceback
        raise UserInputError(f"{name}={value!r} in the environment is not a whole number: torchrun sets it to one; "
                             f"unset it or correct it") from None
    if number < least:  # e.g. WORLD_SIZE=0: no process would hold rank 0
        raise UserInputError(f"{name}={value!r} in the environment is below {least}: torchrun never sets it so; "
                             f"unset it or correct it")
    return number


def launched_processes() -> int:
    """How many processes ``torchrun`` started for this job (its ``WORLD_SIZE``); 1 without it."""
    return _whole_number("WORLD_SIZE", 1, least=1)


def launched_node_processes() -> int:
    """How many of them run on this node (``LOCAL_WORLD_SIZE``); 1 without torchrun."""
    return _whole_number("LOCAL_WORLD_SIZE", 1, least=1)


def launched_rank() -> int:
    """This process's rank among them (``RANK``); 0 without torchrun."""
    return _whole_number("RANK", 0, least=0)


def launched_local_rank() -> int:
    """This process's rank among this node's (``LOCAL_RANK``); 0 without torchrun."""
    return _whole_number("LOCAL_RANK", 0, least=0)


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` started this process (it sets ``RANK``), even as its only one."""
    return "RANK" in os.environ


def launched_by_torchrun_agent() -> bool:
    """Whether torchrun's launcher (its elastic agent, which sets ``TORCHELASTIC_RUN_ID``) is
    this process's parent: processes that set ``RANK`` themselves (spawned ones) have none."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _check_rank_below_count(rank_name: str, count_name: str) -> None:
    """The rank ``rank_name`` is below its process count ``count_name``, where the environment
    sets the count: torchrun numbers its processes from 0."""
    if count_name in os.environ and _whole_number(rank_name, 0, least=0) >= _whole_number(count_name, 1, least=1):
        raise UserInputError(f"{rank_name}={os.environ[rank_name]!r} in the environment is not below "
                             f"{count_name}={os.environ[count_name]!r}: torchrun numbers its processes from 0; "
                             f"unset them or correct them")


def check_launch_variables() -> None:
    """Raise :class:`~crossformer.errors.UserInputError` for the first of torchrun's numbers
    that is no whole number or one torchrun never sets: the command line asks before anything
    reads one."""
    for read in (launched_processes, launched_node_processes, launched_rank, launched_local_rank):
        read()
    _check_rank_below_count("RANK", "WORLD_SIZE")
    _check_rank_below_count("LOCAL_RANK", "LOCAL_WORLD_SIZE")
    if {"WORLD_SIZE", "LOCAL_WORLD_SIZE"} <= os.environ.keys() and launched_node_processes() > launched_processes():
        raise UserInputError(f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']!r} in the environment is above "
                             f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: a node runs at most all of the job's "
                             f"processes; unset them or correct them")
