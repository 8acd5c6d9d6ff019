"""The 8 official variants, registered with timm.

``import crossformer`` registers ``crossformer_{tiny,small,base,large}`` (CrossFormer) and
``crossformer_pp_{small,base,large,huge}`` (CrossFormer++). No weights are downloaded:
pass an official or converted file with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``; timm's
builder then adapts the first convolutions to ``in_chans`` and drops a classifier of
another ``num_classes``, as for any timm model. One of our training checkpoints that names
the variant also brings the settings it was trained with (``model_kwargs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import re
from typing import Any, Callable, Mapping

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg

from ..errors import did_you_mean
from ..variant_table import IMAGENET_CLASSES, VARIANTS, Variant, require_known_model
from .crossformer import CrossFormer
from .dense import CheckpointableFeatures, CheckpointableHookFeatures
from .weights import (
    CheckpointError,
    checkpoint_filter_fn,
    extract_state_dict,
    read_checkpoint,
    recorded_model,
    settings_of_misfit,
)

__all__ = ["Variant", "VARIANTS", "create_crossformer", "identify_variant", "architecture_of", "require_known_model",
           "check_builds"]

def identify_variant(state: Mapping[str, torch.Tensor]) -> str | None:
    """The registered variant whose weights ``state`` holds (every name and shape but the
    classifier's, which may have any class count), or None. Lets files that do not name
    their model (the authors' releases, bare state dicts) be used without ``--model``."""
    found = architecture_of(state)
    if not found:
        return None
    for name, variant in VARIANTS.items():
        arch = variant.arch
        if (arch["embed_dim"], list(arch["depths"]), arch["use_acl"]) != (found["embed_dim"], found["depths"], found["use_acl"]):
            continue
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            expected = CrossFormer(**arch, num_classes=0).state_dict()
        given = {key: tuple(value.shape) for key, value in state.items() if not key.startswith("head.")}
        return name if given == {key: tuple(value.shape) for key, value in expected.items()} else None
    return None


def architecture_of(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The CrossFormer settings that ``state``'s names and shapes show: ``embed_dim``,
    ``depths``, ``num_heads`` (each stage's first block's position bias has one output per
    head), ``mlp_ratio``, ``use_acl``, ``patch_kernel_sizes``; empty for another model's weights."""
    norm = state.get("patch_embed.norm.weight")
    if norm is None:
        return {}
    stages = 1 + max((int(key.split(".")[1]) for key in state if key.startswith("layers.")), default=-1)
    kernels = sorted((int(key.split(".")[2]), value.shape[-1]) for key, value in state.items()
                     if key.startswith("patch_embed.projs.") and key.endswith(".weight"))
    found: dict[str, Any] = {
        "embed_dim": norm.shape[0],
        "depths": [len({key.split(".")[3] for key in state if key.startswith(f"layers.{i}.blocks.")}) for i in range(stages)],
        "use_acl": any(".ex_conv." in key for key in state),
        "patch_kernel_sizes": [size for _, size in kernels],
    }
    heads = [state.get(f"layers.{i}.blocks.0.attn.pos.pos3.2.weight") for i in range(stages)]
    if stages and all(h is not None for h in heads):
        found["num_heads"] = [h.shape[0] for h in heads]
    fc1 = state.get("layers.0.blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        found["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    return found


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": IMAGENET_CLASSES,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        # all four kernels of the cross-scale patch embedding see the image (in_chans adaptation)
        "first_conv": tuple(f"patch_embed.projs.{i}" for i in range(4)),
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2108.00154, arXiv:2303.06908",
        "paper_name": "CrossFormer++: A Versatile Vision Transformer Hinging on Cross-scale Attention",
        "origin_url": "https://github.com/cheerss/CrossFormer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f"{name}.in1k": _cfg() for name in VARIANTS})


def _pretrained_checkpoint(cfg: PretrainedCfg) -> Mapping[str, Any] | None:
    """The checkpoint ``cfg`` points at: its in-memory ``state_dict``, or its ``file`` read
    with :func:`read_checkpoint` (timm would read it with ``torch.load(weights_only=True)``,
    which refuses the official files: their pickled yacs config). None for timm's
    ``save_for_hf`` folders, which timm reads itself and whose config describes them."""
    if cfg.source == "local-dir":
        return None
    if cfg.state_dict is not None:
        return cfg.state_dict
    return read_checkpoint(cfg.file) if cfg.file else None


def _with_weights(cfg: PretrainedCfg, checkpoint: Mapping[str, Any], overlay: dict[str, Any]) -> PretrainedCfg:
    """``cfg`` with the weights of ``checkpoint`` in ``state_dict``, and described by them.

    Unless the overlay says otherwise, ``num_classes`` and the input channels become those
    of the weights, so that timm keeps a fitting classifier and adapts the first
    convolutions from the right channel count.
    """
    state = extract_state_dict(checkpoint)
    described: dict[str, Any] = {"state_dict": state}
    head = state.get("head.weight")
    if "num_classes" not in overlay:
        described["num_classes"] = head.shape[0] if head is not None else 0
    first_conv = state.get(f"{cfg.first_conv[0]}.weight") if cfg.first_conv else None
    if "input_size" not in overlay and first_conv is not None:
        described["input_size"] = (first_conv.shape[1], *cfg.input_size[1:])
    return dataclasses.replace(cfg, **described)


def recorded_model_hint(checkpoint: Mapping[str, Any], variant: str) -> str:
    """What to build for weights that do not fit ``variant`` as asked: the model and settings
    the checkpoint records (ours) or the registered variant they fit ("" if neither is known)."""
    name, settings = recorded_model(checkpoint)
    if name is None:
        return ""
    if checkpoint.get("features_only"):  # `crossformer export --features`: no head, no final norm
        arguments = "".join(f", {key}={value!r}" for key, value in settings.items())
        return f"the weights are a features backbone of {name}: create {name} with features_only=True{arguments}"
    if settings:
        arguments = ", ".join(f"{key}={value!r}" for key, value in settings.items())
        return f"the weights are {name} with {arguments}: create {name} with those settings"
    if name == variant:
        return f"the weights are {name} at its registered settings: leave out the settings that change its shape"
    return f"the weights are {name}: create that model"


def _misfit_hint(checkpoint: Mapping[str, Any], variant: str, arch: Mapping[str, Any]) -> str:
    """:func:`recorded_model_hint`, else the settings the weights' shapes show against the model
    ``arch`` asked for (the authors' files: their yacs config is not read for it); "" if none."""
    hint = recorded_model_hint(checkpoint, variant)
    if hint:
        return hint
    own = inspect.signature(CrossFormer).parameters  # (timm's builder takes others: cache_dir, ...)
    try:
        with torch.device("meta"):
            expected = CrossFormer(**{k: v for k, v in arch.items() if k in own}).state_dict()
    except (TypeError, ValueError, RuntimeError):  # settings it refuses: the error says so, no hint
        return ""
    differing = settings_of_misfit(checkpoint, expected)
    return f"the weights show other settings: create {variant} with {', '.join(differing)}" if differing else ""


def _feature_class(feature_cls: Any) -> Any:
    """The ``features_only`` wrapper for timm's ``feature_cls`` argument.

    ``"getter"`` (the default) is :class:`CheckpointableFeatures`, ``"hook"`` (any name
    holding it, as timm reads it) :class:`CheckpointableHookFeatures`; ``"fx"`` stays timm's.
    ``"list"`` / ``"dict"`` run the top-level modules in turn, where a stage's merge is no
    module of its own, so they cannot give the stage maps: one clear error.
    """
    if not isinstance(feature_cls, str):
        return feature_cls
    if feature_cls.lower() == "getter":
        return CheckpointableFeatures
    if "hook" in feature_cls.lower():
        return CheckpointableHookFeatures
    if feature_cls.lower() in ("list", "dict"):
        raise ValueError(
            f"feature_cls={feature_cls!r} cannot take CrossFormer's stage maps (each stage's merge runs "
            f"outside it): leave feature_cls out, or use 'hook' or 'fx'"
        )
    return feature_cls


# What a timm user may pass for a model of fixed input size (timm's Swin and ViT take it)
_SIZE_SETTINGS = ("img_size", "input_size", "window_size", "patch_size")


def unknown_setting_message(variant: str, name: str) -> str:
    """Why ``name`` is no setting of ``variant``, with the settings it may have meant."""
    if name in _SIZE_SETTINGS:
        return (f"{variant} takes no setting {name!r}: CrossFormer runs on any input size, so the size is "
                f"the images' (the commands' --img-size / data.img_size); group_size and interval set its grouping")
    settings = [p for p in inspect.signature(CrossFormer.__init__).parameters if p != "self"]
    hint = did_you_mean(name, settings, limit=2)
    meant = f" ({hint.rstrip()})" if hint else ""
    return f"{variant} takes no setting {name!r}{meant}; its settings: {', '.join(settings)}"


def create_crossformer(variant: str, pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """Build a registered variant with timm's builder; ``kwargs`` override its architecture.

    ``pretrained=True`` needs weights in the pretrained config: a local file
    (``pretrained_cfg_overlay=dict(file=PATH)``; official ``.pth``, crossformer training
    checkpoints and ``.safetensors`` all work) or a ``state_dict``. They go through
    :func:`checkpoint_filter_fn` and timm's ``num_classes`` / ``in_chans`` adaptation. The
    file's class count and, for one of our checkpoints naming ``variant``, the settings it
    records (``model_kwargs``) describe the model where ``kwargs`` do not; weights that still
    do not fit raise :class:`CheckpointError` naming the model they are.
    ``device`` / ``dtype`` (timm's factory arguments) place and cast the model.
    """
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    features_only = bool(kwargs.get("features_only"))  # timm's builder takes it from kwargs
    out_indices = kwargs.pop("out_indices", None)
    feature_cls = _feature_class(kwargs.pop("feature_cls", "getter"))
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    pretrained_cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.pop("pretrained_cfg", None), pretrained_cfg_overlay=overlay
    )
    checkpoint, recorded = None, {}
    if pretrained:
        if pretrained_cfg.state_dict is None and not pretrained_cfg.file:
            raise RuntimeError(
                f"no weights are bundled for {variant}: pass a local checkpoint with "
                f"pretrained_cfg_overlay=dict(file=PATH) (official .pth files work as they are)"
            )
        checkpoint = _pretrained_checkpoint(pretrained_cfg)
        if checkpoint is not None:
            # the settings one of our checkpoints was trained with, if it names this variant:
            # like its class count, they describe the model where the caller does not
            recorded = recorded_model(checkpoint, variant)[1]
            pretrained_cfg = _with_weights(pretrained_cfg, checkpoint, overlay)
    arch = {**VARIANTS[variant].arch, **recorded, **kwargs}
    if out_indices is None:  # every stage, as timm's hierarchical models (however many stages)
        depths = arch.get("depths")  # (not a list: the model's own check says so)
        out_indices = tuple(range(len(depths))) if isinstance(depths, (list, tuple)) else (0, 1, 2, 3)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = build_model_with_cfg(
                CrossFormer,
                variant,
                pretrained=pretrained,
                pretrained_cfg=pretrained_cfg,
                pretrained_filter_fn=functools.partial(checkpoint_filter_fn, features_only=features_only),
                feature_cfg=dict(feature_cls=feature_cls, out_indices=out_indices),
                **arch,
            )
    except CheckpointError as err:
        hint = _misfit_hint(checkpoint, variant, arch) if checkpoint is not None else ""
        if not hint:
            raise
        raise CheckpointError(f"{hint} ({err})") from None
    except TypeError as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown is None or unknown.group(1) not in kwargs:
            raise
        raise TypeError(unknown_setting_message(variant, unknown.group(1))) from None
    if dtype is not None:
        model.to(dtype=dtype)
    if recorded:
        # timm keeps the factory's arguments to rebuild the model (save_for_hf's config); the
        # file's settings are part of the architecture too (timm adds the caller's over these)
        model._model_args = dict(recorded)
    for module in model.modules():  # the config must not keep the weights alive
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return model


@register_model
def crossformer_tiny(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-T: architecture and published figures in ``VARIANTS['crossformer_tiny']``."""
    return create_crossformer("crossformer_tiny", pretrained=pretrained, **kwargs)


@register_model
def crossformer_small(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-S: architecture and published figures in ``VARIANTS['crossformer_small']``."""
    return create_crossformer("crossformer_small", pretrained=pretrained, **kwargs)


@register_model
def crossformer_base(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-B: architecture and published figures in ``VARIANTS['crossformer_base']``."""
    return create_crossformer("crossformer_base", pretrained=pretrained, **kwargs)


@register_model
def crossformer_large(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-L: architecture and published figures in ``VARIANTS['crossformer_large']``."""
    return create_crossformer("crossformer_large", pretrained=pretrained, **kwargs)


@register_model
def crossformer_pp_small(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-S: architecture and published figures in ``VARIANTS['crossformer_pp_small']``."""
    return create_crossformer("crossformer_pp_small", pretrained=pretrained, **kwargs)


@register_model
def crossformer_pp_base(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-B: architecture and published figures in ``VARIANTS['crossformer_pp_base']``."""
    return create_crossformer("crossformer_pp_base", pretrained=pretrained, **kwargs)


@register_model
def crossformer_pp_large(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-L: architecture and published figures in ``VARIANTS['crossformer_pp_large']``."""
    return create_crossformer("crossformer_pp_large", pretrained=pretrained, **kwargs)


@register_model
def crossformer_pp_huge(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-H: architecture and published figures in ``VARIANTS['crossformer_pp_huge']``."""
    return create_crossformer("crossformer_pp_huge", pretrained=pretrained, **kwargs)


def check_builds(build: Callable[[str, dict[str, Any]], Any], name: str, settings: Mapping[str, Any]) -> None:
    """``build(name, settings)`` on the meta device (no memory, no arithmetic) for the one-line
    error it raises where the settings do not build: the configs check the user's model settings
    so when they load, before a command reads any data or writes any file. Settings that built
    are not built again (0.05-0.25 s each time a config loads)."""
    _builds(build, name, json.dumps(dict(settings), default=repr))  # in their order: the message shows them so


@functools.lru_cache(maxsize=64)
def _builds(build: Callable[[str, dict[str, Any]], Any], name: str, settings_json: str) -> None:
    """:func:`check_builds` with the settings as JSON (hashable, so cached; an error is not)."""
    with torch.device("meta"):
        build(name, json.loads(settings_json))
