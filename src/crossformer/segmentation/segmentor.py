"""Semantic FPN and UPerNet segmentors on CrossFormer backbones, as the authors ran them.

The segmentor is mmsegmentation's ``EncoderDecoder``: backbone maps -> (neck) -> decode head
logits at stride 4; training adds the auxiliary head (UPerNet) and the losses; prediction
resizes the logits bilinearly to the requested size.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserInputError
from ..models.dense import DenseBackbone, build_task_backbone
from ..models.weights import load_pretrained
from .heads import FCNHead, FPNHead, UPerHead, fpn_neck, resize, run_fpn_neck
from .loss import resized_cross_entropy
from .transforms import IGNORE_INDEX

__all__ = ["SEGMENTOR_KINDS", "IGNORE_INDEX", "Segmentor", "FullSizeLogits", "build_segmentor"]

SEGMENTOR_KINDS = ("fpn", "upernet")
KIND_NAMES = {"fpn": "Semantic FPN", "upernet": "UPerNet"}

class Segmentor(nn.Module):
    """Backbone -> optional neck -> decode head (+ auxiliary head, training only).

    Args:
        kind: ``"fpn"`` or ``"upernet"``.
        backbone: Returns the four NCHW stage maps.
        decode_head: Maps (after the neck) -> logits at the finest map's stride.
        neck: Semantic FPN's neck, or None.
        auxiliary_head: Reads ``backbone maps[aux_index]``; only :meth:`losses` runs it.
        aux_weight: Weight of the auxiliary loss.

    Inputs are images ``(B, 3, H, W)`` normalised with mmseg's mean/std on 0-255 RGB,
    ``H, W >= 32`` and any size: the backbone pads internally, the heads resize.
    """

    align_corners = False  # every resize in these segmentors

    def __init__(
        self,
        kind: str,
        backbone: DenseBackbone,
        decode_head: nn.Module,
        neck: nn.Module | None = None,
        auxiliary_head: nn.Module | None = None,
        aux_index: int = 2,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_index = aux_index
        self.aux_weight = aux_weight

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def decode(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone maps -> decode-head logits ``(B, num_classes, h0, w0)``."""
        if self.neck is not None:
            maps = run_fpn_neck(self.neck, maps)
        return self.decode_head(maps)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        """``(B, 3, H, W)`` -> decode-head logits ``(B, num_classes, H/4, W/4)`` (sizes as the
        backbone's stride-4 map), what mmseg's ``decode_head.forward`` returns. With ``labels``:
        :meth:`losses` instead (so that training through a DDP wrapper calls ``forward``)."""
        if labels is not None:
            return self.losses(images, labels)
        return self.decode(self.backbone(images))

    def predict_logits(self, images: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """Logits resized bilinearly to ``out_size`` ``(h, w)``: ``(B, num_classes, h, w)``."""
        return resize(self(images), out_size)

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses for ``labels`` ``(B, H, W)`` int64 (255 = ignore).

        Cross-entropy of the logits resized to the label size, averaged as mmseg 0.29's
        ``CrossEntropyLoss`` does by default (``avg_non_ignore=False``): the sum over valid
        pixels divided by **all** pixels. ``loss_aux`` (UPerNet) is already weighted.
        """
        if labels.ndim != 3 or labels.shape[0] != images.shape[0]:
            raise UserInputError(
                f"labels must be shaped (batch, height, width) with batch {images.shape[0]}, "
                f"got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:  # float labels were truncated silently
            raise UserInputError(f"labels must be integer class indices (int64, {IGNORE_INDEX} = ignore), got {labels.dtype}")
        outside = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.num_classes))
        if outside.any():  # on GPU this would be a device-side assert, far from the cause
            raise UserInputError(
                f"labels hold values outside 0..{self.num_classes - 1} and {IGNORE_INDEX} (ignore), "
                f"e.g. {labels[outside][0].item()}: check the dataset's class count"
            )
        maps = self.backbone(images)
        out = {"loss_decode": self._cross_entropy(self.decode(maps), labels)}
        if self.auxiliary_head is not None:
            aux = self.auxiliary_head(maps[self.aux_index])
            out["loss_aux"] = self.aux_weight * self._cross_entropy(aux, labels)
        return out

    @staticmethod
    def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.device.type == "cpu":  # no full-size maps (loss.py); measured on the CPU only
            total = resized_cross_entropy(logits.float(), labels.long(), IGNORE_INDEX)
        else:
            logits = resize(logits, labels.shape[1:])
            total = F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
        return total / labels.numel()

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any], source: str, use_ema: bool = False) -> None:
        """Place the weights of an mmseg checkpoint (the authors' files) or of one of ours;
        called by :func:`crossformer.load_checkpoint`. See ``checkpoint.py``."""
        from .checkpoint import load_segmentor_state

        load_segmentor_state(self, checkpoint, source, use_ema)


def build_segmentor(
    kind: str,
    backbone: str = "crossformer_small",
    num_classes: int = 150,
    backbone_kwargs: dict[str, Any] | None = None,
    pretrained_backbone: str | None = None,
    channels: int | None = None,
    aux_channels: int | None = None,
) -> Segmentor:
    """A Semantic FPN (``"fpn"``) or UPerNet (``"upernet"``) segmentor as the authors built it.

    Args:
        kind: One of :data:`SEGMENTOR_KINDS`.
        backbone: timm model name (any CrossFormer variant; other timm models with
            ``features_only`` support work too).
        num_classes: Output classes (150 for ADE20K).
        backbone_kwargs: Backbone settings over the authors' segmentation settings
            (``group_size``, ``interval``, ``embed_dim``, ``depths``, ``drop_path_rate``...).
        pretrained_backbone: An ImageNet checkpoint (official or ours) for the backbone.
        channels: Width of the decode head (None: the authors' 128 for Semantic FPN, whose
            neck stays 256 wide, and 512 for UPerNet); smaller for small demos.
        aux_channels: Width of UPerNet's auxiliary head (None: the authors' 256).

    Semantic FPN: FPN neck (256 channels, 4 outputs) + FPNHead (128 channels).
    UPerNet: UPerHead (pool scales 1,2,3,6, 512 channels) + auxiliary FCNHead on the stride-16
    map (256 channels, one conv, loss weight 0.4). All with BatchNorm and dropout 0.1.
    """
    if kind not in SEGMENTOR_KINDS:
        raise UserInputError(f"unknown segmentor kind {kind!r}: choose one of {', '.join(SEGMENTOR_KINDS)}")
    if not timm.is_model(backbone):
        raise UserInputError(f"unknown backbone {backbone!r}: use a timm model name such as crossformer_small")
    if num_classes < 1:
        raise UserInputError(f"num_classes must be at least 1, got {num_classes}")
    net = build_task_backbone(backbone, backbone_kwargs)
    if len(net.channels) != 4:
        raise UserInputError(f"backbone {backbone!r} must return 4 maps, it returns {len(net.channels)}")
    if pretrained_backbone is not None:
        load_pretrained(net, pretrained_backbone, "model.backbone_kwargs")
    maps = net.channels
    if kind == "fpn":
        neck = fpn_neck(maps, 256)
        head = FPNHead([256] * len(maps), net.strides, channels or 128, num_classes)
        return Segmentor(kind, net, head, neck=neck)
    head = UPerHead(maps, channels or 512, num_classes)
    aux = FCNHead(maps[2], aux_channels or 256, num_classes)
    return Segmentor(kind, net, head, auxiliary_head=aux, aux_index=2, aux_weight=0.4)


class FullSizeLogits(nn.Module):
    """A segmentor whose logits come resized to its input: ``(B, 3, H, W)`` ->
    ``(B, num_classes, H, W)``, as :meth:`Segmentor.predict_logits` gives them. What an
    exported file computes: one graph from normalised images to per-pixel class scores."""

    # An export serves inputs whose coarsest (stride 32) map is at least 2 x 2: the heads'
    # resizes and broadcasts trace differently for a map of one pixel.
    smallest_map = 2

    def __init__(self, model: Segmentor) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict_logits(images, images.shape[2:])

