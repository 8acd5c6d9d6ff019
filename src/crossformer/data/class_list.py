"""Class names from a list or a text file, read without torch: a config's class count is
checked while the command line reads it (``data.classes``, ``data.label_colours``)."""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path
from typing import Sequence

from ..errors import DataError

__all__ = ["load_class_list", "first_category_difference"]


def load_class_list(classes: str | Path | Sequence[str]) -> list[str]:
    """Class names from a list or a text file (one per line; blank lines at its end ignored).

    A blank line among the names is an error: a line's place is its class's index, so skipping
    it would shift every class after it (one left blank for an unused label value)."""
    if isinstance(classes, (str, Path)):
        path = Path(classes)
        if not path.is_file():
            raise DataError(f"class list not found: {path} (expected a text file with one class name per line)")
        # utf-8-sig: a byte-order mark (Windows editors) is no part of the first class's name
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        blank = next((number for number, line in enumerate(lines, start=1) if not line), None)
        if blank is not None:  # (one among names: the trailing ones are gone)
            raise DataError(f"line {blank} of the class list {path} is blank: a line's place is its class's index, so "
                            f"give every class a name (e.g. 'unused') or remove the line")
        names = [line for line in lines if line]
    else:
        names = [str(c) for c in classes]
    where = f" {classes}" if isinstance(classes, (str, Path)) else ""  # a file is named; a list is its own text
    if not names:
        raise DataError(f"the class list{where} is empty")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"class {dup!r} is listed twice in the class list{where}")
    return names


def first_category_difference(found: Sequence[str], expected: Sequence[str], found_in: str, expected_in: str) -> str | None:
    """Where two category name lists in label order first differ, as "label 4 is 'star' in the
    file, 'étoile ★' in the checkpoint" (``found_in``, ``expected_in``; "none" past the end of
    the shorter); None where they agree."""
    for label, (one, other) in enumerate(zip_longest(found, expected)):
        if one != other:
            return (f"label {label} is {'none' if one is None else repr(one)} in {found_in}, "
                    f"{'none' if other is None else repr(other)} in {expected_in}")
    return None
