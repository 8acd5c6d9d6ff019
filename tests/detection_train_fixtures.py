"""Tiny detection runs for the training and command-line tests: a small synthetic COCO set and
a detector small enough to train a few steps in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crossformer.detection.synthetic import make_coco_dataset
from crossformer.engine.registry import resolve_config

# A 4-block CrossFormer with 16-channel heads on 64-pixel images.
TINY_MODEL = {
    "backbone": "crossformer_tiny",
    "backbone_kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
    "num_classes": None,
    "drop_path": 0.1,
    "channels": 16,
    "fc_channels": 32,
    "rpn_samples": 32,
    "rcnn_samples": 16,
}


def make_tiny_coco(root: Path, images: int = 12) -> Path:
    """12 images (9 train, 3 val) of 64-80 pixels."""
    make_coco_dataset(root, images=images, seed=3, image_size=(64, 80))
    return root


def tiny_settings(kind: str, data: Path, output: Path, **run: Any) -> dict[str, Any]:
    """A whole detection config (as a YAML mapping) for the tiny model and data."""
    return {
        "task": "detection",
        "model": {"kind": kind, **TINY_MODEL},
        "data": {"root": str(data), "max_size": 64, "min_size": 64},
        "run": {"epochs": 1, "batch_size": 2, "num_workers": 0, "device": "cpu", "cpu_threads": 1, "amp": "none", "log_every": 1,
                "tensorboard": False, "output": str(output), **run},
        "optimizer": {"lr": 1e-3},
        "schedule": {"warmup_iters": 2},
        "test": {"eval_batch_size": 2},
    }


def write_tiny_config(path: Path, kind: str, data: Path, output: Path, **run: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_settings(kind, data, output, **run)))
    return path


def tiny_config(path: Path, kind: str, data: Path, output: Path, **run: Any):
    return resolve_config(str(write_tiny_config(path, kind, data, output, **run))).config
