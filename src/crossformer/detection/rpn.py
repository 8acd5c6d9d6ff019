"""mmdetection's ``RPNHead``: one 3x3 conv, then objectness and box deltas per anchor.

torchvision's ``RegionProposalNetwork`` takes the top ``pre_nms_top_n`` per level in the
same way but decodes with its own box coder, filters small boxes and scores below a
threshold, and holds its weights under other names; the head here keeps mmdet's names
(``rpn_conv``, ``rpn_cls``, ``rpn_reg``) and reuses torchvision's NMS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import capturing_graph
from .anchors import AnchorGenerator
from .assign import MaxIoUAssigner, sample
from .box_coding import DeltaXYWHCoder
from .nms import class_aware_nms

__all__ = ["RPNHead", "ProposalSettings", "flatten_levels", "inside_image"]


@dataclass(frozen=True)
class ProposalSettings:
    """Per level ``nms_pre`` best anchors, NMS at ``iou`` with the level as class, ``max_per_img`` kept."""

    nms_pre: int = 1000
    max_per_img: int = 1000
    iou: float = 0.7


def flatten_levels(maps: Sequence[torch.Tensor], per_anchor: int) -> torch.Tensor:
    """``(B, A * k, h, w)`` per level -> ``(B, sum h*w*A, k)`` in anchor order."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, per_anchor) for m in maps], dim=1)


def inside_image(anchors: torch.Tensor, img_shape: tuple[int, int], allowed_border: int) -> torch.Tensor:
    """Anchors that may be trained on: all when ``allowed_border < 0``, else those within
    ``allowed_border`` pixels of the image (mmdet's ``anchor_inside_flags``)."""
    if allowed_border < 0:
        return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    h, w = img_shape
    b = allowed_border
    return (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) & (anchors[:, 2] < w + b) & (anchors[:, 3] < h + b)


class RPNHead(nn.Module):
    """Region proposals from FPN levels.

    Args:
        in_channels: FPN channels.
        anchor_generator: Anchors per level (3 per location for Mask R-CNN).
        bbox_loss: ``"l1"`` (mmdet's Mask R-CNN) or ``"smooth_l1"`` (beta 1/9, the Swin
            Transformer cascade configs).
        allowed_border: Anchors crossing the image border by more than this are not
            trained on (-1: all are; 0 in the Swin cascade configs).
    """

    def __init__(
        self,
        in_channels: int = 256,
        anchor_generator: AnchorGenerator | None = None,
        bbox_loss: str = "l1",
        allowed_border: int = -1,
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator or AnchorGenerator((4, 8, 16, 32, 64), (0.5, 1.0, 2.0), (8,))
        num_anchors = self.anchor_generator.num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(in_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):  # mmdet's init: N(0, 0.01)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.coder = DeltaXYWHCoder()
        self.assigner = MaxIoUAssigner(0.7, 0.3, 0.3, match_low_quality=True)
        self.bbox_loss = bbox_loss
        self.allowed_border = allowed_border
        self.num_samples = 256  # anchors sampled per image in training, at most half positive

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """FPN levels -> objectness logits ``(B, A, h, w)`` and deltas ``(B, 4A, h, w)`` per level."""
        scores, deltas = [], []
        for x in features:
            x = F.relu(self.rpn_conv(x), inplace=True)
            scores.append(self.rpn_cls(x))
            deltas.append(self.rpn_reg(x))
        return scores, deltas

    def anchors(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.anchor_generator([f.shape[-2:] for f in features], features[0].device)

    def proposals(
        self,
        scores: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        img_shapes: Sequence[tuple[int, int]],
        settings: ProposalSettings,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image ``(boxes (K, 4), sigmoid scores (K,))``, best first, in resized-image pixels."""
        results = []
        for i, img_shape in enumerate(img_shapes):
            level_logits, level_deltas, level_anchors, level_ids = [], [], [], []
            for level, (s, d, a) in enumerate(zip(scores, deltas, anchors)):
                # Anchors are ranked by logit, the sigmoid's order without its ties: float32
                # sigmoids saturate at 1.0 and some runtimes flush the far tail to 0, where
                # the sort would then pick among equal scores arbitrarily.
                s = s[i].permute(1, 2, 0).reshape(-1)
                d = d[i].permute(1, 2, 0).reshape(-1, 4)
                # a recorded graph's anchor count is symbolic: it always sorts, and the slice
                # keeps every anchor of a level that has fewer (the NMS's result is the same)
                if settings.nms_pre > 0 and (capturing_graph() or settings.nms_pre < s.shape[0]):
                    s, order = s.sort(descending=True)
                    s, order = s[: settings.nms_pre], order[: settings.nms_pre]
                    d, a = d[order], a[order]
                level_logits.append(s)
                level_deltas.append(d)
                level_anchors.append(a)
                level_ids.append(torch.full_like(s, level, dtype=torch.long))
            s = torch.cat(level_logits)
            boxes = self.coder.decode(torch.cat(level_anchors), torch.cat(level_deltas), max_shape=img_shape)
            ids = torch.cat(level_ids)
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, s, ids = boxes[valid], s[valid], ids[valid]
            keep = class_aware_nms(boxes, s, ids, settings.iou)[: settings.max_per_img]
            results.append((boxes[keep], s[keep].sigmoid()))
        return results

    def loss(
        self,
        scores: Sequence[torch.Tensor],
        deltas: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        gt_boxes: Sequence[torch.Tensor],
        img_shapes: Sequence[tuple[int, int]],
    ) -> dict[str, torch.Tensor]:
        """mmdet's RPN loss: 256 anchors per image (half positive at most), sigmoid BCE and
        L1 (or smooth L1) on deltas, both summed and divided by the number sampled."""
        all_anchors = torch.cat(anchors)
        flat_scores = flatten_levels(scores, 1).squeeze(-1)
        flat_deltas = flatten_levels(deltas, 4)
        cls_terms, box_terms, num_sampled = [], [], 0
        for i, (gt, img_shape) in enumerate(zip(gt_boxes, img_shapes)):
            valid = inside_image(all_anchors, img_shape, self.allowed_border).nonzero().squeeze(1)
            assigned = self.assigner.assign(all_anchors[valid], gt)
            pos, neg = sample(assigned, self.num_samples, 0.5)
            pos_idx, neg_idx = valid[pos], valid[neg]
            logits = torch.cat([flat_scores[i, pos_idx], flat_scores[i, neg_idx]])
            target = torch.cat([torch.ones_like(pos_idx), torch.zeros_like(neg_idx)]).to(logits.dtype)
            cls_terms.append(F.binary_cross_entropy_with_logits(logits, target, reduction="sum"))
            target_deltas = self.coder.encode(all_anchors[pos_idx], gt[assigned[pos]])
            pred = flat_deltas[i, pos_idx]
            if self.bbox_loss == "smooth_l1":
                box_terms.append(F.smooth_l1_loss(pred, target_deltas, beta=1 / 9, reduction="sum"))
            else:
                box_terms.append(F.l1_loss(pred, target_deltas, reduction="sum"))
            num_sampled += pos_idx.numel() + neg_idx.numel()
        num_sampled = max(num_sampled, 1)
        return {
            "loss_rpn_cls": torch.stack(cls_terms).sum() / num_sampled,
            "loss_rpn_bbox": torch.stack(box_terms).sum() / num_sampled,
        }
