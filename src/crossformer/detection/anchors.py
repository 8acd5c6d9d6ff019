"""mmdetection's ``AnchorGenerator``: anchors centred on ``(x * stride, y * stride)``.

torchvision's ``AnchorGenerator`` rounds its base anchors; mmdet keeps them exact, so the
boxes differ by up to half a pixel. Order: location (row-major), then ratio, then scale.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["AnchorGenerator", "octave_scales"]


class AnchorGenerator(nn.Module):
    """Anchors for each pyramid level.

    Args:
        strides: Level strides in pixels; the base anchor side is the stride.
        ratios: Height / width ratios.
        scales: Anchor side over stride (``octave_base_scale * 2**(i / scales_per_octave)``
            for RetinaNet).
    """

    def __init__(self, strides: Sequence[int], ratios: Sequence[float], scales: Sequence[float]) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.ratios = tuple(ratios)
        self.scales = tuple(scales)

    @property
    def num_anchors(self) -> int:
        """Anchors per location."""
        return len(self.ratios) * len(self.scales)

    def base_anchors(self, stride: int, device: torch.device) -> torch.Tensor:
        """``(A, 4)`` anchors centred on the origin."""
        h_ratios = torch.tensor(self.ratios, device=device).sqrt()
        w_ratios = 1 / h_ratios
        scales = torch.tensor(self.scales, device=device)
        ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def forward(self, sizes: Sequence[tuple[int, int]], device: torch.device) -> list[torch.Tensor]:
        """Feature-map sizes ``(h, w)`` per level -> ``(h * w * A, 4)`` xyxy anchors per level."""
        anchors = []
        for (h, w), stride in zip(sizes, self.strides):
            xs = torch.arange(w, device=device, dtype=torch.float32) * stride
            ys = torch.arange(h, device=device, dtype=torch.float32) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + self.base_anchors(stride, device)[None]).reshape(-1, 4))
        return anchors


def octave_scales(base: float, per_octave: int) -> tuple[float, ...]:
    """RetinaNet's anchor scales: ``base * 2**(i / per_octave)``."""
    return tuple(base * math.pow(2, i / per_octave) for i in range(per_octave))
