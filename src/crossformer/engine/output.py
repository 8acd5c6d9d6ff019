"""The run's output folder: never mix a new run into an earlier one's files.

A folder that already holds something is used only to continue that run (``resume``) or to
replace it on request (``overwrite``, which deletes the earlier run's files and says which).
A folder holding only logs (``log.txt``, ``tensorboard/``: an attempt that stopped before
training, e.g. on bad input) is reused, its log continued.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..atomic import OutputError, stale_temporaries
from ..errors import UserInputError
from .checkpoint import BEST, LAST

__all__ = ["RUN_FILES", "claim_output"]

# What a run writes in its folder (and --overwrite deletes); other files are left alone.
RUN_FILES = (LAST, BEST, "metrics.jsonl", "log.txt", "tensorboard")
LOGS_ONLY = ("log.txt", "tensorboard")


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def claim_output(output: str | Path, resume: str | None, overwrite: bool) -> list[str]:
    """Check that a run may write into ``output``; with ``overwrite``, delete an earlier run's files.

    Returns the names deleted (empty when the folder was new or empty, or when resuming).

    Raises:
        OutputError: ``output`` is a file.
        UserInputError: the folder holds something and neither ``resume`` nor ``overwrite`` is set.
    """
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} is a file, not a folder; pass another --output")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if resume or all(name in LOGS_ONLY for name in entries):
        _remove_stale_checkpoints(folder)
        return []
    if not overwrite:
        raise UserInputError(
            f"output folder {folder} already holds {_listing(entries)}: pass --resume auto to continue that run, "
            f"--overwrite to replace it, or another --output"
        )
    _remove_stale_checkpoints(folder)
    removed = [name for name in RUN_FILES if name in entries]
    for name in removed:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def _remove_stale_checkpoints(folder: Path) -> None:
    """Delete the half-written checkpoints of an earlier run killed while saving (each as large
    as a checkpoint): the run taking the folder over is its only writer."""
    for name in (LAST, BEST):
        for path in stale_temporaries(folder / name):
            path.unlink(missing_ok=True)
