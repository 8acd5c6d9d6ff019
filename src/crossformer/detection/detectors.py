"""The three detectors and ``build_detector``.

Inputs and outputs (all detectors)::

    images: (B, 3, Hp, Wp) normalised, zero-padded bottom/right to a multiple of 32
    metas:  per image {"img_shape": (h, w), "ori_shape": (H0, W0), "scale_factor": (w/W0, h/H0)}
    train:  detector(images, metas, targets) -> dict of weighted losses (mmdet's names)
    eval:   detector(images, metas) -> per image {"boxes" (K, 4) xyxy in original pixels,
            "scores" (K,), "labels" (K,) int64, and "masks" (K, H0, W0) bool for mask models}
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, get_args

import torch
from torch import nn

from ..errors import UserInputError
from ..models import VARIANTS
from ..models.dense import build_task_backbone
from ..models.layout import nchw_contiguous
from .cascade import CascadeRoIHead
from .config import DetectorKind
from .fpn import FPN
from .retinanet import RetinaHead, RetinaSettings
from .roi_heads import RCNNSettings, StandardRoIHead, paste_masks
from .rpn import ProposalSettings, RPNHead

__all__ = ["Detector", "TwoStageDetector", "RetinaNet", "build_detector", "DETECTOR_KINDS"]

DETECTOR_KINDS: tuple[str, ...] = get_args(DetectorKind)

Meta = Mapping[str, Any]


def _img_shapes(metas: Sequence[Meta]) -> list[tuple[int, int]]:
    # a recorded graph's sizes are symbolic: int() would fix them to the example's
    return [tuple(s if isinstance(s, torch.SymInt) else int(s) for s in m["img_shape"][:2]) for m in metas]


def _rescale(result: dict[str, torch.Tensor], meta: Meta) -> dict[str, torch.Tensor]:
    """Boxes from resized-image to original-image pixels (mmdet's ``rescale=True``)."""
    w_scale, h_scale = (float(s) for s in meta["scale_factor"])
    scale = result["boxes"].new_tensor([w_scale, h_scale, w_scale, h_scale])
    return {**result, "boxes": result["boxes"] / scale}


def _check_metas(metas: Sequence[Meta], keys: tuple[str, ...]) -> None:
    """A one-line error for an image meta without one of ``keys`` (the module docstring's fields)."""
    for i, meta in enumerate(metas):
        missing = [key for key in keys if key not in meta]
        if missing:
            raise UserInputError(f"image meta {i} has no {', '.join(missing)}: give each image's {', '.join(keys)} "
                                 f"(img_shape (h, w) after resizing, ori_shape (H0, W0), scale_factor (w/W0, h/H0))")


def _check_targets(targets: Sequence[Mapping[str, torch.Tensor]], batch: int, num_classes: int, masks: bool) -> None:
    """A one-line error for training targets the losses would misread: per image ``boxes``
    (N, 4), ``labels`` (N,) integers in ``0..num_classes-1`` (a -1 indexed the last class) and,
    for mask models, ``masks`` (N, H, W)."""
    if len(targets) != batch:
        raise UserInputError(f"{len(targets)} targets for a batch of {batch} images")
    needed = ("boxes", "labels", "masks") if masks else ("boxes", "labels")
    for i, target in enumerate(targets):
        missing = [key for key in needed if key not in target]
        if missing:
            raise UserInputError(f"target {i} has no {', '.join(missing)}: give {', '.join(needed)} for each image")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
            raise UserInputError(f"target {i}: boxes must be (N, 4) and labels (N,), got {tuple(boxes.shape)} and "
                                 f"{tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise UserInputError(f"target {i}: labels must be integer class indices (int64), got {labels.dtype}")
        outside = (labels < 0) | (labels >= num_classes)
        if outside.any():
            raise UserInputError(f"target {i}: labels must be in 0..{num_classes - 1} (the detector's classes), got "
                                 f"{labels[outside][0].item()}")
        if masks and len(target["masks"]) != len(boxes):
            raise UserInputError(f"target {i}: {len(target['masks'])} masks for {len(boxes)} boxes")


class Detector(nn.Module):
    """Backbone + FPN; subclasses add the heads."""

    kind: str
    has_masks: bool

    def __init__(self, backbone: nn.Module, neck: FPN, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.num_classes = num_classes

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images -> FPN levels."""
        return self.neck(self.backbone(images))

    def forward(
        self,
        images: torch.Tensor,
        metas: Sequence[Meta],
        targets: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserInputError(f"{self.kind} expects images shaped (B, 3, H, W), got {tuple(images.shape)}")
        if len(metas) != images.shape[0]:
            raise UserInputError(f"{len(metas)} image metas for a batch of {images.shape[0]} images")
        if self.training:
            if targets is None:
                raise UserInputError(f"{self.kind} in training mode needs targets; call .eval() to predict")
            _check_metas(metas, ("img_shape",))
            _check_targets(targets, images.shape[0], self.num_classes, self.has_masks)
            return self.losses(self.extract(images), metas, targets)
        _check_metas(metas, ("img_shape", "ori_shape", "scale_factor"))
        return self.predict(self.extract(images), metas)

    def losses(self, features, metas, targets) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, features, metas) -> list[dict[str, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def detect(self, features, metas) -> list[dict[str, torch.Tensor]]:  # pragma: no cover - abstract
        """Per image ``boxes`` (K, 4) in resized-image pixels, ``scores``, ``labels``, and for
        mask models ``mask_probs`` (K, 28, 28) inside each box: :meth:`predict` before the
        boxes are rescaled to the original image and the masks pasted into it."""
        raise NotImplementedError

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any], source: str, use_ema: bool) -> None:
        """Called by :func:`crossformer.load_checkpoint`: mmdet files, ours, or ImageNet ones."""
        from .checkpoint import load_detector_state

        load_detector_state(self, checkpoint, source, use_ema)


class TwoStageDetector(Detector):
    """Mask R-CNN (``StandardRoIHead``) or Cascade Mask R-CNN (``CascadeRoIHead``)."""

    has_masks = True

    def __init__(self, kind: str, backbone: nn.Module, num_classes: int, channels: int = 256, fc_channels: int = 1024) -> None:
        neck = FPN(backbone.feature_info.channels(), channels, num_outs=5)
        super().__init__(backbone, neck, num_classes)
        self.kind = kind
        cascade = kind == "cascade_mask_rcnn"
        # The Swin cascade configs train the RPN with smooth L1 and inside-image anchors only.
        self.rpn_head = RPNHead(channels, bbox_loss="smooth_l1" if cascade else "l1", allowed_border=0 if cascade else -1)
        head = CascadeRoIHead if cascade else StandardRoIHead
        self.roi_head = head(num_classes, channels=channels, fc_channels=fc_channels)
        self.test_proposals = ProposalSettings(1000, 1000, 0.7)
        self.train_proposals = ProposalSettings(2000, 2000 if cascade else 1000, 0.7)
        self.rcnn_settings = RCNNSettings()

    def proposals(self, features: Sequence[torch.Tensor], metas: Sequence[Meta], settings: ProposalSettings):
        scores, deltas = self.rpn_head(features)
        anchors = self.rpn_head.anchors(features)
        return scores, deltas, anchors, self.rpn_head.proposals(scores, deltas, anchors, _img_shapes(metas), settings)

    def finalize(self, results: Sequence[dict[str, torch.Tensor]], metas: Sequence[Meta]) -> list[dict[str, torch.Tensor]]:
        """RoI-head results in resized-image pixels (with ``mask_probs``) -> boxes in original
        pixels and binary masks pasted into the original image."""
        out = []
        for r, meta in zip(results, metas):
            r = _rescale(r, meta)
            h0, w0 = (int(s) for s in meta["ori_shape"][:2])
            probs = r.pop("mask_probs")
            r["masks"] = paste_masks(probs, r["boxes"], h0, w0, self.rcnn_settings.mask_thr)
            out.append(r)
        return out

    @staticmethod
    def roi_levels(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The RoI heads' four levels (strides 4-32), each made NCHW-contiguous once: the FPN's
        maps are channels-last, and torchvision's RoIAlign kernel would copy the whole map again
        at every call (box head, mask head, each cascade stage)."""
        return [nchw_contiguous(level) for level in features[:4]]

    def detect(self, features, metas):
        *_, proposals = self.proposals(features, metas, self.test_proposals)
        return self.roi_head.predict(self.roi_levels(features), [p[0] for p in proposals], _img_shapes(metas), self.rcnn_settings)

    def predict(self, features, metas):
        return self.finalize(self.detect(features, metas), metas)

    def losses(self, features, metas, targets):
        scores, deltas, anchors, proposals = self.proposals(features, metas, self.train_proposals)
        gt_boxes = [t["boxes"] for t in targets]
        losses = self.rpn_head.loss(scores, deltas, anchors, gt_boxes, _img_shapes(metas))
        boxes = [p[0] for p in proposals]
        if isinstance(self.roi_head, CascadeRoIHead):
            losses.update(self.roi_head.loss(self.roi_levels(features), boxes, targets, _img_shapes(metas)))
        else:
            losses.update(self.roi_head.loss(self.roi_levels(features), boxes, targets))
        return losses


class RetinaNet(Detector):
    """RetinaNet: FPN on the stride-8/16/32 maps with P6 from C5 and P7 from P6."""

    kind = "retinanet"
    has_masks = False

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 256) -> None:
        neck = FPN(backbone.feature_info.channels(), channels, num_outs=5, start_level=1, extra_convs_on_input=True)
        super().__init__(backbone, neck, num_classes)
        self.bbox_head = RetinaHead(num_classes, channels)
        self.test_settings = RetinaSettings()

    def _head(self, features, metas, rescale: bool):
        scores, deltas = self.bbox_head(features)
        anchors = self.bbox_head.anchors(features)
        scale_factors = [m["scale_factor"] for m in metas] if rescale else None
        return self.bbox_head.predict(scores, deltas, anchors, _img_shapes(metas), self.test_settings, scale_factors)

    def predict(self, features, metas):
        # mmdet rescales the boxes before its NMS (the overlaps change slightly where the
        # two axes were resized by different factors)
        return self._head(features, metas, rescale=True)

    def detect(self, features, metas):
        return self._head(features, metas, rescale=False)

    def losses(self, features, metas, targets):
        scores, deltas = self.bbox_head(features)
        return self.bbox_head.loss(scores, deltas, self.bbox_head.anchors(features), targets)


def build_detector(
    kind: str,
    backbone: str = "crossformer_small",
    num_classes: int = 80,
    backbone_kwargs: dict[str, Any] | None = None,
    pretrained_backbone: str | None = None,
    channels: int = 256,
    fc_channels: int = 1024,
) -> Detector:
    """A detector of ``kind`` (one of :data:`DETECTOR_KINDS`) on a CrossFormer backbone.

    Args:
        kind: ``"retinanet"``, ``"mask_rcnn"`` or ``"cascade_mask_rcnn"``.
        backbone: A registered CrossFormer variant name.
        num_classes: Object classes (no background).
        backbone_kwargs: Architecture overrides (``group_size``, ``interval``,
            ``drop_path_rate``, or ``embed_dim`` / ``depths`` / ``num_heads`` for tiny models).
        pretrained_backbone: An ImageNet checkpoint (official or ours) for the backbone only.
        channels: Width of the FPN and of every head's convolutions (the authors': 256).
        fc_channels: Width of the R-CNN box heads' fully connected layers (the authors': 1024).
            Smaller widths make detectors small enough to train on a CPU (the demo).
    """
    if kind not in DETECTOR_KINDS:
        raise UserInputError(f"unknown detector {kind!r}: choose one of {', '.join(DETECTOR_KINDS)}")
    if num_classes < 1:
        raise UserInputError(f"num_classes must be at least 1, got {num_classes}")
    if backbone not in VARIANTS:
        raise UserInputError(f"unknown backbone {backbone!r}: choose one of {', '.join(VARIANTS)}")
    body = build_task_backbone(backbone, backbone_kwargs)
    if pretrained_backbone is not None:
        from ..models.weights import load_pretrained, read_checkpoint
        from .checkpoint import head_keys

        checkpoint = read_checkpoint(pretrained_backbone)
        if head_keys(checkpoint, source=str(pretrained_backbone)):  # else its keys fail to fit, listed by the hundred
            raise UserInputError(f"{pretrained_backbone} is a whole detector, not an ImageNet backbone: start every weight "
                                 f"from it with --init-from (model.init_from), or give --pretrained an ImageNet checkpoint")
        load_pretrained(body, pretrained_backbone, "model.backbone_kwargs", checkpoint=checkpoint)
    if kind == "retinanet":
        return RetinaNet(body, num_classes, channels)
    return TwoStageDetector(kind, body, num_classes, channels, fc_channels)
