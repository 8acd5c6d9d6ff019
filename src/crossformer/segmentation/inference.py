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
from typing import Any, Iterator, Protocol, Sequence

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


def _passes(
    segmentor: Segmentor, image: np.ndarray, config: InferenceConfig, device: torch.device | str, autocast: Any, banded: bool,
) -> Iterator[tuple[torch.Tensor, tuple[int, int], bool]]:
    """Each test pass (scale x flip) in turn: its logits ``(1, C, h, w)`` float32, its network
    input size and whether it ran on the flipped image. ``banded``: the head's own logits (slide:
    at the input size), for :func:`_resized_probs`; else resized to the input size."""
    flips: Sequence[bool] = (False, True) if config.flip else (False,)
    for scale in scale_bounds(config):
        inputs = prepare_image(image, scale, config).to(device)
        for flip in flips:
            batch = inputs.flip(-1) if flip else inputs
            with autocast() if autocast is not None else nullcontext():
                if config.mode == "slide":
                    logits = slide_logits(segmentor, batch, config.crop_size, config.stride)
                elif banded:
                    logits = segmentor(batch)  # the head's logits: resized by _resized_probs
                else:
                    logits = whole_logits(segmentor, batch)
            yield logits.float(), tuple(batch.shape[-2:]), flip


def _is_banded(segmentor: Segmentor, device: torch.device | str) -> bool:
    """On the CPU the resizes to the input and image sizes, the softmax and the flip back are
    done a band of rows at a time: fresh full-size maps of every class cost more there than
    the arithmetic (RESULTS.md, row 81)."""
    return torch.device(device).type == "cpu" and not segmentor.align_corners


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
    banded = _is_banded(segmentor, device)
    merged = None
    count = 0
    for logits, input_size, flip in _passes(segmentor, image, config, device, autocast, banded):
        count += 1
        if banded:
            if merged is None:
                merged = logits.new_zeros((segmentor.num_classes, height, width))
            _add_resized_probs(merged, logits[0], input_size, flip)
            continue
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=segmentor.align_corners)
        probs = logits.softmax(dim=1)[0]
        probs = probs.flip(-1) if flip else probs
        merged = probs if merged is None else merged.add_(probs)
    return merged / count


def _resized_probs(logits: torch.Tensor, input_size: tuple[int, int], flip: bool, height: int,
                   width: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """``softmax(resize(resize(logits, input_size), (height, width)))``, flipped back when
    ``flip``, a band of rows at a time (:mod:`.bands`): ``(out_rows, (C, rows, width))``. The two
    bilinear resizes are one product of their matrices; ``logits`` ``(C, h, w)`` at the head's
    stride or (slide mode) at ``input_size``. The bands depend only on the classes and image size."""
    classes = logits.shape[0]
    rows = bilinear_matrix(height, input_size[0]) @ bilinear_matrix(input_size[0], logits.shape[1])
    cols = bilinear_matrix(width, input_size[1]) @ bilinear_matrix(input_size[1], logits.shape[2])
    cols_t = (cols.flip(0) if flip else cols).t().to(logits.device)  # a flipped pass's columns, mirrored
    step = max(1, BAND_ELEMENTS // (classes * width))
    for out_rows, in_rows, weights in row_bands(rows.to(logits.device), step):
        yield out_rows, (weights @ logits[:, in_rows] @ cols_t).softmax(0)


def _add_resized_probs(merged: torch.Tensor, logits: torch.Tensor, input_size: tuple[int, int], flip: bool) -> None:
    """``merged`` ``(C, H, W)`` += :func:`_resized_probs` of ``logits``."""
    for out_rows, probs in _resized_probs(logits, input_size, flip, merged.shape[1], merged.shape[2]):
        merged[:, out_rows] += probs


@torch.no_grad()
def segment(
    segmentor: Segmentor, image: np.ndarray, config: InferenceConfig, device: torch.device | str = "cpu", autocast: Any = None
) -> torch.Tensor:
    """The predicted label map ``(H, W)`` int64 (class indices) of one image: the argmax of
    :func:`segment_probs`. On the CPU, where the passes' logits hold fewer values than those
    probabilities (a photo larger than the test scale: 150 classes of a 12-megapixel photo are
    7.2 GB of them), the probabilities are summed and their argmax taken a band of rows at a
    time, in the same order and so to the same values, and never held whole."""
    if not _is_banded(segmentor, device):
        return segment_probs(segmentor, image, config, device, autocast).argmax(dim=0)
    height, width = image.shape[:2]
    full = segmentor.num_classes * height * width
    passes: list[tuple[torch.Tensor, tuple[int, int], bool]] = []
    merged, count = None, 0
    for logits, input_size, flip in _passes(segmentor, image, config, device, autocast, banded=True):
        count += 1
        passes.append((logits[0], input_size, flip))
        if merged is None and sum(kept[0].numel() for kept in passes) > full:  # keeping them costs more
            merged = logits.new_zeros((segmentor.num_classes, height, width))
        if merged is not None:  # segment_probs' way from here on
            for kept in passes:
                _add_resized_probs(merged, *kept)
            passes.clear()
    if merged is not None:
        return (merged / count).argmax(dim=0)
    labels = torch.empty(height, width, dtype=torch.int64, device=passes[0][0].device)
    for bands in zip(*(_resized_probs(*kept, height, width) for kept in passes)):
        total = bands[0][1]  # p1 + p2 + ...: the sums segment_probs forms (0 + p1 is p1)
        for _, probs in bands[1:]:
            total += probs
        if count > 1:  # as segment_probs divides (by 1 it changes nothing)
            total /= count
        # max's indices are argmax's (the first of equal values), 3x faster on a band's outer dimension
        labels[bands[0][0]] = total.max(dim=0).indices
    return labels
