"""Cascade Mask R-CNN's RoI head as the authors ran it (the Swin Transformer detection
configs of mmdetection): torchvision has no cascade, so the stage logic is here.

Three stages, trained at IoU 0.5 / 0.6 / 0.7 with box coder stds (0.1, 0.2),
(0.05, 0.1), (0.033, 0.067); each stage a box head of four 3x3 conv-BN-ReLU and one fc
(1024), class-specific deltas trained as GIoU on decoded boxes (weight 10), and its own
mask head; stage losses weighted 1 / 0.5 / 0.25. Between stages each roi is moved by the
deltas of its class (the assigned class in training, the best non-background class at
test). At test the class scores are the softmax of the mean of the three stages' logits,
boxes come from the last stage, and masks are the mean of the three heads' sigmoids.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..models.layers import capturing_graph
from .assign import MaxIoUAssigner
from .box_coding import DeltaXYWHCoder
from .roi_heads import (
    BBoxHead,
    MaskHead,
    RCNNSettings,
    RoIExtractor,
    boxes_to_rois,
    class_deltas,
    detections_from_scores,
    mask_loss,
    positive_rois,
    Sampled,
    rcnn_losses,
    sample_rois,
)

__all__ = ["CascadeRoIHead", "STAGE_STDS", "STAGE_IOUS", "STAGE_LOSS_WEIGHTS"]

STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


def regress_by_class(
    coder: DeltaXYWHCoder, boxes: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor, img_shape: tuple[int, int]
) -> torch.Tensor:
    """Move each ``(K, 4)`` box by the deltas of its label (``(K, 4C)`` deltas), clipped."""
    chosen = class_deltas(deltas)[torch.arange(labels.numel(), device=labels.device), labels]
    return coder.decode(boxes, chosen, max_shape=img_shape)


class CascadeRoIHead(nn.Module):
    """Three box heads and three mask heads (mmdet's ``CascadeRoIHead`` layout:
    ``bbox_head.{0,1,2}``, ``mask_head.{0,1,2}``)."""

    def __init__(self, num_classes: int, with_mask: bool = True, channels: int = 256, fc_channels: int = 1024) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.bbox_roi_extractor = RoIExtractor(7)
        self.bbox_head = nn.ModuleList(
            BBoxHead(num_classes, num_convs=4, num_fcs=1, in_channels=channels, fc_channels=fc_channels) for _ in STAGE_STDS
        )
        self.coders = [DeltaXYWHCoder(stds) for stds in STAGE_STDS]
        self.assigners = [MaxIoUAssigner(iou, iou, iou, match_low_quality=False) for iou in STAGE_IOUS]
        self.num_samples = 512  # rois sampled per image and stage in training
        if with_mask:
            self.mask_roi_extractor = RoIExtractor(14)
            self.mask_head = nn.ModuleList(MaskHead(num_classes, channels) for _ in STAGE_STDS)
        self.with_mask = with_mask

    def forward_stage(self, stage: int, features: Sequence[torch.Tensor], rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rois ``(K, 5)`` -> stage logits ``(K, C + 1)`` and deltas ``(K, 4C)``."""
        return self.bbox_head[stage](self.bbox_roi_extractor(features, rois))

    def refine_stages(
        self, features: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor], img_shapes: Sequence[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Test-time cascade: the rois fed to each stage, its logits and its deltas."""
        sizes = [p.shape[0] for p in proposals]
        rois = boxes_to_rois(proposals)
        stage_rois, stage_logits, stage_deltas = [], [], []
        for stage in range(len(self.bbox_head)):
            logits, deltas = self.forward_stage(stage, features, rois)
            stage_rois.append(rois)
            stage_logits.append(logits)
            stage_deltas.append(deltas)
            if stage < len(self.bbox_head) - 1:
                refined = []
                for r, lg, d, shape in zip(rois.split(sizes), logits.split(sizes), deltas.split(sizes), img_shapes):
                    boxes = regress_by_class(self.coders[stage], r[:, 1:], d, lg[:, :-1].argmax(dim=1), shape)
                    refined.append(torch.cat([r[:, :1], boxes], dim=1))
                rois = torch.cat(refined)
        return stage_rois, stage_logits, stage_deltas

    def predict(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        img_shapes: Sequence[tuple[int, int]],
        settings: RCNNSettings,
    ) -> list[dict[str, torch.Tensor]]:
        """Proposals per image -> detections in resized-image pixels (and mask probabilities)."""
        stage_rois, stage_logits, stage_deltas = self.refine_stages(features, proposals, img_shapes)
        probs = (sum(stage_logits) / len(stage_logits)).softmax(dim=-1)
        sizes = [p.shape[0] for p in proposals]
        results = []
        for p, d, r, shape in zip(probs.split(sizes), stage_deltas[-1].split(sizes), stage_rois[-1].split(sizes), img_shapes):
            boxes, scores, labels = detections_from_scores(r[:, 1:], p, d, self.coders[-1], shape, settings)
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
        if self.with_mask:
            for r, m in zip(results, self.mask_probs(features, [r["boxes"] for r in results], [r["labels"] for r in results])):
                r["mask_probs"] = m
        return results

    def mask_probs(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor],
                   labels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, the mean over the three mask heads of the label channel's sigmoid."""
        rois = boxes_to_rois(boxes)
        if not capturing_graph() and rois.numel() == 0:
            return [b.new_zeros(0, 28, 28) for b in boxes]
        pooled = self.mask_roi_extractor(features, rois)
        label = torch.cat(labels)
        rows = torch.arange(label.numel(), device=label.device)
        probs = sum(head(pooled)[rows, label].sigmoid() for head in self.mask_head) / len(self.mask_head)
        return list(probs.split([b.shape[0] for b in boxes]))

    def loss(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        targets: Sequence[dict[str, torch.Tensor]],
        img_shapes: Sequence[tuple[int, int]],
    ) -> dict[str, torch.Tensor]:
        """Per stage ``s{i}.loss_cls``, ``s{i}.loss_bbox``, ``s{i}.loss_mask``, already weighted."""
        losses: dict[str, torch.Tensor] = {}
        gt_boxes = [t["boxes"] for t in targets]
        proposals = [p.detach() for p in proposals]
        for stage, weight in enumerate(STAGE_LOSS_WEIGHTS):
            samples = [
                sample_rois(p, t["boxes"], t["labels"], self.assigners[stage], self.num_classes, self.num_samples)
                for p, t in zip(proposals, targets)
            ]
            rois = boxes_to_rois([s.boxes for s in samples])
            logits, deltas = self.forward_stage(stage, features, rois)
            stage_losses = rcnn_losses(self.coders[stage], rois, samples, gt_boxes,
                                       logits, deltas, decoded_giou=True)
            if self.with_mask:
                mask_logits = self.mask_head[stage](self.mask_roi_extractor(features, positive_rois(samples)))
                stage_losses["loss_mask"] = mask_loss(mask_logits, samples, [t["masks"] for t in targets])
            losses.update({f"s{stage}.{name}": value * weight for name, value in stage_losses.items()})
            if stage < len(STAGE_LOSS_WEIGHTS) - 1:
                proposals = self._refine_training(stage, samples, logits.detach(), deltas.detach(), img_shapes)
        return losses

    def _refine_training(self, stage: int, samples: Sequence[Sampled], logits: torch.Tensor, deltas: torch.Tensor,
                         img_shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """mmdet's ``refine_bboxes``: each sampled roi moved by the deltas of its assigned
        class (its best class if background); gt boxes that were sampled as positives are
        dropped (they join again as proposals of the next stage)."""
        refined = []
        start = 0
        for s, shape in zip(samples, img_shapes):
            end = start + s.boxes.shape[0]
            labels = s.labels.clone()
            background = labels == self.num_classes
            labels[background] = logits[start:end][background, :-1].argmax(dim=1)
            boxes = regress_by_class(self.coders[stage], s.boxes, deltas[start:end], labels, shape)
            keep = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
            keep[: s.num_pos] = ~s.pos_is_gt
            refined.append(boxes[keep])
            start = end
        return refined
