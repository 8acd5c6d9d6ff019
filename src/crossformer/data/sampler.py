"""A sampler that shards an epoch over ranks and can start part-way through it."""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

import torch
from torch.utils.data import Sampler

__all__ = ["ShardedSampler"]

T = TypeVar("T")


class ShardedSampler(Sampler[int]):
    """Rank ``rank``'s share of each epoch: every ``world_size``-th index of one order.

    - ``shuffle``: the order is a permutation drawn from ``seed + epoch`` (same on every rank,
      so the shards are disjoint); otherwise index order.
    - ``pad``: repeat indices so every rank gets the same count (training: DDP needs equal
      step counts). Evaluation uses ``pad=False`` so no image is counted twice.
    - ``groups`` (one id per sample) with ``batch_size``: every batch of ``batch_size`` holds
      samples of one group (detection: images wider than tall or not, as mmdetection's group
      sampler, so a batch is padded to one orientation). Each group, shuffled, is padded with
      its own samples to whole batches on every rank; the batches are then shuffled together
      and each rank takes a contiguous run of them. Implies ``pad``.
    - ``set_epoch(epoch, start)``: ``start`` skips this rank's first samples, for resuming
      mid-epoch exactly where the checkpoint was taken.
    """

    def __init__(
        self, num_samples: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0, pad: bool = True,
        groups: Sequence[int] | None = None, batch_size: int = 1,
    ) -> None:
        if groups is not None and len(groups) != num_samples:
            raise ValueError(f"groups names {len(groups)} samples, not {num_samples}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.batch_size = batch_size
        self.members = None if groups is None else [
            [i for i, g in enumerate(groups) if g == group] for group in sorted(set(groups))
        ]
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self, items: list[T], generator: torch.Generator) -> list[T]:
        """``items`` in this epoch's random order (as they are without ``shuffle``)."""
        if not self.shuffle:
            return items
        return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]

    def _padded_group_size(self, size: int) -> int:
        """``size`` rounded up to whole batches on every rank."""
        whole = self.batch_size * self.world_size
        return -(-size // whole) * whole

    def shard(self) -> list[int]:
        """This rank's whole share of the current epoch (before skipping ``start``)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.members is not None:
            return self._grouped_shard(generator)
        order = self._order(list(range(self.num_samples)), generator)
        if self.pad and self.num_samples % self.world_size:
            extra = self.world_size - self.num_samples % self.world_size
            order += (order * (extra // max(len(order), 1) + 1))[:extra]
        return order[self.rank :: self.world_size]

    def _grouped_shard(self, generator: torch.Generator) -> list[int]:
        """This rank's run of one-group batches (see the class docstring)."""
        batches: list[list[int]] = []
        for members in self.members:
            order = self._order(members, generator)
            size = self._padded_group_size(len(order))
            order = (order * (size // len(order) + 1))[:size]
            batches += [order[i : i + self.batch_size] for i in range(0, size, self.batch_size)]
        batches = self._order(batches, generator)
        per_rank = len(batches) // self.world_size
        return [i for batch in batches[self.rank * per_rank : (self.rank + 1) * per_rank] for i in batch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start :])

    def __len__(self) -> int:
        if self.members is not None:
            per_rank = sum(self._padded_group_size(len(m)) for m in self.members) // self.world_size
        elif self.pad:
            per_rank = -(-self.num_samples // self.world_size)
        else:
            per_rank = len(range(self.rank, self.num_samples, self.world_size))
        return max(per_rank - self.start, 0)
