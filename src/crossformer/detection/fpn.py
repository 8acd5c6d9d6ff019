"""mmdetection's ``FPN`` neck in its checkpoint layout (``lateral_convs.i.conv``,
``fpn_convs.i.conv``).

torchvision's ``FeaturePyramidNetwork`` has the same top-down sum but other key names,
and its ``LastLevelP6P7`` puts a ReLU before P7 (mmdet does not), so the neck is written
here; it is a handful of convolutions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FPN"]


class _Conv(nn.Module):
    """A bare conv under the name mmcv's ``ConvModule`` gives it (``.conv``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """Feature pyramid on backbone maps.

    Args:
        in_channels: Channels of every backbone map.
        out_channels: Channels of every output level.
        num_outs: Output levels.
        start_level: First backbone map used (1 for RetinaNet: strides 8, 16, 32).
        extra_convs_on_input: Extra levels are 3x3 stride-2 convs, the first on the last
            backbone map (RetinaNet's P6 / P7); otherwise they are max-pools (kernel 1,
            stride 2) of the last output (Mask R-CNN's P6).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        num_outs: int = 5,
        start_level: int = 0,
        extra_convs_on_input: bool = False,
    ) -> None:
        super().__init__()
        self.start_level = start_level
        self.num_outs = num_outs
        self.extra_convs_on_input = extra_convs_on_input
        used = list(in_channels[start_level:])
        self.lateral_convs = nn.ModuleList(_Conv(c, out_channels, 1) for c in used)
        fpn_convs = [_Conv(out_channels, out_channels, 3) for _ in used]
        if extra_convs_on_input:
            for i in range(num_outs - len(used)):
                fpn_convs.append(_Conv(in_channels[-1] if i == 0 else out_channels, out_channels, 3, stride=2))
        self.fpn_convs = nn.ModuleList(fpn_convs)
        for m in self.modules():  # mmdet's FPN init: Xavier (uniform), zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone maps (strides 4..32) -> ``num_outs`` maps of ``out_channels``."""
        inputs = features[self.start_level:]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        used = len(laterals)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.extra_convs_on_input:
            outs.append(self.fpn_convs[used](features[-1]))
            for i in range(used + 1, self.num_outs):
                outs.append(self.fpn_convs[i](outs[-1]))  # no ReLU before P7, as mmdet's default
        else:
            while len(outs) < self.num_outs:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs
