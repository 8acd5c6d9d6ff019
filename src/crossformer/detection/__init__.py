"""Object detection and instance segmentation: RetinaNet, Mask R-CNN and Cascade Mask R-CNN
on CrossFormer backbones, faithful to mmdetection (see ``docs/detection.md``)."""

from ..lazy import export_lazily

# Imported on first use: the command line reads a detection config's flags from .config and
# .commands alone, the detectors need torch and torchvision.
__all__ = export_lazily(__name__, {
    ".detectors": ("build_detector", "DETECTOR_KINDS", "Detector", "TwoStageDetector", "RetinaNet"),
    ".flops": ("detector_flops",),
})
