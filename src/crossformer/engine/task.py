"""The task interface the trainer drives (classification, detection, segmentation).

A task is built once per process from its configuration and the process's
:class:`~crossformer.engine.DistContext`; it owns the model, the data and the metric. The
trainer (:mod:`crossformer.engine.trainer`) owns everything else: the loop, accumulation,
mixed precision, the optimizer and schedule, EMA, checkpoints and resume, logging.

Contract for the training loader: it iterates ``train_sampler`` (a
:class:`~crossformer.data.ShardedSampler`) and has an explicit ``generator`` (built by
:func:`~crossformer.data.build_loader`, with ``seed_each_sample=True`` where samples draw
random augmentations); the trainer sets both per epoch, which is what makes a resumed run draw
exactly the samples and random numbers of an uninterrupted one, with loader workers too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .distributed import DistContext
from .logging import RunLogger, SkippedFiles

__all__ = ["Task", "move_to_device", "require_one_batch"]


def require_one_batch(samples: int, batch: int, world_size: int, what: str = "") -> None:
    """A one-line :class:`~crossformer.errors.DataError` where ``samples`` training samples
    give a process no whole batch of ``batch`` (``what``: e.g. ``"DIR has 5 images"``)."""
    if samples // world_size >= batch:
        return
    from ..errors import DataError

    each = f" over {world_size} processes, {samples // world_size} each" if world_size > 1 else ""
    fewer = " or run fewer processes" if world_size > 1 else ""
    raise DataError(f"{what + each + ': ' if what else ''}fewer than one batch of {batch} per process; "
                    f"lower --batch-size{fewer}")


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere in nested lists, tuples and dicts moved to ``device`` (others kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


class Task(ABC):
    """What one kind of training supplies to the engine's trainer.

    Set in ``__init__``: ``model`` (on ``ctx.device``, not yet wrapped in DDP),
    ``train_loader`` and ``train_sampler``. The class attributes name the task's primary
    metric, a key of :meth:`evaluate`'s result: best.pth keeps the weights that scored best
    by it (``higher_is_better``), and it is logged as ``val/<metric>``.
    """

    primary_metric: ClassVar[str]  # e.g. "acc1", "bbox_mAP", "mIoU"
    higher_is_better: ClassVar[bool] = True

    model: nn.Module
    train_loader: DataLoader
    train_sampler: Any  # crossformer.data.ShardedSampler
    # The run's logger (rank 0 writes, the others do nothing); the trainer sets it after __init__.
    log: RunLogger = RunLogger(None, enabled=False)

    def __init__(self, config: Any, ctx: DistContext) -> None:
        self.config, self.ctx = config, ctx
        # Lines for the run's log found while the task is built (the log is set after
        # ``__init__``): what reading the data dropped, a pretrained head left fresh. The
        # trainer logs them before the data check.
        self.notes: list[str] = []
        # Validation files skipped as unreadable (``skip_corrupt``), every rank's, as
        # :meth:`skip_validation_file` names them: the trainer's done line counts them.
        self.skipped_validation: set[str] = set()
        self._name_skipped_validation = SkippedFiles(
            lambda line: self.log.info(line), "more unreadable validation files are skipped: counted, not named")

    @abstractmethod
    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Scalar losses of one training micro-batch (already on the device), by name.

        ``model`` is what to call (the DDP wrapper when distributed); the trainer sums the
        values, back-propagates the sum and logs each (``train/<name>``). Runs under autocast.
        """

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of ``model`` on the validation data, reduced over every rank (each rank
        returns the same numbers). Keys are plain names (``acc1``, ``loss``, ``bbox_mAP``); the
        trainer logs them as ``val/<key>`` (``val_ema/<key>`` for the EMA weights)."""

    def check_data(self) -> None:
        """Raise :class:`~crossformer.errors.UserInputError` naming a file that training or
        evaluation would fail on (e.g. an unreadable validation image), before any training.

        Runs on every rank after ``__init__``: check this rank's share (``ctx.rank`` of
        ``ctx.world_size``); the trainer stops every rank with the first error. Keep it cheap
        (headers, not a full decode); ``self.log.progress`` shows progress on large sets.
        Default: nothing to check.
        """

    def checkpoint_extras(self) -> dict[str, Any]:
        """What checkpoints must carry besides the training state, to be checked on resume and
        used for inference (class names, model name and settings, input size...). Plain
        values only (tensors, numbers, strings, lists, dicts): checkpoints load weights-only."""
        return {}

    def check_resume(self, state: dict[str, Any], path: str) -> None:
        """Raise :class:`~crossformer.errors.UserInputError` when the checkpoint ``state`` (read
        from ``path``) belongs to another model or data set than this task's."""

    def to_device(self, batch: Any) -> Any:
        """A training batch from the loader, moved to ``ctx.device`` (nested lists and dicts of
        tensors by default: detection's images and target dicts)."""
        return move_to_device(batch, self.ctx.device)

    def batch_counts(self, batch: Any) -> dict[str, float]:
        """Counts summed over a report interval and over ranks: ``samples`` (what the mean
        losses are per; 0 skips the batch) and any others, logged as ``train/<name>`` when not
        zero (e.g. ``unreadable_images``). Default: the length of the batch's first element."""
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        return {"samples": float(len(first))}

    def unreadable(self, batch: Any) -> list[str]:
        """The files of a training ``batch`` skipped as unreadable (``skip_corrupt``; ``batch_counts``
        counts them), each as the trainer names it after "skipping unreadable ": ``image PATH:
        reason``. The trainer gathers every rank's and logs each file once. Default: none."""
        return []

    def skip_validation_file(self, item: str) -> None:
        """Name ``item``, a validation file skipped as unreadable (``skip_corrupt``), once a run,
        and keep it for the done line. ``item`` as :meth:`unreadable`'s: ``image PATH: reason``.
        Call it with every rank's files (:func:`~crossformer.data.check_readable` returns them)."""
        self.skipped_validation.add(item)
        self._name_skipped_validation(f"skipping unreadable {item}")

    def restore_skipped_validation(self, items: Iterable[str]) -> None:
        """The validation files that earlier sessions of a resumed run skipped (its checkpoint's
        ``run_counts``): counted on the done line with this session's, not named again."""
        items = sorted(items)
        self.skipped_validation.update(items)
        self._name_skipped_validation.mark_said(f"skipping unreadable {item}" for item in items)

    def describe(self) -> str:
        """One log line about the model and data (parameter count, sizes)."""
        return f"{type(self).__name__}: {self.parameter_count()}, {len(self.train_sampler)} training samples per process"

    def parameter_count(self) -> str:
        """The model's parameter count for :meth:`describe`: ``"27.76M params"``."""
        return f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params"

    def describe_images(self, model_name: str, num_classes: int, train_images: int, val_images: int,
                        started_from: str | None = None) -> str:
        """:meth:`describe` for a task of image data sets: ``model_name``, the parameter count,
        the class and image counts, and what the weights started from (``started_from``)."""
        return (f"{model_name}: {self.parameter_count()}, {num_classes} classes, "
                f"{train_images} train / {val_images} val images" + (f"; {started_from}" if started_from else ""))
