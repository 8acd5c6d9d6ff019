"""Stop a diverged run before it overwrites good checkpoints."""

from __future__ import annotations

import math

from .distributed import DistContext

__all__ = ["NonFiniteLossError", "check_finite_loss"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def check_finite_loss(value: float, ctx: DistContext, epoch: int, step: int, last_checkpoint: str | None) -> float:
    """Raise on every rank as soon as any rank's loss is not finite; else return the loss
    averaged over ranks (under torchrun: the global batch's, as one process would log it).

    All ranks agree through one reduction, so none is left waiting in a collective.
    """
    finite = math.isfinite(value)
    total, failed = ctx.all_reduce_sum([value if finite else 0.0, 0.0 if finite else 1.0])
    if not failed:
        return total / ctx.world_size
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    raise NonFiniteLossError(
        f"loss became {value if not finite else 'non-finite on another rank'} at epoch {epoch} "
        f"step {step}; stopped before the update ({kept}); lower the learning rate, use amp=bf16 or none, "
        f"or check the data"
    )
