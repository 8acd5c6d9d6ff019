"""COCO's 80 detection categories: their names (as COCO's annotation files and mmdetection's
``CocoDataset.CLASSES`` spell them, which the authors' checkpoints record in ``meta.CLASSES``)
and their category ids, which skip 11 numbers of the original 91."""

from __future__ import annotations

from typing import Sequence

__all__ = ["COCO_CLASSES", "COCO_CATEGORY_IDS", "known_category_ids"]

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
# COCO 2017's ids of those names, in the same order (12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91),
)


def known_category_ids(class_names: Sequence[str] | None) -> list[int] | None:
    """The category ids of a known class list (COCO's 80, in order), else None."""
    if class_names is not None and tuple(class_names) == COCO_CLASSES:
        return list(COCO_CATEGORY_IDS)
    return None

