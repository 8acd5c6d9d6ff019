"""Learning-rate schedules as pure functions of the optimizer update count.

A schedule gives a *factor* of each parameter group's peak rate at update ``t`` (the rate
used for update ``t + 1``), so resuming needs nothing but ``t``, and groups with different
peak rates keep their ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import ScheduleConfig

__all__ = ["LRSchedule", "cosine_factor", "step_factor", "poly_factor", "linear_warmup", "build_schedule"]


def linear_warmup(t: int, warmup: int, ratio: float) -> float:
    """``ratio`` at ``t = 0`` rising linearly to 1 at ``t = warmup`` (and 1 after)."""
    if t >= warmup:
        return 1.0
    return 1.0 - (1.0 - t / warmup) * (1.0 - ratio)


def cosine_factor(t: int, total: int, warmup: int, ratio: float, min_ratio: float) -> float:
    """Warm-up line from ``ratio`` towards 1 over ``warmup`` updates, then (from ``t = warmup``)
    the cosine ``min + (1 - min)(1 + cos(pi t / total)) / 2``, reaching ``min_ratio`` at ``total``
    (timm's ``CosineLRScheduler`` without warm-up prefix, as the authors)."""
    if t < warmup:
        return linear_warmup(t, warmup, ratio)
    t = min(t, total)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * t / total))


def step_factor(t: int, milestones: Sequence[int], gamma: float, warmup: int, ratio: float) -> float:
    """``gamma^k`` once ``t`` has reached ``k`` of the ``milestones`` (in updates), times the warm-up."""
    passed = sum(1 for m in milestones if t >= m)
    return gamma**passed * linear_warmup(t, warmup, ratio)


def poly_factor(t: int, total: int, power: float, min_ratio: float, warmup: int, ratio: float) -> float:
    """``(1 - min)(1 - t / total)^power + min``, times the warm-up (mmseg's ``poly``)."""
    t = min(t, total)
    return ((1.0 - min_ratio) * (1.0 - t / total) ** power + min_ratio) * linear_warmup(t, warmup, ratio)


@dataclass(frozen=True)
class LRSchedule:
    """A schedule resolved to update counts: ``factor(t)``, and ``apply(optimizer, t)`` which
    sets each group's ``lr`` to its ``peak_lr`` times the factor."""

    name: str
    total: int  # updates in the run
    warmup: int  # warm-up updates
    warmup_ratio: float
    min_ratio: float  # min_lr / lr
    milestones: tuple[int, ...] = ()  # updates
    gamma: float = 0.1
    power: float = 0.9

    def factor(self, t: int) -> float:
        total = max(self.total, 1)
        if self.name == "cosine":
            return cosine_factor(t, total, self.warmup, self.warmup_ratio, self.min_ratio)
        if self.name == "step":
            return step_factor(t, self.milestones, self.gamma, self.warmup, self.warmup_ratio)
        return poly_factor(t, total, self.power, self.min_ratio, self.warmup, self.warmup_ratio)

    def apply(self, optimizer: torch.optim.Optimizer, t: int) -> float:
        """Set the rates for the update after ``t`` updates; returns the first group's rate."""
        factor = self.factor(t)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        return optimizer.param_groups[0]["lr"]


def build_schedule(config: ScheduleConfig, lr: float, min_lr: float, total_updates: int, updates_per_epoch: int,
                   by_iterations: bool) -> LRSchedule:
    """Resolve epochs to updates: a warm-up in epochs counts ``updates_per_epoch`` each in either
    mode; milestones (in the run's unit) too in epoch mode, and are already updates in iteration mode."""
    warmup = config.warmup_iters or config.warmup_epochs * updates_per_epoch
    unit = 1 if by_iterations else updates_per_epoch
    return LRSchedule(
        name=config.name,
        total=total_updates,
        warmup=warmup,
        warmup_ratio=config.warmup_ratio,
        min_ratio=min_lr / lr if lr else 0.0,
        milestones=tuple(m * unit for m in config.milestones),
        gamma=config.gamma,
        power=config.power,
    )
