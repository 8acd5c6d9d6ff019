"""Shared by the detection data / evaluation tests: a small synthetic COCO set and a
"detector" that answers with the ground truth, following the detectors' interface."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from crossformer.detection.data import CocoDetection, coco_paths
from crossformer.detection.synthetic import make_coco_dataset


def make_small_coco(root: Path, images: int = 24) -> Path:
    make_coco_dataset(root, images=images, seed=1, val_fraction=0.5, image_size=(96, 160))
    return root


class GroundTruthDetector(nn.Module):
    """``detector(images, metas)`` -> the annotated objects of each image (original pixels,
    score 1), with masks when ``with_masks``; ``drop_every`` leaves out every n-th object."""

    def __init__(self, root: Path, split: str = "val", with_masks: bool = True, drop_every: int = 0) -> None:
        super().__init__()
        self.truth = CocoDetection(*coco_paths(root, split), with_masks=with_masks)
        self.index = {image_id: i for i, image_id in enumerate(self.truth.image_ids)}
        self.drop_every = drop_every

    def forward(self, images: torch.Tensor, metas: list[dict]) -> list[dict[str, torch.Tensor]]:
        assert images.shape[0] == len(metas) and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
        outputs = []
        for meta in metas:
            sample = self.truth[self.index[meta["image_id"]]]
            keep = torch.ones(len(sample.boxes), dtype=torch.bool)
            if self.drop_every:
                keep[:: self.drop_every] = False
            out = {"boxes": sample.boxes[keep], "scores": torch.ones(int(keep.sum())), "labels": sample.labels[keep]}
            if sample.masks is not None:
                out["masks"] = sample.masks[keep].bool()
            outputs.append(out)
        return outputs
