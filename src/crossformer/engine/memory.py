"""Keeping freed memory in the process, so that large tensors are not page-faulted in every step.

glibc's ``malloc`` serves every block above its mmap threshold (128 KB, rising to at most 32 MB)
with fresh pages from the kernel and hands them back when the block is freed. A training step
allocates and frees the same large activations every time, so every step faults all of them in
again: at 800x1216 a CrossFormer-S backbone's training step took 2.3-2.6 million page faults and
12-15 s of system time on 2 cores, 19 s a step against 10 s once freed memory is kept
(benchmarks/RESULTS.md, row 62). :func:`keep_freed_memory` makes ``malloc`` take every block from
its heap (``M_MMAP_MAX`` 0) and never shrink the heap (``M_TRIM_THRESHOLD`` unbounded): the
process's memory then stays at its peak, as PyTorch's CUDA allocator keeps GPU memory.

It pays where every step has the same shapes. Where they vary (detection's per-batch image
sizes) the heap fragments: a Mask R-CNN trained on random sizes held 7.6 GB after 72 steps
against 5.3 GB by default, for 1.07x. So it is opt-in: ``CROSSFORMER_KEEP_FREED_MEMORY=1`` makes
the ``crossformer`` command's ``train``, ``evaluate``, ``predict`` and ``demo`` set it,
``benchmark --keep-freed-memory`` measures with it, and a script calls the function. The
library never changes this process-wide setting on its own.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "ENV_SWITCH"]

ENV_SWITCH = "CROSSFORMER_KEEP_FREED_MEMORY"  # "1": the crossformer command keeps freed memory

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
    """Whether ``CROSSFORMER_KEEP_FREED_MEMORY`` asks for the setting ("1", "true", "yes", "on")."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("1", "true", "yes", "on")
