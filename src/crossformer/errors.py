"""Errors that mean "the user's input is wrong" (the CLI prints them as one line)."""

from __future__ import annotations

__all__ = ["UserInputError", "CheckpointError"]


class UserInputError(ValueError):
    """Bad input (file, image, size, option): the message says what and how to fix it."""


class CheckpointError(UserInputError):
    """A checkpoint file that cannot be read or does not fit the model."""
