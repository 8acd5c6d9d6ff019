"""Drawing on images for prediction outputs: colours, mask overlays, captioned boxes, legends.

Task-neutral: detection draws boxes and instance masks with it, segmentation class maps and a
legend. Everything takes and returns PIL RGB images; masks are boolean numpy arrays.
"""

from __future__ import annotations

import colorsys
import functools
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Colour", "palette", "class_colours", "text_colour", "blend", "overlay_masks", "draw_boxes", "draw_legend"]

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


def class_colours(colours: Sequence[Sequence[int]] | None, classes: int, what: str = "the palette") -> list[Colour]:
    """``colours`` as ``(R, G, B)`` tuples, one per class and each 0-255, or :func:`palette`'s
    where None; a :class:`crossformer.data.DataError` (one line naming ``what``) otherwise."""
    from ..errors import DataError

    if colours is None:
        return palette(classes)
    if len(colours) != classes:
        raise DataError(f"{what} has {len(colours)} colours for {classes} classes: give one [R, G, B] per class")
    bad = next((c for c in colours if len(c) != 3 or not all(0 <= v <= 255 for v in c)), None)
    if bad is not None:
        raise DataError(f"{what} holds {list(bad)}: each colour is [R, G, B], three values 0-255")
    return [tuple(int(v) for v in c) for c in colours]


def text_colour(background: Colour) -> Colour:
    """Black or white, whichever reads better on ``background`` (by perceived luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def blend(image: np.ndarray, colors: np.ndarray, mask: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """``image * (1 - opacity) + colors * opacity`` where ``mask``; ``image`` elsewhere.

    ``image``/``colors``: ``(H, W, 3)`` uint8; ``mask``: ``(H, W)`` bool. Returns uint8.
    """
    mixed = image.astype(np.float32) * (1.0 - opacity) + colors.astype(np.float32) * opacity
    out = image.copy()
    out[mask] = np.clip(np.round(mixed[mask]), 0, 255).astype(np.uint8)
    return out


def overlay_masks(image: Image.Image, masks: np.ndarray, colours: Sequence[Colour], alpha: float = 0.45) -> Image.Image:
    """Blend each boolean mask of ``masks`` (K, H, W) in its colour over ``image`` (H, W); later
    masks on top."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    for mask, colour in zip(masks, colours):
        pixels = blend(pixels, np.broadcast_to(np.asarray(colour, dtype=np.uint8), pixels.shape),
                       np.asarray(mask, dtype=bool), alpha)
    return Image.fromarray(pixels)


# TrueType fonts with glyphs beyond ASCII, by file name (ImageFont.truetype looks in the system's
# font folders): Linux's DejaVu and Noto, macOS's and Windows' Arial Unicode and Arial
UNICODE_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial Unicode.ttf", "arialuni.ttf", "Arial.ttf", "arial.ttf")


@functools.lru_cache(maxsize=16)
def _unicode_font(size: int) -> ImageFont.FreeTypeFont | None:
    for name in UNICODE_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return None


def label_font(texts: Iterable[str], size: int | None = None) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A font for drawing ``texts``: Pillow's default (``size`` where it scales), or, where a
    text holds characters beyond ASCII (class names such as "grün" or "猫", which the default
    font draws as empty boxes), the first of :data:`UNICODE_FONTS` this system has."""
    if not all(text.isascii() for text in texts):
        font = _unicode_font(size or 11)
        if font is not None:
            return font
    if size is None:
        return ImageFont.load_default()
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed bitmap font
        return ImageFont.load_default()


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
    font = label_font(captions)
    for box, caption, colour in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), captions, colours):
        x1, y1, x2, y2 = box.tolist()
        draw.rectangle((x1, y1, max(x2, x1), max(y2, y1)), outline=colour, width=width)
        if caption:
            _caption(draw, (x1, y1), caption, colour, font, image.size)
    return image


def draw_legend(image: Image.Image, entries: Sequence[tuple[str, Colour]], max_entries: int = 20) -> Image.Image:
    """A copy of ``image`` with a legend box: a swatch and name per entry, in the top-left corner,
    or in a panel to the right of the image where the box would not fit in it or would cover
    more than a quarter of it (small images: the legend would hide the image, and be cut off).

    The text size follows the image size (readable on small and large images); entries past
    ``max_entries`` are summarised as "+N more".
    """
    out = image.convert("RGB").copy()
    if not entries:
        return out
    shown = list(entries[:max_entries])
    hidden = len(entries) - len(shown)
    size = max(10, min(out.size) // 30)
    labels = [name for name, _ in shown] + ([f"+{hidden} more"] if hidden else [])
    font = label_font(labels, size)
    line_h = size + 4
    width = round(max(ImageDraw.Draw(out).textlength(text, font=font) for text in labels)) + line_h + 10
    height = line_h * len(labels) + 6
    left = 0
    if width > out.width or height > out.height or width * height > out.width * out.height / 4:
        left = out.width
        panel = Image.new("RGB", (out.width + width + 1, max(out.height, height + 1)))
        panel.paste(out, (0, 0))
        out = panel
    draw = ImageDraw.Draw(out, "RGBA")
    draw.rectangle([left, 0, left + width, height], fill=(0, 0, 0, 160))
    for row, text in enumerate(labels):
        top = 3 + row * line_h
        if row < len(shown):
            draw.rectangle([left + 4, top + 1, left + line_h, top + line_h - 3], fill=shown[row][1],
                           outline=(255, 255, 255))
        draw.text((left + line_h + 6, top), text, fill=(255, 255, 255), font=font)
    return out
