"""A synthetic COCO-format instance set that any machine can write and a tiny detector can learn.

``make_coco_dataset(root, images=N)`` writes the COCO layout a user's data would have:
``annotations/instances_{train,val}2017.json`` and JPEG files in ``train2017/`` ``val2017/``.
Each image holds a few shapes (circles, rectangles, triangles, stars: four categories with
the non-contiguous ids 1, 3, 6, 9) in random sizes, colours and rotations on a textured
background (noise, gradients, stripes), overlapping; some images hold a crowd (a cluster of
small shapes of one kind, one ``iscrowd=1`` RLE annotation), some hold nothing.

Colours (``colours="by_category"``, the default) vary from object to object in shade,
saturation and hue around one hue per category (reds, greens, blues, yellows), as many
real categories have typical colours; a minutes-long training on 2 CPU cores learns the
categories from shape and colour together. ``colours="random"`` draws any saturated colour
for any shape: the category is then in the shape alone, which a tiny detector trained from
scratch learns several times more slowly (held-out box AP 0.07 against 0.43 after 5 epochs
of the demo's recipe).

Masks are the *visible* part of each object, as in COCO: shapes are painted in order, a later
shape covers earlier ones, and each shape is painted exactly where pycocotools rasterises its
polygon, so the annotation matches the pixels. An object nobody covers is annotated with its
exact polygon; a partly covered one with the compressed RLE of its visible pixels (shapes are
placed so that each keeps at least half of its area). Boxes and areas are those of the
visible mask.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..atomic import save_image_atomic, write_text_atomic

__all__ = ["SHAPE_CATEGORIES", "SyntheticCoco", "make_coco_dataset"]

SHAPE_CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 3, "name": "rectangle"},
                    {"id": 6, "name": "triangle"}, {"id": 9, "name": "star"})
MIN_VISIBLE = 0.5  # every object keeps at least this fraction of its area visible
# ``colours="by_category"``: each category's hue (HSV, in SHAPE_CATEGORIES' order: red, green,
# blue, yellow), from which every object's hue strays by up to HUE_SPREAD.
CATEGORY_HUES = (0.0, 0.33, 0.62, 0.15)
HUE_SPREAD = 0.04
EMPTY_EVERY = 10  # image k of a split (k % EMPTY_EVERY == EMPTY_EVERY - 1) has no objects
CROWD_EVERY = 7  # image k (k % CROWD_EVERY == 3) has a crowd


@dataclass
class SyntheticCoco:
    """What :func:`make_coco_dataset` wrote."""

    root: Path
    train_images: int
    val_images: int
    objects: int  # non-crowd annotations, both splits
    crowds: int
    empty_images: int


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float, aspect: float) -> list[float]:
    """Vertices [x0, y0, x1, y1, ...] of a shape of radius ``r`` centred at (cx, cy)."""
    if kind == "circle":
        points = [(r * math.cos(t), r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif kind == "rectangle":
        a, b = r, r * aspect
        points = [(-a, -b), (a, -b), (a, b), (-a, b)]
    elif kind == "triangle":
        points = [(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # five-pointed star
        points = [((r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                   (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    c, s = math.cos(angle), math.sin(angle)
    return [round(v, 2) for x, y in points for v in (cx + c * x - s * y, cy + s * x + c * y)]


def _rasterise(polygon: list[float], height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.frPyObjects([polygon], height, width))[..., 0].astype(bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float (H, W, 3): a gradient, stripes or blotchy noise in muted colours, plus fine noise."""
    base, other = rng.uniform(60, 190, 3), rng.uniform(60, 190, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(np.ptp(t), 1.0)
    elif kind == 1:  # soft stripes
        angle, period = rng.uniform(0, math.pi), rng.uniform(8, 40)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    else:  # blotches: coarse noise upsampled
        coarse = rng.uniform(0, 1, (height // 16 + 2, width // 16 + 2)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    image = base + (other - base) * t[..., None]
    return image + rng.normal(0, 8, (height, width, 3))


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour, so shapes stand out of the muted background."""
    rgb = rng.uniform(0, 80, 3)
    rgb[rng.integers(3)] = rng.uniform(200, 255)
    return rgb if rng.random() < 0.8 else 255 - rgb


def _category_colour(rng: np.random.Generator, kind: int) -> np.ndarray:
    """A colour near category ``kind``'s hue, in a random shade and saturation."""
    hue = (CATEGORY_HUES[kind] + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 1.0
    return 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)))


def _grow(mask: np.ndarray, pixels: int = 2) -> np.ndarray:
    """``mask`` dilated by ``pixels`` (a square structuring element)."""
    grown = mask.copy()
    for _ in range(pixels):
        grown[1:] |= grown[:-1].copy()
        grown[:-1] |= grown[1:].copy()
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
    return grown


def _encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray, segmentation, iscrowd: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "area": float(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": iscrowd}


def _draw_image(rng: np.random.Generator, height: int, width: int, shapes: int, crowd: bool,
                radius: tuple[float, float], separate: bool, colours: str):
    """An image and its objects: (image uint8, [(category id, full mask, visible mask, polygon or None)]).

    ``radius``: shape radii as fractions of the shorter side; ``separate``: shapes never touch
    (each keeps all of its area); ``colours``: "by_category" or "random" (see the module).
    """
    paint = (lambda kind: _category_colour(rng, kind)) if colours == "by_category" else (lambda kind: _colour(rng))
    image = _background(rng, height, width)
    objects: list[list] = []  # [category id, full mask, visible mask, polygon | None (crowd)]
    if crowd:
        kind = int(rng.integers(len(SHAPE_CATEGORIES)))
        side = min(height, width)
        cx0, cy0 = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
        union = np.zeros((height, width), dtype=bool)
        colour = paint(kind)
        for _ in range(int(rng.integers(6, 12))):
            polygon = _shape_polygon(SHAPE_CATEGORIES[kind]["name"], cx0 + rng.normal(0, side * 0.08),
                                     cy0 + rng.normal(0, side * 0.08), rng.uniform(3, 6), rng.uniform(0, math.pi), 1.0)
            m = _rasterise(polygon, height, width)
            image[m] = colour
            union |= m
        if union.any():
            objects.append([SHAPE_CATEGORIES[kind]["id"], union, union.copy(), None])
    for _ in range(shapes):
        for _attempt in range(20):
            kind = int(rng.integers(len(SHAPE_CATEGORIES)))
            r = rng.uniform(*radius) * min(height, width)
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            polygon = _shape_polygon(SHAPE_CATEGORIES[kind]["name"], cx, cy, r, rng.uniform(0, 2 * math.pi),
                                     rng.uniform(0.5, 1.0))
            full = _rasterise(polygon, height, width)
            if separate:
                grown = _grow(full)
                if not any((o[1] & grown).any() for o in objects):
                    break
            elif all((o[2] & ~full).sum() >= MIN_VISIBLE * o[1].sum() for o in objects):
                break
        else:
            continue  # no place where this shape hides too little of the others
        for o in objects:
            o[2] &= ~full
        image[full] = paint(kind) + rng.normal(0, 6, (int(full.sum()), 3))
        objects.append([SHAPE_CATEGORIES[kind]["id"], full, full.copy(), polygon])
    return np.clip(image, 0, 255).astype(np.uint8), objects


def make_coco_dataset(
    root: str | Path,
    images: int = 200,
    seed: int = 0,
    val_fraction: float = 0.25,
    image_size: tuple[int, int] = (96, 128),
    shapes_per_image: tuple[int, int] = (1, 3),
    jpeg_quality: int = 92,
    *,
    radius: tuple[float, float] = (0.15, 0.3),
    separate: bool = False,
    colours: Literal["by_category", "random"] = "by_category",
    crowds: bool = True,
) -> SyntheticCoco:
    """Write ``images`` images (``val_fraction`` of them in val2017) under ``root``.

    Sides are drawn from ``image_size`` (min, max) pixels; each non-empty image gets
    ``shapes_per_image`` (min, max) shapes with radii ``radius`` (fractions of its shorter
    side), which may overlap (each keeps at least half of its area visible) unless
    ``separate``; ``colours`` as the module says; ``crowds=False``: no crowd regions.
    """
    if colours not in ("by_category", "random"):
        raise ValueError(f"colours must be 'by_category' or 'random', got {colours!r}")
    if images < 2:
        raise ValueError("make_coco_dataset needs at least 2 images (one per split)")
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_val = min(max(1, round(images * val_fraction)), images - 1)
    image_id = ann_id = 0
    for split in ("train2017", "val2017"):  # an earlier set's JSON would describe a rewrite cut short as whole
        (root / "annotations" / f"instances_{split}.json").unlink(missing_ok=True)
    counts = {"objects": 0, "crowds": 0, "empty": 0}
    for split, n in (("train2017", images - n_val), ("val2017", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        entries, annotations = [], []
        for k in range(n):
            image_id += 1
            width, height = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, 2))
            empty = k % EMPTY_EVERY == EMPTY_EVERY - 1
            shapes = 0 if empty else int(rng.integers(shapes_per_image[0], shapes_per_image[1] + 1))
            crowd = crowds and not empty and k % CROWD_EVERY == 3
            pixels, objects = _draw_image(rng, height, width, shapes, crowd, radius, separate, colours)
            file_name = f"{image_id:012d}.jpg"
            save_image_atomic(Image.fromarray(pixels), root / split / file_name, quality=jpeg_quality)
            entries.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            counts["empty"] += empty
            for category_id, full, visible, polygon in objects:
                ann_id += 1
                if polygon is None:
                    annotations.append(_annotation(ann_id, image_id, category_id, visible, _encode(visible), 1))
                    counts["crowds"] += 1
                else:
                    segmentation = [polygon] if (visible == full).all() else _encode(visible)
                    annotations.append(_annotation(ann_id, image_id, category_id, visible, segmentation, 0))
                    counts["objects"] += 1
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        coco = {"info": {"description": "crossformer synthetic shapes", "version": "1.0"}, "licenses": [],
                "images": entries, "annotations": annotations, "categories": [dict(c, supercategory="shape")
                                                                              for c in SHAPE_CATEGORIES]}
        write_text_atomic(root / "annotations" / f"instances_{split}.json", json.dumps(coco))
    return SyntheticCoco(root, images - n_val, n_val, counts["objects"], counts["crowds"], counts["empty"])
