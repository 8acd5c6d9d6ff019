"""The CrossFormer backbone of the detectors: a timm ``features_only`` model with the
grouping of the authors' detection configs."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from ..errors import UserInputError
from ..models import VARIANTS

__all__ = ["build_backbone", "DETECTION_GROUPING"]

# The authors' detection configs (v1 and ++) use group size 7 and intervals 8, 4, 2, 1 in
# every stage; CrossFormer++'s classification values (4, 4, 14, 7 / 4, 2, 1, 1) are not used.
DETECTION_GROUPING = dict(group_size=7, interval=(8, 4, 2, 1))


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, features_only=True)`` returning the four stage maps
    (strides 4, 8, 16, 32; channels ``feature_info.channels()``). ``kwargs`` override
    the detection grouping and any architecture setting (e.g. tiny demo models)."""
    if name not in VARIANTS:
        raise UserInputError(f"unknown backbone {name!r}: choose one of {', '.join(VARIANTS)}")
    settings = {**DETECTION_GROUPING, **kwargs}
    return timm.create_model(name, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3), **settings)
