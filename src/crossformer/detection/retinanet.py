"""mmdetection's ``RetinaHead``: four conv-ReLU towers, 9 anchors, focal loss.

torchvision's ``RetinaNetHead`` has the same towers but other names, GroupNorm-free
init and its own decoding (``BoxCoder`` weights, score filtering per level with
``topk_candidates``); the test-time rule here is mmdet's: per level, pairs above 0.05,
the best 1000, then class-wise NMS 0.5 over all levels and the best 100. The focal loss
is torchvision's ``sigmoid_focal_loss``, which is mmdet's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from .anchors import AnchorGenerator, octave_scales
from .assign import MaxIoUAssigner
from .box_coding import DeltaXYWHCoder
from .nms import class_aware_nms
from .rpn import flatten_levels

__all__ = ["RetinaHead", "RetinaSettings"]


@dataclass(frozen=True)
class RetinaSettings:
    """mmdet's RetinaNet ``test_cfg``."""

    nms_pre: int = 1000
    score_thr: float = 0.05
    iou: float = 0.5
    max_per_img: int = 100


class _Conv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x), inplace=True)


class RetinaHead(nn.Module):
    """Class logits ``(B, A * C, h, w)`` and deltas ``(B, 4A, h, w)`` for each FPN level."""

    def __init__(self, num_classes: int, in_channels: int = 256, stacked_convs: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.anchor_generator = AnchorGenerator((8, 16, 32, 64, 128), (0.5, 1.0, 2.0), octave_scales(4, 3))
        num_anchors = self.anchor_generator.num_anchors
        self.cls_convs = nn.ModuleList(_Conv(in_channels) for _ in range(stacked_convs))
        self.reg_convs = nn.ModuleList(_Conv(in_channels) for _ in range(stacked_convs))
        self.retina_cls = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():  # mmdet's init: N(0, 0.01), classifier bias for prior 0.01
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - 0.01) / 0.01))
        self.coder = DeltaXYWHCoder()
        self.assigner = MaxIoUAssigner(0.5, 0.4, 0.0, match_low_quality=True)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        scores, deltas = [], []
        for x in features:
            c, r = x, x
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            scores.append(self.retina_cls(c))
            deltas.append(self.retina_reg(r))
        return scores, deltas

    def anchors(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.anchor_generator([f.shape[-2:] for f in features], features[0].device)

    def predict(
        self,
        scores: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        img_shapes: Sequence[tuple[int, int]],
        settings: RetinaSettings,
        scale_factors: Sequence[tuple[float, float]] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Per image ``boxes (N, 4)``, ``scores``, ``labels``; boxes in resized-image pixels,
        or divided by ``scale_factors[i] = (w_scale, h_scale)`` before the NMS, as mmdet."""
        results = []
        for i, img_shape in enumerate(img_shapes):
            kept_logits, kept_labels, kept_deltas, kept_anchors = [], [], [], []
            for s, d, a in zip(scores, deltas, anchors):
                # thresholded on the sigmoid as mmdet, ranked by logit (the same order without
                # the float32 sigmoid's ties at 1.0: see the RPN)
                s = s[i].permute(1, 2, 0).reshape(-1, self.num_classes)
                d = d[i].permute(1, 2, 0).reshape(-1, 4)
                candidates = (s.sigmoid() > settings.score_thr).nonzero()
                top, order = s[candidates[:, 0], candidates[:, 1]].sort(descending=True)
                chosen = candidates[order[: settings.nms_pre]]
                kept_logits.append(top[: settings.nms_pre])
                kept_labels.append(chosen[:, 1])
                kept_deltas.append(d[chosen[:, 0]])
                kept_anchors.append(a[chosen[:, 0]])
            s, labels = torch.cat(kept_logits), torch.cat(kept_labels)
            boxes = self.coder.decode(torch.cat(kept_anchors), torch.cat(kept_deltas), max_shape=img_shape)
            if scale_factors is not None:
                w_scale, h_scale = (float(f) for f in scale_factors[i])
                boxes = boxes / boxes.new_tensor([w_scale, h_scale, w_scale, h_scale])
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, s, labels = boxes[valid], s[valid], labels[valid]
            keep = class_aware_nms(boxes, s, labels, settings.iou)[: settings.max_per_img]
            results.append({"boxes": boxes[keep], "scores": s[keep].sigmoid(), "labels": labels[keep]})
        return results

    def loss(
        self,
        scores: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        targets: Sequence[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Focal loss (alpha 0.25, gamma 2) over all non-ignored anchors and L1 on the deltas
        of positives, both summed and divided by the number of positives in the batch."""
        all_anchors = torch.cat(anchors)
        flat_scores = flatten_levels(scores, self.num_classes)
        flat_deltas = flatten_levels(deltas, 4)
        cls_terms, box_terms, num_pos = [], [], 0
        for i, t in enumerate(targets):
            assigned = self.assigner.assign(all_anchors, t["boxes"])
            pos = (assigned >= 0).nonzero().squeeze(1)
            used = assigned != -2
            onehot = torch.zeros_like(flat_scores[i])
            onehot[pos, t["labels"][assigned[pos]]] = 1
            cls_terms.append(sigmoid_focal_loss(flat_scores[i][used], onehot[used], 0.25, 2.0, reduction="sum"))
            target_deltas = self.coder.encode(all_anchors[pos], t["boxes"][assigned[pos]])
            box_terms.append(F.l1_loss(flat_deltas[i, pos], target_deltas, reduction="sum"))
            num_pos += pos.numel()
        num_pos = max(num_pos, 1)
        return {"loss_cls": torch.stack(cls_terms).sum() / num_pos, "loss_bbox": torch.stack(box_terms).sum() / num_pos}
