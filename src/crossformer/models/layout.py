"""NCHW copies of channels-last maps that stay fast on large CPU maps.

The convolutions leave their maps channels-last on the CPU. Where a consumer needs NCHW
(torchvision's RoIAlign kernel) or a concatenation mixes layouts (UPerNet's fused levels),
PyTorch's one-pass transposing copy runs at about 1 GB/s on maps of tens of MB. Copying a strip
of rows at a time, each about :data:`STRIP_ELEMENTS`, keeps the strip's reads and writes in
cache and is 2.5-6x faster (benchmarks/RESULTS.md rows 68-69). Values are copied unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layers import capturing_graph, without_autocast

__all__ = ["nchw_contiguous", "nchw_cat", "STRIP_COPY_ELEMENTS", "STRIP_ELEMENTS"]

# Maps of fewer elements gain nothing from strips (one copy is already fast in cache).
STRIP_COPY_ELEMENTS = 1 << 20
# Elements of one strip: 512 KB of float32.
STRIP_ELEMENTS = 1 << 17


class _StripCat(torch.autograd.Function):
    """``torch.cat(maps, dim=1)`` into a new NCHW tensor, non-NCHW maps copied in strips of rows."""

    @staticmethod
    def forward(ctx, *maps: torch.Tensor) -> torch.Tensor:
        n, _, height, width = maps[0].shape
        ctx.channels = [m.shape[1] for m in maps]
        out = maps[0].new_empty(n, sum(ctx.channels), height, width)
        start = 0
        for m in maps:
            part = out[:, start:start + m.shape[1]]
            start += m.shape[1]
            if m.is_contiguous():
                part.copy_(m)
                continue
            rows = max(1, STRIP_ELEMENTS * height // m.numel())
            for top in range(0, height, rows):
                part[:, :, top:top + rows].copy_(m[:, :, top:top + rows])
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return grad_out.split(ctx.channels, dim=1)


def _in_strips(maps: Sequence[torch.Tensor]) -> bool:
    """Whether copying ``maps`` strip by strip pays: large non-NCHW CPU maps of one dtype
    (``torch.cat`` would promote mixed ones), in eager mode."""
    return (
        # first: a size test on a traced map is a guard on its batch (a static-size export failed)
        not capturing_graph()
        and any(not m.is_contiguous() and m.numel() >= STRIP_COPY_ELEMENTS for m in maps)
        and all(m.device.type == "cpu" and m.dtype == maps[0].dtype for m in maps)
    )


def nchw_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()`` for an ``(N, C, H, W)`` map."""
    return _StripCat.apply(x) if _in_strips([x]) else x.contiguous()


def nchw_cat(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(maps, dim=1)`` of ``(N, C_i, H, W)`` maps, NCHW whatever their layouts."""
    return _StripCat.apply(*maps) if _in_strips(maps) else torch.cat(list(maps), dim=1)
