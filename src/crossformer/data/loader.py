"""DataLoaders over :class:`ImageFolderDataset`, with unreadable images reported by the main process."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .folder import DataError

__all__ = ["ImageBatch", "collate_images", "build_loader", "raise_or_count_unreadable"]

# (images (B, 3, H, W), targets (B,), unreadable files as "path: reason")
ImageBatch = tuple[torch.Tensor, torch.Tensor, list[str]]


def collate_images(samples: Sequence[tuple[torch.Tensor | None, int, str | None]]) -> ImageBatch:
    """Stack the readable samples; list the unreadable ones instead of raising in a worker."""
    good = [(img, t) for img, t, err in samples if err is None]
    failures = [err for _, _, err in samples if err is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), failures
    return torch.stack([img for img, _ in good]), torch.tensor([t for _, t in good]), failures


def raise_or_count_unreadable(failures: list[str], skip_corrupt: bool) -> int:
    """The number of unreadable samples in a batch; an error naming the first unless skipping."""
    if failures and not skip_corrupt:
        raise DataError(f"cannot read image {failures[0]}; fix or delete it, or pass --skip-corrupt to skip such files")
    return len(failures)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler[int],
    num_workers: int,
    seed: int,
    drop_last: bool,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] = collate_images,
) -> DataLoader:
    """A loader whose workers are seeded from ``seed`` and that never draws from the global RNG.

    ``collate_fn`` makes a batch of the dataset's samples (default: :func:`collate_images`;
    detection collates lists of images and target dicts).

    The explicit generator matters for exact resume: a loader without one draws its worker
    base seed from the global torch RNG each epoch, which would shift every later random draw.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
