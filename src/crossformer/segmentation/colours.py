"""Colour-coded label maps: each class drawn in its own colour (``data.label_colours``), as many
labelling tools and data sets (Cityscapes' ``*_color.png``, CamVid) save them.

:class:`LabelColours` turns such a map's pixels into the values an index map of the same data
set would store: class ``k`` (the ``k``-th colour) as ``k`` (``k + 1`` where label maps count
classes from 1, ``reduce_zero_label``), each of ``data.ignore_colours`` as 255 (ignored). A pixel
of another colour is a one-line error naming the file, the colour and where it first occurs. A
palette PNG (mode P) holds indices, read as they are (Pascal VOC's), unless its palette shows
every index it uses in a listed colour: then it is a colour-coded map an editor saved indexed
(its indices in the order the colours were met), read by those colours.

The lookup packs each pixel into one 24-bit key and looks up each horizontal run of one colour
once in a sorted table (label maps are runs of few colours; a 2^24 table would cost 16 MiB per
loader worker): under 1 ms a 512x512 map on one core, 0.6 ms of it copying the pixels out of
PIL, against 1.5-2.5 ms to decode the PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..data.draw import Colour, class_colours
from ..errors import DataError
from .config import IGNORE_INDEX

__all__ = ["LabelColours", "hex_colour", "COLOUR_MODES"]

COLOUR_MODES = ("RGB", "RGBA")  # the modes a colour-coded map is saved in (an opaque RGBA one: Cityscapes')
_RGB = 0xFFFFFF  # the colour bits of a pixel packed as r | g << 8 | b << 16 | alpha << 24


def hex_colour(colour: Sequence[int]) -> str:
    """``(128, 64, 128)`` -> ``"#804080"``, as colours are named in messages."""
    r, g, b = (int(v) for v in colour)
    return f"#{r:02x}{g:02x}{b:02x}"


def _packed(colours: Sequence[Colour]) -> np.ndarray:
    """``(N,)`` uint32 keys ``r | g << 8 | b << 16`` of ``colours``, as :meth:`LabelColours.values` packs pixels."""
    rgb = np.asarray(colours, dtype=np.uint32).reshape(-1, 3)
    return rgb[:, 0] | rgb[:, 1] << 8 | rgb[:, 2] << 16


class LabelColours:
    """The colour of each class (``colours[k]``: class ``k``) and the colours that mean "ignore".

    Checked when built (one line naming the setting): one ``[R, G, B]`` per class (where
    ``classes`` is given), values 0-255, no colour twice (two classes, or a class and ignore).
    ``offset`` is added to the class index (1 where label maps count classes from 1).
    """

    def __init__(self, colours: Sequence[Sequence[int]], ignore: Sequence[Sequence[int]] = (),
                 classes: int | None = None, offset: int = 0) -> None:
        self.colours = class_colours(colours, len(colours) if classes is None else classes, "data.label_colours")
        self.ignore = class_colours(ignore, len(ignore), "data.ignore_colours")
        keys = _packed(self.colours + self.ignore)
        values = np.array([k + offset for k in range(len(self.colours))] + [IGNORE_INDEX] * len(self.ignore), np.int64)
        order = np.argsort(keys, kind="stable")
        twice = np.flatnonzero(keys[order][1:] == keys[order][:-1])
        if twice.size:
            first, second = sorted(order[twice[0]: twice[0] + 2])
            colour = hex_colour((self.colours + self.ignore)[first])
            if second >= len(self.colours):  # a class's colour, or an ignore colour, listed again as ignore
                what = ("twice in data.ignore_colours" if first >= len(self.colours)
                        else f"as class {first}'s colour in data.label_colours and in data.ignore_colours")
                raise DataError(f"colour {colour} is listed {what}: list each colour once")
            raise DataError(f"data.label_colours gives classes {first} and {second} one colour, {colour}: "
                            "give each class its own colour")
        # a last key no pixel packs to (its alpha bits set): every lookup lands on a key
        self.keys = np.append(keys[order], np.uint32(0xFFFFFFFF))
        self.stored = np.append(values[order], IGNORE_INDEX)

    def values(self, img: Image.Image, path: str | Path) -> np.ndarray:
        """The ``(H, W)`` int64 values an index map would store for the opaque RGB(A) label map
        ``img`` (read from ``path``); a DataError naming the first pixel of a colour not listed."""
        width, height = img.size
        raw = "RGBA" if img.mode == "RGBA" else "RGBX"  # PIL holds RGB as 4 bytes a pixel: no conversion
        pixels = np.frombuffer(img.tobytes("raw", raw), dtype="<u4") & _RGB
        starts = np.concatenate(([0], np.flatnonzero(pixels[1:] != pixels[:-1]) + 1))  # each run of one colour
        colours = pixels[starts]
        found = np.searchsorted(self.keys, colours)
        known = self.keys[found] == colours
        if not known.all():  # the first run of an unlisted colour starts at its first pixel
            at = int(starts[np.argmin(known)])
            key = int(pixels[at])
            colour = hex_colour((key & 255, key >> 8 & 255, key >> 16))
            raise DataError(f"label map {path} holds colour {colour} (first at x={at % width}, y={at // width}), which "
                            "data.label_colours does not list: add it there, or to data.ignore_colours where it means "
                            "unlabelled")
        lengths = np.diff(np.append(starts, pixels.size))
        return np.repeat(self.stored[found], lengths).reshape(height, width)

    def palette_values(self, img: Image.Image) -> np.ndarray | None:
        """The ``(H, W)`` int64 values of the palette (mode P) label map ``img`` read by its
        colours where its palette shows every index it uses in a listed colour, else None (its
        indices are the values)."""
        palette = np.asarray(img.getpalette() or [], np.uint32).reshape(-1, 3)
        used = np.flatnonzero(img.histogram())  # PIL counts a P image's indices (bincount: 3x slower)
        if used[-1] >= len(palette):  # an index the palette does not colour
            return None
        keys = _packed(palette[used])
        found = np.searchsorted(self.keys, keys)
        if not (self.keys[found] == keys).all():
            return None
        table = np.zeros(256, np.uint8)  # values of 8-bit maps: a data set holds at most 255 classes
        table[used] = self.stored[found]
        return table.take(np.asarray(img)).astype(np.int64)  # take on uint8: 3x faster than int64 indexing
