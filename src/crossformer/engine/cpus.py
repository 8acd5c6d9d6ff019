"""How many CPUs this process may use, and the data-loader processes that makes: read without
torch, since the configuration's defaults (``run.num_workers``) need them and the command line
shows those in its help."""

from __future__ import annotations

import os

from .launch import launched_node_processes

__all__ = ["available_cpus", "default_workers", "usable_workers", "MAX_DEFAULT_WORKERS"]

MAX_DEFAULT_WORKERS = 8


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one, else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Data-loader processes per training process: this node's CPUs available to us, shared by
    the node's processes (``torchrun`` sets ``LOCAL_WORLD_SIZE``), at most 8 and at least 1.

    More workers than CPUs only adds switching (and PyTorch warns about it).
    """
    per_process = available_cpus() // max(launched_node_processes(), 1)
    return max(1, min(MAX_DEFAULT_WORKERS, per_process))


def usable_workers(requested: int) -> int:
    """``requested`` loader processes (``run.num_workers``), at most one per CPU this process
    may use: more would only queue for the same cores, and PyTorch warns about each loader."""
    return min(requested, available_cpus())
