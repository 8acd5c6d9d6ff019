"""Training-time assignment of priors to ground truth, as mmdetection's ``MaxIoUAssigner``.

torchvision's ``Matcher`` gives a low-quality match to the prediction's own best box; mmdet
gives it to the ground-truth box for which the prior is the best (and honours
``min_pos_iou``), so the rule is written here. Sampling is torchvision's
``BalancedPositiveNegativeSampler``, which draws exactly as mmdet's ``RandomSampler``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import box_iou

__all__ = ["MaxIoUAssigner", "sample"]

IGNORE = -2  # between the thresholds: neither positive nor negative
NEGATIVE = -1


@dataclass(frozen=True)
class MaxIoUAssigner:
    """``assign(priors (P,4), gt (G,4)) -> (P,)`` index of the matched gt, -1 background,
    -2 ignored."""

    pos_iou_thr: float
    neg_iou_thr: float
    min_pos_iou: float
    match_low_quality: bool = True

    def assign(self, priors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        num = priors.shape[0]
        if gt_boxes.numel() == 0:
            return torch.full((num,), NEGATIVE, dtype=torch.long, device=priors.device)
        iou = box_iou(gt_boxes.float(), priors.float())  # (G, P)
        max_iou, argmax = iou.max(dim=0)
        assigned = torch.full((num,), IGNORE, dtype=torch.long, device=priors.device)
        assigned[(max_iou >= 0) & (max_iou < self.neg_iou_thr)] = NEGATIVE
        positive = max_iou >= self.pos_iou_thr
        assigned[positive] = argmax[positive]
        if self.match_low_quality:
            gt_max = iou.max(dim=1).values
            for g in range(gt_boxes.shape[0]):  # later boxes win ties, as in mmdet
                if gt_max[g] >= self.min_pos_iou:
                    assigned[iou[g] == gt_max[g]] = g
        return assigned


def sample(assigned: torch.Tensor, num: int, pos_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positive / negative indices: at most ``num * pos_fraction`` positives, the
    rest negatives (mmdet's ``RandomSampler`` with ``neg_pos_ub=-1``)."""
    labels = torch.where(assigned >= 0, 1, torch.where(assigned == NEGATIVE, 0, -1))
    pos_mask, neg_mask = BalancedPositiveNegativeSampler(num, pos_fraction)([labels])
    return pos_mask[0].nonzero().squeeze(1), neg_mask[0].nonzero().squeeze(1)
