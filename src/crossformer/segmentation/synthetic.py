"""A small synthetic data set in the ADE20K layout (``crossformer make-data ade``).

Scenes of textured horizontal bands (sky on top, a wall or water band, grass or water at the
bottom) with shapes in front (buildings, people, cars). Each of the seven classes has its own
hue range *and* texture (smooth gradient, speckle, horizontal stripes, waves, window grid,
dots, diagonal stripes), and colours vary from image to image, so a small network has to look
at both. Pixels on band borders and on grey "clutter" blobs are unlabelled (value 0).

Written as ``ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}`` with JPEG
images, PNG label maps (0 = unlabelled, class ``i`` = value ``i + 1``) and ``classes.txt``
beside them, which :func:`.data.ade20k_dataset` reads instead of the 150 ADE20K names.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import save_image_atomic, write_text_atomic
from ..data import DataError

__all__ = ["SYNTHETIC_CLASSES", "make_ade_dataset", "render_scene"]

SYNTHETIC_CLASSES = ("sky", "grass", "wall", "water", "building", "person", "car")
SKY, GRASS, WALL, WATER, BUILDING, PERSON, CAR = range(len(SYNTHETIC_CLASSES))
# Base hue, saturation, value of each class; each image jitters them.
_HSV = {
    SKY: (0.58, 0.55, 0.9), GRASS: (0.30, 0.7, 0.6), WALL: (0.08, 0.3, 0.75), WATER: (0.47, 0.75, 0.6),
    BUILDING: (0.0, 0.7, 0.55), PERSON: (0.83, 0.6, 0.8), CAR: (0.15, 0.85, 0.85),
}


def _color(cls: int, rng: np.random.Generator) -> np.ndarray:
    h, s, v = _HSV[cls]
    h = (h + rng.uniform(-0.035, 0.035)) % 1.0
    s = float(np.clip(s + rng.uniform(-0.15, 0.15), 0.1, 1.0))
    v = float(np.clip(v + rng.uniform(-0.15, 0.15), 0.2, 1.0))
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _texture(cls: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``(H, W)`` brightness multiplier around 1 with the class's pattern."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if cls == SKY:  # smooth vertical gradient
        return 0.8 + 0.35 * yy / height
    if cls == GRASS:  # coarse speckle
        return 1.0 + rng.normal(0.0, 0.22, (height, width)).astype(np.float32)
    if cls == WALL:  # horizontal stripes
        return 1.0 + 0.3 * np.sign(np.sin(2 * np.pi * yy / rng.uniform(5, 9) + rng.uniform(0, 6.3)))
    if cls == WATER:  # vertical waves
        period, wobble = rng.uniform(7, 12), rng.uniform(6, 12)
        return 1.0 + 0.3 * np.sin(2 * np.pi * (xx + 3 * np.sin(yy / wobble)) / period)
    if cls == BUILDING:  # window grid
        cell = rng.uniform(8, 12)
        windows = (np.mod(yy, cell) > cell * 0.45) & (np.mod(xx, cell) > cell * 0.45)
        return np.where(windows, 1.45, 0.85).astype(np.float32)
    if cls == PERSON:  # dots
        period = rng.uniform(4, 6)
        return 1.0 + 0.35 * (np.sin(2 * np.pi * yy / period) * np.sin(2 * np.pi * xx / period) > 0.4)
    # CAR: diagonal stripes
    return 1.0 + 0.3 * np.sign(np.sin(2 * np.pi * (xx + yy) / rng.uniform(6, 10)))


def render_scene(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(H, W, 3)`` uint8 RGB image and ``(H, W)`` uint8 label map (0 = unlabelled,
    class ``i`` = ``i + 1``)."""
    label = np.zeros((height, width), dtype=np.int64) - 1
    horizon = int(height * rng.uniform(0.3, 0.45))
    ground = int(height * rng.uniform(0.6, 0.75))
    middle, bottom = rng.choice([WALL, WATER]), rng.choice([GRASS, WATER, GRASS])
    if middle == bottom:
        bottom = GRASS
    label[:horizon], label[horizon:ground], label[ground:] = SKY, middle, bottom
    for _ in range(rng.integers(1, 5)):
        cls = rng.choice([BUILDING, PERSON, CAR])
        if cls == BUILDING:
            w, h = int(width * rng.uniform(0.12, 0.3)), int(height * rng.uniform(0.25, 0.5))
            x0, y1 = int(rng.integers(0, width - w)), ground
            label[max(y1 - h, 0):y1, x0:x0 + w] = BUILDING
        elif cls == PERSON:
            ry, rx = height * rng.uniform(0.1, 0.18), width * rng.uniform(0.03, 0.07)
            cy, cx = rng.uniform(horizon, height - ry), rng.uniform(rx, width - rx)
            yy, xx = np.ogrid[0:height, 0:width]
            label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = PERSON
        else:
            w, h = int(width * rng.uniform(0.15, 0.3)), int(height * rng.uniform(0.08, 0.15))
            x0, y0 = int(rng.integers(0, width - w)), int(rng.uniform(ground - h, height - h))
            label[y0:y0 + h, x0:x0 + w] = CAR
    image = np.zeros((height, width, 3), dtype=np.float32)
    for cls in np.unique(label):
        mask = label == cls
        image[mask] = (_color(int(cls), rng)[None, None] * _texture(int(cls), height, width, rng)[..., None])[mask]
    # Unlabelled pixels: class borders (the row/column where the class changes) and clutter blobs.
    border = np.zeros_like(label, dtype=bool)
    border[1:] |= label[1:] != label[:-1]
    border[:, 1:] |= label[:, 1:] != label[:, :-1]
    for _ in range(rng.integers(0, 3)):
        r = min(height, width) * rng.uniform(0.04, 0.09)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        yy, xx = np.ogrid[0:height, 0:width]
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
        image[blob] = rng.uniform(0.3, 0.7) + rng.normal(0, 0.1, (int(blob.sum()), 1))
        border |= blob
    label = label + 1
    label[border] = 0
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    return (image * 255).round().astype(np.uint8), label.astype(np.uint8)


def make_ade_dataset(
    root: str | Path,
    images: int = 200,
    seed: int = 0,
    size: tuple[int, int] = (128, 176),
    val_fraction: float = 0.2,
) -> Path:
    """Write ``images`` scenes (``val_fraction`` of them, at least one, in ``validation``) of
    about ``size = (h, w)`` pixels (each side varies by up to 25%); returns the
    ``ADEChallengeData2016`` folder. Deterministic in ``seed``."""
    if images < 2:
        raise DataError(f"make-data ade needs at least 2 images (one for validation), got {images}")
    if min(size) < 32:
        raise DataError(f"synthetic images must be at least 32x32 pixels, got {size[0]}x{size[1]}")
    ade = Path(root) / "ADEChallengeData2016"
    rng = np.random.default_rng(seed)
    val = max(1, round(images * val_fraction))
    (ade / "classes.txt").unlink(missing_ok=True)  # the mark of a whole set, written last: not over a rewrite cut short
    splits = [("training", "ADE_train", images - val), ("validation", "ADE_val", val)]
    for folder, prefix, count in splits:
        (ade / "images" / folder).mkdir(parents=True, exist_ok=True)
        (ade / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            height = int(size[0] * rng.uniform(0.75, 1.25))
            width = int(size[1] * rng.uniform(0.75, 1.25))
            image, label = render_scene(height, width, rng)
            name = f"{prefix}_{index + 1:08d}"
            save_image_atomic(Image.fromarray(image), ade / "images" / folder / f"{name}.jpg", quality=92)
            save_image_atomic(Image.fromarray(label, mode="L"), ade / "annotations" / folder / f"{name}.png")
    # last and whole: the demo takes the set for complete once this file is there
    write_text_atomic(ade / "classes.txt", "\n".join(SYNTHETIC_CLASSES) + "\n")
    return ade
