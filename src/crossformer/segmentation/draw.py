"""Drawing label maps: class colours, colour overlays, and a legend box.

The first part (palette, blending, legend) knows nothing about segmentation and can move to
a task-neutral ``crossformer.data.draw``; the last function (:func:`overlay_segmentation`)
is the segmentation-specific composition.
"""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["class_palette", "blend", "draw_legend", "colorize", "present_classes", "overlay_segmentation"]

Color = tuple[int, int, int]


# ---------------------------------------------------------------- generic

def class_palette(num_classes: int) -> list[Color]:
    """``num_classes`` distinct, fixed RGB colours (golden-ratio hue steps, two brightness levels)."""
    colors = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 == 0 else 0.7
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def blend(image: np.ndarray, colors: np.ndarray, mask: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """``image * (1 - opacity) + colors * opacity`` where ``mask``; ``image`` elsewhere.

    ``image``/``colors``: ``(H, W, 3)`` uint8; ``mask``: ``(H, W)`` bool. Returns uint8.
    """
    mixed = image.astype(np.float32) * (1.0 - opacity) + colors.astype(np.float32) * opacity
    out = image.copy()
    out[mask] = np.clip(np.round(mixed[mask]), 0, 255).astype(np.uint8)
    return out


def _text_color(color: Color) -> Color:
    return (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 140 else (255, 255, 255)


def draw_legend(image: Image.Image, entries: Sequence[tuple[str, Color]], max_entries: int = 20) -> Image.Image:
    """A copy of ``image`` with a legend box in the top-left corner: a swatch and name per entry.

    The text size follows the image size (readable on small and large images); entries past
    ``max_entries`` are summarised as "+N more".
    """
    out = image.convert("RGB").copy()
    if not entries:
        return out
    shown = list(entries[:max_entries])
    hidden = len(entries) - len(shown)
    size = max(10, min(out.size) // 30)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(out, "RGBA")
    labels = [name for name, _ in shown] + ([f"+{hidden} more"] if hidden else [])
    line_h = size + 4
    width = max(draw.textlength(text, font=font) for text in labels) + line_h + 10
    draw.rectangle([0, 0, width, line_h * len(labels) + 6], fill=(0, 0, 0, 160))
    for row, text in enumerate(labels):
        top = 3 + row * line_h
        if row < len(shown):
            draw.rectangle([4, top + 1, 4 + line_h - 4, top + line_h - 3], fill=shown[row][1], outline=(255, 255, 255))
        draw.text((line_h + 6, top), text, fill=(255, 255, 255), font=font)
    return out


# ---------------------------------------------------------------- segmentation

def colorize(label_map: np.ndarray, palette: Sequence[Color], ignore_index: int = 255) -> np.ndarray:
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
    palette: Sequence[Color],
    opacity: float = 0.5,
    ignore_index: int = 255,
) -> Image.Image:
    """The image with each class painted in its colour at ``opacity`` and a legend of the
    classes present, largest area first. ``image`` (H, W, 3) uint8, ``label_map`` (H, W)."""
    blended = blend(image, colorize(label_map, palette, ignore_index), label_map != ignore_index, opacity)
    present = present_classes(label_map, len(class_names), ignore_index)
    return draw_legend(Image.fromarray(blended), [(class_names[c], tuple(palette[c])) for c in present])
