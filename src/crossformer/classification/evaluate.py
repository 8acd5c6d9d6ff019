"""Top-1 / top-5 accuracy and loss on a labelled split, on one process or many."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import (
    DataError,
    ImageBatch,
    ImageFolderDataset,
    ShardedSampler,
    build_eval_transform,
    build_loader,
    gather_skipped,
    raise_or_count_unreadable,
)
from ..data.folder import left_out_line
from ..engine import (
    DistContext,
    Precision,
    RunLogger,
    default_workers,
    evaluation_pass,
    resolve_precision,
    setup_distributed,
    skipped_on_stderr,
    teardown_distributed,
)
from .model import load_classifier

__all__ = ["evaluate_batches", "evaluate"]


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[ImageBatch],
    ctx: DistContext,
    precision: Precision,
    skip_corrupt: bool = False,
    logger: RunLogger | None = None,
    total: int = 0,
    on_skip: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent) over every rank's batches.

    Sums are reduced over ranks, so with an unpadded sampler each image counts exactly once.
    An unreadable image (unless ``skip_corrupt``) stops every rank with the same error, none
    left waiting in a reduction. ``on_skip("image PATH: reason")`` is given each skipped image
    of every rank's share, after the loop (:func:`~crossformer.data.gather_skipped`; a rank
    that names none may pass None).
    """
    sums = {"loss": 0.0, "correct1": 0.0, "correct5": 0.0, "count": 0.0}
    skipped_files: list[str] = []

    def step(batch: ImageBatch) -> None:
        images, targets, _ = batch
        if not len(targets):
            return
        images, targets = images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
        logits = logits.float()
        sums["loss"] += float(F.cross_entropy(logits, targets, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        hits = top == targets[:, None]
        sums["correct1"] += float(hits[:, 0].sum())
        sums["correct5"] += float(hits.any(dim=1).sum())
        sums["count"] += len(targets)

    def check(batch: ImageBatch) -> None:
        raise_or_count_unreadable(batch[2], skip_corrupt, skipped_files.append)  # batch[2]: the failures

    evaluation_pass(model, batches, ctx, check, step, logger.progress(total, "eval") if logger is not None else None)
    loss_sum, correct1, correct5, count = ctx.all_reduce_sum(list(sums.values()))
    skipped = gather_skipped(ctx, skipped_files, on_skip)
    if count == 0:
        raise DataError("no readable images to evaluate")
    return {
        "loss": loss_sum / count,
        "acc1": 100.0 * correct1 / count,
        "acc5": 100.0 * correct5 / count,
        "images": int(count),
        "skipped": int(skipped),
    }


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    model: str | None = None,
    split: str = "val",
    img_size: int | tuple[int, int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    use_ema: bool = False,
    amp: str = "auto",
    device: str = "auto",
    skip_corrupt: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Evaluate a checkpoint on ``DATA/<split>`` (resize to size/crop_pct, centre crop). Size,
    crop and resize filter: the arguments, else what the checkpoint records (bicubic, 0.875).

    Our checkpoints know their model and classes; the authors' files are taken for the
    registered variant their weights fit (else they need ``model``) and take their class
    order from the sorted folder names (the ImageNet convention).
    ``num_workers`` None: the CPUs available. Works under ``torchrun`` too: images are split
    over ranks and the sums reduced.
    """
    ctx = setup_distributed(device)
    try:
        loaded = load_classifier(checkpoint, model, img_size, use_ema, ctx.device, model_kwargs)
        transform = build_eval_transform(loaded.img_size, crop_pct or loaded.crop_pct,
                                         interpolation or loaded.interpolation)
        dataset = ImageFolderDataset(data, split, classes=loaded.class_names, transform=transform)
        if ctx.is_main and dataset.left_out:  # on stderr: stdout holds the result alone
            print(left_out_line(dataset.left_out), file=sys.stderr)
        if len(dataset.classes) != loaded.num_classes:
            raise DataError(
                f"{dataset.split_dir} has {len(dataset.classes)} classes but the checkpoint's head has "
                f"{loaded.num_classes}; evaluate on the data set the model was trained for"
            )
        sampler = ShardedSampler(len(dataset), ctx.rank, ctx.world_size, shuffle=False, pad=False)
        workers = default_workers() if num_workers is None else num_workers
        loader = build_loader(dataset, batch_size, sampler, workers, seed=0, drop_last=False,
                              pin_memory=ctx.device.type == "cuda")
        # A progress bar on a terminal; no plain progress lines, so stdout holds the result alone.
        bar = RunLogger(None, enabled=ctx.is_main) if sys.stderr.isatty() else None
        metrics = evaluate_batches(loaded.model, loader, ctx, resolve_precision(amp, ctx.device), skip_corrupt,
                                   bar, total=len(loader), on_skip=skipped_on_stderr("images") if ctx.is_main else None)
        return {"model": loaded.name, "img_size": loaded.img_size, **metrics}
    finally:
        teardown_distributed(ctx)
