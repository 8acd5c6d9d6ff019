"""A tiny synthetic ADE20K-layout set and a tiny segmentation config for the training and
command-line tests (a CrossFormer of 16 channels, heads of 16 / 8 channels, 32x32 crops)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crossformer.segmentation.synthetic import make_ade_dataset

TINY_BACKBONE = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], group_size=[4, 4, 2, 1],
                     interval=[2, 2, 1, 1])


def make_tiny_ade(root: Path, images: int = 12) -> Path:
    """``images`` scenes of about 48x64 pixels (a sixth held out); returns ``root``."""
    make_ade_dataset(root, images=images, seed=3, size=(48, 64))
    return root


def tiny_config(kind: str = "upernet", **sections: Any) -> dict[str, Any]:
    """A segmentation config (as YAML values) that trains in about a second per iteration."""
    config: dict[str, Any] = {
        "task": "segmentation",
        "model": {"kind": kind, "backbone": "crossformer_small", "backbone_kwargs": dict(TINY_BACKBONE),
                  "drop_path": 0.0, "num_classes": None, "channels": 16,
                  **({"aux_channels": 8} if kind == "upernet" else {})},  # FPN's would be refused as unread
        "pipeline": {"scale": [64, 48], "crop_size": [32, 32]},
        "test": {"scale": [64, 48]},
        "run": {"iterations": 2, "eval_every": 2, "batch_size": 2, "num_workers": 0, "cpu_threads": 1, "amp": "none",
                "tensorboard": False, "log_every": 1},
        "optimizer": {"lr": 1e-3, "scale_lr": False},
        "schedule": {"name": "poly", "power": 1.0, "warmup_iters": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def write_config(path: Path, kind: str = "upernet", **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(kind, **sections)))
    return path
