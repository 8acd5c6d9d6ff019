"""Errors that mean "the user's input is wrong" (the CLI prints them as one line)."""

from __future__ import annotations

__all__ = ["UserInputError", "CheckpointError", "one_line", "listing"]


class UserInputError(ValueError):
    """Bad input (file, image, size, option): the message says what and how to fix it."""


class CheckpointError(UserInputError):
    """A checkpoint file that cannot be read or does not fit the model."""


def one_line(message: object, limit: int = 600) -> str:
    """``message`` as one line of at most ``limit`` characters (a multi-line error from a
    library, e.g. a checkpoint's list of mismatched keys, joined for the CLI's one line)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def listing(names: list[str], limit: int = 4) -> str:
    """The first ``limit`` of ``names`` joined for a message, and how many more there are:
    "a, b, c and 5 more"."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
