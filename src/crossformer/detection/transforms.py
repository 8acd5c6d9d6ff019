"""mmdetection 2.x's detection pipeline on :class:`DetectionSample` s (torch tensors, torch RNG).

- :class:`Resize`: keep-ratio resize to a scale ``(long, short)`` chosen uniformly from a list
  (mmdet ``Resize(img_scale=[...], multiscale_mode='value', keep_ratio=True)``), with mmcv's
  ``rescale_size`` rounding; bilinear image (values rounded as cv2 does on uint8 images),
  nearest-neighbour masks, boxes scaled and clipped to the new image.
- :class:`RandomFlip`: horizontal flip of image, boxes (``x1' = w - x2``) and masks.
- :class:`RandomCrop`: mmdet ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``.
- :class:`RandomChoice`: one of several pipelines, uniformly (mmdet ``AutoAugment``).
- :class:`Normalize`: ``(x - mean) / std`` per RGB channel.

Padding to a multiple of 32 happens in :func:`crossformer.detection.data.collate_detection`,
which pads each batch to its largest image (the same result as mmdet's ``Pad(size_divisor=32)``
followed by its collate). Randomness comes from torch's RNG, so the engine's seeding and
resume state cover it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.transforms import rescale_size
from ..pixels import IMAGENET_MEAN_255, IMAGENET_STD_255
from .config import CROP_RANGE, CROP_SHORT, DEFAULT_SCALE, MULTISCALE_SHORT
from .data import DetectionSample

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "rescale_size", "resize_sample", "Compose", "Resize", "RandomFlip", "RandomCrop",
    "RandomChoice", "Normalize", "build_train_transform", "build_test_transform",
]

# The authors' img_norm_cfg (RGB, 0..255).
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_MEAN_255, IMAGENET_STD_255

Transform = Callable[[DetectionSample], DetectionSample]


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high) from torch's RNG (numpy's randint semantics)."""
    return int(torch.randint(low, high, ()).item())


def resize_sample(sample: DetectionSample, size: tuple[int, int]) -> DetectionSample:
    """Resize to ``size = (new_w, new_h)``; ``scale_factor`` multiplies by the new/old ratios."""
    h, w = sample.img_shape
    new_w, new_h = size
    if (new_w, new_h) != (w, h):
        image = F.interpolate(sample.image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        sample.image = image.round_().clamp_(0, 255)  # cv2 resizes uint8 images into uint8
        if sample.masks is not None and len(sample.masks):
            sample.masks = F.interpolate(sample.masks[None], size=(new_h, new_w), mode="nearest")[0]
        elif sample.masks is not None:
            sample.masks = sample.masks.new_zeros(0, new_h, new_w)
    fx, fy = new_w / w, new_h / h
    boxes = sample.boxes * torch.tensor([fx, fy, fx, fy], dtype=sample.boxes.dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_h)
    sample.boxes = boxes
    sample.scale_factor = (sample.scale_factor[0] * fx, sample.scale_factor[1] * fy)
    return sample


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        for t in self.transforms:
            sample = t(sample)
        return sample


class Resize:
    """Keep-ratio resize to one of ``scales`` (each ``(long, short)``), chosen uniformly."""

    def __init__(self, scales: Sequence[tuple[int, int]]) -> None:
        if not scales:
            raise ValueError("Resize needs at least one scale")
        self.scales = [tuple(s) for s in scales]

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        scale = self.scales[_randint(0, len(self.scales))] if len(self.scales) > 1 else self.scales[0]
        h, w = sample.img_shape
        return resize_sample(sample, rescale_size(w, h, scale))


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        if not (self.prob > 0 and torch.rand(()).item() < self.prob):
            return sample
        w = sample.img_shape[1]
        sample.image = sample.image.flip(-1)
        if sample.masks is not None:
            sample.masks = sample.masks.flip(-1)
        boxes = sample.boxes.clone()
        boxes[:, 0], boxes[:, 2] = w - sample.boxes[:, 2], w - sample.boxes[:, 0]
        sample.boxes = boxes
        sample.flip = not sample.flip
        return sample


class RandomCrop:
    """Crop a ``(crop_h, crop_w)`` window, each side drawn from ``size_range`` (capped by the image).

    Boxes are shifted and clipped; objects left with no width or height are dropped with their
    labels and masks; a crop may end with no objects (mmdet's ``allow_negative_crop=True``).
    """

    def __init__(self, size_range: tuple[int, int] = CROP_RANGE) -> None:
        self.low, self.high = size_range

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        h, w = sample.img_shape
        crop_h = _randint(min(h, self.low), min(h, self.high) + 1)
        crop_w = _randint(min(w, self.low), min(w, self.high) + 1)
        top = _randint(0, max(h - crop_h, 0) + 1)
        left = _randint(0, max(w - crop_w, 0) + 1)
        sample.image = sample.image[:, top : top + crop_h, left : left + crop_w]
        new_h, new_w = sample.img_shape
        boxes = sample.boxes - torch.tensor([left, top, left, top], dtype=sample.boxes.dtype)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        sample.boxes, sample.labels = boxes[keep], sample.labels[keep]
        if sample.masks is not None:
            sample.masks = sample.masks[keep][:, top : top + crop_h, left : left + crop_w]
        return sample


class RandomChoice:
    """Apply one of ``pipelines``, chosen uniformly."""

    def __init__(self, pipelines: Sequence[Sequence[Transform]]) -> None:
        self.pipelines = [Compose(p) for p in pipelines]

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        return self.pipelines[_randint(0, len(self.pipelines))](sample)


class Normalize:
    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        sample.image = (sample.image - self.mean) / self.std
        return sample


def _scales(max_size: int, min_sizes: Sequence[int]) -> list[tuple[int, int]]:
    return [(max_size, s) for s in min_sizes]


def build_train_transform(
    recipe: str = "1x",
    max_size: int = DEFAULT_SCALE[0],
    min_size: int = DEFAULT_SCALE[1],
    multiscale_min_sizes: Sequence[int] = MULTISCALE_SHORT,
    crop_min_sizes: Sequence[int] = CROP_SHORT,
    crop_size_range: tuple[int, int] = CROP_RANGE,
    flip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """The authors' training pipeline.

    - ``"1x"`` (mmdet ``coco_instance.py``): resize to ``(max_size, min_size)``, flip, normalise.
    - ``"3x"`` (the Swin Transformer ``mstrain_480-800_3x`` configs): flip, then either a resize
      to a shorter side from ``multiscale_min_sizes``, or a resize to one of ``crop_min_sizes``,
      a random crop with sides in ``crop_size_range`` and a resize to one of
      ``multiscale_min_sizes`` (longer side <= ``max_size`` throughout), then normalise.

    Smaller sizes (the demo) scale these numbers down; the structure stays.
    """
    if recipe == "1x":
        steps: list[Transform] = [Resize([(max_size, min_size)]), RandomFlip(flip_prob)]
    elif recipe == "3x":
        multiscale = Resize(_scales(max_size, multiscale_min_sizes))
        crop_then_resize = [Resize(_scales(max_size, crop_min_sizes)), RandomCrop(crop_size_range),
                            Resize(_scales(max_size, multiscale_min_sizes))]
        steps = [RandomFlip(flip_prob), RandomChoice([[multiscale], crop_then_resize])]
    else:
        raise ValueError(f"unknown detection training recipe {recipe!r}; expected '1x' or '3x'")
    return Compose([*steps, Normalize(mean, std)])


def build_test_transform(
    max_size: int = DEFAULT_SCALE[0],
    min_size: int = DEFAULT_SCALE[1],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """mmdet's test pipeline: keep-ratio resize to ``(max_size, min_size)``, no flip, normalise."""
    return Compose([Resize([(max_size, min_size)]), Normalize(mean, std)])
