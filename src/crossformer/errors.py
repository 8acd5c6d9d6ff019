"""Errors that mean "the user's input is wrong" (the CLI prints them as one line)."""

from __future__ import annotations

__all__ = ["UserInputError", "CheckpointError", "one_line"]


class UserInputError(ValueError):
    """Bad input (file, image, size, option): the message says what and how to fix it."""


class CheckpointError(UserInputError):
    """A checkpoint file that cannot be read or does not fit the model."""


def one_line(message: object, limit: int = 600) -> str:
    """``message`` as one line of at most ``limit`` characters (a multi-line error from a
    library, e.g. a checkpoint's list of mismatched keys, joined for the CLI's one line)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."
