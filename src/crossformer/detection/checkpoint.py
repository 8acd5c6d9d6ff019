"""Loading the authors' mmdetection checkpoints, our own, and ImageNet backbones.

mmdet's key layout is kept in our modules (``neck.``, ``rpn_head.``, ``roi_head.``,
``bbox_head.``; background is the last classifier row in both), so the only renaming is
the backbone: mmdet's ``backbone.X`` is our ``backbone.model.X`` (timm's features
wrapper). The backbone part goes through :func:`crossformer.models.load_state`, which
knows the official CrossFormer layouts and what a features-only model prunes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import UserInputError, one_line
from ..models import CheckpointError, load_state, read_checkpoint
from ..models.weights import another_tasks_model, check_keys, dense_task, split_class_layers, weights_entry
from .classes import known_category_ids
from .config import DetectionConfig

__all__ = ["load_detector_state", "HEAD_PREFIXES", "mmdet_to_ours", "head_keys", "load_detector", "LoadedDetector"]

HEAD_PREFIXES = ("neck.", "rpn_head.", "roi_head.", "bbox_head.")
# the layers whose outputs are per class (R-CNN classifier and class-specific box deltas,
# mask logits, RetinaNet's classifier): another data set's class count changes only these
CLASS_LAYERS = ("fc_cls", "fc_reg", "conv_logits", "retina_cls")
_OUR_BACKBONE = "backbone.model."


def mmdet_to_ours(key: str) -> str:
    """An mmdet (or our own) checkpoint key -> our state-dict key."""
    key = key.removeprefix("module.")
    if key.startswith("backbone.") and not key.startswith(_OUR_BACKBONE):
        return _OUR_BACKBONE + key[len("backbone."):]
    return key


def _kind_of(keys: list[str]) -> str:
    if any(k.startswith("bbox_head.retina_cls") for k in keys):
        return "retinanet"
    if any(k.startswith("roi_head.bbox_head.2.") for k in keys):
        return "cascade_mask_rcnn"
    if any(k.startswith("roi_head.") for k in keys):
        return "mask_rcnn"
    return "unknown"


def recorded_class_names(checkpoint: Mapping[str, Any]) -> list[str] | None:
    """The class names a detector checkpoint (or its plain entries) records, in label order:
    ours in ``class_names``, mmdet's in ``meta["CLASSES"]``; None where it records none."""
    if "class_names" in checkpoint:
        return [str(name) for name in checkpoint["class_names"]]
    classes = _mmdet_classes(checkpoint)
    return [str(name) for name in classes] if classes else None


def _mmdet_classes(checkpoint: Mapping[str, Any]) -> Any:
    """``meta["CLASSES"]`` of an mmdet checkpoint, None where it has none."""
    meta = checkpoint.get("meta")
    return meta.get("CLASSES") if isinstance(meta, Mapping) else None


def _check_classes(detector: nn.Module, checkpoint: Mapping[str, Any], source: str) -> None:
    classes = _mmdet_classes(checkpoint)
    if classes is not None and len(classes) != detector.num_classes:
        raise CheckpointError(
            f"{source} is a detector of {len(classes)} classes; this one has {detector.num_classes}: "
            f"build it with num_classes={len(classes)}"
        )


def _our_weights(checkpoint: Mapping[str, Any], use_ema: bool, source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our key names."""
    return {mmdet_to_ours(k): v for k, v in weights_entry(checkpoint, use_ema, source).items() if isinstance(v, torch.Tensor)}


def head_keys(checkpoint: Mapping[str, Any], use_ema: bool = False, source: str = "checkpoint") -> list[str]:
    """The keys of a checkpoint's detection heads (neck, RPN, R-CNN / RetinaNet heads) in our
    names; none for an ImageNet classification or backbone-only file."""
    return [k for k in _our_weights(checkpoint, use_ema, source) if k.startswith(HEAD_PREFIXES)]


def load_detector_state(
    detector: nn.Module, checkpoint: Mapping[str, Any], source: str, use_ema: bool, other_classes: bool = False
) -> list[str]:
    """Fill ``detector`` from a checkpoint dict; raise :class:`CheckpointError` listing
    every key that cannot be placed (or is missing) otherwise.

    With ``other_classes`` (fine-tuning a whole detector on another data set, as mmdet's
    ``load_from``) the classifier layers of another class count keep their initialisation and
    their keys are returned; an ImageNet file is refused then (it belongs in ``pretrained``).
    """
    weights = _our_weights(checkpoint, use_ema, source)
    heads_found = [k for k in weights if k.startswith(HEAD_PREFIXES)]
    if not heads_found:  # an ImageNet classification checkpoint: the backbone alone
        if dense_task(checkpoint) == "segmentation":  # the authors' mmseg files record no task
            raise CheckpointError(f"{another_tasks_model(source, 'segmentation', 'detection')}: "
                                  "give a detection model")
        if other_classes:
            raise CheckpointError(f"{source} holds no detection heads: give an ImageNet checkpoint as model.pretrained "
                                  f"(--pretrained) instead")
        load_state(detector.backbone, checkpoint, source, use_ema=use_ema)
        return []
    kind = _kind_of(heads_found)
    if kind != detector.kind:
        raise CheckpointError(f"{source} holds a {kind} detector, not a {detector.kind}: use a {kind} config")
    if not other_classes:
        _check_classes(detector, checkpoint, source)

    expected = detector.state_dict()
    backbone = {k[len(_OUR_BACKBONE):]: v for k, v in weights.items() if k.startswith(_OUR_BACKBONE)}
    heads = {k: v for k, v in weights.items() if not k.startswith(_OUR_BACKBONE)}
    expected_heads = {k: v for k, v in expected.items() if not k.startswith(_OUR_BACKBONE)}
    fresh: list[str] = []
    if other_classes:
        heads, expected_heads, fresh = split_class_layers(heads, expected_heads, CLASS_LAYERS)
    check_keys(heads, expected_heads, f"{source} does not fit this {detector.kind} (check the backbone variant and num_classes)",
               missing_first=() if backbone else ("backbone.* (all backbone weights)",))
    load_state(detector.backbone, backbone, source)
    with torch.no_grad():
        for key, value in heads.items():
            expected_heads[key].copy_(value.contiguous())
    return fresh


class LoadedDetector:
    """A detector with its weights, what the checkpoint says about its classes, and the
    checkpoint as read."""

    def __init__(self, detector: nn.Module, class_names: list[str] | None, cat_ids: list[int] | None,
                 checkpoint: Mapping[str, Any]) -> None:
        self.detector, self.class_names, self.cat_ids, self.checkpoint = detector, class_names, cat_ids, checkpoint


def _checkpoint_classes(state: Mapping[str, Any], path: str, config: DetectionConfig) -> tuple[int, list[str] | None, list[int] | None]:
    """``(num_classes, class names, category ids)`` a checkpoint records, checked against the config."""
    model = config.model
    if "detector" in state:  # a crossformer training checkpoint
        if state["detector"] != model.kind or state.get("backbone") != model.backbone:
            raise UserInputError(f"{path} holds a {state['detector']} on {state.get('backbone')}, but the config describes "
                                 f"a {model.kind} on {model.backbone}: pass the config it was trained with")
        names, cat_ids = list(state["class_names"]), list(state["cat_ids"])
    else:  # the authors' mmdet files name their classes in meta
        names = recorded_class_names(state)
        cat_ids = known_category_ids(names)  # COCO's ids for COCO's 80 classes (not 1..80)
    count = len(names) if names else model.num_classes
    if count is None:
        raise UserInputError(f"{path} does not record its classes: pass model.num_classes=N")
    if model.num_classes is not None and model.num_classes != count:
        raise UserInputError(f"{path} is a detector of {count} classes but the config says model.num_classes="
                             f"{model.num_classes}: pass model.num_classes={count} (or the config it was trained with)")
    return count, names, cat_ids


def load_detector(config: DetectionConfig, checkpoint: str | Path, device: torch.device, use_ema: bool = False) -> LoadedDetector:
    """The config's detector with the weights of ``checkpoint`` (ours or the authors'), in eval
    mode on ``device``; one-line errors for a file that does not fit."""
    from .task import build_configured_detector  # (which imports this module)

    try:
        state = read_checkpoint(checkpoint)
        if dense_task(state) == "segmentation":  # not an ImageNet file, as said below
            raise UserInputError(f"{another_tasks_model(checkpoint, 'segmentation', 'detection')}: pass a detection "
                                 "checkpoint here (or the segmentation config, for a segmentation verb)")
        if not head_keys(state, use_ema, str(checkpoint)):  # load_state would fill the backbone alone and keep random heads
            raise UserInputError(f"{checkpoint} holds no detection heads (an ImageNet or backbone checkpoint): pass it to "
                                 f"`crossformer train --pretrained`, and a detector checkpoint here")
        num_classes, names, cat_ids = _checkpoint_classes(state, str(checkpoint), config)
        detector = build_configured_detector(config.model, num_classes, pretrained=False)
        load_state(detector, state, str(checkpoint), use_ema=use_ema)
    except CheckpointError as err:
        raise UserInputError(one_line(err)) from None
    return LoadedDetector(detector.to(device).eval(), names, cat_ids, state)
