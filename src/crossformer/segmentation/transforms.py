"""Image + label-map transforms of mmsegmentation 0.x's ADE20K pipeline, on numpy arrays.

Images are ``(H, W, 3)`` uint8 RGB arrays and label maps ``(H, W)`` uint8 arrays (already
reduced: 255 = ignore) until :func:`normalize`, which gives the float tensor the segmentors
take. Sizes follow mmcv's conventions: scales are ``(long edge, short edge)`` bounds and
``(w, h)`` targets; crops and paddings are ``(h, w)``.

What is faithful to mmseg 0.29 / mmcv 1.6 (the authors' versions):

- the scale sampling and rounding of ``Resize(img_scale, ratio_range, keep_ratio=True)``
  (:func:`rescale_size`, :func:`sample_train_scale`);
- ``RandomCrop``'s ``cat_max_ratio`` rule with its up-to-10 retries (:func:`random_crop_box`);
- ``PhotoMetricDistortion``'s order, probabilities, ranges and uint8 truncations;
- ``Pad`` at the bottom/right after ``Normalize`` (so the image pad value is 0 in normalised
  units).

Resampling uses torch's bilinear (``align_corners=False``, no antialias) and ``nearest``
kernels, which compute what OpenCV's ``INTER_LINEAR`` / ``INTER_NEAREST`` compute; OpenCV's
11-bit fixed-point arithmetic can differ by one grey level. The RGB<->HSV conversion follows
OpenCV's 8-bit definitions (H in 0..179) with rounding to nearest.

Randomness comes from torch's RNG (the global one unless a ``torch.Generator`` is given), so a
data loader's worker seeding makes runs repeatable and resumable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.transforms import rescale_size
from .config import IGNORE_INDEX, MMSEG_MEAN, MMSEG_STD, TrainPipelineConfig

__all__ = [
    "IGNORE_INDEX", "MMSEG_MEAN", "MMSEG_STD", "TrainPipelineConfig", "SegTrainTransform",
    "rescale_size", "resize_image", "resize_label", "resize_to_multiple", "sample_train_scale",
    "random_crop_box", "photometric_distortion", "normalize", "pad_to",
    "rgb_to_hsv_u8", "hsv_to_rgb_u8",
]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An integer in ``[low, high)`` (numpy's ``randint`` convention, which mmseg relies on)."""
    return int(torch.randint(low, high, (), generator=generator))


# ---------------------------------------------------------------- resizing

def sample_train_scale(
    scale: tuple[int, int], ratio_range: tuple[float, float], generator: torch.Generator | None = None
) -> tuple[int, int]:
    """mmseg ``Resize(img_scale=scale, ratio_range=...)``: ``scale`` times a uniform ratio, truncated."""
    ratio = _uniform(ratio_range[0], ratio_range[1], generator)
    return int(scale[0] * ratio), int(scale[1] * ratio)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``(H, W, 3)`` uint8 image to ``size = (w, h)``, rounded back to uint8."""
    width, height = size
    if image.shape[:2] == (height, width):
        return image
    # a float copy (the one .float() made): a read-only array (np.asarray of a PIL image) is no
    # warning from torch.from_numpy
    tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None].contiguous()
    out = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a ``(H, W)`` label map to ``size = (w, h)`` (OpenCV's rule)."""
    width, height = size
    if label.shape == (height, width):
        return label
    tensor = torch.from_numpy(np.ascontiguousarray(label))[None, None]
    return F.interpolate(tensor.float(), size=(height, width), mode="nearest")[0, 0].to(torch.uint8).numpy()


def resize_to_multiple(image: np.ndarray, divisor: int) -> np.ndarray:
    """The authors' ``AlignResize`` step: bilinear resize so height and width are the next
    multiples of ``divisor`` (a resize, not a pad)."""
    height, width = image.shape[:2]
    return resize_image(image, (-(-width // divisor) * divisor, -(-height // divisor) * divisor))


# ---------------------------------------------------------------- cropping

def random_crop_box(
    label: np.ndarray,
    crop_size: tuple[int, int],
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """``(y1, y2, x1, x2)`` of mmseg's ``RandomCrop``.

    A box is drawn uniformly; with ``cat_max_ratio < 1`` it is redrawn (up to 10 times) until
    the crop holds at least two classes and none covers ``cat_max_ratio`` or more of the
    labelled (non-ignored) pixels. After 10 redraws the last box is kept unchecked, as mmseg.
    """

    def draw() -> tuple[int, int, int, int]:
        margin_h = max(label.shape[0] - crop_size[0], 0)
        margin_w = max(label.shape[1] - crop_size[1], 0)
        y1, x1 = _randint(0, margin_h + 1, generator), _randint(0, margin_w + 1, generator)
        return y1, y1 + crop_size[0], x1, x1 + crop_size[1]

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            values, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


# ---------------------------------------------------------------- photometric distortion

def rgb_to_hsv_u8(image: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit RGB -> HSV: H in 0..179 (degrees / 2), S and V in 0..255."""
    rgb = image.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    diff = v - rgb.min(axis=-1)
    safe = np.where(diff == 0, 1.0, diff)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(diff == 0, 0.0, h) * 30.0  # sixths of the circle -> half-degrees
    h = np.round(h) % 180
    s = np.where(v == 0, 0.0, np.round(diff * 255.0 / np.where(v == 0, 1.0, v)))
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV -> RGB (the inverse of :func:`rgb_to_hsv_u8`).

    Per channel ``n`` (R 5, G 3, B 1): ``v - v * s * clip(min(k, 4 - k), 0, 1)`` with
    ``k = (n + h / 60deg) mod 6``, the closed form of OpenCV's per-sector table.
    """
    h = hsv[..., 0].astype(np.float32) / 30.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32) / 255.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h) % 6.0
        channels.append(v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.clip(np.round(np.stack(channels, -1) * 255.0), 0, 255).astype(np.uint8)


def _scale_shift(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert``: ``values * alpha + beta`` clipped to 0..255 and truncated to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on a uint8 RGB image.

    Each step applies with probability 1/2, in this order: brightness (add a uniform value in
    +-delta), contrast (multiply) either here or last (a coin decides), saturation (multiply
    S), hue (add an integer in ``[-hue_delta, hue_delta)`` to H, modulo 180).
    """
    if _randint(0, 2, generator):
        image = _scale_shift(image, beta=_uniform(-brightness_delta, brightness_delta, generator))
    contrast_last = _randint(0, 2, generator) == 0

    def contrast(img: np.ndarray) -> np.ndarray:
        if _randint(0, 2, generator):
            img = _scale_shift(img, alpha=_uniform(*contrast_range, generator))
        return img

    if not contrast_last:
        image = contrast(image)
    if _randint(0, 2, generator):
        hsv = rgb_to_hsv_u8(image)
        hsv[..., 1] = _scale_shift(hsv[..., 1], alpha=_uniform(*saturation_range, generator))
        image = hsv_to_rgb_u8(hsv)
    if _randint(0, 2, generator):
        hsv = rgb_to_hsv_u8(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + _randint(-hue_delta, hue_delta, generator)) % 180
        image = hsv_to_rgb_u8(hsv)
    if contrast_last:
        image = contrast(image)
    return image


# ---------------------------------------------------------------- tensors

def normalize(image: np.ndarray, mean: tuple[float, ...] = MMSEG_MEAN, std: tuple[float, ...] = MMSEG_STD) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32 ``(x - mean) / std`` (0-255 statistics)."""
    tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)  # (a copy: see resize_image)
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def pad_to(
    image: torch.Tensor, label: torch.Tensor, size: tuple[int, int], ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``(3, H, W)`` / ``(H, W)`` at the bottom and right to at least ``size = (h, w)``:
    0 in the (normalised) image, ``ignore_index`` in the label."""
    pad_h, pad_w = max(size[0] - image.shape[1], 0), max(size[1] - image.shape[2], 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
    return image, label


# ---------------------------------------------------------------- the training pipeline

class SegTrainTransform:
    """RandomResize -> RandomCrop (cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion ->
    Normalize -> Pad, on ``(image (H, W, 3) uint8, label (H, W) uint8)``.

    Returns ``(image (3, h, w) float32, label (h, w) int64, meta)`` with ``h, w`` at least the
    crop size (exactly it for images at least that large after resizing). ``meta`` records what
    was drawn: ``scale`` ``(w, h)`` after resizing, ``crop`` box, ``flip``.
    """

    def __init__(self, config: TrainPipelineConfig | None = None) -> None:
        self.config = config or TrainPipelineConfig()

    def __call__(
        self, image: np.ndarray, label: np.ndarray, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        cfg = self.config
        target = sample_train_scale(cfg.scale, cfg.ratio_range, generator)
        size = rescale_size(image.shape[1], image.shape[0], target)
        image, label = resize_image(image, size), resize_label(label, size)
        box = random_crop_box(label, cfg.crop_size, cfg.cat_max_ratio, IGNORE_INDEX, generator)
        y1, y2, x1, x2 = box
        image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]
        flip = _uniform(0.0, 1.0, generator) < cfg.flip_prob
        if flip:
            image, label = image[:, ::-1], label[:, ::-1]
        if cfg.photometric:
            image = photometric_distortion(image, generator=generator)
        tensor = normalize(image, cfg.mean, cfg.std)
        target_label = torch.from_numpy(np.ascontiguousarray(label)).long()
        tensor, target_label = pad_to(tensor, target_label, cfg.crop_size, IGNORE_INDEX)
        return tensor, target_label, {"scale": size, "crop": box, "flip": flip}
