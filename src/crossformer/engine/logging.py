"""What a run tells people: log lines, progress bars, TensorBoard scalars, ``metrics.jsonl``.

Only the main process (rank 0) prints or writes; the others get a logger that does nothing,
so callers never branch on the rank themselves.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..atomic import OutputError, make_folder, output_error, write_text_atomic

__all__ = ["RunLogger", "Progress", "SkippedFiles", "skipped_on_stderr", "MAX_NAMED_FILES"]

MAX_NAMED_FILES = 20  # files a run names as skipped in each list; the rest are counted only


class Progress:
    """A progress bar on a terminal; otherwise a plain line every ``every`` steps, every
    ``seconds`` seconds (so a slow run in a log file is never silent for long) and at the end."""

    def __init__(self, logger: "RunLogger", total: int, desc: str, initial: int = 0, every: int = 50,
                 seconds: float = 30.0) -> None:
        self.logger, self.total, self.desc, self.every, self.seconds = logger, total, desc, max(every, 1), seconds
        self.count = self.initial = initial
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if logger.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)

    def update(self, **values: float) -> None:
        self.count += 1
        shown = {k: f"{v:.4g}" for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif self.logger.enabled and (self.count % self.every == 0 or self.count == self.total
                                      or time.perf_counter() - self.last_line >= self.seconds):
            self.last_line = now = time.perf_counter()
            rate = (self.count - self.initial) / max(now - self.start, 1e-9)
            fields = " ".join(f"{k} {v}" for k, v in shown.items())
            self.logger.info(f"{self.desc} [{self.count}/{self.total}] {fields} ({rate:.2f} it/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLogger:
    """Logs of one run under ``output_dir``: ``log.txt``, ``metrics.jsonl``, ``tensorboard/``."""

    def __init__(self, output_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._writer = None
        self.failure: OutputError | None = None  # the first file it could not write (it writes none after)
        if not enabled or self.output_dir is None:
            return
        make_folder(self.output_dir)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra: crossformer[logging]
                self.info("tensorboard is not installed: scalars go to metrics.jsonl only")
            else:
                self._writer = SummaryWriter(str(make_folder(self.output_dir / "tensorboard")))

    def resume_at(self, step: int, restarted_epoch: int | None = None, redo_evaluation: bool = False) -> None:
        """Forget the records of the steps after ``step`` (``metrics.jsonl`` and TensorBoard's):
        a run resumed from a checkpoint at ``step`` writes them again (a stop or a kill after the
        checkpoint had logged some already), and a line cut short by a kill goes too; with
        ``restarted_epoch``, the ``metrics.jsonl`` records of that epoch and later ones too (it is
        trained again, its updates counted anew); with ``redo_evaluation``, an evaluation's
        record at ``step`` too (the checkpoint was written before it)."""
        if not self.enabled or self.output_dir is None:
            return
        path = self.output_dir / "metrics.jsonl"
        kept: list[dict[str, Any]] = []
        purge_step = step if redo_evaluation else step + 1
        if path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
            records = [_record(line) for line in lines]
            stays = [_kept(record, step, restarted_epoch, redo_evaluation) for record in records]
            kept = [record for record, stay in zip(records, stays) if stay]
            if not all(stays):
                write_text_atomic(path, "".join(line for line, stay in zip(lines, stays) if stay))
            if restarted_epoch is not None:  # TensorBoard's points of the restarted epoch go too
                restarted = [int(record["step"]) for record in records
                             if record is not None and int(record.get("epoch", -1)) >= restarted_epoch]
                purge_step = min([purge_step, *restarted])
        if self._writer is not None:  # TensorBoard drops its events from purge_step on
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self._writer.log_dir
            self._writer.close()
            # an evaluation done again: its step's points too, so the update's own, kept in
            # metrics.jsonl, are written again
            self._writer = SummaryWriter(log_dir, purge_step=purge_step)
            for record in kept if redo_evaluation else []:
                if float(record["step"]) == step:
                    for key, value in record.items():
                        if key not in ("step", "epoch") and isinstance(value, (int, float)):
                            self._writer.add_scalar(key, value, step)

    def info(self, message: str, echo: bool = True) -> None:
        """``message`` on stdout (unless not ``echo``: errors the caller prints itself) and in ``log.txt``."""
        if not self.enabled:
            return
        if echo:
            print(message, flush=True)
        if self.output_dir is not None:
            self._append("log.txt", f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def scalars(self, step: int, values: dict[str, float], **fields: Any) -> None:
        """One ``metrics.jsonl`` record ``{step, **fields, **values}`` and a TensorBoard point each."""
        if not self.enabled or self.output_dir is None:
            return
        record = {"step": step, **fields, **{k: float(v) for k, v in values.items()}}
        self._append("metrics.jsonl", json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def _append(self, name: str, text: str) -> None:
        """``text`` at the end of ``OUTPUT/name``. A destination that fails (a full disk) is kept
        as :attr:`failure`, not raised, and no file is written after it: rank 0 alone writes, and
        stopping alone would leave the other ranks waiting (:meth:`raise_failure` where they agree)."""
        if self.failure is not None:
            return
        path = self.output_dir / name
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as err:
            self.failure = output_error(path, err)
            if self.failure is None:
                raise

    def raise_failure(self) -> None:
        """Raise :attr:`failure` (an ``OutputError``), the first log file it could not write, if any."""
        if self.failure is not None:
            raise self.failure

    def progress(self, total: int, desc: str, initial: int = 0, every: int = 50) -> Progress:
        return Progress(self, total, desc, initial, every)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _record(line: str) -> dict[str, Any] | None:
    """A ``metrics.jsonl`` line's record: a whole line (a kill may cut the last one short) holding
    an object with a numeric ``step`` (and ``epoch``, where it has one); else None."""
    try:
        record = json.loads(line) if line.endswith("\n") else None
        if isinstance(record, dict):
            float(record["step"]), int(record.get("epoch", -1))
            return record
    except (ValueError, KeyError, TypeError):
        pass
    return None


def _kept(record: dict[str, Any] | None, step: int, restarted_epoch: int | None, redo_evaluation: bool = False) -> bool:
    """Whether a ``metrics.jsonl`` record (:func:`_record`; None: a broken line) stays at a resume
    (:meth:`RunLogger.resume_at`): a record of a step up to ``step``, of an epoch before
    ``restarted_epoch`` where given, and with ``redo_evaluation`` no evaluation's (``val/``
    values) at ``step``."""
    if record is None or float(record["step"]) > step:
        return False
    if redo_evaluation and float(record["step"]) == step and any(key.startswith("val") for key in record):
        return False
    return restarted_epoch is None or int(record.get("epoch", -1)) < restarted_epoch


class SkippedFiles:
    """Says each line naming a skipped file once, the first :data:`MAX_NAMED_FILES` of them;
    past the limit, one ``rest`` line says the others are counted only. A folder of bad files
    would otherwise flood the log (every skip is counted elsewhere, e.g. in the metrics).

    ``say`` is where the lines go (``RunLogger.info``, stderr); ``None`` names nothing.
    """

    def __init__(self, say: Callable[[str], None] | None, rest: str, limit: int = MAX_NAMED_FILES) -> None:
        self.say, self.rest, self.limit = say, rest, limit
        self.named: set[str] = set()

    def mark_said(self, lines: Iterable[str]) -> None:
        """Take ``lines`` as said already (by an earlier session of a resumed run), within the limit."""
        for line in lines:
            if len(self.named) > self.limit:
                return
            self.named.add(line)

    def __call__(self, line: str) -> None:
        """``line``, e.g. ``skipping unreadable image PATH: reason``, unless said or over the limit."""
        if line in self.named or len(self.named) > self.limit:
            return
        self.named.add(line)
        if self.say is not None:
            self.say(self.rest if len(self.named) > self.limit else line)


def skipped_on_stderr(what: str = "files") -> Callable[[str], None]:
    """Names each skipped file on stderr, ``skipping unreadable ITEM`` (``ITEM`` as the training
    log names it: ``image PATH: reason``), the first :data:`MAX_NAMED_FILES`, then one line
    saying the other ``what`` are counted only: how ``crossformer evaluate`` names the files it
    skips (its stdout holds the result alone)."""
    named = SkippedFiles(lambda line: print(line, file=sys.stderr), f"more unreadable {what} are skipped: counted, not named")
    return lambda item: named(f"skipping unreadable {item}")
