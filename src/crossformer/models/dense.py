"""Backbones for dense tasks: the four stage maps of a timm model, by name and settings."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import timm
import torch
from timm.models._features import FeatureGetterNet, FeatureHookNet

from ..errors import settings_that_fail

__all__ = ["CheckpointableFeatures", "CheckpointableHookFeatures", "DenseBackbone", "build_dense_backbone", "authors_dense_settings",
           "build_task_backbone"]

# The authors' detection and segmentation configs use group size 7 and intervals 8, 4, 2, 1
# in every stage for CrossFormer++ too (not its ImageNet 4,4,14,7 / 4,2,1,1); CrossFormer (v1)
# variants have these values already.
_DENSE_GROUPING = dict(group_size=(7, 7, 7, 7), interval=(8, 4, 2, 1))


class CheckpointableFeatures(FeatureGetterNet):
    """timm's ``FeatureGetterNet`` (the maps of ``model.forward_intermediates``) that passes
    ``set_grad_checkpointing`` on to the model, as timm's other feature wrappers take it."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


class CheckpointableHookFeatures(FeatureHookNet):
    """timm's ``FeatureHookNet`` (hooks on the stage outputs of the whole model, ``body``)
    that passes ``set_grad_checkpointing`` on to the model. timm's own checkpoints every
    module of its list but the first and last, of which a model kept whole has none."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self["body"].set_grad_checkpointing(enable)


class DenseBackbone(CheckpointableFeatures):
    """A timm ``features_only`` network (the same module tree and state-dict keys:
    ``model.<classifier key>``) that also says what its maps are.

    ``forward(images (B, 3, H, W))`` returns the NCHW stage maps, for CrossFormer the
    outputs of stages 0..3 before each merge at strides 4, 8, 16, 32 with ``C0 * 2**s``
    channels and no extra norm, as the authors' dense backbones return them.
    ``crossformer.models.load_state`` loads ImageNet checkpoints into it (head and final
    norm skipped).
    """

    def __init__(self, name: str, out_indices: Sequence[int] = (0, 1, 2, 3), **settings: Any) -> None:
        # The classifier head is never used: build without it.
        super().__init__(timm.create_model(name, num_classes=0, **settings), out_indices=tuple(out_indices))
        self.name = name
        self.settings = dict(settings, out_indices=tuple(out_indices))  # rebuilds a twin (e.g. on meta)

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of each returned map."""
        return tuple(self.feature_info.channels())

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride (reduction) of each returned map."""
        return tuple(self.feature_info.reduction())


def authors_dense_settings(name: str) -> dict[str, Any]:
    """The grouping the authors' dense configs give variant ``name`` (empty for other models)."""
    from .variants import VARIANTS

    return dict(_DENSE_GROUPING) if name in VARIANTS else {}


def build_dense_backbone(name: str, **settings: Any) -> DenseBackbone:
    """The four stage maps of timm model ``name`` built with ``settings`` (e.g. the
    CrossFormer ``group_size``, ``interval``, ``drop_path_rate``; ``out_indices``)."""
    return DenseBackbone(name, **settings)


def build_task_backbone(name: str, settings: Mapping[str, Any] | None = None) -> DenseBackbone:
    """The backbone of a detector or segmentor: :func:`build_dense_backbone` with the
    authors' grouping (:func:`authors_dense_settings`) under the user's ``settings`` (a
    config's ``model.backbone_kwargs`` and drop path rate). Settings it cannot take are one
    :class:`~crossformer.errors.UserInputError` line naming them, for every command that builds one."""
    given = dict(settings or {})
    with settings_that_fail(f"backbone {name}", given):
        return build_dense_backbone(name, **{**authors_dense_settings(name), **given})

