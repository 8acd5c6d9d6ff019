"""The run's output folder: never mix a new run into an earlier one's files.

A folder that already holds something is used only to continue that run (``resume``) or to
replace it on request (``overwrite``, which deletes the earlier run's files and says which).
A folder holding only logs (``log.txt``, ``tensorboard/``) is reused, its log continued. A run
that fails before it trains (bad input) takes back what it wrote (:class:`OutputBefore`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..atomic import OutputError, stale_temporaries, write_text_atomic
from ..errors import UserInputError, listing
from .checkpoint import BEST, LAST

__all__ = ["RUN_FILES", "claim_output", "claim_demo_output", "DEMO_MARK", "OutputBefore"]

# What a run writes in its folder (and --overwrite deletes); other files are left alone.
RUN_FILES = (LAST, BEST, "metrics.jsonl", "log.txt", "tensorboard")
LOGS_ONLY = ("log.txt", "tensorboard")
DEMO_MARK = "crossformer-demo.txt"  # a demo's output folder says so, naming the demo's task


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
            f"output folder {folder} already holds {listing(entries)}: pass --resume auto to continue that run, "
            f"--overwrite to replace it, or another --output"
        )
    _remove_stale_checkpoints(folder)
    removed = [name for name in RUN_FILES if name in entries]
    for name in removed:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


@dataclass(frozen=True)
class OutputBefore:
    """What a run's folder lacked before the run started, so that a start that fails (bad
    data, bad settings) can take back what it wrote: the folder as it was, no new logs."""

    new_folders: tuple[Path, ...]  # the folder and its parents that did not exist yet, deepest first
    new_files: tuple[Path, ...]  # the run's files (:data:`RUN_FILES`) that were not in it yet

    @classmethod
    def of(cls, output: str | Path) -> "OutputBefore":
        """The state of ``output`` now, before anything of the run is written."""
        folder = Path(output).absolute()
        new_folders = tuple(path for path in (folder, *folder.parents) if not path.exists())
        return cls(new_folders, tuple(folder / name for name in RUN_FILES if not (folder / name).exists()))

    def restore(self) -> None:
        """Delete what the run added since :meth:`of`; folders only while empty (another
        process may have written into them meanwhile)."""
        for path in self.new_files:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        for folder in self.new_folders:
            try:
                folder.rmdir()
            except OSError:  # not empty, or gone
                return


def _remove_stale_checkpoints(folder: Path) -> None:
    """Delete the half-written checkpoints of an earlier run killed while saving (each as large
    as a checkpoint): the run taking the folder over is its only writer."""
    for name in (LAST, BEST):
        for path in stale_temporaries(folder / name):
            path.unlink(missing_ok=True)


def claim_demo_output(output: str | Path, task: str, writes: tuple[str, ...], default: str | Path,
                      keep: tuple[str, ...] = ()) -> None:
    """Let the ``task`` demo start afresh in ``output``: delete its earlier output (the entries
    named in ``writes``, except ``keep``, e.g. data it reuses), say so, and mark the folder.

    A demo replaces only what a demo wrote: the folder must be new or empty, or marked by an
    earlier ``task`` demo (:data:`DEMO_MARK`), or be the demo's ``default`` folder holding no
    more than ``writes`` (from before demos marked theirs). Anything else, a training run
    above all, is refused in one line and left as it is.

    Raises:
        OutputError: ``output`` is a file.
        UserInputError: the folder holds something a ``task`` demo did not write.
    """
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} is a file, not a folder; pass another --output")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    mark = folder / DEMO_MARK
    marked = mark.is_file() and mark.read_text(encoding="utf-8").strip() == task
    earlier_default = folder.resolve() == Path(default).resolve() and set(entries) <= set(writes)
    if entries and not (marked or earlier_default):
        raise UserInputError(f"output folder {folder} already holds {listing(entries)}, not an earlier {task} "
                             f"demo's output: a demo replaces its folder, so pass a new or empty --output")
    removed = [name for name in writes if name in entries and name not in keep]
    for name in removed:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        print(f"demo: deleted the earlier {task} demo's {listing(removed)} in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(mark, f"{task}\n")  # a cut mark would name no task: the next demo would refuse the folder
