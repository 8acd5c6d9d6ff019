"""Run a function as ranks 0 and 1 of a gloo process group on the CPU, in two processes that
torch.multiprocessing spawns: the multi-process code paths in seconds, without torchrun.

The ranks meet at a store this process listens on from before they start to after they end, on
a port the kernel chose: a port found free and let go before rank 0 listened on it could be
taken meanwhile by another test's process (xdist runs two at once): EADDRINUSE."""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from processes import end_processes

__all__ = ["on_two_ranks"]


def _worker(rank: int, port: int, out: str, fn: Callable[..., Any], args: tuple) -> None:
    os.setsid()  # the rank and what it starts: one process group, which on_two_ranks ends
    import torch

    # as torchrun sets them (its store too is the launcher's): crossformer's setup_distributed reads
    # them and joins this group
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        result = fn(*args)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def on_two_ranks(fn: Callable[..., Any], *args: Any, timeout: float = 120) -> list[Any]:
    """``fn(*args)`` on ranks 0 and 1 of one gloo group; what each returned, in rank order.
    ``fn`` must be importable by the spawned processes (a module-level function)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # port 0: the kernel's choice
    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(_worker, args=(store.port, out, fn, args), nprocs=2, join=False,
                                     start_method="spawn")
        try:
            deadline = time.monotonic() + timeout
            while not context.join(1):  # raises, with the rank's traceback, if one failed
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} did not finish on two ranks in {timeout:.0f} s")
        finally:  # a rank stuck in a collective ignores SIGTERM: end_processes follows with SIGKILL
            end_processes(groups=[process.pid for process in context.processes])
            for process in context.processes:  # one still starting has no group of its own yet
                if process.is_alive():
                    process.kill()
        return [pickle.loads(Path(out, f"rank{rank}.pkl").read_bytes()) for rank in range(2)]
