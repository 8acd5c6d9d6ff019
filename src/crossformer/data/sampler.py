"""A sampler that shards an epoch over ranks and can start part-way through it."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ShardedSampler"]


class ShardedSampler(Sampler[int]):
    """Rank ``rank``'s share of each epoch: every ``world_size``-th index of one order.

    - ``shuffle``: the order is a permutation drawn from ``seed + epoch`` (same on every rank,
      so the shards are disjoint); otherwise index order.
    - ``pad``: repeat indices so every rank gets the same count (training: DDP needs equal
      step counts). Evaluation uses ``pad=False`` so no image is counted twice.
    - ``set_epoch(epoch, start)``: ``start`` skips this rank's first samples, for resuming
      mid-epoch exactly where the checkpoint was taken.
    """

    def __init__(
        self, num_samples: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0, pad: bool = True
    ) -> None:
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self) -> list[int]:
        """This rank's whole share of the current epoch (before skipping ``start``)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        if self.pad and self.num_samples % self.world_size:
            extra = self.world_size - self.num_samples % self.world_size
            order += (order * (extra // max(len(order), 1) + 1))[:extra]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start :])

    def __len__(self) -> int:
        per_rank = -(-self.num_samples // self.world_size) if self.pad else len(range(self.rank, self.num_samples, self.world_size))
        return max(per_rank - self.start, 0)
