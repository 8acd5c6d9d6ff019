"""Class names from a list or a text file, read without torch: a config's class count is
checked while the command line reads it (``data.classes``, ``data.label_colours``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import DataError

__all__ = ["load_class_list"]


def load_class_list(classes: str | Path | Sequence[str]) -> list[str]:
    """Class names from a list or a text file (one per line, blank lines ignored)."""
    if isinstance(classes, (str, Path)):
        path = Path(classes)
        if not path.is_file():
            raise DataError(f"class list not found: {path} (expected a text file with one class name per line)")
        # utf-8-sig: a byte-order mark (Windows editors) is no part of the first class's name
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    else:
        names = [str(c) for c in classes]
    where = f" {classes}" if isinstance(classes, (str, Path)) else ""  # a file is named; a list is its own text
    if not names:
        raise DataError(f"the class list{where} is empty")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"class {dup!r} is listed twice in the class list{where}")
    return names
