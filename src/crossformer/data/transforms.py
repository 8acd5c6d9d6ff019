"""Train and evaluation transforms, built by ``timm.data.create_transform``, and the keep-ratio
size rule the dense tasks share (:func:`rescale_size`)."""

from __future__ import annotations

import re
from typing import Callable

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform

from ..errors import UserInputError

__all__ = ["build_train_transform", "build_eval_transform", "check_auto_augment", "rescale_size"]

Transform = Callable[[Image.Image], torch.Tensor]


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` / ``imrescale`` (keep ratio): the largest ``(new_w, new_h)`` whose
    longer side is at most ``max(scale)`` and shorter side at most ``min(scale)``, each rounded
    half up, and at least 1 (mmcv's 0 for a side of a very long, thin image fails every resize)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return max(1, int(width * float(factor) + 0.5)), max(1, int(height * float(factor) + 0.5))


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: object) -> Image.Image:
    """timm's posterize, also at 0 bits: RandAugment's ``inc1`` levels reach 0, which
    Pillow >= 13 rejects; older Pillow (the authors' runs) gave a black image."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


# RandAugment ops are looked up in this table when a transform is built.
for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    if auto_augment.NAME_TO_OP.get(_name) is auto_augment.posterize:
        auto_augment.NAME_TO_OP[_name] = _posterize


def _check_sections(policy: str) -> None:
    """timm skips a policy's section without a number (``rand-mX`` ran at the default magnitude,
    ``original-mstdX`` without its noise): each one needs its letters and a number, or
    RandAugment's ``t<set>``."""
    for section in policy.split("-")[1:]:
        if not (re.fullmatch(r"[a-z]+\d[\d.]*", section) or (policy.startswith("rand") and section.startswith("t"))):
            raise ValueError(f"section {section!r} is not a letter code followed by a number")


def check_auto_augment(policy: str, key: str = "auto_augment") -> None:
    """A one-line error naming ``key`` unless timm can build the augmentation ``policy``
    (built as ``create_transform`` builds it: ``rand-...``, ``augmix-...`` or an AutoAugment
    name), rather than an AssertionError from inside a loader when training starts."""
    if policy.startswith("rand"):
        build = auto_augment.rand_augment_transform
    elif policy.startswith("augmix"):
        build = auto_augment.augment_and_mix_transform
    else:
        build = auto_augment.auto_augment_transform
    try:
        _check_sections(policy)
        build(policy, {})
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        detail = f" ({err})" if str(err) else ""
        raise UserInputError(
            f"{key} {policy!r} is not a timm augmentation policy{detail}; use e.g. rand-m9-mstd0.5-inc1, "
            f"augmix-m5-w4-d2, original or v0, or null for none"
        ) from None


def build_train_transform(
    img_size: int | tuple[int, int],
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.4,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> Transform:
    """The authors' recipe: random resized crop, flip, RandAugment, colour jitter, erasing.

    ``img_size``: N or ``(H, W)``. Output: float tensor ``(3, H, W)``, normalised.
    """
    return create_transform(
        img_size,
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment or None,
        interpolation=interpolation,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        mean=tuple(mean),
        std=tuple(std),
    )


def build_eval_transform(
    img_size: int | tuple[int, int],
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> Transform:
    """Resize to ``img_size / crop_pct`` (an int: the short side), centre-crop ``img_size``
    (224/256 at 224).

    ``img_size``: N or ``(H, W)``. Output: float tensor ``(3, H, W)``, normalised.
    """
    return create_transform(
        img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=tuple(mean), std=tuple(std)
    )
