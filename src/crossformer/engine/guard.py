"""Stop a diverged run before it overwrites good checkpoints."""

from __future__ import annotations

import math

from .distributed import DistContext

__all__ = ["NonFiniteLossError", "check_finite_loss"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def check_finite_loss(value: float, ctx: DistContext, epoch: int, step: int, last_checkpoint: str | None) -> None:
    """Raise on every rank as soon as any rank's loss is not finite.

    All ranks agree through one reduction, so none is left waiting in a collective.
    """
    if ctx.all_true(math.isfinite(value)):
        return
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    raise NonFiniteLossError(
        f"loss became {value if not math.isfinite(value) else 'non-finite on another rank'} at epoch {epoch} "
        f"step {step}; stopped before the update ({kept}); lower the learning rate, use amp=bf16 or none, "
        f"or check the data"
    )
