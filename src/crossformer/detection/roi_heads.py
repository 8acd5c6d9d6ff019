"""Mask R-CNN's RoI heads as mmdetection's ``StandardRoIHead``, on torchvision's RoIAlign.

What differs from torchvision's ``RoIHeads`` (and is therefore written here):
- RoIAlign is ``aligned=True`` (half-pixel shift); torchvision's ``MultiScaleRoIAlign``
  uses ``aligned=False``. Levels are ``floor(log2(sqrt(wh) / 56 + 1e-6))`` clamped to 0..3.
  On CPU its backward is ours (``roi_align.py``): several times faster on small maps.
- The classifier's background is its *last* logit (torchvision: first).
- Box deltas are scaled by stds (0.1, 0.1, 0.2, 0.2) and clamped both sides.
- No small-box filter at test; every (roi, class) pair above 0.05 enters per-class NMS.
- Masks are pasted with ``grid_sample`` on pixel centres, then thresholded at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from ..models.layers import capturing_graph
from .assign import MaxIoUAssigner, sample
from .box_coding import DeltaXYWHCoder
from .nms import class_aware_nms
from .roi_align import roi_align

__all__ = [
    "RoIExtractor",
    "BBoxHead",
    "MaskHead",
    "StandardRoIHead",
    "RCNNSettings",
    "boxes_to_rois",
    "class_deltas",
    "detections_from_scores",
    "paste_masks",
    "mask_targets",
    "Sampled",
    "sample_rois",
    "rcnn_losses",
    "mask_loss",
    "positive_rois",
]


@dataclass(frozen=True)
class RCNNSettings:
    """Test-time R-CNN settings (mmdet's ``test_cfg.rcnn``)."""

    score_thr: float = 0.05
    iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5


def boxes_to_rois(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image ``(K_i, 4)`` boxes -> ``(sum K_i, 5)`` rois ``(image index, x1, y1, x2, y2)``."""
    return torch.cat(
        [torch.cat([b.new_full((b.shape[0], 1), i), b[:, :4]], dim=1) for i, b in enumerate(boxes)]
    )


def class_deltas(deltas: torch.Tensor) -> torch.Tensor:
    """Class-specific deltas ``(K, 4C)`` -> ``(K, C, 4)``; ``K`` may be 0 (an image, or a whole
    batch, with no sampled roi), where a reshape to ``(0, -1, 4)`` is ambiguous."""
    return deltas.unflatten(1, (-1, 4))


class RoIExtractor(nn.Module):
    """mmdet's ``SingleRoIExtractor``: each roi pooled from one level by its scale."""

    def __init__(self, output_size: int, strides: Sequence[int] = (4, 8, 16, 32), finest_scale: int = 56) -> None:
        super().__init__()
        self.output_size = output_size
        self.strides = tuple(strides)
        self.finest_scale = finest_scale

    def levels(self, rois: torch.Tensor) -> torch.Tensor:
        """``(K, 5)`` rois -> ``(K,)`` level index."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        level = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return level.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """FPN levels (first ``len(strides)`` used) and rois -> ``(K, C, s, s)``."""
        size = self.output_size
        out = features[0].new_zeros(rois.shape[0], features[0].shape[1], size, size)
        levels = self.levels(rois)
        for level, stride in enumerate(self.strides):
            index = (levels == level).nonzero().squeeze(1)
            if capturing_graph() or index.numel():  # a recorded graph has no count to test
                out[index] = roi_align(features[level], rois[index], size, 1.0 / stride)
        return out


def _kaiming(conv: nn.Module) -> None:
    """mmcv's ``ConvModule`` init (and FCNMaskHead's): Kaiming normal, fan out, zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class _ConvBN(nn.Module):
    """3x3 conv (no bias) + BN + ReLU, named as mmcv's ``ConvModule``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        _kaiming(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class BBoxHead(nn.Module):
    """mmdet's ``ConvFCBBoxHead`` with shared branches only: ``num_convs`` conv-BN-ReLU, then
    ``num_fcs`` fc-ReLU, then the classifier (``num_classes + 1``, background last) and
    class-specific deltas (``4 * num_classes``).

    ``Shared2FCBBoxHead`` is ``num_convs=0, num_fcs=2``; the Swin cascade head is
    ``num_convs=4, num_fcs=1``.
    """

    def __init__(
        self,
        num_classes: int,
        num_convs: int = 0,
        num_fcs: int = 2,
        in_channels: int = 256,
        roi_size: int = 7,
        fc_channels: int = 1024,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.shared_convs = nn.ModuleList(_ConvBN(in_channels) for _ in range(num_convs))
        dims = [in_channels * roi_size * roi_size] + [fc_channels] * num_fcs
        self.shared_fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.fc_cls = nn.Linear(dims[-1], num_classes + 1)
        self.fc_reg = nn.Linear(dims[-1], 4 * num_classes)
        # mmdet's init: Xavier (uniform) fcs, N(0, 0.01) classifier, N(0, 0.001) regressor;
        # the convs keep mmcv's ConvModule init (Kaiming, as PyTorch's default family).
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, C, 7, 7)`` -> logits ``(K, num_classes + 1)``, deltas ``(K, 4 * num_classes)``."""
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x), inplace=True)
        return self.fc_cls(x), self.fc_reg(x)


class MaskHead(nn.Module):
    """mmdet's ``FCNMaskHead``: four 3x3 conv-ReLU, a 2x deconv-ReLU, one logit map per class."""

    def __init__(self, num_classes: int, channels: int = 256, num_convs: int = 4) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_NamedConv(channels) for _ in range(num_convs))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        _kaiming(self.upsample)
        _kaiming(self.conv_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, C, 14, 14)`` -> ``(K, num_classes, 28, 28)`` logits (channels-last on the CPU)."""
        if x.device.type == "cpu":
            # oneDNN runs these shapes faster channels-last, the 2x deconv twice as fast
            # (benchmarks/RESULTS.md row 67); a no-op when the input already is.
            x = x.contiguous(memory_format=torch.channels_last)
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)
        return self.conv_logits(F.relu(self.upsample(x), inplace=True))


class _NamedConv(nn.Module):
    """A 3x3 conv named as mmcv's ``ConvModule`` (the ReLU is applied by the caller)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        _kaiming(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def detections_from_scores(
    rois: torch.Tensor,
    probs: torch.Tensor,
    deltas: torch.Tensor,
    coder: DeltaXYWHCoder,
    img_shape: tuple[int, int],
    settings: RCNNSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's class probabilities ``(K, C + 1)`` (background last) and deltas
    ``(K, 4C)`` on ``(K, 4)`` boxes -> ``boxes (N, 4), scores (N,), labels (N,)``: every
    (roi, class) pair above ``score_thr``, per-class NMS, the best ``max_per_img``."""
    num_classes = probs.shape[1] - 1
    boxes = coder.decode(rois, deltas, max_shape=img_shape).reshape(-1, num_classes, 4)
    scores = probs[:, :-1]
    labels = torch.arange(num_classes, device=probs.device).expand_as(scores)
    keep = scores > settings.score_thr
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = class_aware_nms(boxes, scores, labels, settings.iou)[: settings.max_per_img]
    return boxes[order], scores[order], labels[order]


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float) -> torch.Tensor:
    """mmdet's mask pasting: ``(N, 28, 28)`` probabilities in ``(N, 4)`` boxes -> ``(N, height, width)``
    bool. Each mask is sampled (``grid_sample``, ``align_corners=False``) at the pixel
    centres of its box's extent plus one pixel, as mmdet does on CPU; the rest is empty."""
    out = torch.zeros(probs.shape[0], height, width, dtype=torch.bool, device=probs.device)
    for i in range(probs.shape[0]):
        x0, y0, x1, y1 = boxes[i]
        left = int(max(torch.floor(x0).item() - 1, 0))
        top = int(max(torch.floor(y0).item() - 1, 0))
        right = int(min(torch.ceil(x1).item() + 1, width))
        bottom = int(min(torch.ceil(y1).item() + 1, height))
        if right <= left or bottom <= top:
            continue
        xs = (torch.arange(left, right, device=probs.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        ys = (torch.arange(top, bottom, device=probs.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        xs = torch.nan_to_num(xs, posinf=0.0, neginf=0.0) if torch.isinf(xs).any() else xs
        ys = torch.nan_to_num(ys, posinf=0.0, neginf=0.0) if torch.isinf(ys).any() else ys
        grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)[None]
        sampled = F.grid_sample(probs[i][None, None].float(), grid, align_corners=False)[0, 0]
        out[i, top:bottom, left:right] = sampled >= threshold
    return out


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, size: int = 28) -> torch.Tensor:
    """mmdet's mask targets: the i-th of ``(N, Hp, Wp)`` gt masks cropped to the i-th box by RoIAlign
    (aligned, adaptive sampling) at ``size x size``, then ``>= 0.5``."""
    if boxes.numel() == 0:
        return boxes.new_zeros(0, size, size)
    rois = torch.cat([torch.arange(boxes.shape[0], device=boxes.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
    crops = roi_align(gt_masks[:, None].float(), rois, size, 1.0)[:, 0]
    return (crops >= 0.5).float()


@dataclass
class Sampled:
    """One image's sampled rois for an R-CNN stage: positives first."""

    boxes: torch.Tensor  # (K, 4)
    labels: torch.Tensor  # (K,) class or num_classes for background
    gt_index: torch.Tensor  # (num_pos,) index of the matched gt
    num_pos: int
    pos_is_gt: torch.Tensor  # (num_pos,) bool: the positive is a gt box added as a proposal


def sample_rois(
    proposals: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    assigner: MaxIoUAssigner,
    num_classes: int,
    num: int = 512,
    pos_fraction: float = 0.25,
) -> Sampled:
    """mmdet's R-CNN sampling: gt boxes join the proposals, then assign and sample."""
    candidates = torch.cat([gt_boxes.to(proposals.dtype), proposals[:, :4]])
    is_gt = torch.zeros(candidates.shape[0], dtype=torch.bool, device=candidates.device)
    is_gt[: gt_boxes.shape[0]] = True
    assigned = assigner.assign(candidates, gt_boxes)
    pos, neg = sample(assigned, num, pos_fraction)
    index = torch.cat([pos, neg])
    gt_index = assigned[pos]
    labels = torch.cat([gt_labels[gt_index], gt_labels.new_full((neg.numel(),), num_classes)])
    return Sampled(candidates[index], labels, gt_index, pos.numel(), is_gt[pos])


def rcnn_losses(
    coder: DeltaXYWHCoder,
    rois: torch.Tensor,
    samples: Sequence[Sampled],
    gt_boxes: Sequence[torch.Tensor],
    logits: torch.Tensor,
    deltas: torch.Tensor,
    decoded_giou: bool,
) -> dict[str, torch.Tensor]:
    """mmdet's ``BBoxHead.loss``: cross-entropy over all sampled rois; for positives the
    deltas of their class, L1 against encoded targets (or, with ``decoded_giou``, GIoU
    times 10 on decoded boxes), summed and divided by the number of sampled rois."""
    labels = torch.cat([s.labels for s in samples])
    loss_cls = F.cross_entropy(logits, labels, reduction="sum") / max(labels.numel(), 1)
    pos_rows, pos_labels, targets = [], [], []
    start = 0
    for s, gt in zip(samples, gt_boxes):
        pos_rows.append(torch.arange(start, start + s.num_pos, device=rois.device))
        pos_labels.append(s.labels[: s.num_pos])
        targets.append(gt[s.gt_index])
        start += s.boxes.shape[0]
    pos_rows, pos_labels, targets = torch.cat(pos_rows), torch.cat(pos_labels), torch.cat(targets)
    pred = class_deltas(deltas)[pos_rows, pos_labels]
    priors = rois[pos_rows, 1:]
    if decoded_giou:
        boxes = coder.decode(priors, pred)
        loss_bbox = 10.0 * generalized_box_iou_loss(boxes, targets, reduction="sum") / max(labels.numel(), 1)
    else:
        loss_bbox = F.l1_loss(pred, coder.encode(priors, targets), reduction="sum") / max(labels.numel(), 1)
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}


def mask_loss(
    mask_logits: torch.Tensor, samples: Sequence[Sampled], gt_masks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean BCE of each positive's label channel against its 28x28 cropped gt mask."""
    targets = torch.cat(
        [mask_targets(m[s.gt_index], s.boxes[: s.num_pos], mask_logits.shape[-1]) if s.num_pos else
         mask_logits.new_zeros(0, *mask_logits.shape[-2:]) for s, m in zip(samples, gt_masks)]
    )
    labels = torch.cat([s.labels[: s.num_pos] for s in samples])
    if labels.numel() == 0:
        return mask_logits.sum() * 0
    pred = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(pred, targets)


def positive_rois(samples: Sequence[Sampled]) -> torch.Tensor:
    """``(num_pos, 5)`` rois of every image's positives (the mask heads' training input)."""
    return boxes_to_rois([s.boxes[: s.num_pos] for s in samples])


class StandardRoIHead(nn.Module):
    """Box and mask heads of Mask R-CNN (mmdet's ``StandardRoIHead``)."""

    def __init__(self, num_classes: int, with_mask: bool = True, channels: int = 256, fc_channels: int = 1024) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.bbox_roi_extractor = RoIExtractor(7)
        self.bbox_head = BBoxHead(num_classes, in_channels=channels, fc_channels=fc_channels)
        self.coder = DeltaXYWHCoder((0.1, 0.1, 0.2, 0.2))
        self.assigner = MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=True)
        self.num_samples = 512  # rois sampled per image in training, at most a quarter positive
        if with_mask:
            self.mask_roi_extractor = RoIExtractor(14)
            self.mask_head = MaskHead(num_classes, channels)
        self.with_mask = with_mask

    def forward_boxes(self, features: Sequence[torch.Tensor], rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rois ``(K, 5)`` -> logits ``(K, C + 1)`` and deltas ``(K, 4C)``."""
        return self.bbox_head(self.bbox_roi_extractor(features, rois))

    def mask_probs(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor],
                   labels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, the sigmoid of each detection's label channel, ``(N, 28, 28)``."""
        rois = boxes_to_rois(boxes)
        if not capturing_graph() and rois.numel() == 0:
            return [b.new_zeros(0, 28, 28) for b in boxes]
        logits = self.mask_head(self.mask_roi_extractor(features, rois))
        label = torch.cat(labels)
        probs = logits[torch.arange(label.numel(), device=label.device), label].sigmoid()
        return list(probs.split([b.shape[0] for b in boxes]))

    def predict(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        img_shapes: Sequence[tuple[int, int]],
        settings: RCNNSettings,
    ) -> list[dict[str, torch.Tensor]]:
        """Proposals per image -> detections in resized-image pixels (and mask probabilities)."""
        rois = boxes_to_rois(proposals)
        logits, deltas = self.forward_boxes(features, rois)
        probs = logits.softmax(dim=-1)
        sizes = [p.shape[0] for p in proposals]
        results = []
        for p, d, r, shape in zip(probs.split(sizes), deltas.split(sizes), rois.split(sizes), img_shapes):
            boxes, scores, labels = detections_from_scores(r[:, 1:], p, d, self.coder, shape, settings)
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
        if self.with_mask:
            mask_probs = self.mask_probs(features, [r["boxes"] for r in results], [r["labels"] for r in results])
            for r, m in zip(results, mask_probs):
                r["mask_probs"] = m
        return results

    def loss(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        targets: Sequence[dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        samples = [
            sample_rois(p.detach(), t["boxes"], t["labels"], self.assigner, self.num_classes, self.num_samples)
            for p, t in zip(proposals, targets)
        ]
        rois = boxes_to_rois([s.boxes for s in samples])
        logits, deltas = self.forward_boxes(features, rois)
        gt_boxes = [t["boxes"] for t in targets]
        losses = rcnn_losses(self.coder, rois, samples, gt_boxes, logits, deltas, decoded_giou=False)
        if self.with_mask:
            pos = positive_rois(samples)
            logits = self.mask_head(self.mask_roi_extractor(features, pos))
            losses["loss_mask"] = mask_loss(logits, samples, [t["masks"] for t in targets])
        return losses
