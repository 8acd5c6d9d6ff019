"""The run's output folder: never mix a new run into an earlier one's files.

A folder that already holds something is used only to continue that run (``resume``) or to
replace it on request (``overwrite``, which deletes the earlier run's files once the new run has
started, and says which: a start that fails on bad input leaves the earlier run as it was).
A folder holding only logs (``log.txt``, ``tensorboard/``) is reused, its log continued. A run
that fails before it trains (bad input) takes back what it wrote (:class:`OutputBefore`).
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from ..atomic import OutputError, output_error, stale_temporaries, write_text_atomic
from ..errors import UserInputError, listing
from .checkpoint import BEST, LAST

__all__ = ["RUN_FILES", "EARLIER_RUN", "OutputClaim", "claim_output", "claim_demo_output", "DEMO_MARK",
           "OutputBefore", "is_marked"]

# What a run writes in its folder (and --overwrite deletes); other files are left alone.
RUN_FILES = (LAST, BEST, "metrics.jsonl", "log.txt", "tensorboard")
LOGS_ONLY = ("log.txt", "tensorboard")
DEMO_MARK = "crossformer-demo.txt"  # a demo's output folder says so, naming the demo's task


EARLIER_RUN = ".earlier-run"  # --overwrite moves the earlier run's files here until the new run has started
RUN_LOCK = ".crossformer-lock"  # locked by the run writing into the folder, deleted when it ends


def _lock(folder: Path) -> int | None:
    """An exclusive lock on ``folder``'s :data:`RUN_LOCK` (its file descriptor): the folder's
    one writer. Refused in one line while another run holds it; None where the file system
    has no locks (some network mounts): the run goes on unguarded. A killed run's lock goes
    with its process."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: unguarded
        return None
    path = folder / RUN_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise output_error(path, err) or err from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip()
        os.close(fd)
        raise UserInputError(f"output folder {folder} is in use by another run ({holder or 'its lock is held'}): "
                             f"wait for it to end, stop it, or pass another --output") from None
    except OSError:
        os.close(fd)
        return None
    try:  # who holds it, for another run's message; a full disk leaves that out, not the lock
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    except OSError:
        pass
    return fd


@dataclass
class OutputClaim:
    """A run's hold on its folder (:func:`claim_output`): the folder's lock (:data:`RUN_LOCK`),
    taken at the claim where the folder exists, else by :meth:`lock` once the run has made it,
    and let go by :meth:`release`. With ``overwrite``, the earlier run's files are moved aside
    (into :data:`EARLIER_RUN`), not deleted: a start that fails on bad data or settings puts
    them back (:meth:`give_back`), a start that succeeds deletes them (:meth:`replace`)."""

    folder: Path
    displaced: tuple[str, ...] = ()  # the earlier run's files, moved aside
    lock_fd: int | None = None

    def lock(self) -> None:
        """Take the folder's lock if the claim could not (the folder was new)."""
        if self.lock_fd is None and self.folder.is_dir():
            self.lock_fd = _lock(self.folder)

    def release(self) -> None:
        """The run has ended: delete the lock file, then let go of the lock."""
        if self.lock_fd is not None:
            (self.folder / RUN_LOCK).unlink(missing_ok=True)
            os.close(self.lock_fd)
            self.lock_fd = None

    def replace(self) -> None:
        """The new run has started: delete the earlier run's files."""
        if self.displaced:
            shutil.rmtree(self.folder / EARLIER_RUN)

    def give_back(self) -> None:
        """The new run failed to start: put the earlier run's files back where they were."""
        aside = self.folder / EARLIER_RUN
        for name in self.displaced:
            (aside / name).rename(self.folder / name)
        if self.displaced:
            aside.rmdir()


def claim_output(output: str | Path, resume: str | None, overwrite: bool) -> OutputClaim:
    """Check that a run may write into ``output``: a new or empty folder, one holding only logs,
    the run that ``resume`` continues (``auto``, or a checkpoint inside the folder), or, with
    ``overwrite``, an earlier run, whose files (:data:`RUN_FILES`) are moved aside.

    Raises:
        OutputError: ``output`` is a file.
        UserInputError: the folder holds something that is not the run ``resume`` continues,
            and ``overwrite`` is not set; or ``resume`` continues the folder's run and
            ``overwrite`` would replace it.
    """
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} is a file, not a folder; pass another --output")
    claim = OutputClaim(folder, lock_fd=_lock(folder) if folder.is_dir() else None)  # before anything is moved
    try:
        return _claim(claim, resume, overwrite)
    except BaseException:
        claim.release()
        raise


def _claim(claim: OutputClaim, resume: str | None, overwrite: bool) -> OutputClaim:
    """:func:`claim_output` once ``claim`` holds the folder's lock (where it exists)."""
    folder = claim.folder
    entries = sorted(p.name for p in folder.iterdir() if p.name != RUN_LOCK) if folder.is_dir() else []
    logs_only = all(name in LOGS_ONLY for name in entries)
    if overwrite and resume and not logs_only and _resumes_from(folder, resume, entries):
        # it resumed, silently ignoring --overwrite (a folder with no checkpoint to resume from
        # is overwritten: resume=auto then starts afresh, as a job's first start does)
        raise UserInputError(
            f"--resume {resume} continues the run in {folder} and --overwrite would replace it (run.resume and "
            f"run.overwrite, from the command line or the config file): keep one, turning the other off with "
            f"--no-overwrite or run.resume=null")
    if logs_only or (resume and not overwrite and _continues_its_run(folder, resume, entries)):
        _remove_stale_checkpoints(folder)
        return claim
    if not overwrite:
        raise UserInputError(_refusal(folder, resume, entries))
    _remove_stale_checkpoints(folder)
    aside = folder / EARLIER_RUN
    if aside.exists():  # left by an --overwrite killed before its run started: replaced as asked twice
        shutil.rmtree(aside)
    displaced = tuple(name for name in RUN_FILES if name in entries)
    if displaced:
        aside.mkdir()
        for name in displaced:
            (folder / name).rename(aside / name)
    claim.displaced = displaced
    return claim


def _continues_its_run(folder: Path, resume: str, entries: list[str]) -> bool:
    """Whether ``resume`` continues the run in ``folder``: ``auto`` with the folder's own
    ``last.pth``, or with no checkpoint there yet (a run stopped before its first, restarted by
    the same command), or a checkpoint file in the folder (:func:`_resumes_from`)."""
    if resume == "auto":
        return LAST in entries or BEST not in entries
    return _resumes_from(folder, resume, entries)


def _resumes_from(folder: Path, resume: str, entries: list[str]) -> bool:
    """Whether ``resume`` loads a checkpoint of ``folder``: ``auto`` with its ``last.pth``, or a
    file in it, by the path given or by where that path leads (a link in or out of it)."""
    if resume == "auto":
        return LAST in entries
    path, here = Path(resume).expanduser(), folder.resolve()
    return path.absolute().parent.resolve() == here or path.resolve().parent == here


def _refusal(folder: Path, resume: str | None, entries: list[str]) -> str:
    """Why ``folder`` is refused, and the ways on."""
    held = f"output folder {folder} already holds {listing(entries)}"
    if resume == "auto":  # a best.pth without its last.pth: starting afresh would replace it
        return (f"{held} but no {LAST} to continue from: pass --resume {folder / BEST} to continue from the best "
                f"checkpoint, --overwrite to replace that run, or another --output")
    if resume:
        return (f"{held}, another run than the one --resume {resume} continues: pass that run's own folder, "
                f"a new --output, or --overwrite to replace the run in {folder}")
    if set(entries) <= set(RUN_FILES) - {LAST, BEST}:  # a run's records alone: nothing to continue from
        return f"{held} but no checkpoint (that run ended before its first): pass --overwrite to start it again, or " \
               f"another --output"
    return f"{held}: pass --resume auto to continue that run, --overwrite to replace it, or another --output"


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
            try:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            except NotADirectoryError:  # the folder was never made: a file is on its path
                return
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
    marked = is_marked(folder / DEMO_MARK, task)
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
    write_text_atomic(folder / DEMO_MARK, f"{task}\n")  # a cut mark would name no task: the next demo would refuse the folder


def is_marked(mark: Path, kind: str) -> bool:
    """Whether the mark file ``mark`` (a demo's, make-data's) says its folder holds a ``kind``
    the command wrote, which it may replace."""
    return mark.is_file() and mark.read_text(encoding="utf-8").strip() == kind
