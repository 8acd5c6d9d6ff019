"""Token grouping for short-distance (SDA) and long-distance (LDA) attention.

Every grouping the architecture uses is one pattern: the padded map splits into regions of
``(Gh * I) x (Gw * I)`` tokens, and each region holds ``I x I`` groups of ``Gh x Gw`` tokens
that sit ``I`` pixels apart. Token ``(gy, gx)`` of group ``(iy, ix)`` in region ``(ry, rx)`` is
at row ``ry*Gh*I + gy*I + iy`` and column ``rx*Gw*I + gx*I + ix``; groups are ordered
``(batch, ry, rx, iy, ix)``.

- SDA with group G: ``Gh = Gw = G``, ``I = 1`` (contiguous tiles).
- LDA, CrossFormer++ ("fixed_group"): ``Gh = Gw = G`` and interval ``I``.
- LDA, CrossFormer ("fixed_interval"): one region, ``Gh = Hp / I``, ``Gw = Wp / I``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

LongDistance = Literal["fixed_interval", "fixed_group"]
LONG_DISTANCE_CHOICES: tuple[str, ...] = ("fixed_interval", "fixed_group")


class GroupLayout(NamedTuple):
    """How one block groups an ``H x W`` map: group shape, interval and padded size."""

    group_h: int
    group_w: int
    interval: int
    padded_h: int
    padded_w: int

    @property
    def tokens_per_group(self) -> int:
        return self.group_h * self.group_w

    @property
    def num_groups(self) -> int:
        return (self.padded_h * self.padded_w) // self.tokens_per_group


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple)) * multiple


def group_layout(
    height: int,
    width: int,
    group_size: int,
    interval: int,
    long_distance_groups: bool,
    long_distance: LongDistance,
) -> GroupLayout:
    """Choose the grouping of one block for an actual ``height x width`` map.

    Decided per call from the real size (the official code fixed it at construction or
    mutated the block on the first small input). On maps whose short side is at most
    ``group_size`` the block falls back to one SDA group size ``G'``: ``min(H, W)`` for
    CrossFormer semantics, ``max(H, W)`` for CrossFormer++ semantics.
    """
    if min(height, width) <= group_size:
        size = min(height, width) if long_distance == "fixed_interval" else max(height, width)
        return GroupLayout(size, size, 1, _round_up(height, size), _round_up(width, size))
    if not long_distance_groups:
        return GroupLayout(
            group_size, group_size, 1, _round_up(height, group_size), _round_up(width, group_size)
        )
    if long_distance == "fixed_group":
        span = group_size * interval
        return GroupLayout(
            group_size, group_size, interval, _round_up(height, span), _round_up(width, span)
        )
    padded_h, padded_w = _round_up(height, interval), _round_up(width, interval)
    return GroupLayout(padded_h // interval, padded_w // interval, interval, padded_h, padded_w)


def pad_to_layout(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom and right to the layout's padded size."""
    pad_h = layout.padded_h - x.shape[1]
    pad_w = layout.padded_w - x.shape[2]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def partition_groups(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` -> ``(B * num_groups, Gh * Gw, C)``, tokens row-major in each group."""
    batch, height, width, channels = x.shape
    gh, gw, step = layout.group_h, layout.group_w, layout.interval
    regions_h, regions_w = height // (gh * step), width // (gw * step)
    x = x.view(batch, regions_h, gh, step, regions_w, gw, step, channels)
    # -> (B, ry, rx, iy, ix, gy, gx, C)
    x = x.permute(0, 1, 4, 3, 6, 2, 5, 7)
    return x.reshape(-1, gh * gw, channels)


def merge_groups(x: torch.Tensor, layout: GroupLayout, batch: int) -> torch.Tensor:
    """Inverse of :func:`partition_groups`: ``(B * nG, Gh * Gw, C)`` -> ``(B, Hp, Wp, C)``."""
    channels = x.shape[-1]
    gh, gw, step = layout.group_h, layout.group_w, layout.interval
    regions_h = layout.padded_h // (gh * step)
    regions_w = layout.padded_w // (gw * step)
    x = x.view(batch, regions_h, regions_w, step, step, gh, gw, channels)
    # (B, ry, rx, iy, ix, gy, gx, C) -> (B, ry, gy, iy, rx, gx, ix, C)
    x = x.permute(0, 1, 5, 3, 2, 6, 4, 7)
    return x.reshape(batch, layout.padded_h, layout.padded_w, channels)


def padding_key_mask(
    height: int, width: int, layout: GroupLayout, device: torch.device
) -> torch.Tensor | None:
    """Which tokens of each group are padding: bool ``(num_groups, Gh * Gw)``, or None."""
    if layout.padded_h == height and layout.padded_w == width:
        return None
    is_pad = torch.ones(1, layout.padded_h, layout.padded_w, 1, dtype=torch.bool, device=device)
    is_pad[:, :height, :width] = False
    return partition_groups(is_pad, layout).squeeze(-1)
