"""Tiny detection runs for the training and command-line tests: a small synthetic COCO set and
a detector small enough to train a few steps in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from crossformer.detection.data import CocoDetection, coco_paths, collate_detection
from crossformer.detection.synthetic import make_coco_dataset
from crossformer.detection.transforms import build_test_transform
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


def tiny_settings(kind: str, data: Path, output: Path, schedule: dict[str, Any] | None = None, **run: Any) -> dict[str, Any]:
    """A whole detection config (as a YAML mapping) for the tiny model and data; ``schedule`` and
    ``run`` settings are added to the tiny ones."""
    return {
        "task": "detection",
        # RetinaNet has no RPN or R-CNN head: their sizes in its config are refused as unread
        "model": {"kind": kind, **{k: v for k, v in TINY_MODEL.items()
                                   if kind != "retinanet" or k not in ("fc_channels", "rpn_samples", "rcnn_samples")}},
        "data": {"root": str(data), "max_size": 64, "min_size": 64},
        "run": {"epochs": 1, "batch_size": 2, "num_workers": 0, "device": "cpu", "cpu_threads": 1, "amp": "none", "log_every": 1,
                "tensorboard": False, "output": str(output), **run},
        "optimizer": {"lr": 1e-3},
        "schedule": {"warmup_iters": 2, **(schedule or {})},
        "test": {"eval_batch_size": 2},
    }


def write_tiny_config(path: Path, kind: str, data: Path, output: Path, **run: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_settings(kind, data, output, **run)))
    return path


def tiny_config(path: Path, kind: str, data: Path, output: Path, **run: Any):
    return resolve_config(str(write_tiny_config(path, kind, data, output, **run))).config


def resized_images(coco: Path, size: tuple[int, int]):
    """The data set's images through the test pipeline at ``size`` = (short, long) bound:
    (batch as the loader gives it, the unpadded image the graph takes)."""
    dataset = CocoDetection(*coco_paths(coco, "val"), with_masks=False, transform=build_test_transform(size[1], size[0]))
    for i in range(len(dataset)):
        batch = collate_detection([dataset[i]])
        h, w = batch.metas[0]["img_shape"][:2]
        yield batch, batch.images[:, :, :h, :w].contiguous()


def agree(got: list[np.ndarray], expected: tuple[torch.Tensor, ...]) -> None:
    """The same detections: each expected one paired with a found one of its label whose box
    is within 1e-3 px + 1e-5 relative and score within 1e-5, mask probabilities then within
    1e-4; the order may differ where scores tie. One detection in 50 (at least one) may have
    no pair: the RPN keeps each level's best anchors by logit, logits differ by rounding (~1e-6)
    between runtimes, and two anchors that swap at that cut-off can each yield a detection."""
    assert len(got) == len(expected)
    boxes, scores, labels, *masks = (torch.from_numpy(g) for g in got)
    assert [g.shape[1:] for g in got] == [e.shape[1:] for e in expected]
    differing = max(1, expected[0].shape[0] // 50)
    unused = list(range(boxes.shape[0]))
    unpaired = 0
    for i, (box, score, label) in enumerate(zip(*expected[:3])):
        pair = next((j for j in unused if labels[j] == label and abs(float(scores[j] - score)) <= 1e-5
                     and torch.allclose(boxes[j], box, atol=1e-3, rtol=1e-5)), None)
        if pair is None:
            unpaired += 1
            continue
        unused.remove(pair)
        if masks:
            assert torch.allclose(masks[0][pair], expected[3][i], atol=1e-4, rtol=0)
    assert unpaired <= differing and len(unused) <= differing, (
        f"{unpaired} of {expected[0].shape[0]} detections expected and {len(unused)} of {boxes.shape[0]} found differ")
