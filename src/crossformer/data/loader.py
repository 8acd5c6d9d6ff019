"""DataLoaders over the three tasks' datasets (image folders, COCO, label maps), with unreadable
images reported by the main process."""

from __future__ import annotations

import signal
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..engine.cpus import usable_workers
from ..engine.distributed import DistContext
from ..engine.seeding import sample_seed, seeded_rngs
from .folder import SKIP_HINT, UNREADABLE_ERRORS, DataError, opened, oriented_size, size_difference, unreadable_reason
from .sampler import ShardedSampler

__all__ = ["ImageBatch", "collate_images", "build_loader", "raise_or_count_unreadable", "gather_skipped",
           "find_unreadable", "check_readable"]

# (images (B, 3, H, W), targets (B,), unreadable files as "path: reason")
ImageBatch = tuple[torch.Tensor, torch.Tensor, list[str]]


def collate_images(samples: Sequence[tuple[torch.Tensor | None, int, str | None]]) -> ImageBatch:
    """Stack the readable samples; list the unreadable ones instead of raising in a worker."""
    good = [(img, t) for img, t, err in samples if err is None]
    failures = [err for _, _, err in samples if err is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), failures
    return torch.stack([img for img, _ in good]), torch.tensor([t for _, t in good]), failures


def raise_or_count_unreadable(
    failures: list[str], skip_corrupt: bool, on_skip: Callable[[str], None] | None = None
) -> int:
    """The number of unreadable samples in a batch (``failures``: ``path: reason``); an error
    naming the first unless skipping.

    ``on_skip("image PATH: reason")`` is called for each skipped sample (as the log names it).
    """
    if failures and not skip_corrupt:
        raise DataError(f"cannot read image {failures[0]}{SKIP_HINT}")
    if on_skip is not None:
        for failure in failures:
            on_skip(f"image {failure}")
    return len(failures)


def gather_skipped(ctx: DistContext, mine: list[str], on_skip: Callable[[str], None] | None = None) -> int:
    """After an evaluation's loop, every rank's files skipped as unreadable (``mine``: this
    rank's, each as the log names it, ``image PATH: reason``): ``on_skip(item)`` for each, in
    rank order, and their number. Every rank calls it (a gather) and gets them all, so that a
    task's :meth:`~crossformer.engine.Task.skip_validation_file` counts the same on each."""
    everyone = ctx.gather_lists(mine)
    if on_skip is not None:
        for item in everyone:
            on_skip(item)
    return len(everyone)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT / SIGTERM to the main process, which stops the run cleanly
    (a worker killed by Ctrl-C would make the next batch fail instead). They still exit with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Headers(Dataset):
    """``None`` for a file whose image header reads (and, where ``sizes`` are given, whose
    size after EXIF orientation is its ``(height, width)``), else ``"path: reason"``."""

    def __init__(self, paths: Sequence[str], sizes: Sequence[tuple[int, int]] | None = None) -> None:
        self.paths, self.sizes = paths, sizes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str | None:
        path = self.paths[index]
        try:
            with opened(path) as img:  # reads the header only, not the pixels
                size, stored = oriented_size(img), (img.height, img.width)
        except UNREADABLE_ERRORS as err:
            return f"{path}: {unreadable_reason(err)}"
        differs = size_difference(size, self.sizes[index], stored) if self.sizes is not None else None
        return f"{path}: {differs}" if differs else None


def find_unreadable(
    paths: Sequence[str], num_workers: int = 0, batch_size: int = 64, progress: Any = None,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[str]:
    """``"path: reason"`` for each of ``paths`` whose image header cannot be read (or whose
    size is not its entry of ``sizes``, ``(height, width)`` as an annotation file gives them), in order.

    A cheap check (a header, not a decode) run in ``num_workers`` loader processes (at most
    one per CPU available); ``progress.update()`` (a :class:`~crossformer.engine.Progress`) is
    called per batch of paths.
    """
    loader = DataLoader(_Headers(paths, sizes), batch_size=batch_size, num_workers=usable_workers(num_workers),
                        collate_fn=list, worker_init_fn=_ignore_stop_signals)
    found: list[str] = []
    for results in loader:
        found.extend(r for r in results if r is not None)
        if progress is not None:
            progress.update()
    return found


def check_readable(paths: Sequence[str], ctx: DistContext, num_workers: int, skip_corrupt: bool,
                   log: Any = None, what: str = "validation image",
                   sizes: Sequence[tuple[int, int]] | None = None) -> list[str]:
    """A task's data check before training: the headers of this process's share of ``paths``
    (:func:`find_unreadable`; ``ctx`` says which). A bad file is a :class:`DataError` naming it
    (and how many more) unless ``skip_corrupt``; then returns the bad ones of every process's
    share as ``"path: reason"``, on every process (each must call this then). ``log`` (a
    :class:`~crossformer.engine.RunLogger`) shows progress on large sets; ``sizes`` (per path,
    ``(height, width)``) are checked too where given."""
    share = list(ShardedSampler(len(paths), ctx.rank, ctx.world_size, shuffle=False, pad=False))
    mine = [paths[i] for i in share]
    batch = 64
    large = log is not None and len(mine) > 5000  # a progress bar (or a line every 30 s) while checking ImageNet's 50k
    progress = log.progress(-(-len(mine) // batch), f"checking {what}s", every=100) if large else None
    bad = find_unreadable(mine, num_workers, batch, progress, [sizes[i] for i in share] if sizes is not None else None)
    if progress is not None:
        progress.close()
    if not skip_corrupt:  # (the same on every process: none is left in the gather below)
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(f"cannot read {what} {bad[0]}{more}{SKIP_HINT}")
        return []
    return ctx.gather_lists(bad)


class _SeededSamples(Dataset):
    """``dataset`` with each sample drawn under generators seeded from the run's ``seed``, the
    sampler's epoch and the sample's index (:func:`~crossformer.engine.seeding.seeded_rngs`).

    A sample's random augmentation is then the same whichever loader worker draws it and
    whatever that worker drew before. That is what a run resumed mid-epoch needs: its workers
    start afresh and are dealt the remaining batches anew, so without this their draws would
    differ from the uninterrupted run's from the first batch on.
    """

    def __init__(self, dataset: Dataset, sampler: ShardedSampler, seed: int) -> None:
        self.dataset, self.sampler, self.seed = dataset, sampler, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        # the sampler's epoch as set before this epoch's workers started (they hold a copy)
        with seeded_rngs(sample_seed(self.seed, self.sampler.epoch, index)):
            return self.dataset[index]


def build_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler[int],
    num_workers: int,
    seed: int,
    drop_last: bool,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] = collate_images,
    seed_each_sample: bool = False,
) -> DataLoader:
    """A loader whose workers are seeded from ``seed`` and that never draws from the global RNG;
    every task's loaders are built here.

    ``num_workers`` is capped at the CPUs this process may use
    (:func:`~crossformer.engine.cpus.usable_workers`; the trainer says so in the log).

    ``collate_fn`` makes a batch of the dataset's samples (default: :func:`collate_images`;
    detection collates lists of images and target dicts). ``seed_each_sample`` (training
    loaders, whose samples draw random augmentations; ``sampler`` a :class:`ShardedSampler`)
    draws each sample under generators seeded for it (:class:`_SeededSamples`), so that a run
    resumed mid-epoch augments as the uninterrupted run did, with loader workers too.

    The explicit generator matters for exact resume: a loader without one draws its worker
    base seed from the global torch RNG each epoch, which would shift every later random draw.
    """
    if seed_each_sample:
        if not isinstance(sampler, ShardedSampler):
            raise TypeError("seed_each_sample needs a ShardedSampler (its epoch is part of each sample's seed)")
        dataset = _SeededSamples(dataset, sampler, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=usable_workers(num_workers),
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_ignore_stop_signals,
    )
