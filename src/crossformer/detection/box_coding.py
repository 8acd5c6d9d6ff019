"""mmdetection's ``DeltaXYWHBBoxCoder``: box deltas with per-coordinate stds.

Differs from torchvision's ``BoxCoder`` in three ways that change numbers: widths are
``x2 - x1`` (no ``+1``, like torchvision) but deltas are *multiplied* by stds (torchvision
divides by weights), ``dw``/``dh`` are clamped on both sides to ``+-log(1000/16)`` (torchvision
clamps only from above), and decoded boxes are clipped to the image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["DeltaXYWHCoder", "WH_RATIO_CLIP"]

WH_RATIO_CLIP = abs(math.log(16 / 1000))


class DeltaXYWHCoder:
    """Encode ``(N, 4)`` xyxy boxes against priors as ``(dx, dy, dw, dh) / stds`` and back."""

    def __init__(self, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        self.stds = tuple(float(s) for s in stds)

    def encode(self, priors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``(N, 4)`` priors and target boxes -> ``(N, 4)`` normalised deltas."""
        priors, boxes = priors.float(), boxes.float()
        pw, ph = priors[:, 2] - priors[:, 0], priors[:, 3] - priors[:, 1]
        px, py = (priors[:, 0] + priors[:, 2]) * 0.5, (priors[:, 1] + priors[:, 3]) * 0.5
        gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        gx, gy = (boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        return deltas / deltas.new_tensor(self.stds)

    def decode(
        self, priors: torch.Tensor, deltas: torch.Tensor, max_shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Priors ``(N, 4)`` and deltas ``(N, 4k)`` -> boxes ``(N, 4k)``, clipped to
        ``max_shape = (h, w)`` when given."""
        num, width = deltas.shape
        deltas = deltas.reshape(num, width // 4, 4) * deltas.new_tensor(self.stds)
        priors = priors[:, None, :]
        pxy = (priors[..., :2] + priors[..., 2:]) * 0.5
        pwh = priors[..., 2:] - priors[..., :2]
        dwh = deltas[..., 2:].clamp(min=-WH_RATIO_CLIP, max=WH_RATIO_CLIP)
        gxy = pxy + pwh * deltas[..., :2]
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if max_shape is not None:
            h, w = max_shape
            boxes = torch.stack(
                [boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)],
                dim=-1,
            )
        return boxes.reshape(num, width)
