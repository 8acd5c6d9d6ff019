"""Test-time inference of a segmentor on one image: whole / slide, multi-scale, flip.

What the authors ran (mmseg 0.29 with their ``AlignResize``, ``configs/_base_/datasets/
ade20k*.py``), and what :class:`InferenceConfig`'s defaults reproduce:

- Single scale: rescale to fit ``scale = (2048, 512)`` keeping the aspect ratio (mmcv's
  ``imrescale`` rounding, :func:`.transforms.rescale_size`), then *resize* (bilinear, not pad)
  so both sides are the next multiples of 32; normalise.
- Multi-scale: the same for ``scale * r`` (each side truncated to int) for ``r`` in 0.5,
  0.75, 1.0, 1.25, 1.5, 1.75 (mmseg's ``MultiScaleFlipAug(img_ratios=...)``); with ``flip``
  each scale is also run on the horizontally flipped image.
- ``whole``: the segmentor's logits are resized (bilinear, ``align_corners=False``) to the
  network input size and then to the original image size. ``slide``: ``crop_size`` windows
  every ``stride`` pixels (the last window flush with the border), each window's logits at
  window size added into place and divided by the number of windows covering each pixel,
  then resized to the original size (mmseg's ``slide_inference``).
- Several passes (scales x flips) are merged as mmseg 0.x's ``aug_test`` does: the *softmax
  probabilities* at the original size are averaged (flipped passes flipped back first), not
  the raw logits; a single pass is softmaxed too (``simple_test``), which leaves its argmax
  unchanged.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..models.crossformer import MIN_INPUT_SIZE
from .bands import BAND_ELEMENTS, bilinear_matrix, row_bands
from .transforms import MMSEG_MEAN, MMSEG_STD, normalize, rescale_size, resize_image, resize_to_multiple

__all__ = [
    "MULTI_SCALE_RATIOS", "InferenceConfig", "Segmentor", "prepare_image", "scale_bounds",
    "whole_logits", "slide_logits", "segment_probs", "segment",
]

MULTI_SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
MODES = ("whole", "slide")


class Segmentor(Protocol):
    """What inference needs of a segmentor (see the segmentation models): called on images it
    gives the head's logits, which ``predict_logits`` resizes bilinearly (``align_corners=False``)."""

    num_classes: int
    align_corners: bool

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def predict_logits(self, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor: ...


@dataclass
class InferenceConfig:
    """How to run a segmentor on an image. ``scale`` is mmcv's ``(long, short)`` bound;
    ``crop_size``/``stride`` are ``(h, w)``; ``size_divisor`` None skips the multiple-of-32 resize."""

    mode: str = "whole"
    scale: tuple[int, int] = (2048, 512)
    size_divisor: int | None = 32
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    mean: tuple[float, float, float] = MMSEG_MEAN
    std: tuple[float, float, float] = MMSEG_STD

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserInputError(f"inference mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.ratios or min(self.ratios) <= 0:
            raise UserInputError(f"test scale ratios must be positive, got {self.ratios}")
        if min(self.crop_size) <= 0 or min(self.stride) <= 0:
            raise UserInputError(f"slide crop size and stride must be positive, got {self.crop_size} / {self.stride}")
        if self.mode == "slide" and min(self.crop_size) < MIN_INPUT_SIZE:
            raise UserInputError(f"slide windows (test.slide_crop) must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, "
                                 f"the backbone's smallest input; got {list(self.crop_size)}")
        if self.mode == "slide" and any(s > c for s, c in zip(self.stride, self.crop_size)):
            # the pixels between windows would be 0 / 0: NaN probabilities, all read as class 0
            raise UserInputError(f"slide stride {list(self.stride)} (test.slide_stride) is larger than the window "
                                 f"{list(self.crop_size)}: pixels between windows would get no prediction; use a "
                                 "stride of at most the window")

    @classmethod
    def build(cls, mode: str = "whole", multi_scale: bool = False, flip: bool = False, **overrides: Any) -> "InferenceConfig":
        """The CLI's ``--mode``, ``--multi-scale`` (the authors' six ratios) and ``--flip``."""
        ratios = MULTI_SCALE_RATIOS if multi_scale else (1.0,)
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return cls(mode=mode, ratios=values.pop("ratios", ratios), flip=flip, **values)


def scale_bounds(config: InferenceConfig) -> list[tuple[int, int]]:
    """The ``(long, short)`` bound of each test scale."""
    return [(int(config.scale[0] * r), int(config.scale[1] * r)) for r in config.ratios]


def prepare_image(image: np.ndarray, scale: tuple[int, int], config: InferenceConfig) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> the normalised ``(1, 3, h, w)`` network input at ``scale``."""
    resized = resize_image(image, rescale_size(image.shape[1], image.shape[0], scale))
    if config.size_divisor:
        resized = resize_to_multiple(resized, config.size_divisor)
    return normalize(resized, config.mean, config.std)[None]


def whole_logits(segmentor: Segmentor, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, h, w)`` -> ``(B, C, h, w)`` logits at the input size."""
    return segmentor.predict_logits(images, tuple(images.shape[-2:])).float()


def slide_logits(
    segmentor: Segmentor, images: torch.Tensor, crop_size: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """``(B, 3, h, w)`` -> ``(B, C, h, w)``: window logits summed in place, divided by the count."""
    batch, _, height, width = images.shape
    rows = max(height - crop_size[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop_size[1] + stride[1] - 1, 0) // stride[1] + 1
    total = images.new_zeros((batch, segmentor.num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride[0] + crop_size[0], height), min(col * stride[1] + crop_size[1], width)
            y1, x1 = max(y2 - crop_size[0], 0), max(x2 - crop_size[1], 0)
            total[:, :, y1:y2, x1:x2] += whole_logits(segmentor, images[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def segment_probs(
    segmentor: Segmentor,
    image: np.ndarray,
    config: InferenceConfig,
    device: torch.device | str = "cpu",
    autocast: Any = None,
) -> torch.Tensor:
    """Class probabilities ``(C, H, W)`` at the image's own size, averaged over the configured
    scales and flips. ``image``: ``(H, W, 3)`` uint8 RGB; ``autocast``: an optional context
    manager factory (e.g. ``Precision.autocast``) around the forward passes."""
    height, width = image.shape[:2]
    flips: Sequence[bool] = (False, True) if config.flip else (False,)
    # On the CPU the resizes to the input and image sizes, the softmax and the flip back are
    # done a band of rows at a time: fresh full-size maps of every class cost more there than
    # the arithmetic (RESULTS.md, row 81).
    banded = torch.device(device).type == "cpu" and not segmentor.align_corners
    merged = None
    for scale in scale_bounds(config):
        inputs = prepare_image(image, scale, config).to(device)
        for flip in flips:
            batch = inputs.flip(-1) if flip else inputs
            with autocast() if autocast is not None else nullcontext():
                if config.mode == "slide":
                    logits = slide_logits(segmentor, batch, config.crop_size, config.stride)
                elif banded:
                    logits = segmentor(batch)  # the head's logits: resized below
                else:
                    logits = whole_logits(segmentor, batch)
            if banded:
                if merged is None:
                    merged = logits.new_zeros((segmentor.num_classes, height, width), dtype=torch.float32)
                _add_resized_probs(merged, logits[0].float(), tuple(batch.shape[-2:]), flip)
                continue
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear",
                                   align_corners=segmentor.align_corners)
            probs = logits.softmax(dim=1)[0]
            probs = probs.flip(-1) if flip else probs
            merged = probs if merged is None else merged.add_(probs)
    return merged / (len(config.ratios) * len(flips))


def _add_resized_probs(merged: torch.Tensor, logits: torch.Tensor, input_size: tuple[int, int], flip: bool) -> None:
    """``merged += softmax(resize(resize(logits, input_size), image size))``, flipped back when
    ``flip``, a band of rows at a time (:mod:`.bands`): the two bilinear resizes are one product
    of their matrices. ``merged`` ``(C, H, W)``; ``logits`` ``(C, h, w)`` at the head's stride
    or (slide mode) at ``input_size``."""
    classes, height, width = merged.shape
    rows = bilinear_matrix(height, input_size[0]) @ bilinear_matrix(input_size[0], logits.shape[1])
    cols = bilinear_matrix(width, input_size[1]) @ bilinear_matrix(input_size[1], logits.shape[2])
    cols_t = (cols.flip(0) if flip else cols).t().to(logits.device)  # a flipped pass's columns, mirrored
    step = max(1, BAND_ELEMENTS // (classes * width))
    for out_rows, in_rows, weights in row_bands(rows.to(logits.device), step):
        merged[:, out_rows] += (weights @ logits[:, in_rows] @ cols_t).softmax(0)


def segment(
    segmentor: Segmentor, image: np.ndarray, config: InferenceConfig, device: torch.device | str = "cpu", autocast: Any = None
) -> torch.Tensor:
    """The predicted label map ``(H, W)`` int64 (class indices) of one image."""
    return segment_probs(segmentor, image, config, device, autocast).argmax(dim=0)
