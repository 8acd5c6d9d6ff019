"""Drawing on images for prediction outputs: colours, mask overlays, captioned boxes, legends.

Task-neutral: detection draws boxes and instance masks with it, segmentation class maps and a
legend. Everything takes and returns PIL RGB images; masks are boolean numpy arrays.
"""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["palette", "text_colour", "overlay_masks", "draw_boxes", "draw_legend"]

Colour = tuple[int, int, int]


def palette(n: int) -> list[Colour]:
    """``n`` distinct, saturated colours: hues spaced by the golden ratio, alternating brightness,
    so neighbouring indices never look alike and every colour shows on photographs."""
    colours = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0 if i % 2 == 0 else 0.8)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours


def text_colour(background: Colour) -> Colour:
    """Black or white, whichever reads better on ``background`` (by perceived luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def overlay_masks(image: Image.Image, masks: np.ndarray, colours: Sequence[Colour], alpha: float = 0.45) -> Image.Image:
    """Blend each boolean mask of ``masks`` (K, H, W) in its colour over ``image`` (H, W); later
    masks on top."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for mask, colour in zip(masks, colours):
        mask = np.asarray(mask, dtype=bool)
        pixels[mask] = (1 - alpha) * pixels[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def _caption(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: Colour,
             font: ImageFont.ImageFont, image_size: tuple[int, int]) -> None:
    """``text`` on a filled label in ``colour``, above ``xy`` when it fits, else below it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x = min(max(xy[0], 0), max(image_size[0] - w, 0))
    y = xy[1] - h if xy[1] - h >= 0 else min(xy[1], max(image_size[1] - h, 0))
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    draw.text((x + 2 - left, y + 2 - top), text, fill=text_colour(colour), font=font)


def draw_boxes(image: Image.Image, boxes: np.ndarray, captions: Sequence[str], colours: Sequence[Colour],
               width: int | None = None) -> Image.Image:
    """Outline each xyxy box of ``boxes`` (K, 4) in its colour, with its caption on a label."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    width = width or max(1, round(min(image.size) / 250))
    font = ImageFont.load_default()
    for box, caption, colour in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), captions, colours):
        x1, y1, x2, y2 = box.tolist()
        draw.rectangle((x1, y1, max(x2, x1), max(y2, y1)), outline=colour, width=width)
        if caption:
            _caption(draw, (x1, y1), caption, colour, font, image.size)
    return image


def draw_legend(image: Image.Image, names: Sequence[str], colours: Sequence[Colour]) -> Image.Image:
    """A column of colour swatches with their names in the top-left corner."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    y = 2
    for name, colour in zip(names, colours):
        _caption(draw, (2, y), name, colour, font, image.size)
        y += draw.textbbox((0, 0), name, font=font)[3] + 6
    return image
