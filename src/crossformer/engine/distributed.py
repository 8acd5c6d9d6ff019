"""Process-group set-up for ``torchrun`` (or a single process), and the few collectives we use.

``torchrun`` exports ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; when they are present we
join the default process group (NCCL on GPUs, gloo on the CPU). Without them everything
runs as rank 0 of 1 and the collectives below are no-ops. A ``torchrun`` worker stops (as on
SIGTERM) when its launcher dies, even by SIGKILL (Linux).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from ..errors import UserInputError
from .launch import (launched_by_torchrun_agent, launched_local_rank, launched_node_processes, launched_processes,
                     launched_rank)

__all__ = ["DistContext", "setup_distributed", "teardown_distributed", "resolve_device", "set_cpu_threads",
           "stop_with_launcher", "PeerLostError", "lost_a_peer", "align_grad_strides"]

T = TypeVar("T")

# torch's own intra-op thread count, read before any run of this process changed it.
TORCH_DEFAULT_THREADS = torch.get_num_threads()
# The process that started this one, read at import: torchrun's launcher for its workers.
PARENT_AT_IMPORT = os.getppid()
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCHER_DEATH_SIGNAL = signal.SIGHUP  # what the kernel sends a torchrun worker whose launcher died


class PeerLostError(RuntimeError):
    """Another process of the run ended (killed, out of memory) while this one waited for it
    in a collective: this process stops too, with one line."""


# What gloo's and NCCL's errors say when the process on the other end is gone.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def lost_a_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective's failure because another process of the run ended."""
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _PEER_GONE)


def set_cpu_threads(threads: int) -> None:
    """``run.cpu_threads``: ``threads`` intra-op threads, or torch's default for 0 (restored,
    so that a run after one that chose 1 thread, as ``demo --task all`` does, gets all cores)."""
    torch.set_num_threads(threads or TORCH_DEFAULT_THREADS)


def _stop_once(signum: int, frame: Any) -> None:
    """The launcher died: SIGTERM to this process, once. The kernel sends the death signal
    each time the launcher thread this process is attached to exits, and attaches it to another
    thread of the launcher while one lives (a killed launcher's threads go one by one; a live
    launcher may end the thread that started it): only a new parent process means the launcher
    is gone, and a second SIGTERM would end a run before its checkpoint."""
    if os.getppid() == PARENT_AT_IMPORT:  # a thread of the launcher ended, not the launcher
        return
    signal.signal(signum, signal.SIG_IGN)
    signal.raise_signal(signal.SIGTERM)


def stop_with_launcher(parent: int = PARENT_AT_IMPORT) -> bool:
    """Under ``torchrun`` on Linux, have this process get SIGTERM when its launcher ``parent``
    dies; whether that was arranged.

    A launcher killed with SIGKILL cannot stop its workers, which would go on training, holding
    the output folder and the GPUs; SIGTERM makes them stop as on any other SIGTERM (in training:
    after the current update, with a resumable ``last.pth``). The kernel sends
    :data:`LAUNCHER_DEATH_SIGNAL` (torchrun's workers have no terminal to hang up), which
    :func:`_stop_once` turns into one SIGTERM. A launcher that is gone already (this process was
    handed to another parent) means SIGTERM at once. Elsewhere (no ``torchrun``, not Linux, not
    the main thread, which alone may set signal handlers) nothing is done.
    """
    if (not sys.platform.startswith("linux") or not launched_by_torchrun_agent()
            or threading.current_thread() is not threading.main_thread()):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no C library to ask: leave it as it was
        return False
    signal.signal(LAUNCHER_DEATH_SIGNAL, _stop_once)
    if prctl(PR_SET_PDEATHSIG, int(LAUNCHER_DEATH_SIGNAL), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # it died before the request, so the kernel will not signal it
        signal.raise_signal(signal.SIGTERM)
    return True


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device; under torchrun ``cuda`` means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
        return _visible_gpu(name, local_rank)
    if name != "cpu":
        raise UserInputError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device("cpu")


def _visible_gpu(name: str, local_rank: int) -> torch.device:
    """``cuda:N`` as named, or for ``cuda`` this node's process ``local_rank``'s GPU; a one-line
    error when no such GPU is visible. More processes on this node than GPUs (torchrun's
    ``LOCAL_WORLD_SIZE``) is an error on every one of them, so that rank 0 says it."""
    try:
        device = torch.device(name if ":" in name else f"cuda:{local_rank}")
    except RuntimeError:
        raise UserInputError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None
    count = torch.cuda.device_count()
    visible = f"{count} GPUs are visible (0-{count - 1})"
    per_node = max(launched_node_processes(), local_rank + 1)
    if ":" in name:
        if device.type != "cuda" or device.index is None or device.index >= count:
            raise UserInputError(f"--device {name}: {visible}")
        if per_node > 1:  # NCCL cannot join processes on one GPU
            raise UserInputError(f"--device {name} would put all {per_node} processes torchrun started on this node "
                                 f"on GPU {device.index}: use --device cuda (each process takes its own GPU)")
        return device
    if per_node > count:
        raise UserInputError(f"torchrun started {per_node} processes on this node but {visible}: start at most "
                             f"{count} per node (torchrun --nproc-per-node) or use --device cpu")
    return device


@dataclass
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call created the process group, so it destroys it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and logs."""
        return self.rank == 0

    def sync_batchnorm(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with its BatchNorm layers computing statistics over every GPU of a
        multi-GPU job, as the authors' SyncBN heads (UPerNet's, the cascade heads); unchanged
        on one process or the CPU (torch syncs only accelerator tensors). The state dict keys
        stay BatchNorm's."""
        if self.distributed and self.device.type == "cuda":
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def share_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank: each rank's saw its own last
        batches (DDP copies rank 0's only at the next forward), so an evaluation split over ranks
        would score, on the others' shares, statistics no checkpoint holds."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over ranks (float64, so counts stay exact)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (so all ranks take the same branch)."""
        return self.all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0

    def raise_together(self, error: UserInputError | None) -> None:
        """Raise on every rank when any rank has an ``error`` (the lowest rank's), else return.

        A rank that stopped alone would leave the others waiting in their next collective, and
        the message would drown in their timeouts; so every rank stops with the same one line.
        Costs one small reduction (and a gather only when something failed).
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        if self.all_true(error is None):
            return
        found = [e for e in self.gather_objects(None if error is None else (type(error), str(error))) if e is not None]
        cls, message = found[0]
        raise cls(message)

    def on_main(self, work: Callable[[], T]) -> T | None:
        """``work()`` on rank 0 alone (a file it writes, a score it computes): what it returned
        there, None on the other ranks, which wait for it.

        A :class:`UserInputError` it raises (a full disk: ``OutputError``) is raised on every rank
        (:meth:`raise_together`): rank 0 stopping alone would leave the others waiting in their next
        collective. The agreement is the one collective, so no rank runs ahead of the work either.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = work()
            except UserInputError as err:
                error = err
        self.raise_together(error)
        return result

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (picklable objects only)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_lists(self, items: list[Any]) -> list[Any]:
        """Every rank's ``items``, joined in rank order (e.g. the files each rank skipped)."""
        return [item for share in self.gather_objects(items) for item in share]

    @property
    def _collective_device(self) -> torch.device:
        # NCCL reduces only CUDA tensors; gloo only CPU ones.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def align_grad_strides(model: torch.nn.Module) -> None:
    """Have each gradient of ``model``'s parameters with a dimension of size 1 (a 1x1
    convolution's kernel) carry its parameter's strides, as DDP expects.

    A convolution's backward on channels-last input gives a ``(O, C, 1, 1)`` kernel's gradient
    the strides ``(C, 1, C, C)`` where the parameter has ``(C, 1, 1, 1)``: the same memory (a
    size-1 dimension's stride is never stepped), but DDP compares the strides as numbers and
    warns, once per rank, that the gradient's layout may impair performance. The gradient is
    re-viewed with the parameter's strides as it is accumulated, before DDP reads it.
    """
    for param in model.parameters():
        if param.requires_grad and param.dim() > 1 and 1 in param.shape:
            param.register_post_accumulate_grad_hook(_view_grad_as_param)


def _view_grad_as_param(param: torch.Tensor) -> None:
    grad = param.grad
    if grad is None or grad.stride() == param.stride() or grad.layout != torch.strided:
        return
    # only strides of size-1 dimensions differ: the same elements at the same places
    if all(g == p for g, p, size in zip(grad.stride(), param.stride(), param.shape) if size != 1):
        param.grad = grad.as_strided(param.shape, param.stride(), grad.storage_offset())


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group if there is one (stopping with its launcher:
    :func:`stop_with_launcher`); pick this process's device."""
    stop_with_launcher()
    world_size = launched_processes()
    rank, local_rank = launched_rank(), launched_local_rank()
    resolved = resolve_device(device, local_rank)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistContext(rank, local_rank, world_size, resolved, owns_group)


def teardown_distributed(ctx: DistContext) -> None:
    """Leave the process group if :func:`setup_distributed` joined it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
