"""Reading official and our own checkpoint files, safely, into any CrossFormer model.

Official classification files are ``torch.save`` dicts whose ``config`` entry is a pickled
``yacs.config.CfgNode``; PyTorch's weights-only loader refuses them. We read those with an
unpickler that admits only what tensors and containers need plus that one class (mapped
to a plain dict), and refuse any other global by name. Nothing is ever fully unpickled.
What a file is (told from its first bytes) and its plain entries (:func:`peek_checkpoint`) are
read without torch, in :mod:`crossformer.checkpoint_files`.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Collection, Mapping, Sequence

import torch
import torch.nn as nn
from timm.models._features import FeatureGetterNet, FeatureHookNet
from timm.models._features_fx import FeatureGraphNet

from ..checkpoint_files import (
    DESCRIPTION_KEY,
    decode_description,
    peek_checkpoint,
    readable_checkpoint,
    safetensors_header,
)
from ..errors import CheckpointError

__all__ = [
    "CheckpointError",
    "RECOMPUTABLE_SUFFIXES",
    "checkpoint_filter_fn",
    "read_checkpoint",
    "peek_checkpoint",
    "load_state",
    "check_keys",
    "key_differences",
    "summarize_differences",
    "split_class_layers",
    "extract_state_dict",
    "weights_entry",
    "EMA_WEIGHTS_KEY",
    "dense_task",
    "load_checkpoint",
    "convert_to_safetensors",
    "save_safetensors",
    "checkpoint_description",
    "DESCRIPTION_KEY",
    "recorded_model",
    "unwrap_model",
]

# Recomputable buffers the CrossFormer (v1) release stores in its state dicts.
RECOMPUTABLE_SUFFIXES = (".attn.biases", ".attn.relative_position_index")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_BACKBONE_PREFIX = "backbone."


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


# The description entry (true) of a file whose one set of weights is a training run's EMA
# (``crossformer export --ema``): asked for the EMA weights, it gives them.
EMA_WEIGHTS_KEY = "ema_weights"
# Checkpoint entries that are weights or training progress, not a description of the model.
_NOT_DESCRIPTION = frozenset({
    "model", "model_ema", "state_dict", "state_dict_ema", "optimizer", "scheduler", "lr_scheduler",
    "scaler", "rank_state", "epoch", "batches_done", "global_step", "world_size", "best_metric",
    "primary_metric", "max_accuracy", "amp", "format", "run_counts",
})
# The ``meta`` entries that describe the model's classes and how label maps store them (ours
# add ``label_colours``: a colour-coded map's colour of each class, or None). mmdet / mmseg
# ``meta`` also carries the whole config text and the training machine's set-up.
_META_DESCRIPTION = ("CLASSES", "PALETTE", "dataset_meta", "classes", "palette", "reduce_zero_label", "label_colours")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _damaged(path: Path, description: str, err: BaseException | str) -> CheckpointError:
    reason = err if isinstance(err, str) else _first_line(err)
    return CheckpointError(f"{path} is a damaged or truncated {description.removeprefix('a ')} ({reason})")


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    size = path.stat().st_size
    with open(path, "rb") as f:
        length = safetensors_header(f.read(9)) or 0
        header = f.read(length - 1)
    if 8 + length > size:
        raise _damaged(path, "a safetensors file", f"the file ends inside its header: {size} bytes")
    try:
        entries = json.loads(b"{" + header)
        needed = 8 + length + max(
            (int(e["data_offsets"][1]) for k, e in entries.items() if k != "__metadata__"), default=0
        )
    except (ValueError, TypeError, KeyError, IndexError):
        raise _damaged(path, "a safetensors file", "its header is not valid") from None
    if needed > size:
        raise _damaged(path, "a safetensors file", f"the file ends early: {size} of {needed} bytes")
    try:
        tensors = dict(load_file(str(path), device="cpu"))
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: the file is bad
        raise _damaged(path, "a safetensors file", err) from None
    metadata = entries.get("__metadata__")
    text = metadata.get(DESCRIPTION_KEY) if isinstance(metadata, dict) else None
    if text is None:  # weights only, as other tools write them
        return tensors
    description = decode_description(text)
    if description is None:
        raise _damaged(path, "a safetensors file", f"its {DESCRIPTION_KEY!r} metadata is not a JSON object")
    # Laid out as a training checkpoint: the weights under "model", the description beside them.
    return {**description, "model": tensors}


def _failed_checksum(archive: Any) -> str | None:
    """The first entry of a ``torch.save`` zip archive whose bytes fail the CRC-32 its header
    records, else None (about 0.3 s a GB). An entry recorded with CRC 0 is not checked:
    ``torch.serialization.set_crc32_options(False)`` writes them so."""
    import zipfile

    for info in archive.infolist():
        if info.CRC == 0:
            continue
        try:
            with archive.open(info) as entry:
                while entry.read(1 << 24):
                    pass
        except zipfile.BadZipFile:
            return info.filename
    return None


def _read_torch(path: Path, kind: str, description: str) -> Any:
    import zipfile

    if kind == "zip":
        if not zipfile.is_zipfile(path):
            raise _damaged(path, description, "the zip archive ends early")
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise CheckpointError(f"{path} is not a PyTorch checkpoint (a zip archive without data.pkl)")
            bad = _failed_checksum(archive)
        if bad is not None:  # torch.load reads changed bytes without a word (a bad disk, a copy cut and patched)
            raise _damaged(path, description, f"its entry {bad} fails its checksum")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # e.g. the official files' yacs config
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except pickle.UnpicklingError as err:
        if "refusing to unpickle" in str(err):
            raise CheckpointError(f"cannot read {path}: {err}") from None
        raise _damaged(path, description, err) from None
    except EOFError:
        raise _damaged(path, description, "the file ends early") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on a bad file
        if "magic number" in str(err):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (a pickle not written by torch.save)") from None
        raise _damaged(path, description, err) from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file (``torch.save`` or safetensors) without unpickling arbitrary code.

    The format is told by the file's content, not its name. Anything that is not a readable
    checkpoint (text, an HTML page, an empty, truncated or damaged file, a folder) raises
    :class:`CheckpointError` naming the file and saying what it is instead. A ``~`` at its start
    is the home folder (no shell expands it in ``--checkpoint=~/...`` or ``model.pretrained=~/...``).
    """
    path, kind, description = readable_checkpoint(path)
    obj = _read_safetensors(path) if kind == "safetensors" else _read_torch(path, kind, description)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict of weights")
    return _plain(obj)


def weights_entry(checkpoint: Mapping[str, Any], use_ema: bool = False, source: str = "checkpoint") -> Mapping[str, Any]:
    """The mapping of ``checkpoint`` that holds its weights: ``model`` (ours) or ``state_dict``
    (timm, mmdet, mmseg), with ``use_ema`` ``model_ema`` / ``state_dict_ema``; a bare state
    dict is its own. ``source`` names the file in errors."""
    for key in ("model_ema", "state_dict_ema") if use_ema else ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    if use_ema and checkpoint.get(EMA_WEIGHTS_KEY) is True and isinstance(checkpoint.get("model"), Mapping):
        return checkpoint["model"]  # exported with --ema: the average is the file's one set of weights
    if use_ema:  # only EMA entries will do: the plain weights' accuracy would be reported as the EMA's
        raise CheckpointError(f"{source} holds no EMA weights (no 'model_ema' entry: trained without --model-ema); "
                              "drop --ema")
    return checkpoint


def dense_task(checkpoint: Mapping[str, Any]) -> str | None:
    """``"detection"`` or ``"segmentation"`` for a file holding such heads (mmdet / mmseg key
    names, which ours keep), else None: the authors' files record no task."""
    keys = list(weights_entry(checkpoint))
    if any(k.startswith(("rpn_head.", "roi_head.", "bbox_head.")) for k in keys):
        return "detection"
    if any(k.startswith("decode_head.") for k in keys):
        return "segmentation"
    return None


_TASK_MODELS = {"classification": "classifier", "detection": "detector", "segmentation": "segmentor"}


def another_tasks_model(source: str | Path, held: str, wanted: str) -> str:
    """The start of the line that refuses a file of another task's model (:func:`dense_task`
    ``held``) where a ``wanted`` task's model was asked for; the caller adds what to give instead."""
    return f"{source} holds a {held} model (its heads' weights say so), not a {_TASK_MODELS[wanted]}"


def extract_state_dict(
    checkpoint: Mapping[str, Any], use_ema: bool = False, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint dict, with wrapper prefixes and v1 buffers removed.

    Accepts training checkpoints (``model``/``state_dict``/``model_ema`` entries) and bare
    state dicts, with ``module.``/``backbone.`` prefixes as the dense-task releases have.
    ``source`` names the file in errors.
    """
    state = weights_entry(checkpoint, use_ema, source)
    result: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.endswith(RECOMPUTABLE_SUFFIXES):
            continue
        result[key] = value
    if not result:
        raise CheckpointError(f"{source} holds no tensors")
    # A bare backbone file carries "backbone." on every key; a whole detector or segmentor
    # (backbone. beside neck. and heads) keeps its keys as they are.
    if all(key.startswith(_BACKBONE_PREFIX) for key in result):
        result = {key[len(_BACKBONE_PREFIX):]: value for key, value in result.items()}
    return result


def checkpoint_filter_fn(
    checkpoint: Mapping[str, Any], model: nn.Module, features_only: bool = False
) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: an official or crossformer checkpoint -> ``model``'s keys.

    Unwraps training checkpoints (``model``/``state_dict``), strips wrapper prefixes and
    drops the buffers v1 files store but the model recomputes (:func:`extract_state_dict`).
    Keys that still do not fit raise :class:`CheckpointError`; the first convolutions
    named in ``model.pretrained_cfg`` may differ in shape, timm adapts them (``in_chans``)
    after this filter, and so may its classifier where timm drops it: for another class
    count, or whatever it is for a model built ``features_only``.
    """
    state = extract_state_dict(checkpoint)
    expected = model.state_dict()
    if features_only:  # a features backbone's file has no final norm, which the features wrapper drops
        state.update({k: v for k, v in expected.items() if k.startswith("norm.") and k not in state})
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = tuple(f"{name}." for name in _names(cfg.get("classifier")))
    kept = not features_only and cfg.get("num_classes") == getattr(model, "num_classes", None)
    dropped = () if kept else classifier
    adapted = tuple(f"{name}." for name in _names(cfg.get("first_conv"))) + dropped
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


def unwrap_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """The network inside compiled / DDP / timm ``features_only`` wrappers, and whether
    it is cut for features (so its head, final norm and later stages may be gone): wrapped
    by timm's ``"getter"``, ``"hook"`` or ``"fx"`` features class (the graph module, for
    ``"fx"``), or cut by its own ``prune_intermediate_layers`` (the final norm is gone)."""
    features_only = False
    while True:
        if isinstance(model, FeatureGetterNet):
            model, features_only = model.model, True
        elif isinstance(model, FeatureHookNet) and "body" in model:  # hooks on the whole model
            model, features_only = model["body"], True
        elif isinstance(model, FeatureGraphNet):  # the traced modules keep their names
            model, features_only = model.graph_module, True
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model, features_only or isinstance(getattr(model, "norm", None), nn.Identity)


def _is_pruned_away(key: str, model: nn.Module) -> bool:
    """Whether a features-only model dropped the module holding ``key`` on purpose."""
    if key.startswith(("head.", "norm.")):
        return True
    parts = key.split(".")
    if parts[0] == "layers" and parts[1].isdigit():
        stage = int(parts[1])
        kept = len(list(model.layers.children()))  # a traced graph's ``layers`` is a plain Module
        return stage >= kept or (stage == kept - 1 and parts[2] == "downsample")
    return False


def check_keys(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    heading: str,
    missing_first: Sequence[str] = (),
) -> None:
    """Raise :class:`CheckpointError` under ``heading`` listing the keys of ``expected`` that
    ``state`` lacks (after ``missing_first``), the keys it has in excess, and those of another shape."""
    differences = key_differences(state, expected)
    differences["missing"][:0] = missing_first
    listed = summarize_differences(differences, shown=20)
    if listed:
        raise CheckpointError("\n  ".join([f"{heading}:", *listed]))


def key_differences(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """What keeps ``state`` from loading into a model whose state dict is ``expected``: its
    ``missing`` keys, its ``unexpected`` ones and those of the ``wrong shape`` (with both shapes)."""
    return {
        "missing": sorted(set(expected) - set(state)),
        "unexpected": sorted(set(state) - set(expected)),
        "wrong shape": [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                        for k, v in state.items() if k in expected and v.shape != expected[k].shape],
    }


def summarize_differences(differences: Mapping[str, Sequence[str]], shown: int) -> list[str]:
    """``kind: the first shown items, ... (N in all)`` for each kind of :func:`key_differences` found."""
    return [f"{kind}: {', '.join(items[:shown])}" + (f", ... ({len(items)} in all)" if len(items) > shown else "")
            for kind, items in differences.items() if items]


def reordered_classes(recorded: Sequence[str], wanted: Sequence[str]) -> list[int] | None:
    """Each of ``wanted``'s classes' row in a classifier trained on ``recorded``, where those are
    ``wanted`` in another order (fine-tuning keeps each class its own rows); else None."""
    recorded, wanted = [str(name) for name in recorded], [str(name) for name in wanted]
    if recorded == wanted or sorted(recorded) != sorted(wanted):
        return None
    row = {name: i for i, name in enumerate(recorded)}
    return [row[name] for name in wanted]


def split_class_layers(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], layer_names: Collection[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """``state`` and ``expected`` (the model's) without the tensors of classifier layers of
    another class count, and those tensors' keys.

    A classifier layer is a module whose own name is in ``layer_names`` (``fc_cls``,
    ``conv_seg``); its tensors are left out where their shape is not the model's, so that
    fine-tuning on another data set keeps every other weight. Any other difference still fails
    :func:`check_keys` on what is returned.
    """
    fresh = sorted(
        key for key, value in state.items()
        if key in expected and value.shape != expected[key].shape and key.rsplit(".", 2)[-2] in layer_names
    )

    def kept(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value for key, value in tensors.items() if key not in fresh}

    return kept(state), kept(expected), fresh


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    use_ema: bool = False,
    note: Callable[[str], None] | None = None,
) -> nn.Module:
    """Load official or crossformer weights into a classification or features model.

    - A head of another size (e.g. 1000 classes into a 10-class model) is skipped and keeps
      its fresh initialisation, which is told in one line to ``note`` (default: a
      ``UserWarning``; a training run logs it).
    - Keys a ``features_only`` model (any of timm's ``"getter"``, ``"hook"``, ``"fx"``
      classes) or ``prune_intermediate_layers`` pruned (head, final norm, unused stages)
      are ignored, and so is the head for a model built with ``num_classes=0``.
    - Any other missing or unexpected key, or a shape mismatch, raises
      :class:`CheckpointError` listing them.
    - A model that knows its own checkpoint layouts (the detectors and segmentors, which
      read mmdet / mmseg files) has a ``load_checkpoint_state(checkpoint, source, use_ema)``
      method; it is handed the file's contents instead.
    """
    return load_state(model, read_checkpoint(path), str(path), use_ema=use_ema, note=note)


def load_state(
    model: nn.Module,
    checkpoint: Mapping[str, Any],
    source: str = "checkpoint",
    use_ema: bool = False,
    note: Callable[[str], None] | None = None,
) -> nn.Module:
    """:func:`load_checkpoint` for a checkpoint already read (``source`` names it in errors)."""
    target, features_only = unwrap_model(model)
    if hasattr(target, "load_checkpoint_state"):
        target.load_checkpoint_state(checkpoint, source, use_ema)
        return model
    state = extract_state_dict(checkpoint, use_ema=use_ema, source=source)
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
        message = (f"{path}: classifier head {tuple(state['head.weight'].shape)} does not fit the model's "
                   f"{tuple(expected['head.weight'].shape)}; the head keeps its fresh initialisation")
        if note is None:
            warnings.warn(message, stacklevel=2)
        else:
            note(message)
        for k in head_keys:
            del state[k]
        expected = {k: v for k, v in expected.items() if k not in head_keys}

    try:
        check_keys(state, expected, f"{path} does not fit this model (check the variant and its settings)")
    except CheckpointError:
        dense = dense_task(checkpoint)
        if dense is None:
            from .variants import recorded_model_hint

            hint = recorded_model_hint(checkpoint, "")  # the model the weights are, where it is known
            if not hint:  # else the settings their shapes show (the authors' files)
                differing = settings_of_misfit(checkpoint, expected)
                hint = f"its weights show other settings: build the model with {', '.join(differing)}" if differing else ""
            if hint:  # in one line, not every key listed
                raise CheckpointError(f"{path} does not fit this model ({first_differences(state, expected)}); "
                                      f"{hint}") from None
            raise
        # the authors' mmdet / mmseg files record no task: their heads say what they are, in
        # one line rather than every key of the model listed as missing
        raise CheckpointError(f"{path} holds a whole {dense} model (its heads' weights say so), not weights for this "
                              f"model: a {dense} config starts from it with --init-from (model.init_from); "
                              f"--pretrained takes ImageNet weights") from None
    target.load_state_dict(state, strict=False)
    return model


def first_differences(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """The first two keys of each kind that keep ``weights`` from loading into ``expected``."""
    return "; ".join(summarize_differences(key_differences(weights, expected), shown=2))


def settings_shown_by(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                      checkpoint: Mapping[str, Any] | None = None) -> list[str]:
    """``KEY=VALUE`` for each architecture setting (embed_dim, depths, num_heads, ...) that the
    shapes of ``weights`` show and that differs from the model whose state dict is ``expected``.
    Where that is ``use_acl`` (CrossFormer++ weights for a v1 model, or back), the grouping too
    (group sizes, intervals, long-distance groups), which no weight shows, and without which the
    model built would load the weights and compute another function: as the ``checkpoint``
    records it (ours: ``model_name`` and ``model_kwargs``), else the weights' family's."""
    from ..variant_table import VARIANTS, family_grouping
    from .variants import architecture_of

    file_settings, model_settings = architecture_of(weights), architecture_of(expected)
    differing = {k: v for k, v in file_settings.items() if k in model_settings and v != model_settings[k]}
    if "use_acl" in differing:
        grouping = family_grouping(differing["use_acl"])
        kwargs = (checkpoint or {}).get("model_kwargs")
        if isinstance(kwargs, Mapping):  # the recorded model's own grouping, and what the settings changed
            variant = VARIANTS.get(str((checkpoint or {}).get("model_name")))
            recorded = {**(variant.arch if variant is not None else {}), **kwargs}
            grouping.update({k: recorded[k] for k in grouping if k in recorded})
        differing.update({k: list(v) if isinstance(v, tuple) else v for k, v in grouping.items()})
    return [f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}" for k, v in differing.items()]


def load_pretrained(model: nn.Module, path: str | Path, settings_key: str, note: Callable[[str], None] | None = None,
                    checkpoint: Mapping[str, Any] | None = None) -> None:
    """:func:`load_state` of the ImageNet weights ``path`` (``--pretrained``; ``checkpoint``: its
    contents, where read already) into a classifier or a dense task's backbone, whose
    constructor settings the config holds under ``settings_key`` (``model.kwargs``,
    ``model.backbone_kwargs``). Weights of other settings are one line naming them (e.g.
    ``set model.backbone_kwargs.embed_dim=32``), rather than the keys that differ, listed by the dozen."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    try:
        load_state(model, checkpoint, str(path), note=note)
    except CheckpointError as err:
        raise _pretrained_misfit(err, path, checkpoint, model, settings_key) from None


def _pretrained_misfit(error: CheckpointError, path: str | Path, checkpoint: Mapping[str, Any], model: nn.Module,
                       settings_key: str) -> CheckpointError:
    """``error`` as one line naming the settings the weights of ``checkpoint`` (read from
    ``path``) show, where they show any; else ``error`` itself (weights it cannot find, or
    that differ otherwise)."""
    expected = unwrap_model(model)[0].state_dict()
    differing = settings_of_misfit(checkpoint, expected)
    if not differing:
        return error
    weights, expected = _compared(extract_state_dict(checkpoint)), _compared(expected)
    return CheckpointError(f"{path} does not fit this model ({first_differences(weights, expected)}); its weights "
                           f"show other settings: set {' '.join(f'{settings_key}.{d}' for d in differing)}")


def _compared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` less the head and the final norm: a head of another class count starts afresh
    (a note, not a misfit), and a features backbone has neither."""
    return {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}


def settings_of_misfit(checkpoint: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """:func:`settings_shown_by` for the weights of ``checkpoint`` against a model's state dict
    ``expected`` (empty where the weights cannot be found or show no other CrossFormer settings)."""
    from ..errors import UserInputError

    try:
        weights = extract_state_dict(checkpoint)
    except UserInputError:
        return []
    return settings_shown_by(_compared(weights), _compared(expected), checkpoint)


def checkpoint_description(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records about its model besides the weights: every plain (JSON)
    entry that is not training progress, e.g. ours: ``task``, ``model_name``, ``model_kwargs``,
    ``class_names``, ``img_size``, ``metrics`` and the training ``config`` (its data paths
    included, as mmdet / mmseg files carry theirs: a detection or segmentation weights file
    then runs without ``--config``); ``meta``'s classes and palette (mmdet / mmseg files and
    ours) and, of our segmentation checkpoints, how label maps store the classes:
    ``reduce_zero_label`` and ``label_colours`` (colour-coded maps, ``data.label_colours``)."""
    description: dict[str, Any] = {}
    for key, value in checkpoint.items():
        if key in _NOT_DESCRIPTION:
            continue
        if key == "meta" and isinstance(value, Mapping):
            value = {k: value[k] for k in _META_DESCRIPTION if k in value}
            if not value:
                continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):  # tensors, objects: not a plain description
            continue
        description[key] = value
    return description


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: str | Path, description: Mapping[str, Any] | None = None
) -> Path:
    """Write tensors as a ``.safetensors`` file, atomically (:func:`crossformer.atomic.write_atomic`).

    ``description`` (plain values, e.g. :func:`checkpoint_description`) is stored as JSON in
    the file's metadata under :data:`DESCRIPTION_KEY`; :func:`read_checkpoint` then returns
    ``{"model": tensors, **description}``, as it would the checkpoint. Other readers
    (``safetensors.torch.load_file``, timm) see the tensors alone.
    """
    from safetensors.torch import save

    from ..atomic import write_atomic

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {DESCRIPTION_KEY: json.dumps(dict(description), allow_nan=False)} if description else None
    return write_atomic(path, lambda file: file.write(save(tensors, metadata=metadata)))


def convert_to_safetensors(
    src: str | Path, dst: str | Path, use_ema: bool = False, note: Callable[[str], None] | None = None
) -> Path:
    """Write the model weights of any readable checkpoint as a ``.safetensors`` file, with
    what the checkpoint records about its model (:func:`checkpoint_description`) in its metadata.
    ``note`` hears when the tensors hold no CrossFormer (e.g. a file of test inputs)."""
    from ..atomic import check_output_path

    check_output_path(dst, inputs=(src,))
    checkpoint = read_checkpoint(src)
    weights = extract_state_dict(checkpoint, use_ema=use_ema, source=str(src))
    # every CrossFormer, classifier or dense backbone, starts with its cross-scale patch embedding
    if note is not None and not any(key.startswith("patch_embed.") or ".patch_embed." in key for key in weights):
        shown = ", ".join(list(weights)[:3]) + (", ..." if len(weights) > 3 else "")
        note(f"{src} holds no CrossFormer weights (its tensors: {shown}); written as they are")
    return save_safetensors(weights, dst, checkpoint_description(checkpoint))


def recorded_model(checkpoint: Mapping[str, Any], model_name: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """The model name and constructor settings a checkpoint records, as ``(name, kwargs)``.

    Our training checkpoints store ``model_name`` and ``model_kwargs``. ``model_name``, when
    given, wins over the file's; the file's settings apply only to the model it names.
    Other files (official releases, state dicts) give ``(model_name, {})``, or without one
    the registered variant their weights fit (:func:`~crossformer.models.variants.identify_variant`).
    """
    recorded_name = checkpoint.get("model_name")
    name = model_name or recorded_name
    if name is None:
        from .variants import identify_variant

        try:
            return identify_variant(extract_state_dict(checkpoint)), {}
        except CheckpointError:  # no tensors: said when the weights are loaded
            return None, {}
    settings = checkpoint.get("model_kwargs") if name == recorded_name else None
    return name, dict(settings) if isinstance(settings, Mapping) else {}
