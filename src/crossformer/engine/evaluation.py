"""The evaluation loop the three tasks share: the model in eval mode over one rank's batches,
stopping every rank together at the first bad file (none left waiting in a reduction)."""

from collections.abc import Callable, Iterable
from typing import TypeVar

from torch import nn

from ..errors import DataError
from ..modes import eval_mode
from .distributed import DistContext
from .logging import Progress

__all__ = ["evaluation_pass"]

Batch = TypeVar("Batch")


def evaluation_pass(
    model: nn.Module,
    batches: Iterable[Batch],
    ctx: DistContext,
    check: Callable[[Batch], None],
    step: Callable[[Batch], None],
    progress: Progress | None = None,
) -> None:
    """Calls ``check(batch)`` then ``step(batch)`` for each batch, ``model`` in eval mode.

    ``check`` raises :class:`DataError` for a file that stops the evaluation (else it notes the
    files skipped); the loop then ends and every rank raises that error (:meth:`DistContext.
    raise_together`), so the task reduces its sums only after a loop all ranks finished.
    ``progress`` is advanced once a batch and closed; the model's mode is restored however the
    loop ends.
    """
    error = None
    try:
        with eval_mode(model):
            for batch in batches:
                try:
                    check(batch)
                except DataError as err:
                    error = err
                    break
                step(batch)
                if progress is not None:
                    progress.update()
    finally:
        if progress is not None:
            progress.close()
    ctx.raise_together(error)
