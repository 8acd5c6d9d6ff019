"""mIoU, mean accuracy and pixel accuracy over a whole split, as mmsegmentation computes them.

Per class ``c``, over every evaluated pixel whose label is not ``ignore_index`` (predictions
at ignored pixels do not count), four areas are summed over the whole split (and over
``torchrun`` processes): intersection (pred = label = c), union (pred = c or label = c),
prediction and label. Then, as mmseg's ``eval_metrics``:

- IoU(c) = intersection / union, NaN when c is in neither prediction nor label;
- Acc(c) = intersection / label area, NaN when c is absent from the labels (even if
  predicted: such a class still counts in mIoU with IoU 0);
- mIoU and mAcc are the means over the non-NaN classes; aAcc = sum intersection / sum label.

Values are fractions in 0..1; the printed table shows percentages like mmseg's log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data import DataError, ShardedSampler, build_loader, gather_skipped
from ..engine import DistContext, RunLogger, evaluation_pass
from .data import (ABSENT_SCORES, SegBatch, SegmentationDataset, check_batch, collate_segmentation,
                   validation_file)
from .inference import InferenceConfig, segment
from .transforms import IGNORE_INDEX

__all__ = ["IoUAccumulator", "SegMetrics", "evaluate_segmentor"]


class IoUAccumulator:
    """Per-class intersection / union / prediction / label pixel counts (float64: exact), and
    the ignored label pixels (what a class that no label holds may have been stored as)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.areas = torch.zeros(4, num_classes, dtype=torch.float64)  # intersect, union, pred, label
        self.ignored = 0.0

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one prediction/label pair (same shape, class indices; ``label`` may hold ``ignore_index``)."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        keep = label != self.ignore_index
        self.ignored += float(keep.numel() - keep.sum())
        pred, label = pred[keep].long(), label[keep].long()
        n = self.num_classes
        intersect = torch.bincount(pred[pred == label], minlength=n)[:n]
        area_pred = torch.bincount(pred, minlength=n)[:n]
        area_label = torch.bincount(label, minlength=n)[:n]
        union = area_pred + area_label - intersect
        self.areas += torch.stack([intersect, union, area_pred, area_label]).cpu().double()

    def all_reduce(self, ctx: DistContext) -> None:
        """Sum the counts over ``torchrun`` processes (every rank must call it)."""
        summed = ctx.all_reduce_sum([*self.areas.flatten().tolist(), self.ignored])
        self.areas = torch.tensor(summed[:-1], dtype=torch.float64).view(4, self.num_classes)
        self.ignored = summed[-1]

    def compute(self, class_names: Sequence[str] | None = None, images: int = 0, skipped: int = 0) -> "SegMetrics":
        intersect, union, _, area_label = self.areas.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersect / union
            acc = intersect / area_label
        total_label = area_label.sum()
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        return SegMetrics(
            miou=_nanmean(iou), macc=_nanmean(acc),
            aacc=float(intersect.sum() / total_label) if total_label else math.nan,
            iou=iou.tolist(), acc=acc.tolist(), class_names=names, images=images, skipped=skipped,
            label_pixels=area_label.tolist(), ignored_pixels=self.ignored,
        )


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


@dataclass
class SegMetrics:
    """Results of one evaluation (fractions; per-class lists in class order, NaN as above)."""

    miou: float
    macc: float
    aacc: float
    iou: list[float]
    acc: list[float]
    class_names: list[str]
    images: int = 0
    skipped: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    label_pixels: list[float] = field(default_factory=list)  # per class: 0 where no label map holds it
    ignored_pixels: float = 0.0

    @property
    def absent(self) -> list[bool]:
        """Per class: whether no evaluated label map holds it (its Acc is nan; its IoU 0 where
        the model predicts it, else nan)."""
        return [pixels == 0 for pixels in self.label_pixels] or [False] * len(self.class_names)

    def label_counts(self) -> list[float]:
        """Pixels per label value (classes, then 255: ignored), as
        :func:`~crossformer.segmentation.data.absent_classes_note` takes them."""
        counts = [*self.label_pixels, *[0.0] * (IGNORE_INDEX + 1 - len(self.label_pixels))]
        counts[IGNORE_INDEX] = self.ignored_pixels
        return counts

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (NaN -> None): ``mIoU``, ``mAcc``, ``aAcc``, ``per_class`` {name: {IoU, Acc}}, counts."""

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "mIoU": clean(self.miou), "mAcc": clean(self.macc), "aAcc": clean(self.aacc),
            "images": self.images, "skipped": self.skipped,
            "per_class": {n: {"IoU": clean(i), "Acc": clean(a)} for n, i, a in zip(self.class_names, self.iou, self.acc)},
            **({"settings": self.settings} if self.settings else {}),
        }

    def table(self) -> str:
        """A per-class IoU / Acc table in percent (``nan`` where undefined; a class that no label
        map holds marked ``*`` and explained below) and the summary line."""
        width = max(len("Class"), *(len(n) for n in self.class_names))
        lines = [f"{'Class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
        for name, iou, acc, absent in zip(self.class_names, self.iou, self.acc, self.absent):
            lines.append(f"{name:<{width}}  {_pct(iou):>6}  {_pct(acc):>6}" + ("  *" if absent else ""))
        lines.append("-" * (width + 16))
        if any(self.absent):
            lines.append(f"* in no label map: {ABSENT_SCORES}")
        lines.append(f"mIoU {_pct(self.miou)}  mAcc {_pct(self.macc)}  aAcc {_pct(self.aacc)}  ({self.images} images)")
        return "\n".join(lines)


def _pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"


@torch.no_grad()
def evaluate_segmentor(
    segmentor: torch.nn.Module,
    dataset: SegmentationDataset,
    inference: InferenceConfig | None = None,
    ctx: DistContext | None = None,
    autocast: Callable[[], Any] | None = None,
    skip_corrupt: bool = False,
    logger: RunLogger | None = None,
    num_workers: int = 0,
    on_skip: Callable[[str], None] | None = None,
) -> SegMetrics:
    """Evaluate ``segmentor`` on an untransformed ``dataset`` (one image at a time, at its own
    size), each rank taking every ``world_size``-th image; counts summed over ranks.

    ``autocast``: e.g. ``Precision.autocast``. ``logger``: the progress bar. ``on_skip("file
    PATH: reason")`` is given each file skipped as unreadable, of every rank's share, after the
    loop (:func:`~crossformer.data.gather_skipped`; a rank that names none may pass None).
    The model's train/eval mode is restored. Bad data in any rank's share stops every rank with
    the same error.
    """
    if dataset.transform is not None:
        raise ValueError("evaluate_segmentor needs the dataset without a training transform")
    if segmentor.num_classes != dataset.num_classes:
        raise DataError(
            f"{dataset.image_dir} has {dataset.num_classes} classes but the segmentor predicts {segmentor.num_classes}; "
            "evaluate on the data set the model was trained for"
        )
    ctx = ctx or DistContext()
    inference = inference or InferenceConfig()
    device = next(segmentor.parameters()).device
    sampler = ShardedSampler(len(dataset), ctx.rank, ctx.world_size, shuffle=False, pad=False)
    loader = build_loader(dataset, 1, sampler, num_workers, seed=0, drop_last=False, collate_fn=collate_segmentation)
    accumulator = IoUAccumulator(dataset.num_classes)
    images = 0
    skipped_files: list[str] = []  # this rank's, as "file PATH: reason"

    def step(batch: SegBatch) -> None:
        nonlocal images
        for image, label in zip(batch.images, batch.labels):
            pred = segment(segmentor, image.permute(1, 2, 0).numpy(), inference, device, autocast)
            accumulator.update(pred, label.to(pred.device))
            images += 1

    def check(batch: SegBatch) -> None:
        check_batch(batch, skip_corrupt, lambda line: skipped_files.append(validation_file(line)))

    progress = logger.progress(len(loader), "eval", every=max(len(loader) // 10, 1)) if logger is not None else None
    evaluation_pass(segmentor, loader, ctx, check, step, progress)
    accumulator.all_reduce(ctx)
    images = int(ctx.all_reduce_sum([images])[0])
    skipped = gather_skipped(ctx, skipped_files, on_skip)
    if images == 0:
        raise DataError(f"no readable images to evaluate in {dataset.image_dir}")
    metrics = accumulator.compute(dataset.classes, images, skipped)
    metrics.settings = {
        "mode": inference.mode, "scale": list(inference.scale), "ratios": list(inference.ratios), "flip": inference.flip,
        "size_divisor": inference.size_divisor,
        **({"crop_size": list(inference.crop_size), "stride": list(inference.stride)} if inference.mode == "slide" else {}),
    }
    return metrics
