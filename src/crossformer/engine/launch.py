"""What ``torchrun`` told this process through its environment, read without torch: the command
line refuses a one-process command that torchrun started many times before it imports torch."""

from __future__ import annotations

import os

__all__ = ["launched_processes"]


def launched_processes() -> int:
    """How many processes ``torchrun`` started for this job (its ``WORLD_SIZE``); 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))
