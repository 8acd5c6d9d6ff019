"""Semantic segmentation: Semantic FPN and UPerNet with CrossFormer backbones, as the authors ran them."""

from .checkpoint import read_segmentation_meta
from .flops import segmentor_flops
from .heads import FCNHead, FPNHead, UPerHead
from .segmentor import SEGMENTOR_KINDS, FullSizeLogits, Segmentor, build_segmentor

__all__ = [
    "SEGMENTOR_KINDS",
    "Segmentor",
    "FullSizeLogits",
    "build_segmentor",
    "segmentor_flops",
    "read_segmentation_meta",
    "FPNHead",
    "UPerHead",
    "FCNHead",
]
