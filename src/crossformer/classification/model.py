"""Building classifiers by name, and rebuilding them from checkpoints for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..engine.config import with_drop_path
from ..errors import SETTING_ERRORS, CheckpointError, UserInputError, settings_that_fail

__all__ = ["create_classifier", "LoadedClassifier", "load_classifier", "misfit_message"]


def create_classifier(
    name: str, num_classes: int, drop_path: float | None = None, model_kwargs: dict[str, Any] | None = None,
    img_size: tuple[int, int] | None = None,
) -> nn.Module:
    """``timm.create_model(name, num_classes=..., drop_path_rate=..., **model_kwargs)``.

    With ``img_size`` (H, W), settings that build but do not fit together (channels that do
    not split over the heads or the embedding's kernels, groups larger than the maps) are
    found first by a forward pass on the meta device (no memory, no arithmetic): one line
    naming the settings instead of a shape error in the first training step.
    """
    import timm

    import crossformer.models  # noqa: F401  (registers the variants with timm)
    from ..models import require_known_model

    require_known_model(name)
    kwargs = with_drop_path(model_kwargs or {}, drop_path)
    # The forward pass tells settings that do not fit the size by a shape error (RuntimeError).
    with settings_that_fail(name, kwargs, img_size, errors=(*SETTING_ERRORS, RuntimeError)):
        if img_size is not None:
            with torch.device("meta"):
                timm.create_model(name, num_classes=num_classes, **kwargs).eval()(torch.empty(1, 3, *img_size))
        return timm.create_model(name, num_classes=num_classes, **kwargs)


@dataclass
class LoadedClassifier:
    """A model ready for inference and how its inputs must be prepared."""

    model: nn.Module
    name: str
    num_classes: int
    class_names: list[str] | None  # None for files that do not record them (official releases)
    img_size: int | tuple[int, int]  # N (square) or (H, W)
    crop_pct: float
    interpolation: str


def load_classifier(
    checkpoint: str | Path,
    model_name: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    use_ema: bool = False,
    device: torch.device | str = "cpu",
    model_kwargs: dict[str, Any] | None = None,
) -> LoadedClassifier:
    """Rebuild the model a checkpoint holds, in eval mode on ``device``.

    Our training checkpoints (and their safetensors conversions) name their model, settings
    and classes. Other files (the authors' releases, bare state dicts) are taken for the
    registered variant their weights fit, else need ``model_name``; the class count is read
    off their head; ``model_kwargs`` give the settings of a non-standard size.
    """
    from ..models.weights import another_tasks_model, dense_task, extract_state_dict, load_state, read_checkpoint, recorded_model

    state = read_checkpoint(checkpoint)
    name, recorded = recorded_model(state, model_name)
    if not name:
        dense = dense_task(state)
        if dense is not None:  # the authors' mmdet / mmseg files record no task: only a config says what they hold
            raise UserInputError(f"{checkpoint} holds a {dense} model (its heads' weights say so): pass its {dense} "
                                 f"config with --config NAME_OR_FILE")
        raise UserInputError(f"{checkpoint} does not name its model and fits no registered variant: "
                             "pass --model NAME (and --model-arg KEY=VALUE for a non-standard size)")
    weights = extract_state_dict(state, use_ema=use_ema, source=str(checkpoint))
    head = weights.get("head.weight")
    dense = dense_task(state) if head is None else None
    if dense is not None:  # an mmdet / mmseg file's backbone has no classifier either
        raise UserInputError(f"{another_tasks_model(checkpoint, dense, 'classification')}: pass its {dense} config "
                             f"with --config NAME_OR_FILE")
    if head is None:
        raise UserInputError(f"{checkpoint} has no classifier head (a backbone-only file cannot classify)")
    settings = {**recorded, **(model_kwargs or {})}
    model = create_classifier(name, num_classes=head.shape[0], model_kwargs=settings)
    try:
        load_state(model, state, str(checkpoint), use_ema=use_ema)  # the file is read once
    except CheckpointError:
        raise CheckpointError(misfit_message(checkpoint, state, name, settings, weights, model.state_dict())) from None
    model.to(device).eval()
    return LoadedClassifier(
        model=model,
        name=name,
        num_classes=int(head.shape[0]),
        class_names=list(state["class_names"]) if "class_names" in state else None,
        img_size=_size(img_size or state.get("img_size", 224)),
        crop_pct=float(state.get("crop_pct", 0.875)),
        interpolation=str(state.get("interpolation", "bicubic")),
    )


def misfit_message(checkpoint: str | Path, state: Mapping[str, Any], name: str, settings: dict[str, Any],
                   weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """One line on why ``weights`` (of ``checkpoint``, read as ``state``) do not load into
    ``name`` built with ``settings`` (state dict ``expected``; for the commands that build it
    from ``--model`` and ``--model-arg``): the first differences, then the
    model the file names, else the registered variant its weights are, else the settings they
    show that the model lacks (what ``--model-arg`` would change). Settings alone would not do
    where the file is a variant or names its model: its group sizes and intervals, which no
    weight shows, would stay the given model's (the model built would load, and be another)."""
    from ..models.variants import identify_variant
    from ..models.weights import first_differences, settings_shown_by

    built = f"{name} with {', '.join(f'{k}={v}' for k, v in settings.items())}" if settings else name
    recorded, variant = state.get("model_name"), identify_variant(weights)
    differing = settings_shown_by(weights, expected, state)
    if state.get("features_only"):  # `export --features`: no head, no final norm
        hint = "it holds a features backbone (no head or final norm): add --features"
    elif isinstance(recorded, str) and recorded != name:
        hint = f"the file names its model, {recorded}: leave out --model"
    elif variant is not None and variant != name:
        hint = f"its weights are {variant}'s: pass --model {variant}"
    elif differing:
        hint = f"its weights show other settings: add {' '.join(f'--model-arg {d}' for d in differing)}"
    else:
        hint = "check --model and --model-arg against the settings the file was trained with"
    return f"{checkpoint} does not fit {built} ({first_differences(weights, expected)}); {hint}"


def _size(size: Any) -> int | tuple[int, int]:
    """A recorded or requested size: N, [N] or [H, W]."""
    if isinstance(size, (list, tuple)):
        return int(size[0]) if len(size) == 1 else (int(size[0]), int(size[1]))
    return int(size)
