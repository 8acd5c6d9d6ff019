"""Seeds, deterministic mode, and capturing/restoring every RNG a training step draws from.

Augmentations draw from Python's ``random`` and torch; Mixup/CutMix from NumPy; drop path
from torch (CPU or CUDA). Restoring all of them, together with the sampler position, makes a
resumed run draw exactly what the uninterrupted run would have drawn. Data loader workers are
started afresh by a resumed run, so their draws cannot be restored: each training sample is
drawn under generators seeded for it instead (:func:`sample_seed`, :func:`seeded_rngs`).
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Iterator

import numpy as np
import torch

__all__ = [
    "seed_everything", "enable_determinism", "deterministic_kernels", "capture_rng_state", "restore_rng_state",
    "sample_seed", "seeded_rngs",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for drawing sample ``index`` in ``epoch`` of a run seeded ``seed``: well
    mixed (NumPy's ``SeedSequence``), so that neighbouring samples and epochs draw unrelated streams."""
    words = np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Python's ``random``, NumPy's global and torch's CPU generators seeded from ``seed`` inside
    the block (what augmentations draw from), and put back as they were after it: the caller's
    own streams (dropout, Mixup) go on as if the block had drawn nothing."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA streams are the caller's
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def enable_determinism() -> None:
    """Bitwise-reproducible kernels (slower); needed for exact resume on GPUs."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Inside the block, bitwise-reproducible kernels where ``enabled`` (:func:`enable_determinism`);
    after it, torch's process-wide switches and ``CUBLAS_WORKSPACE_CONFIG`` as they were: a program
    (or test process) that trains once deterministically does not run all that follows that way."""
    if not enabled:
        yield
        return
    algorithms = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, workspace = torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    enable_determinism()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])
        torch.backends.cudnn.benchmark = benchmark
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def capture_rng_state() -> dict[str, Any]:
    """All RNG states as tensors, ints and lists (so ``weights_only`` loading accepts them)."""
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
