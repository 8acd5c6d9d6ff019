"""Class-aware NMS as mmdetection (mmcv's ``batched_nms``) runs it, one algorithm in eager
runs and in recorded graphs (``torch.export`` / ONNX).

Under 10,000 boxes mmcv shifts each class's boxes past every other class's (by the largest
coordinate + 1) and runs one NMS; above, one NMS per class. torchvision's ``batched_nms``
switches at 1,000 boxes on the CPU, and a recorded graph cannot branch on a count known
only at run time, so the shift is used for every count there. Both forms keep the same boxes
up to float rounding of the shifted coordinates.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, nms

from ..models.layers import capturing_graph

__all__ = ["class_aware_nms", "PER_CLASS_FROM"]

PER_CLASS_FROM = 10_000  # mmcv's ``split_thr``: from this many boxes on, one NMS per class


def class_aware_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by NMS within each class, best first.

    Args:
        boxes: ``(K, 4)`` xyxy, coordinates at least 0 (clipped to the image).
        scores: ``(K,)``.
        classes: ``(K,)`` integer class (or level) of each box.
        iou: Overlap above which the lower-scoring box of a class goes.
    """
    if not capturing_graph():
        if boxes.shape[0] == 0:
            return torch.zeros(0, dtype=torch.int64, device=boxes.device)
        if boxes.shape[0] >= PER_CLASS_FROM:
            return batched_nms(boxes, scores, classes, iou)  # torchvision's per-class loop at this size
    # the 0 appended keeps the maximum defined for no boxes (a graph has no count to test)
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = classes.to(boxes.dtype) * (max_coordinate + 1)
    return nms(boxes + offsets[:, None], scores, iou)
