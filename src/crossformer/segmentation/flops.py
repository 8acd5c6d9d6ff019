"""Parameters and MACs of a segmentor in the authors' convention.

The authors ran mmcv's ``get_model_complexity_info`` on the segmentor's ``forward_dummy``
(backbone, neck, decode head; not the auxiliary head) for one 512x2048 image and added the
attention matmuls their dense backbone counts itself, over the groups it actually forms.
We count:

- the backbone as the detection count does (:func:`crossformer.models.dense_backbone_macs`):
  the official analytic formula with attention priced over the real groups, which matters
  for CrossFormer (v1) semantics, whose long-distance groups hold ``(H/I) x (W/I)`` tokens
  (1024 in stage 0 at 512x2048, not G*G = 49) as in the authors' v1 dense code and its FLOP
  counter (within 0.25% of the MACs executed, padding included). The classification formula
  alone (groups of G*G) is reported beside it as ``backbone_macs_analytic``; it lands 10-13%
  under the authors' Semantic FPN figures;
- the neck and decode head as mmcv's hooks do: convolutions ``k*k*C_in/groups*C_out`` per
  output pixel plus one add per output element for a bias, BatchNorm 2 per element,
  ReLU and adaptive average pooling 1 per element; bilinear resizes (``F.interpolate``,
  and mmseg's own ``Upsample``) are not counted, as mmcv does not see them.

The heads run on meta tensors and the backbone is priced by formula, so any size is instant.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from ..errors import UserInputError
from ..models.crossformer import CrossFormer
from ..models.flops import count_params, dense_backbone_macs, layer_macs
from ..modes import eval_mode
from .segmentor import Segmentor

__all__ = ["segmentor_flops", "head_macs"]


class _Decode(nn.Module):
    """Runs ``segmentor.decode`` as ``forward``, so that ``functional_call`` can swap in meta
    tensors for the neck and head weights."""

    def __init__(self, segmentor: Segmentor) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.segmentor.decode(maps)


def head_macs(segmentor: Segmentor, map_shapes: list[tuple[int, ...]]) -> int:
    """mmcv-style MACs of the neck and decode head on backbone maps of these shapes."""
    parts = {name: getattr(segmentor, name) for name in ("neck", "decode_head") if getattr(segmentor, name) is not None}
    meta = {
        f"segmentor.{part}.{name}": torch.empty_like(tensor, device="meta")
        for part, module in parts.items()
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
    }
    maps = [torch.empty(shape, device="meta") for shape in map_shapes]
    with eval_mode(segmentor):
        return layer_macs(parts.values(),
                          lambda: functional_call(_Decode(segmentor), meta, (maps,), strict=False, tie_weights=False))


def segmentor_flops(segmentor: Segmentor, height: int = 512, width: int = 2048) -> dict[str, int]:
    """MACs and parameters for one ``height x width`` image.

    Returns ``dict(params, macs, backbone_macs, head_macs, backbone_macs_analytic)``:
    ``params`` counts every parameter (auxiliary head included, as the authors' table);
    ``macs = backbone_macs + head_macs`` in the authors' convention (module docstring).
    """
    if not isinstance(segmentor, Segmentor):
        raise TypeError(f"segmentor_flops counts a segmentor (build_segmentor), got {type(segmentor).__name__}")
    backbone = segmentor.backbone.model
    if not isinstance(backbone, CrossFormer):
        raise UserInputError(f"FLOPs are counted for CrossFormer backbones only, not {type(backbone).__name__}")
    backbone_macs = dense_backbone_macs(backbone, height, width)
    shapes = [(1, channels, h, w) for channels, (h, w) in zip(segmentor.backbone.channels,
                                                               backbone.stage_sizes(height, width))]
    heads = head_macs(segmentor, shapes)
    return dict(
        params=count_params(segmentor),
        macs=backbone_macs + heads,
        backbone_macs=backbone_macs,
        head_macs=heads,
        backbone_macs_analytic=dense_backbone_macs(backbone, height, width, real_groups=False),
    )
