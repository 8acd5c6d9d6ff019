"""AdamW with the authors' weight-decay rule, and learning rates scaled to the global batch."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

__all__ = ["scale_lr", "param_groups", "build_optimizer"]


def scale_lr(lr: float, global_batch: int, reference_batch: int = 512) -> float:
    """Linear scaling rule, as the authors: ``lr x global_batch / reference_batch``.

    ``global_batch`` is samples per optimizer update: per-process batch x processes x
    gradient-accumulation steps (8 GPUs x 128 = 1024 gives 1e-3 from 5e-4).
    """
    return lr * global_batch / reference_batch


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_keys: Sequence[str] = (), decay_1d: bool = False
) -> list[dict[str, Any]]:
    """Two groups: decayed, and not decayed -- 1-d parameters (norms, biases, scales; unless
    ``decay_1d``, as the mmdet and mmseg recipes have it), the model's ``no_weight_decay()`` names, and names
    containing any of ``no_decay_keys`` (mmseg's custom keys such as ``norm``: decay off for
    every norm layer's parameters)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (param.ndim <= 1 and not decay_1d) or name in skip or any(key in name for key in no_decay_keys):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    no_decay_keys: Sequence[str] = (),
    decay_1d: bool = False,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; each group records its ``peak_lr`` for the schedule.

    PyTorch's fused AdamW (one kernel for all parameters) where every parameter is a float
    tensor on the CPU or a CUDA device: on the CPU PyTorch's default is a loop of small ops
    per parameter, which took 12.9 ms of the segmentation demo's 97 ms step against 4.2 ms
    fused (benchmarks/RESULTS.md, row 77).
    """
    groups = param_groups(model, weight_decay, no_decay_keys, decay_1d)
    for group in groups:
        group["peak_lr"] = lr
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)
