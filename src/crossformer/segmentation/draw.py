"""Drawing label maps: class colours painted over the image and a legend of the classes present
(the generic drawing lives in :mod:`crossformer.data.draw`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..data.draw import Colour, blend, draw_legend

__all__ = ["colorize", "present_classes", "overlay_segmentation"]


def colorize(label_map: np.ndarray, palette: Sequence[Colour], ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3)`` uint8 colours (black where ``ignore_index``)."""
    table = np.zeros((max(len(palette), ignore_index + 1), 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[ignore_index] = 0
    return table[label_map]


def present_classes(label_map: np.ndarray, num_classes: int, ignore_index: int = 255) -> list[int]:
    """The classes in ``label_map``, largest area first."""
    counts = np.bincount(label_map[label_map != ignore_index].ravel(), minlength=num_classes)
    return [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]


def overlay_segmentation(
    image: np.ndarray,
    label_map: np.ndarray,
    class_names: Sequence[str],
    palette: Sequence[Colour],
    opacity: float = 0.5,
    ignore_index: int = 255,
) -> Image.Image:
    """The image with each class painted in its colour at ``opacity`` and a legend of the
    classes present, largest area first. ``image`` (H, W, 3) uint8, ``label_map`` (H, W)."""
    blended = blend(image, colorize(label_map, palette, ignore_index), label_map != ignore_index, opacity)
    present = present_classes(label_map, len(class_names), ignore_index)
    return draw_legend(Image.fromarray(blended), [(class_names[c], tuple(palette[c])) for c in present])
