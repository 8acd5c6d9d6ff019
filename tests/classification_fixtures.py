"""Tiny image folders and tiny training configurations for the classification tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from crossformer.classification import TrainConfig, resolve_config

# A CrossFormer small enough to train in a second on the CPU (32x32 input: maps 8, 4, 2, 1).
TINY_MODEL = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], group_size=[4, 4, 2, 1], interval=[2, 2, 1, 1])
# Classes told apart by colour, so a few steps already learn something.
COLOURS = {"cat": (220, 40, 40), "dog": (40, 200, 40), "eel": (40, 40, 220)}


def make_image_folder(
    root: Path, splits: dict[str, int] | None = None, classes: tuple[str, ...] = tuple(COLOURS), size: int = 40, seed: int = 0
) -> Path:
    """``root/<split>/<class>/<i>.png``: noisy solid-colour images, ``splits[split]`` per class."""
    rng = np.random.default_rng(seed)
    for split, per_class in (splits or {"train": 8, "val": 3}).items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.array(COLOURS.get(name, (128, 128, 128))) + rng.integers(-30, 30, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def tiny_config(data: Path, output: Path, **overrides: Any) -> TrainConfig:
    """The authors' recipe (augmentation, mixup, schedule) on the tiny model, 2 epochs, batch 4."""
    settings: dict[str, Any] = dict(
        data=str(data), output=str(output), **{"model.kwargs": TINY_MODEL}, img_size=32, batch_size=4, epochs=2,
        warmup_epochs=1, num_workers=0, amp="none", device="cpu", cpu_threads=1, log_every=1,
    )
    settings.update(overrides)
    return resolve_config(model="crossformer_tiny", overrides=settings)
