"""Detectors as the benchmark (:func:`crossformer.benchmark.run_benchmark`) calls its models:
``model(images)``, one batch of images alone (``crossformer benchmark --config <detection>``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import SIZE_DIVISOR

__all__ = ["ImagesOnly", "TorchvisionImages"]


class ImagesOnly(nn.Module):
    """A detector called as ``model(images)`` on a fixed batch layout (the benchmark's steps)."""

    def __init__(self, detector: nn.Module, height: int, width: int, batch: int) -> None:
        super().__init__()
        self.detector = detector
        self.metas = [{"img_shape": (height, width), "ori_shape": (height, width), "scale_factor": (1.0, 1.0)}] * batch

    def forward(self, images: torch.Tensor) -> Any:
        pad_h, pad_w = -images.shape[2] % SIZE_DIVISOR, -images.shape[3] % SIZE_DIVISOR  # as the data pipeline pads
        return self.detector(nn.functional.pad(images, (0, pad_w, 0, pad_h)), self.metas[: images.shape[0]])


class TorchvisionImages(nn.Module):
    """torchvision's detector (which resizes and pads itself) called as ``model(images)``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> Any:
        return self.detector(list(images))
