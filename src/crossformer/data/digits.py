"""The built-in data set: scikit-learn's handwritten digits as an ImageNet-layout folder.

1797 labelled 8x8 grayscale digits ship inside scikit-learn. They are written once as
32x32 PNGs to ``$CROSSFORMER_CACHE/digits`` (default ``~/.cache/crossformer/digits``) so
that the demo goes through the same folder-loading code as real data.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import check_output_folder
from ..errors import UserInputError

__all__ = ["digits_root", "prepare_digits", "DIGITS_SIZE", "DIGITS_CLASSES"]

DIGITS_SIZE = 32
DIGITS_CLASSES = 10  # the digits 0..9, one class folder each
# Every 5th image of each class is held out: a fixed, stratified 80/20 split.
VAL_EVERY = 5
_DONE = ".complete"


def digits_root(cache_dir: str | Path | None = None) -> Path:
    base = cache_dir or os.environ.get("CROSSFORMER_CACHE") or Path.home() / ".cache" / "crossformer"
    return Path(base) / "digits"


def prepare_digits(cache_dir: str | Path | None = None) -> Path:
    """The digits folder (``train/0..9``, ``val/0..9``), written on first use; returns its root.

    Writing goes to a temporary folder renamed into place, so concurrent callers (several
    ranks) and interrupted writes never leave a half-written data set behind. A cache folder
    that cannot be written (a file on its way) is a one-line ``OutputError``.
    """
    root = digits_root(cache_dir)
    if (root / _DONE).is_file():
        return root
    check_output_folder(root.parent)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserInputError(
            "the built-in digits data set needs scikit-learn: pip install 'crossformer[demo]' (or pass --data PATH)"
        ) from None
    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    seen = np.zeros(DIGITS_CLASSES, dtype=int)
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if seen[label] % VAL_EVERY == VAL_EVERY - 1 else "train"
        seen[label] += 1
        gray = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)  # values are 0..16
        image = Image.fromarray(gray, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC).convert("RGB")
        folder = tmp / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:04d}.png")
    (tmp / _DONE).write_text(f"{len(digits.target)} images\n")
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first (the target exists and is not empty)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / _DONE).is_file():
            raise
    return root
