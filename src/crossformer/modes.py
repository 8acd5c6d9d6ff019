"""Train/eval mode for the length of a ``with`` block: evaluation, prediction, FLOP counting and
export all run a model in eval mode and hand it back in the mode it came in."""

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block, its own mode (train or eval) restored after, on errors too."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
