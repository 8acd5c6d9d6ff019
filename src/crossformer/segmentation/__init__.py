"""Semantic segmentation: Semantic FPN and UPerNet with CrossFormer backbones, as the authors ran them."""

from ..lazy import export_lazily

# Imported on first use: the command line reads a segmentation config's flags from .config and
# .commands alone, the segmentors need torch.
__all__ = export_lazily(__name__, {
    ".segmentor": ("SEGMENTOR_KINDS", "Segmentor", "FullSizeLogits", "build_segmentor"),
    ".flops": ("segmentor_flops",),
    ".checkpoint": ("read_segmentation_meta",),
    ".heads": ("FPNHead", "UPerHead", "FCNHead"),
})
