"""Segmentor weights from mmsegmentation checkpoints (the authors' releases) and from ours.

An mmseg checkpoint is a dict with ``state_dict`` (``backbone.`` / ``neck.`` /
``decode_head.`` / ``auxiliary_head.`` keys) and ``meta`` (``CLASSES``, ``PALETTE``; mmseg
1.x: ``dataset_meta``). Our module names are mmseg's except for these prefixes, the one
name table of the port:

    mmseg                           ours
    backbone.<k>                    backbone.model.<k>      (timm features_only wrapper)
    neck.lateral_convs.<i>.conv.    neck.inner_blocks.<i>.0. (torchvision FeaturePyramidNetwork)
    neck.fpn_convs.<i>.conv.        neck.layer_blocks.<i>.0.

Our own checkpoints (``model`` / ``model_ema`` entries, or bare state dicts such as a
``.safetensors`` conversion) use our names as they are. Files are read by
:func:`crossformer.models.read_checkpoint`, which never unpickles arbitrary code.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..errors import UserInputError
from ..models.weights import (RECOMPUTABLE_SUFFIXES, CheckpointError, another_tasks_model, check_keys, dense_task,
                              load_state, read_checkpoint, split_class_layers, weights_entry)

if TYPE_CHECKING:
    from .config import SegmentationConfig
    from .segmentor import Segmentor

__all__ = [
    "MMSEG_KEY_MAP", "mmseg_to_ours", "segmentor_weights", "load_segmentor_state", "read_segmentation_meta",
    "checkpoint_kind", "describe_segmentor", "load_segmentor",
]

MMSEG_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^backbone\.", "backbone.model."),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"neck.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"neck.layer_blocks.\1.0."),
)
_COMPILED_MAP = tuple((re.compile(pattern), repl) for pattern, repl in MMSEG_KEY_MAP)
CLASS_LAYERS = ("conv_seg",)  # the decode and auxiliary heads' per-class 1x1 convolutions


def mmseg_to_ours(key: str) -> str:
    """Our name for an mmseg checkpoint key."""
    for pattern, repl in _COMPILED_MAP:
        new, count = pattern.subn(repl, key)
        if count:
            return new
    return key


def segmentor_weights(checkpoint: Mapping[str, Any], source: str, use_ema: bool) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, in our names (mmseg names mapped, DDP prefix removed)."""
    state = weights_entry(checkpoint, use_ema, source)
    tensors = {
        key.removeprefix("module."): value
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and not key.endswith(RECOMPUTABLE_SUFFIXES)
    }
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors")
    ours = any(key.startswith("backbone.model.") for key in tensors)
    return tensors if ours else {mmseg_to_ours(key): value for key, value in tensors.items()}


def checkpoint_kind(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"fpn"`` / ``"upernet"`` for a state dict in our names, None if it has no decode head."""
    if any(key.startswith("decode_head.psp_modules.") for key in state):
        return "upernet"
    if any(key.startswith("decode_head.scale_heads.") for key in state):
        return "fpn"
    return None


def load_segmentor_state(
    segmentor: Segmentor, checkpoint: Mapping[str, Any], source: str, use_ema: bool = False,
    other_classes: bool = False,
) -> list[str]:
    """Load every tensor of ``checkpoint`` into ``segmentor``, or raise :class:`CheckpointError`
    naming what does not fit (another segmentor kind, class count, or the keys).

    With ``other_classes`` (fine-tuning on another data set, as mmseg's ``load_from``) the
    heads' classifiers (``conv_seg``) of another class count keep their initialisation and
    their keys are returned.
    """
    from .segmentor import KIND_NAMES

    state = segmentor_weights(checkpoint, source, use_ema)
    kind = checkpoint_kind(state)
    if kind is None:
        if dense_task(checkpoint) == "detection":  # the authors' mmdet files record no task
            raise CheckpointError(f"{another_tasks_model(source, 'detection', 'segmentation')}: "
                                  "give a segmentation model")
        if any(key.startswith(("patch_embed.", "layers.", "backbone.model.")) for key in state):
            raise CheckpointError(
                f"{source} is a backbone (ImageNet) checkpoint without segmentation heads: "
                f"give it as the backbone's pretrained weights (model.pretrained, pretrained_backbone) instead"
            )
        raise CheckpointError(f"{source} is not a segmentation checkpoint (no decode_head weights)")
    if kind != segmentor.kind:
        raise CheckpointError(
            f"{source} holds a {KIND_NAMES[kind]} segmentor, this model is {KIND_NAMES[segmentor.kind]}: "
            f"use a {kind}_* config"
        )
    classes = state.get("decode_head.conv_seg.weight")
    if not other_classes and classes is not None and classes.shape[0] != segmentor.num_classes:
        raise CheckpointError(
            f"{source} predicts {classes.shape[0]} classes, this model {segmentor.num_classes}: "
            f"build it with num_classes={classes.shape[0]}"
        )
    expected = segmentor.state_dict()
    fresh: list[str] = []
    if other_classes:
        state, expected, fresh = split_class_layers(state, expected, CLASS_LAYERS)
    check_keys(state, expected, f"{source} does not fit this segmentor (check the backbone variant and its settings)")
    segmentor.load_state_dict(state, strict=not fresh)
    return fresh


def read_segmentation_meta(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Class names and palette stored in a checkpoint dict, or None for each when absent.

    Reads mmseg 0.x (``meta.CLASSES`` / ``meta.PALETTE``), mmseg 1.x
    (``meta.dataset_meta.classes`` / ``palette``) and ours (``meta.classes`` / ``palette``).
    Returns ``dict(classes=tuple[str, ...] | None, palette=tuple[(r, g, b), ...] | None)``.
    """
    meta = checkpoint.get("meta")
    meta = meta if isinstance(meta, Mapping) else {}
    nested = meta.get("dataset_meta")
    nested = nested if isinstance(nested, Mapping) else {}
    classes = meta.get("CLASSES", nested.get("classes", meta.get("classes")))
    palette = meta.get("PALETTE", nested.get("palette", meta.get("palette")))
    return dict(
        classes=tuple(str(name) for name in classes) if classes is not None else None,
        palette=tuple(tuple(int(v) for v in colour) for colour in palette) if palette is not None else None,
    )


def describe_segmentor(segmentor: dict[str, Any]) -> str:
    """``upernet crossformer_small (settings) with channels=N``: the head widths where set."""
    from ..commands.common import backbone_settings  # the command line's wording (training imports no verb)

    widths = [f"{k}={segmentor[k]}" for k in ("channels", "aux_channels") if segmentor.get(k) is not None]
    return (f"{segmentor.get('kind')} {segmentor.get('backbone')}{backbone_settings(segmentor.get('backbone_kwargs', {}))}"
            + (f" with {', '.join(widths)}" if widths else ""))


def load_segmentor(config: SegmentationConfig, path: str | Path, use_ema: bool = False) -> tuple[Segmentor, dict[str, Any]]:
    """The config's segmentor with the weights of ``path`` (ours or mmseg's), and the file's
    contents. A checkpoint of another segmentor is a one-line error naming the file."""
    from .task import SEGMENTOR_KEYS, build_model, segmentor_settings  # (which imports this module)

    checkpoint = read_checkpoint(path)
    model = dataclasses.replace(config.model, pretrained=None)  # the checkpoint has every weight
    num_classes = model.num_classes
    saved = checkpoint.get("segmentor")
    if isinstance(saved, dict):  # ours: the model settings it was trained with
        num_classes = num_classes or int(saved["num_classes"])
        mine = segmentor_settings(model, num_classes)
        differing = [k for k in SEGMENTOR_KEYS if k != "num_classes" and saved.get(k) != mine[k]]  # classes: below
        if differing:
            simple = [f"model.{k}={'null' if saved.get(k) is None else saved.get(k)}" for k in differing
                      if k != "backbone_kwargs"]
            raise UserInputError(
                f"{path} holds a {describe_segmentor(saved)} segmentor but the config describes {describe_segmentor(mine)}: "
                f"pass the config it was trained with" + (f" (or {' '.join(simple)})" if simple else "")
            )
    weight = segmentor_weights(checkpoint, str(path), use_ema).get("decode_head.conv_seg.weight")
    if weight is None and dense_task(checkpoint) == "detection":  # not an ImageNet file, as said below
        raise UserInputError(f"{another_tasks_model(path, 'detection', 'segmentation')}: pass a segmentation "
                             "checkpoint here (or the detection config, for a detection verb)")
    if weight is None:
        raise UserInputError(f"{path} holds no segmentation heads (no decode_head.conv_seg weights): an ImageNet or "
                             f"backbone checkpoint goes to `crossformer train --pretrained`; pass a segmentation checkpoint here")
    if num_classes is not None and num_classes != weight.shape[0]:  # said as the command line sets it
        raise UserInputError(f"{path} is a segmentor of {weight.shape[0]} classes but the config says model.num_classes="
                             f"{num_classes}: pass model.num_classes={weight.shape[0]} (or null)")
    num_classes = int(weight.shape[0])
    segmentor = build_model(model, num_classes)
    try:
        load_state(segmentor, checkpoint, str(path), use_ema=use_ema)
    except CheckpointError as err:
        first, *listing = str(err).splitlines()
        if not listing:
            raise
        # The key listing helps nobody on a command line: say what it means, on one line.
        raise CheckpointError(
            f"{first.rstrip(':')} ({len(listing)} kinds of key or shape differences): it holds another "
            f"segmentor than the config's {model.kind} {model.backbone}; pass the config that matches it"
        ) from None
    return segmentor, checkpoint
