"""Training checkpoints: written atomically, read without unpickling code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it and :func:`crossformer.load_checkpoint`
finds the weights under ``model`` (and ``model_ema``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..atomic import write_atomic
from ..checkpoint_files import START_FILES, errors_said_as, readable_start_file
from ..errors import CheckpointError, UserInputError

__all__ = ["save_atomic", "load_training_state", "require_model_files", "without_start_files", "start_from", "LAST",
           "BEST", "resume_path"]

LAST = "last.pth"
BEST = "best.pth"


def resume_path(resume: str, output: str | Path) -> Path:
    """The checkpoint ``run.resume`` names: ``auto`` is ``OUTPUT/last.pth``, else the file given."""
    return Path(output) / LAST if resume == "auto" else Path(resume).expanduser()


def require_model_files(task: str, **settings: str | None) -> None:
    """Stop a ``task`` training run whose ``model.<setting>`` (``pretrained``, ``init_from``)
    names no file, or a model of ours that the setting cannot start from, before it reads any data.

    Training checks this, not the configuration: evaluation, prediction and export take every
    weight from their checkpoint, whose recorded config may name files this machine never had
    (and so does a resumed run: see :func:`without_start_files`).
    """
    for setting, path in settings.items():
        if path is not None:
            readable_start_file(setting, path)
            _check_start_task(task, setting, path)


def _check_start_task(task: str, setting: str, path: str) -> None:
    """A one-line error for a whole detector or segmentor of ours (it records its task) as
    ``model.pretrained``, which takes ImageNet weights and would match none of its keys, or as
    another task's ``model.init_from``. The authors' mmdet / mmseg files record no task."""
    from ..checkpoint_files import peek_checkpoint

    recorded = peek_checkpoint(path).get("task")
    if recorded not in ("detection", "segmentation") or (setting == "init_from" and recorded == task):
        return
    if setting == "pretrained" and recorded == task:
        raise UserInputError(f"model.pretrained: {path} is a whole {recorded} model, not ImageNet weights: start every "
                             f"weight from it with --init-from (model.init_from), or give --pretrained an ImageNet "
                             f"checkpoint")
    if setting == "pretrained":
        raise UserInputError(f"model.pretrained: {path} is a whole {recorded} model, not ImageNet weights: give "
                             f"--pretrained an ImageNet checkpoint (a {recorded} config starts from this file with "
                             f"--init-from)")
    raise UserInputError(f"model.init_from: {path} is a whole {recorded} model, not a {task} one: give --init-from a "
                         f"{task} model (a {recorded} config starts from this file with --init-from)")


def without_start_files(config: Any) -> Any:
    """``config`` with its ``model.pretrained`` and ``model.init_from`` unset: what a resumed
    run's task is built from, since every weight comes from the checkpoint, so the files the
    run started from need not exist any more and are not read (only to be overwritten)."""
    model = getattr(config, "model", None)
    unset = {name: None for name in START_FILES if getattr(model, name, None) is not None}
    return dataclasses.replace(config, model=dataclasses.replace(model, **unset)) if unset else config


def start_from(model: nn.Module, path: str, load: Callable[[nn.Module, Mapping[str, Any], str], list[str]]) -> str:
    """Fill ``model`` from the whole-model checkpoint ``path`` (``model.init_from``) through the
    task's ``load(model, checkpoint, source)``, which keeps the classifier layers of another
    class count as initialised and returns their keys; returns what the run's log says of it."""
    from ..models.weights import read_checkpoint

    fresh = load(model, read_checkpoint(path), path)
    layers = sorted({key.rsplit(".", 1)[0] for key in fresh})
    return f"started from {path}" + (f" (its classifiers of another class count start afresh: {', '.join(layers)})"
                                     if layers else "")


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that readers see the old file or the new one, never half
    (:func:`crossformer.atomic.write_atomic`: a full disk keeps the previous file and says so)."""
    return write_atomic(path, lambda f: torch.save(state, f))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (weights-only unpickling), through the
    one checkpoint reader, which says what a file that is no checkpoint is (text, empty,
    truncated)."""
    from ..models.weights import read_checkpoint

    path = Path(path)
    with errors_said_as("cannot resume"):
        state = read_checkpoint(path)
    if "optimizer" not in state or "global_step" not in state:
        raise CheckpointError(
            f"cannot resume from {path}: it holds weights only; pass it as --pretrained to start from it"
        )
    return state
