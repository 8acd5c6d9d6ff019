"""mmsegmentation's Semantic FPN neck and heads (FPNHead, UPerHead, FCNHead) on plain PyTorch.

They compute what mmsegmentation 0.29 / 1.x computes for the configurations the CrossFormer
authors ran (checked against mmseg's own outputs in ``tests/test_segmentation_reference.py``)
and keep mmseg's module names (``lateral_convs.0.conv``, ``bn``, ``conv_seg``, ...), so the
authors' checkpoints load by name. The neck is torchvision's ``FeaturePyramidNetwork``, which
computes exactly mmseg's FPN (lateral 1x1 conv with bias, nearest top-down resize to the
lower level's size, 3x3 output conv); its names are mapped in ``checkpoint.py``.

Initialisation follows mmcv / mmseg: convs of conv-BN-ReLU units Kaiming-normal (fan out,
ReLU), BN weight 1 / bias 0, the classifier ``conv_seg`` normal with std 0.01, the FPN neck
convs Xavier-uniform (its ``init_cfg``); all biases zero.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork

from ..models.layout import nchw_cat
from ..models.winograd import Conv3x3

__all__ = ["ConvModule", "SegmentationHead", "FPNHead", "UPerHead", "FCNHead", "fpn_neck", "run_fpn_neck"]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False``, the only resize mmseg's heads use here."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU, named ``conv`` / ``bn`` as mmcv's ConvModule.

    3x3 convs are :class:`~crossformer.models.winograd.Conv3x3`: wide ones run by Winograd on
    the CPU.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        conv = (
            Conv3x3(in_channels, out_channels, bias=False)
            if kernel_size == 3
            else nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        )
        super().__init__(OrderedDict(
            conv=conv,
            bn=nn.BatchNorm2d(out_channels),
            activate=nn.ReLU(inplace=True),
        ))
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``(N, C_in, H, W)`` -> ``(N, C_out, H, W)``; ``x`` may also be a list of maps to
        concatenate along the channels, which is done as the conv reads fastest (a
        :class:`Conv3x3` takes the list itself; other kernels NCHW)."""
        if not isinstance(x, torch.Tensor) and not isinstance(self.conv, Conv3x3):
            x = nchw_cat(x)
        return self.activate(self.bn(self.conv(x)))


def fpn_neck(in_channels: Sequence[int], out_channels: int = 256) -> FeaturePyramidNetwork:
    """mmseg's ``FPN`` neck (``num_outs == len(in_channels)``, no extra levels, no norm)."""
    neck = FeaturePyramidNetwork(list(in_channels), out_channels)
    for module in neck.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return neck


def run_fpn_neck(neck: FeaturePyramidNetwork, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The neck's outputs for a list of maps, finest first, as a list."""
    return list(neck(OrderedDict((str(i), x) for i, x in enumerate(maps))).values())


class SegmentationHead(nn.Module):
    """What every mmseg decode head ends with: Dropout2d then the 1x1 classifier ``conv_seg``."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class FPNHead(SegmentationHead):
    """Semantic FPN's head: per level, ``max(1, log2(stride / stride0))`` conv-BN-ReLU units,
    each followed by a 2x bilinear upsample on the coarser levels; the levels are summed at
    the finest stride and classified.

    Args:
        in_channels: Channels of each neck output (finest first).
        strides: Stride of each neck output.
        channels: Width of the scale heads (128 for the authors).

    Shapes: maps ``[(B, C_i, H/s_i, W/s_i)]`` -> logits ``(B, num_classes, H/s_0, W/s_0)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        channels: int,
        num_classes: int,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        self.scale_heads = nn.ModuleList()
        for in_ch, stride in zip(in_channels, strides, strict=True):
            length = max(1, (stride // strides[0]).bit_length() - 1)
            layers: list[nn.Module] = []
            for k in range(length):
                layers.append(ConvModule(in_ch if k == 0 else channels, channels, 3))
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](maps[0])
        for head, x in zip(self.scale_heads[1:], maps[1:], strict=True):
            # Odd sizes: 2x upsampling can miss the finest size by a pixel; mmseg resizes.
            out = out + resize(head(x), out.shape[2:])
        return self.classify(out)


def _bin_means(x: torch.Tensor, bins: int, dim: int) -> torch.Tensor:
    """Means of ``x`` over ``bins`` adaptive-pooling bins along ``dim`` (``-1`` or ``-2``):
    bin ``i`` covers ``[floor(i * n / bins), ceil((i + 1) * n / bins))`` of the ``n`` positions,
    as :func:`torch.nn.functional.adaptive_avg_pool2d` does, from differences of a running sum."""
    size = x.shape[dim]
    index = torch.arange(bins, device=x.device)
    starts = (index * size) // bins
    ends = ((index + 1) * size + bins - 1) // bins
    sums = F.pad(x.cumsum(dim), (0, 0, 1, 0) if dim == -2 else (1, 0))
    total = sums.index_select(dim, ends) - sums.index_select(dim, starts)
    counts = (ends - starts).to(x.dtype)
    return total / (counts[:, None] if dim == -2 else counts)


class AdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d(bins)`` that exports for every input size: ``torch.export``
    turns the built-in into slices for the example's size, so while exporting the bins'
    means come from running sums at bin edges computed from the (symbolic) size."""

    def __init__(self, bins: int) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            return F.adaptive_avg_pool2d(x, self.bins)
        return _bin_means(_bin_means(x, self.bins, -2), self.bins, -1)


class PyramidPooling(nn.ModuleList):
    """PSPNet's pooling module: for each scale, adaptive average pool -> 1x1 conv-BN-ReLU,
    resized back bilinearly. Returns the list of pooled maps (input not included)."""

    def __init__(self, scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(AdaptiveAvgPool(scale), ConvModule(in_channels, channels, 1)) for scale in scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(branch(x), x.shape[2:]) for branch in self]


class UPerHead(SegmentationHead):
    """UPerNet's head: pyramid pooling on the coarsest map (``bottleneck`` fuses it with the
    map), an FPN over the other maps with bilinear top-down resize (``lateral_convs``,
    ``fpn_convs``), every level resized to the finest and fused by ``fpn_bottleneck``.

    Shapes: maps ``[(B, C_i, H/s_i, W/s_i)]`` -> logits ``(B, num_classes, H/s_0, W/s_0)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        *fine, coarsest = in_channels
        self.psp_modules = PyramidPooling(pool_scales, coarsest, channels)
        self.bottleneck = ConvModule(coarsest + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in fine)
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in fine)
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        *fine, coarsest = maps
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, fine, strict=True)]
        laterals.append(self.bottleneck(torch.cat([coarsest, *self.psp_modules(coarsest)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        levels = [outs[0], *(resize(x, size) for x in outs[1:])]
        return self.classify(self.fpn_bottleneck(levels))  # concatenated as its conv reads fastest


class FCNHead(SegmentationHead):
    """FCN head as the authors' auxiliary head: ``num_convs`` 3x3 conv-BN-ReLU units
    (``convs``), no input concatenation, then the classifier.

    Shapes: ``(B, in_channels, h, w)`` -> ``(B, num_classes, h, w)``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        num_convs: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(
            *(ConvModule(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.convs(x))
