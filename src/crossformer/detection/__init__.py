"""Object detection and instance segmentation: RetinaNet, Mask R-CNN and Cascade Mask R-CNN
on CrossFormer backbones, faithful to mmdetection (see ``docs/detection.md``)."""

from .detectors import DETECTOR_KINDS, Detector, RetinaNet, TwoStageDetector, build_detector
from .flops import detector_flops

__all__ = ["build_detector", "DETECTOR_KINDS", "detector_flops", "Detector", "TwoStageDetector", "RetinaNet"]
