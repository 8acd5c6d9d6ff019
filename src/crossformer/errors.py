"""Errors that mean "the user's input is wrong" (the CLI prints them as one line)."""

from __future__ import annotations

__all__ = ["UserInputError"]


class UserInputError(ValueError):
    """Bad input (file, image, size, option): the message says what and how to fix it."""
