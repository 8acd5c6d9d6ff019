"""A detector as one exportable graph: an image in, its detections out.

The graph takes one image normalised as the test pipeline leaves it (RGB, ``(x - mean) / std``
on 0-255 values, resized, not padded), pads it to a multiple of 32 as the data loader does,
and returns what :meth:`~crossformer.detection.detectors.Detector.detect` returns for it:
boxes in the input's pixels (divide by the resize factor for the original image's), scores,
labels and, for Mask R-CNN and Cascade Mask R-CNN, each detection's 28x28 mask
probabilities inside its box (paste them into the box and threshold at 0.5 for the mask,
as ``predict`` does). The number of detections is known only when the graph runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data.folder import upright_rgb
from ..errors import UserInputError
from ..export import SizeRange, dynamic_size_range
from .detectors import Detector
from .config import DEFAULT_SCALE, SIZE_DIVISOR
from .predict import image_sample
from .transforms import build_test_transform

__all__ = ["DetectionGraph", "SIZE_DIVISOR", "graph_input"]



def graph_input(image: Image.Image, max_size: int = DEFAULT_SCALE[0], min_size: int = DEFAULT_SCALE[1],
                ) -> tuple[torch.Tensor, tuple[float, float]]:
    """An image as the graph (and its ONNX file) takes it: upright and RGB as ``predict`` reads
    it (:func:`~crossformer.data.folder.upright_rgb`: EXIF orientation, 16-bit grayscale),
    resized as the test pipeline does (longer side at most ``max_size``, shorter ``min_size``:
    a config's ``data.max_size`` and ``data.min_size``) and normalised, ``(1, 3, H, W)``; and
    the ``(w, h)`` resize factors (divide the boxes by them for the upright image's pixels)."""
    sample = build_test_transform(max_size, min_size)(image_sample(upright_rgb(image)))
    return sample.image[None], tuple(float(f) for f in sample.scale_factor)


def _round_up(size: int) -> int:
    return -(-size // SIZE_DIVISOR) * SIZE_DIVISOR


class DetectionGraph(nn.Module):
    """``images (1, 3, H, W)`` -> ``boxes (K, 4)`` xyxy, ``scores (K,)``, ``labels (K,)``
    int64, and for mask models ``mask_probs (K, 28, 28)``; best first."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.model = detector
        self.output_names = ("boxes", "scores", "labels") + (("mask_probs",) if detector.has_masks else ())
        self.counted_outputs = "detections"  # what the export's check counts (outputs vary in length)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if images.ndim != 4 or images.shape[0] != 1 or images.shape[1] != 3:
            raise ValueError(f"the detection graph takes one image, (1, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        padded = F.pad(images, (0, (-width) % SIZE_DIVISOR, 0, (-height) % SIZE_DIVISOR))
        meta = {"img_shape": (height, width), "ori_shape": (height, width), "scale_factor": (1.0, 1.0)}
        result = self.model.detect(self.model.extract(padded), [meta])[0]
        return tuple(result[name] for name in self.output_names)

    @property
    def coarsest_stride(self) -> int:
        """Stride of the last FPN level (64 for the R-CNNs' P6, 128 for RetinaNet's P7)."""
        neck = self.model.neck
        return self.model.backbone.strides[neck.start_level] * 2 ** (neck.num_outs - 1)

    def size_range(self, height: int, width: int) -> SizeRange:
        """The input sizes whose padded size shares the graph of a ``height x width`` example:
        the backbone's range (:func:`crossformer.export.dynamic_size_range`) for padded sizes,
        with every FPN level at least 2x2. The example must sit where that range has no upper
        bound (every stride-32 side above the group size: 225 pixels and up for the authors'
        grouping): below it, some pyramid level keeps one size over the whole range, which
        ``torch.export`` cannot declare symbolic. A one-line error says so."""
        padded = dynamic_size_range(self.model.backbone, _round_up(height), _round_up(width))
        if padded.max_height is not None or padded.max_width is not None:
            lowest = _first_unbounded(self.model.backbone)
            raise UserInputError(
                f"a {height}x{width} example is too small for a detector's export with dynamic sizes: use "
                f"--img-size {lowest} {lowest} or larger (the graph then serves every size from there up), or --static"
            )
        smallest = self.coarsest_stride + 1  # the last level at least 2x2
        low_h = max(_round_up(padded.min_height) - SIZE_DIVISOR + 1, smallest)
        low_w = max(_round_up(padded.min_width) - SIZE_DIVISOR + 1, smallest)
        return SizeRange(low_h, None, low_w, None)


def _first_unbounded(backbone: nn.Module) -> int:
    """The smallest square input from which the backbone's size range has no upper bound."""
    size = SIZE_DIVISOR
    while dynamic_size_range(backbone, size, size).max_height is not None:
        size += SIZE_DIVISOR
    return size - SIZE_DIVISOR + 1
