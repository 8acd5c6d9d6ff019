"""Reading official and our own checkpoint files, safely, into any CrossFormer model.

Official classification files are ``torch.save`` dicts whose ``config`` entry is a pickled
``yacs.config.CfgNode``; PyTorch's weights-only loader refuses them. We read those with an
unpickler that admits only what tensors and containers need plus that one class (mapped
to a plain dict), and refuse any other global by name. Nothing is ever fully unpickled.
"""

from __future__ import annotations

import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from timm.models._features import FeatureGetterNet

from ..errors import UserInputError

__all__ = [
    "CheckpointError",
    "checkpoint_filter_fn",
    "read_checkpoint",
    "load_state",
    "extract_state_dict",
    "load_checkpoint",
    "convert_to_safetensors",
]

# Recomputable buffers the CrossFormer (v1) release stores in its state dicts.
_RECOMPUTABLE_SUFFIXES = (".attn.biases", ".attn.relative_position_index")
_WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")


class CheckpointError(UserInputError):
    """A checkpoint file that cannot be read or does not fit the model."""


class _ConfigDict(dict):
    """Stands in for ``yacs.config.CfgNode`` while unpickling (a dict with attributes)."""


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
    ("yacs.config", "CfgNode"): _ConfigDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle the global '{module}.{name}': only tensors, containers "
                f"and the official yacs config are read from checkpoints"
            ) from None


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load's pickle_module: it subclasses ``Unpickler`` and handles storages itself.
_restricted_pickle = ModuleType("crossformer_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = _restricted_load


def _plain(obj: Any) -> Any:
    """Turn unpickled config nodes into plain dicts, recursively."""
    if isinstance(obj, _ConfigDict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, dict) and not isinstance(obj, OrderedDict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``.pth``/``.pt``/``.safetensors`` file without unpickling arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # e.g. the official files' yacs config
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read {path}: not a PyTorch checkpoint or truncated ({err})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"cannot read {path}: expected a dict, found {type(obj).__name__}")
    return _plain(obj)


def extract_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint dict, with wrapper prefixes and v1 buffers removed.

    Accepts training checkpoints (``model``/``state_dict``/``model_ema`` entries) and bare
    state dicts, with ``module.``/``backbone.`` prefixes as the dense-task releases have.
    """
    state = checkpoint
    keys = ("model_ema", "state_dict_ema") if use_ema else ()
    for key in (*keys, "model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            state = checkpoint[key]
            break
    else:
        if use_ema:
            raise CheckpointError("checkpoint holds no EMA weights (no 'model_ema' entry)")
    result: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.endswith(_RECOMPUTABLE_SUFFIXES):
            continue
        result[key] = value
    if not result:
        raise CheckpointError("checkpoint holds no tensors")
    return result


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: an official or crossformer checkpoint -> ``model``'s keys.

    Unwraps training checkpoints (``model``/``state_dict``), strips wrapper prefixes and
    drops the buffers v1 files store but the model recomputes (:func:`extract_state_dict`).
    Keys that still do not fit raise :class:`CheckpointError`; the first convolutions and
    the classifier named in ``model.pretrained_cfg`` may differ in shape, timm adapts them
    (``in_chans``) or drops them (``num_classes``) after this filter.
    """
    state = extract_state_dict(checkpoint)
    expected = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    adapted = tuple(f"{name}." for key in ("first_conv", "classifier") for name in _names(cfg.get(key)))
    classifier = tuple(f"{name}." for name in _names(cfg.get("classifier")))
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith(classifier))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith(classifier))
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape and not k.startswith(adapted)
    ]
    if missing or unexpected or mismatched:
        problems = "; ".join(
            f"{title}: {', '.join(items[:5])}" + (f" ... ({len(items)} in all)" if len(items) > 5 else "")
            for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if items
        )
        raise CheckpointError(f"pretrained weights do not fit this model (check the variant and its settings): {problems}")
    return state


def _names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The network inside compiled / DDP / timm ``features_only`` wrappers, and whether
    it was wrapped for features (so its head and final norm were pruned)."""
    features_only = False
    while True:
        if isinstance(model, FeatureGetterNet):
            model, features_only = model.model, True
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model, features_only


def _is_pruned_away(key: str, model: nn.Module) -> bool:
    """Whether a features-only model dropped the module holding ``key`` on purpose."""
    if key.startswith(("head.", "norm.")):
        return True
    parts = key.split(".")
    if parts[0] == "layers" and parts[1].isdigit():
        stage = int(parts[1])
        kept = len(model.layers)
        return stage >= kept or (stage == kept - 1 and parts[2] == "downsample")
    return False


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    use_ema: bool = False,
) -> nn.Module:
    """Load official or crossformer weights into a classification or features model.

    - A head of another size (e.g. 1000 classes into a 10-class model) is skipped with a
      warning and keeps its fresh initialisation.
    - Keys a ``features_only`` model pruned (head, final norm, unused stages) are ignored,
      and so is the head for a model built with ``num_classes=0``.
    - Any other missing or unexpected key, or a shape mismatch, raises
      :class:`CheckpointError` listing them.
    - A model that knows its own checkpoint layouts (the detectors and segmentors, which
      read mmdet / mmseg files) has a ``load_checkpoint_state(checkpoint, source, use_ema)``
      method; it is handed the file's contents instead.
    """
    return load_state(model, read_checkpoint(path), str(path), use_ema=use_ema)


def load_state(
    model: nn.Module,
    checkpoint: Mapping[str, Any],
    source: str = "checkpoint",
    use_ema: bool = False,
) -> nn.Module:
    """:func:`load_checkpoint` for a checkpoint already read (``source`` names it in errors)."""
    target, features_only = _unwrap(model)
    if hasattr(target, "load_checkpoint_state"):
        target.load_checkpoint_state(checkpoint, source, use_ema)
        return model
    state = extract_state_dict(checkpoint, use_ema=use_ema)
    path = source
    expected = target.state_dict()

    if features_only:
        state = {k: v for k, v in state.items() if k in expected or not _is_pruned_away(k, target)}
    elif "head.weight" not in expected:  # built with num_classes=0: no head to fill
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    head_keys = [k for k in ("head.weight", "head.bias") if k in state and k in expected]
    other_classes = (
        len(head_keys) == 2
        and state["head.weight"].shape[1:] == expected["head.weight"].shape[1:]
        and state["head.weight"].shape[0] != expected["head.weight"].shape[0]
    )
    if other_classes:
        warnings.warn(
            f"{path}: classifier head {tuple(state['head.weight'].shape)} does not fit the model's "
            f"{tuple(expected['head.weight'].shape)}; the head keeps its fresh initialisation",
            stacklevel=2,
        )
        for k in head_keys:
            del state[k]
        expected = {k: v for k, v in expected.items() if k not in head_keys}

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{path} does not fit this model (check the variant and its settings):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
    target.load_state_dict(state, strict=False)
    return model


def convert_to_safetensors(src: str | Path, dst: str | Path, use_ema: bool = False) -> Path:
    """Write the model weights of any readable checkpoint as a ``.safetensors`` file."""
    from safetensors.torch import save_file

    state = extract_state_dict(read_checkpoint(src), use_ema=use_ema)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(dst)
    return dst
