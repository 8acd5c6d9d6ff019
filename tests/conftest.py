"""Shared fixtures: the reference files in ../shared and tiny model configurations."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for spec_reference

# Keeping freed memory is process-wide and opt-in: a developer's setting must not reach the
# commands run in this process (tests/test_memory.py checks the setting in processes of its own).
os.environ.pop("CROSSFORMER_KEEP_FREED_MEMORY", None)

# Per spec section 9: the settings the reference checkpoints were made with.
REFERENCE_CONFIGS = {
    "v1": dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), group_size=(7, 7, 7, 7),
               interval=(8, 4, 2, 1), use_acl=False, long_distance="fixed_interval", num_classes=10),
    "pp": dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), group_size=(4, 4, 14, 7),
               interval=(4, 2, 1, 1), use_acl=True, long_distance="fixed_group", num_classes=10),
}


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference files not found at {REFERENCE} (they ship beside the repo, in ../shared)")
    return REFERENCE


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image folder (:func:`classification_fixtures.make_image_folder`), one per test module."""
    from classification_fixtures import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """The whole run on one intra-op thread. The suite's tensors are tiny: on a quiet 2-core machine
    a second thread changes little (tests/test_fast_paths.py: 16 s either way; the reference tests,
    the largest tensors, 1-2 s more on one), but on a busy one its spin-waits made tests many times
    slower (test_fast_paths.py: 300 s on two threads, 80 s on one). Tests of threaded code set their
    own count. Torch's default is recorded first, so a run with ``run.cpu_threads: 0`` still gets it."""
    from crossformer.engine.distributed import TORCH_DEFAULT_THREADS

    torch.set_num_threads(1)
    yield
    torch.set_num_threads(TORCH_DEFAULT_THREADS)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Training (``run.cpu_threads``) and some tests set torch's thread count, module fixtures that
    train too (before any test's own fixtures run): each test starts on the run's one thread."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
