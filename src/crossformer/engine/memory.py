"""Keeping freed memory in the process, so that large tensors are not page-faulted in every step.

glibc's ``malloc`` serves every block above its mmap threshold (128 KB, rising to at most 32 MB)
with fresh pages from the kernel and hands them back when the block is freed. A training step
allocates and frees the same large activations every time, so every step faults all of them in
again: at 800x1216 a CrossFormer-S backbone's training step took 2.3-2.6 million page faults and
12-15 s of system time on 2 cores, 19 s a step against 10 s once freed memory is kept
(benchmarks/RESULTS.md, row 62). :func:`keep_freed_memory` makes ``malloc`` take every block from
its heap (``M_MMAP_MAX`` 0) and never shrink the heap (``M_TRIM_THRESHOLD`` unbounded): the
process's memory then stays at its peak, as PyTorch's CUDA allocator keeps GPU memory.

The ``crossformer`` command does this for ``train``, ``evaluate``, ``predict`` and ``demo``
(``benchmark`` with ``--keep-freed-memory``) unless ``CROSSFORMER_KEEP_FREED_MEMORY=0``. It is
a process-wide setting, so the library never makes it on import: a script calls the function.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "ENV_SWITCH"]

ENV_SWITCH = "CROSSFORMER_KEEP_FREED_MEMORY"  # "0": the crossformer command leaves malloc as it is

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make this process's ``malloc`` (and that of processes it forks) keep the memory it frees.

    Returns whether it was set: ``False`` off Linux or with a C library other than glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # e.g. musl, which has no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt takes an int; -1 becomes the largest size_t, a threshold the heap never reaches.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1


def wanted_by_environment() -> bool:
    """Whether ``CROSSFORMER_KEEP_FREED_MEMORY`` leaves the setting on (unset or not "0")."""
    return os.environ.get(ENV_SWITCH, "1").strip() not in ("0", "false", "no", "off")
