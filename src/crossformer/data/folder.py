"""ImageNet-layout image folders: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``.

Classes come from ``train`` (sorted folder names, as torchvision's ``ImageFolder``); every
other split must hold exactly those classes, so a label can never silently mean another
class. Problems are :class:`DataError` with one line naming the file or folder.
"""

from __future__ import annotations

import os
import unicodedata
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError, features
from torch.utils.data import Dataset

from ..atomic import OutputError
from ..errors import DataError, listing

__all__ = ["DataError", "IMG_EXTENSIONS", "ImageFolderDataset", "ImageListing", "find_split", "find_images", "list_images",
           "left_out_line", "left_out_notes", "open_image", "read_or_skip", "opened", "read_rgb", "upright_rgb",
           "oriented_size",
           "size_difference", "unreadable_reason", "expand_image_paths", "expand_image_inputs", "output_paths", "unique_stem",
           "leave_out_folder", "training_classes"]

ALWAYS_READ_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
                          ".pbm")
# Formats Pillow decodes only where it was built with their library (its wheels have them all,
# AVIF from 11.2), by Pillow's name of its module or codec
CODEC_EXTENSIONS = {"webp": (".webp",), "avif": (".avif",), "jpg_2000": (".jp2", ".j2k")}
# Image files that phones, cameras and editors write which Pillow does not read: left out of a
# folder's images, as a build without a codec leaves out its CODEC_EXTENSIONS, and named (left_out_line)
UNREAD_EXTENSIONS = (".heic", ".heif", ".hif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2",
                     ".svg", ".exr", ".hdr")
CONVERT_HINT = "convert {} to JPEG or PNG"  # what to do with images this build cannot read ("them", "it")
# The authors' loader calls the validation split "val"; some ImageNet copies use "validation".
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation")}
# What PIL raises for a file it cannot decode (truncated, wrong format, decompression bomb).
UNREADABLE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
EXIF_ORIENTATION = 0x0112  # the tag ImageOps.exif_transpose applies
# The advice that ends an unreadable image's error; a run that already skips such files drops it.
SKIP_HINT = "; fix or delete it, or pass --skip-corrupt to skip such files"


def find_split(root: str | Path, split: str) -> Path:
    """``ROOT/train`` or ``ROOT/val`` (also ``ROOT/validation``); ``~`` is the home folder, as
    training's config reads it (no shell expands it in ``data.root=~/...``)."""
    root = Path(root).expanduser()
    holds = f"the folder that holds {split}/<class>/<image>"
    if root.exists() and not root.is_dir():
        raise DataError(f"data {root} is a file, not a folder; give {holds}")
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (give {holds})")
    names = SPLIT_NAMES.get(split, (split,))
    for name in names:
        if (root / name).is_dir():
            return root / name
    is_split = any(root.name in aliases for aliases in SPLIT_NAMES.values())
    if is_split and any((root.parent / name).is_dir() for name in names):  # --data DATA/train for --data DATA
        raise DataError(f"{root} is itself a split folder, not the data folder that holds {names[0]}/: pass its "
                        f"parent, {root.parent}")
    raise DataError(f"{root} has no {' or '.join(n + '/' for n in names)} folder; expected {root}/{names[0]}/<class>/<image>")


def _decoded(codec: str) -> bool:
    """Whether this build's Pillow decodes ``codec``, a module or codec name (one an older Pillow
    does not know: no; ``features.check`` would warn)."""
    if codec in features.modules:
        return bool(features.check_module(codec))
    return codec in features.codecs and bool(features.check_codec(codec))


# The extensions a folder's images are found by: what this build reads
IMG_EXTENSIONS = ALWAYS_READ_EXTENSIONS + tuple(
    extension for codec, extensions in CODEC_EXTENSIONS.items() if _decoded(codec) for extension in extensions)
_LEFT_OUT_EXTENSIONS = tuple(
    extension for extensions in CODEC_EXTENSIONS.values() for extension in extensions if extension not in IMG_EXTENSIONS
) + UNREAD_EXTENSIONS


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMG_EXTENSIONS) and not Path(path).name.startswith(".")


def is_unread_image_file(path: str | Path) -> bool:
    """Whether ``path`` is an image by its extension (any case) that this build cannot read."""
    return str(path).lower().endswith(_LEFT_OUT_EXTENSIONS) and not Path(path).name.startswith(".")


@dataclass(frozen=True)
class ImageListing:
    """The files :func:`find_images` found, each list in sorted order."""

    images: list[Path]  # the images read (IMG_EXTENSIONS)
    left_out: list[Path]  # images by their extension that this build cannot read (.heic, ...)


def find_images(folder: Path) -> ImageListing:
    """Image files under ``folder`` (recursively, linked folders followed, hidden entries
    skipped) and, in the same walk, those left out as unreadable here. A link to a folder that
    holds it is a :class:`DataError`."""
    images, left_out = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        _refuse_link_loops(Path(dirpath), dirnames)
        for name in sorted(filenames):
            if is_image_file(name):
                images.append(Path(dirpath) / name)
            elif is_unread_image_file(name):
                left_out.append(Path(dirpath) / name)
    return ImageListing(images, left_out)


def list_images(folder: Path) -> list[Path]:
    """:func:`find_images`' images alone (label maps, say, where no photo is expected)."""
    return find_images(folder).images


def unread_files(left_out: Sequence[str | os.PathLike]) -> str:
    """The files of :attr:`ImageListing.left_out` for a message: "2 files this build cannot
    read: a.heic, b.jxl (convert them to JPEG or PNG)"."""
    count = f"{len(left_out)} file{'s' if len(left_out) != 1 else ''}"
    return f"{count} this build cannot read: {listing([str(p) for p in left_out])} ({CONVERT_HINT.format('them')})"


def left_out_line(left_out: Sequence[str | os.PathLike]) -> str:
    """The note of images left out as unreadable here: "left out 2 files this build cannot read: ..."."""
    return f"left out {unread_files(left_out)}"


def left_out_notes(*datasets: Any) -> list[str]:
    """A :func:`left_out_line` for each data set (its ``left_out`` list of paths) that left files
    out, for a run's log: training names them rather than learning without them unsaid."""
    return [left_out_line(dataset.left_out) for dataset in datasets if dataset.left_out]


def no_images_error(empty: str, left_out: Sequence[Path]) -> DataError:
    """``empty`` ("no images in folder X"), and where the folder holds only images this build
    cannot read, which: the one line for a folder of none read here."""
    return DataError(empty + (f": it holds only {unread_files(left_out)}" if left_out else ""))


def _refuse_link_loops(folder: Path, subfolders: list[str]) -> None:
    """Following a linked subfolder that resolves to ``folder`` or above would list the same
    images again at every level (os.walk stops only at the system's link limit), those of
    sibling class folders under this one's label."""
    here = None
    for name in subfolders:
        link = folder / name
        if not link.is_symlink():
            continue
        here = here or folder.resolve()
        target = link.resolve()
        if target == here or target in here.parents:
            raise DataError(f"{link} links to {target}, a folder that holds it (a loop); remove the link")


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """``(height, width)`` of an opened image as :func:`read_rgb` returns it, from its header:
    EXIF orientations 5-8 turn it a quarter."""
    width, height = img.size
    # a PNG's eXIf chunk precedes its pixels (PNG spec), but Pillow decodes them all to look further
    exif = img.getexif() if img.format != "PNG" or "exif" in img.info else {}
    return (width, height) if exif.get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (height, width)


def size_difference(size: tuple[int, int], expected: tuple[int, int], stored: tuple[int, int] | None = None) -> str | None:
    """Why an image of ``size`` (height, width, after EXIF orientation) is not the one an
    annotation file describes as ``expected``; None where they agree. ``stored``: its size
    before the orientation, named where the orientation turned it (a viewer or annotation tool
    that ignores the tag shows the stored image, so the mismatch would make no sense)."""
    if tuple(size) == tuple(expected):
        return None
    # (the orientation named only where it turned the image: else it sent users looking for a tag)
    turned = (f" (stored {stored[1]}x{stored[0]}, turned by its EXIF orientation: if the annotations are of the stored "
              f"image, drop the tag)" if stored is not None and tuple(stored) != tuple(size) else "")
    # width x height, as the annotation file's fields give it (the predict notes say height x width, as --img-size)
    return (f"its size {size[1]}x{size[0]} (width x height) differs from the annotation file's "
            f"{expected[1]}x{expected[0]}{turned}")


def unreadable_reason(err: BaseException) -> str:
    """Why a listed file could not be read, as an unreadable file's line gives it: "file not
    found" for one deleted since its listing (skipped with --skip-corrupt as a corrupt one is),
    a decompression bomb's limit, else the decoder's error."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, Image.DecompressionBombError):
        # Pillow's words call a large photo a "DOS attack" and say nothing of what to do
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return f"more than the {limit:,} pixels Pillow decodes (its guard against decompression bombs): downscale it"
    return str(err)


@contextmanager
def opened(path: str | Path) -> Iterator[Image.Image]:
    """``Image.open(path)`` (its header read, pixels not yet), as every input image is opened: an
    empty file says so, a file of no format Pillow knows says that without repeating its name.
    While it is open, Pillow's DecompressionBombWarning (89M-179M pixels: a 108-megapixel phone
    photo; above that its DecompressionBombError stands) and its "Corrupt EXIF data" warnings
    (camera maker notes; the pixels read) are not printed: each was a Python warning, not a line."""
    if os.path.getsize(path) == 0:  # FileNotFoundError for a missing one, as Image.open
        raise UnidentifiedImageError("the file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", message="(Possibly )?[Cc]orrupt EXIF", category=UserWarning)
        try:
            img = Image.open(path)
        except UnidentifiedImageError:
            raise UnidentifiedImageError(_no_format_reason(path)) from None
        with img:
            yield img


def _no_format_reason(path: str | Path) -> str:
    """Why Pillow found no image format in ``path``: its extension names a format this build
    cannot read (a .heic photo: saying its content is no image would be wrong), or its content."""
    if is_unread_image_file(path):
        return f"its format ({Path(path).suffix.lower()}) needs a codec this build lacks: {CONVERT_HINT.format('it')}"
    return "its content is no image format Pillow reads"


def read_rgb(path: str | Path) -> Image.Image:
    """The image file ``path`` as :func:`upright_rgb` makes it.
    ``FileNotFoundError`` and ``UNREADABLE_ERRORS`` pass through, for callers that name the
    file in their own message or count it."""
    with opened(path) as img:
        return upright_rgb(img)


def upright_rgb(img: Image.Image) -> Image.Image:
    """An opened image in RGB as it is meant to be seen: EXIF orientation applied, grayscale
    (8- or 16-bit, float), palette and alpha images converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):
        # 16-bit (or 32-bit integer) grayscale: Pillow's RGB conversion clips every value
        # above 255, so a 16-bit PNG would turn almost white; scale 0..65535 to 0..255
        gray = np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        img = Image.fromarray(gray, "L")
    elif img.mode == "F":
        img = Image.fromarray(_float_grey(np.asarray(img, dtype=np.float64)), "L")
    return img.convert("RGB")


def _float_grey(values: np.ndarray) -> np.ndarray:
    """A 32-bit float grayscale image (a TIFF scientific tools write) as 8-bit grey: values on
    0..1, the usual float convention, scaled by 255 (Pillow's conversion clipped them to a black
    image), values on 0..255 kept; any other range is a ValueError, an unreadable file, rather
    than an image clipped to black and white."""
    if not np.isfinite(values).all():
        raise ValueError("a 32-bit float image holding NaN or infinite values: save it as an 8-bit image")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise ValueError(f"a 32-bit float image with values from {low:g} to {high:g}, on neither 0..1 nor 0..255: "
                         "save it as an 8-bit image")
    return np.round(values * (255.0 if high <= 1.0 else 1.0)).astype(np.uint8)


def open_image(path: str | Path) -> Image.Image:
    """:func:`read_rgb`, with a one-line DataError for a missing or unreadable file (both
    skippable: a file listed and then deleted is skipped as a corrupt one)."""
    try:
        return read_rgb(path)
    except UNREADABLE_ERRORS as err:
        raise _unreadable(path, unreadable_reason(err)) from None


def _unreadable(path: str | Path, reason: str) -> DataError:
    return DataError(f"cannot read image {path}: {reason}{SKIP_HINT}")


def read_or_skip(path: str | Path, skip_corrupt: bool, note: Callable[[str], None] | None = None) -> Image.Image | None:
    """The predict commands' reading of one input: :func:`read_rgb`'s image; an unreadable file
    is :func:`open_image`'s one-line DataError, or with ``skip_corrupt`` None after
    ``note("skipped unreadable image PATH: reason")`` (without the advice to pass the flag given)."""
    try:
        return read_rgb(path)
    except UNREADABLE_ERRORS as err:
        reason = unreadable_reason(err)
        if not skip_corrupt:
            raise _unreadable(path, reason) from None
        if note is not None:
            note(f"skipped unreadable image {path}: {reason}")
        return None


def _class_folders(split_dir: Path) -> list[str]:
    """The class folders' names, sorted; a link whose target is gone (an unmounted drive) is
    a one-line :class:`DataError`, not a class silently left out of the labels (a link named
    as a file, ``notes.txt``, is passed over as a stray file is)."""
    entries = [d for d in split_dir.iterdir() if not d.name.startswith(".")]
    for entry in entries:
        if entry.is_symlink() and not entry.exists() and not entry.suffix[1:].isalnum():
            raise DataError(f"{entry} links to {os.readlink(entry)}, which does not exist: mount or restore it, or "
                            f"delete the link")
    return sorted(d.name for d in entries if d.is_dir())


def training_classes(root: str | Path) -> list[str]:
    """The classes training on ``root`` numbers (``ROOT/train``'s class folders, sorted), listed
    without opening an image; a :class:`DataError` when the folder or its ``train/`` is missing."""
    return _class_folders(find_split(root, "train"))


class ImageFolderDataset(Dataset):
    """``(image, class index)`` pairs of one split.

    Images are read upright (EXIF orientation applied), as predict reads them. ``__getitem__`` returns ``(transformed image, target, None)``, or ``(None, target, reason)``
    for an unreadable file, so that the caller (in the main process, not a loader worker)
    decides whether that is an error or a skip; see :func:`crossformer.data.collate_images`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        classes: Sequence[str] | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.split_dir = find_split(root, split)
        found = _class_folders(self.split_dir)
        loose = sorted(p.name for p in self.split_dir.iterdir() if p.is_file() and is_image_file(p))
        if not found:
            hint = f" (found {loose[0]} directly in it: put images in class subfolders)" if loose else ""
            raise DataError(f"{self.split_dir} has no class folders{hint}; expected {self.split_dir}/<class>/<image>")
        if loose:  # no class to label them with: refused rather than left out unsaid
            raise DataError(f"{self.split_dir / loose[0]} lies outside the class folders ({len(loose)} image(s) "
                            "there); move each into its class folder or delete it")
        self.classes = list(classes) if classes is not None else found
        if classes is not None:
            missing = [c for c in self.classes if c not in found]
            if missing:
                # a folder copied from macOS may spell "é" as "e" + accent: alike on screen, another name
                alike = {unicodedata.normalize("NFC", f): f for f in found}.get(unicodedata.normalize("NFC", missing[0]))
                how = (f" ({alike!r} has it in other Unicode characters: rename it as the training folder spells it)"
                       if alike is not None else "")
                raise DataError(f"{self.split_dir} lacks class folder {missing[0]!r} ({len(missing)} of "
                                f"{len(self.classes)} classes missing){how}; every split needs the training classes")
            extra = [c for c in found if c not in self.classes]
            if extra:
                raise DataError(f"{self.split_dir / extra[0]} is not a training class; remove it or add it to train/")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        self.left_out: list[Path] = []  # images of a format this build cannot read (.heic...): left_out_line names them
        for name in self.classes:
            found = find_images(self.split_dir / name)
            if not found.images:
                raise no_images_error(f"class folder {self.split_dir / name} holds no images ({', '.join(IMG_EXTENSIONS)})",
                                      found.left_out)
            self.samples.extend((str(p), self.class_to_idx[name]) for p in found.images)
            self.left_out.extend(found.left_out)
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        path, target = self.samples[index]
        try:
            # upright, as predict reads it: a model trained on phone photos sees them as predict will
            # (timm's ImageFolder reads the stored grid: the two differ only for files with an orientation tag)
            image = read_rgb(path)
        except UNREADABLE_ERRORS as err:
            return None, target, f"{path}: {unreadable_reason(err)}"
        return (self.transform(image) if self.transform else image), target, None


def expand_image_paths(
    paths: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[Path]:
    """Files as given (read by their content: a file the user names is an image whatever its
    extension), folders as the images inside them (by extension, recursively, sorted); one
    path (a str or a Path) is a list of that one, not of the characters of its name. A folder's
    search leaves out ``output_dir`` where it lies inside: a rerun would read its own outputs.
    Files of an image format this build cannot read (``.heic``...) are left out of a folder's
    images and named to ``on_note`` in one line; a folder holding only such files is a DataError."""
    return [file for file, _ in expand_image_inputs(paths, output_dir, on_note)]


def expand_image_inputs(
    paths: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[tuple[Path, Path]]:
    """:func:`expand_image_paths`' files, each with its path relative to the input that named it:
    below the folder given (``a/x.jpg`` of ``photos/a/x.jpg`` found in ``photos``), or a file's
    own name (see :func:`output_paths`)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[tuple[Path, Path]] = []
    left_out: list[Path] = []
    for path in (Path(p).expanduser() for p in paths):  # "~/x" quoted or after "=": no shell expanded it
        if path.is_dir():
            images, unread = _folder_inputs(path, output_dir)
            left_out.extend(unread)
            found.extend((image, image.relative_to(path)) for image in images)
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            raise DataError(f"no such image or folder: {path}")
    if left_out and on_note is not None:
        on_note(left_out_line(left_out))
    return found


def _folder_inputs(folder: Path, output_dir: str | os.PathLike | None) -> tuple[list[Path], list[Path]]:
    """The images of an input folder (less ``output_dir``) and the files left out as unreadable
    here; a DataError where it holds no image read here."""
    found = find_images(folder)
    images, left_out = found.images, found.left_out
    if output_dir is not None:
        images, left_out = (leave_out_folder(files, folder, output_dir) for files in (images, left_out))
    if not images:
        raise no_images_error(f"no images in folder {folder}", left_out)
    return images, left_out


def output_paths(inputs: Sequence[tuple[Path, Path]], output_dir: Path, endings: Sequence[str]) -> list[list[Path]]:
    """The files each of ``inputs`` (:func:`expand_image_inputs`) writes, one per ``endings``
    (".png"): ``output_dir``, its relative path less the extension, and the ending. So the
    outputs mirror the input folders: ``photos/a/x.jpg`` and ``photos/b/x.jpg`` write
    ``a/x.png`` and ``b/x.png``, not ``x.png`` and ``x_2.png``. Two inputs of one relative
    name (``x.jpg`` beside ``x.png``, or an ``x.jpg`` in each of two folders given) take ``x``,
    ``x_2``, ... (:func:`unique_stem`). An output that would replace an input (``predict photos
    --output photos``) is a one-line :class:`~crossformer.atomic.OutputError`, before any work."""
    taken: set[str] = set()
    stems = [output_dir / unique_stem(relative.with_suffix("").as_posix(), taken) for _, relative in inputs]
    outputs = [[stem.with_name(stem.name + ending) for ending in endings] for stem in stems]
    images = {file.resolve() for file, _ in inputs}
    clash = next((out for paths in outputs for out in paths if out.resolve() in images), None)
    if clash is not None:
        raise OutputError(f"{clash} is an input in the output folder {output_dir}, where an output would replace "
                          f"it; give --output another folder")
    return outputs


def leave_out_folder(files: list[Path], folder: Path, excluded: str | os.PathLike) -> list[Path]:
    """``files`` (listed under ``folder``) less those under ``excluded`` where that folder lies
    inside ``folder``: outputs written into an input folder, label maps kept under the images'."""
    excluded = Path(excluded).expanduser().resolve()
    if Path(folder).resolve() not in excluded.parents:
        return files
    return [file for file in files if excluded not in file.resolve().parents]


def unique_stem(stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ... when taken (two inputs of one name in different
    folders write separate outputs); the result joins ``taken``."""
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return name
