"""Errors that mean "the user's input is wrong" (the CLI prints them as one line)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

__all__ = ["UserInputError", "CheckpointError", "DataError", "PerformanceWarning", "one_line", "listing",
           "did_you_mean", "settings_that_fail"]


class UserInputError(ValueError):
    """Bad input (file, image, size, option): the message says what and how to fix it."""


class CheckpointError(UserInputError):
    """A checkpoint file that cannot be read or does not fit the model."""


class DataError(UserInputError):
    """A data set that is missing, malformed, or holds an unreadable image."""


class PerformanceWarning(UserWarning):
    """A setting that works but runs much slower here than the default would (the CLI prints
    it as one "warning:" line)."""


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


def did_you_mean(name: str, choices: Iterable[str], limit: int = 3) -> str:
    """``"did you mean a or b? "`` for the ``choices`` closest to a mistyped ``name`` (at most
    ``limit``), or ``""`` when none is close: the start of a message's hint."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=limit)
    return f"did you mean {' or '.join(close)}? " if close else ""


# What a model's constructor raises for settings it cannot take: its own checks raise
# ValueError (channels that do not split over the heads, one value per stage...), Python
# raises TypeError for an unknown or ill-typed keyword. Other exceptions are bugs.
SETTING_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError)


@contextmanager
def settings_that_fail(
    name: str, settings: Mapping[str, Any], img_size: tuple[int, int] | None = None,
    errors: tuple[type[Exception], ...] = SETTING_ERRORS,
) -> Iterator[None]:
    """Building model ``name`` from the user's ``settings`` (and input size ``img_size``,
    (H, W), where the block also runs it): one of ``errors`` becomes one
    :class:`UserInputError` line, "cannot build NAME with K=V, ... at HxW: reason".

    Only what the user gave can be at fault: with no settings and no size the model is built
    as registered, so an error is a bug of ours and keeps its traceback.
    """
    try:
        yield
    except UserInputError:
        raise
    except errors as err:
        if not settings and img_size is None:
            raise
        shown = ", ".join(f"{key}={value}" for key, value in settings.items()) or "its default settings"
        size = f" at {img_size[0]}x{img_size[1]}" if img_size is not None else ""  # HxW, as --img-size H W
        reason = one_line(err, 400) or type(err).__name__
        raise UserInputError(f"cannot build {name} with {shown}{size}: {reason}") from None
