"""What ``torchrun`` told this process through its environment, read without torch: the command
line refuses a one-process command that torchrun started many times before it imports torch.

These are the only readers of torchrun's ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``: one default for each, whichever module asks (a test holds the others to it)."""

from __future__ import annotations

import os

__all__ = ["launched_processes", "launched_node_processes", "launched_rank", "launched_local_rank",
           "launched_by_torchrun"]


def launched_processes() -> int:
    """How many processes ``torchrun`` started for this job (its ``WORLD_SIZE``); 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_node_processes() -> int:
    """How many of them run on this node (``LOCAL_WORLD_SIZE``); 1 without torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among them (``RANK``); 0 without torchrun."""
    return int(os.environ.get("RANK", "0"))


def launched_local_rank() -> int:
    """This process's rank among this node's (``LOCAL_RANK``); 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` started this process (it sets ``RANK``), even as its only one."""
    return "RANK" in os.environ
