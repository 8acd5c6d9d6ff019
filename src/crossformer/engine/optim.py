"""AdamW with the authors' weight-decay rule, learning rates scaled to the global batch,
and the per-step cosine schedule with linear warm-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

__all__ = ["ScaledLR", "scale_learning_rates", "build_optimizer", "build_scheduler"]


@dataclass(frozen=True)
class ScaledLR:
    """Peak, warm-up start and final learning rates for one global batch size."""

    lr: float
    warmup_lr: float
    min_lr: float


def scale_learning_rates(
    base_lr: float, warmup_lr: float, min_lr: float, global_batch: int, reference_batch: int = 512
) -> ScaledLR:
    """Linear scaling rule, as the authors: every rate times ``global_batch / reference_batch``.

    ``global_batch`` is images per optimizer update: per-process batch x processes x
    gradient-accumulation steps (8 GPUs x 128 = 1024 gives 1e-3 from 5e-4).
    """
    factor = global_batch / reference_batch
    return ScaledLR(base_lr * factor, warmup_lr * factor, min_lr * factor)


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW; no decay on 1-d parameters (norms, biases) nor on the model's ``no_weight_decay()``."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, rates: ScaledLR, total_steps: int, warmup_steps: int
) -> CosineLRScheduler:
    """Cosine decay to ``min_lr`` over ``total_steps`` updates, the first ``warmup_steps``
    rising linearly from ``warmup_lr``. Call ``step_update(global_step)`` after each update.

    The schedule is a pure function of the update count, so resuming only needs that count.
    """
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps, 1),
        lr_min=rates.min_lr,
        warmup_lr_init=rates.warmup_lr,
        warmup_t=warmup_steps,
        cycle_limit=1,
        t_in_epochs=False,
    )
