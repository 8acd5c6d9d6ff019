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

from ..atomic import check_output_folder, output_error
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
    that cannot be written (a file on its way, a full disk) is a one-line ``OutputError``.
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
    try:
        _write_digits(digits.images, digits.target, tmp)
    except OSError as err:  # a full disk: no half-written folder left behind, and a line, not a traceback
        shutil.rmtree(tmp, ignore_errors=True)
        error = output_error(root, err)
        if error is None:
            raise
        raise error from None
    except BaseException:  # Ctrl-C: no half-written folder left behind either
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first (the target exists and is not empty)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / _DONE).is_file():
            raise
    return root


def _write_digits(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    """The digits ``images`` (8x8, values 0..16) as 32x32 PNGs in ``folder/{train,val}/<label>/``,
    then the mark that says the folder is complete."""
    seen = np.zeros(DIGITS_CLASSES, dtype=int)
    for index, (pixels, label) in enumerate(zip(images, labels)):
        split = "val" if seen[label] % VAL_EVERY == VAL_EVERY - 1 else "train"
        seen[label] += 1
        gray = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC).convert("RGB")
        class_folder = folder / split / str(label)
        class_folder.mkdir(parents=True, exist_ok=True)
        image.save(class_folder / f"{index:04d}.png")
    (folder / _DONE).write_text(f"{len(labels)} images\n")
