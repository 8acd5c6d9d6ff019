"""Semantic-segmentation data: image folders paired with PNG label maps.

Two layouts:

- ADE20K (``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
  ``annotations/{training,validation}/*.png``; the path given may be that folder or its
  parent). Label value 0 means "unlabelled", so labels are *reduced* (mmseg's
  ``reduce_zero_label``): 0 -> 255 (ignored), ``v`` -> ``v - 1``; 255 stays 255. The classes
  are the 150 ADE20K classes, or those listed one per line in ``classes.txt`` beside
  ``images/`` (how the synthetic set of :mod:`.synthetic` names its own classes).
- Any image folder with a label folder holding ``<same relative path and stem>.png`` and a
  class list (a text file, one name per line, or a list): values are class indices as they
  are, 255 = ignore, no reduction.

Label maps are single-channel PNGs read as stored values (mode ``L``, ``P`` palette indices,
1-bit, 16- or 32-bit integer; an opaque RGB(A) or LA file of equal channels as its grey values; a
32-bit float one, a TIFF, where every value is whole); they are never colour-converted. With
``label_colours`` (one colour per class, :mod:`.colours`) every RGB(A) label map is colour-coded:
each pixel's colour gives its class, grey ones too; single-channel maps and LA still read as
stored values, ``P`` ones too unless their palette shows every index used in a listed colour. Images honour their EXIF orientation and are converted to RGB
(grayscale, palette, alpha).

Bad data is a one-line :class:`crossformer.data.DataError` naming the file: an image without
its annotation or an annotation without its image (at construction), a label value out of
range, image/label size mismatch, a colour label map (without ``label_colours``; with them, a
colour they do not list). Unreadable images and label maps are
reported, not raised, by ``__getitem__`` (loader workers cannot print one-line errors);
:func:`check_batch` raises them in the main process or, with ``skip_corrupt``, counts and
names them.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data import IMG_EXTENSIONS, DataError, leave_out_folder, list_images, load_class_list, open_image
from ..data.folder import SKIP_HINT, UNREADABLE_ERRORS, find_images, no_images_error, opened, unreadable_reason
from ..errors import listing
from .classes import ade_classes, find_ade_root
from .colours import COLOUR_MODES, LabelColours, hex_colour
from ..data.draw import class_colours
from .transforms import IGNORE_INDEX

__all__ = [
    "ADE_SPLITS", "SegSample", "SegBatch", "SegmentationDataset", "EvaluationStops",
    "find_ade_root", "ade_classes", "ade20k_dataset", "load_class_list", "read_image", "read_label", "reduce_zero_label",
    "collate_segmentation", "check_batch", "skipped_file", "absent_classes_note", "ABSENT_SCORES",
]

# Our split names -> ADE20K's folder names.
ADE_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
LABEL_SUFFIX = ".png"  # a label map's name: its image's stem and this (mmseg's seg_map_suffix)
JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif")
JPEG_FORMATS = ("JPEG", "MPO")  # what PIL calls a JPEG file, whatever its name
LOSSY_LABELS = "JPEG's compression changes class values along every border"
LABEL_MODES = ("1", "L", "P", "I;16", "I;16B", "I;16L", "I")  # "1": a two-class mask saved from a bool array


def read_image(path: str | Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB, EXIF orientation applied; DataError if unreadable."""
    return np.asarray(open_image(path)).copy()


def _grey_values(img: Image.Image) -> np.ndarray | None:
    """The grey values of an RGB, RGBA or LA (grey + alpha) image whose colour channels are
    equal and alpha opaque at every pixel (a grey label map some tools save so: no colour to
    mistake for a class, no transparency to lose), else None."""
    if img.mode not in ("RGB", "RGBA", "LA"):
        return None
    pixels = np.asarray(img)
    if img.mode != "RGB" and (pixels[..., -1] != 255).any():
        return None
    colour = pixels[..., :1] if img.mode == "LA" else pixels[..., :3]
    grey = pixels[..., 0]
    return grey if (colour == grey[..., None]).all() else None


def _refused_mode(img: Image.Image) -> str:
    """What makes ``img`` (a mode that :func:`_grey_values` did not read) no label map: its
    transparency, its colours, or its mode."""
    bands = img.getbands()
    if "A" in bands and img.getextrema()[bands.index("A")][0] < 255:
        return f"has transparent pixels (mode {img.mode}), which a class index cannot hold"
    if img.mode in COLOUR_MODES:
        return (f"holds colours (mode {img.mode}): to read colour-coded maps, list each class's [R, G, B] in "
                "data.label_colours (in class order), or save class indices as a single-channel PNG (mode L or P)")
    return f"has mode {img.mode}; label maps must be single-channel PNGs (mode L or P) holding class indices"


def _whole_values(img: Image.Image, path: str | Path) -> np.ndarray:
    """A 32-bit float label map (mode F: a TIFF some tools write) as ``(H, W)`` int64 where every
    value is a whole number, as class indices are; a DataError naming the first that is not
    (values a resize interpolated between classes)."""
    values = np.asarray(img, dtype=np.float64)
    whole = np.isfinite(values) & (values == np.round(values))
    if not whole.all():
        raise DataError(f"label map {path} is a 32-bit float image holding {values[~whole].flat[0]:g}, not a class index: "
                        "resize label maps with nearest-neighbour and save the class indices as an 8-bit PNG (mode L)")
    return values.astype(np.int64)


def read_label(path: str | Path, colours: LabelColours | None = None) -> np.ndarray:
    """A label map's stored values as ``(H, W)`` int64 (an RGB file of three equal channels: one
    of them; a float one of whole values: those); DataError if unreadable or colour. With
    ``colours``, an RGB(A) file is colour-coded: the values an index map would store for its
    colours (grey ones too: black and grey are classes' colours in many data sets); so is a
    palette (P) file whose palette shows every index it uses in a listed colour."""
    try:
        with opened(path) as img:  # the reasons and warnings of every input image
            if img.format in JPEG_FORMATS:  # a .jpg renamed .png: its values are no longer the classes drawn
                raise DataError(f"label map {path} is a JPEG file ({LOSSY_LABELS}); save the class indices as PNG")
            if colours is not None and img.mode in COLOUR_MODES:
                if img.mode == "RGBA" and img.getextrema()[3][0] < 255:
                    raise DataError(f"label map {path} {_refused_mode(img)}")
                return colours.values(img, path)
            coloured = colours.palette_values(img) if colours is not None and img.mode == "P" else None
            if coloured is not None:  # an editor's indexed save of a colour-coded map
                return coloured
            grey = _grey_values(img)
            if grey is not None:
                return grey.astype(np.int64)
            if img.mode == "F":
                return _whole_values(img, path)
            if img.mode not in LABEL_MODES:
                raise DataError(f"label map {path} {_refused_mode(img)}")
            return np.asarray(img).astype(np.int64)
    except DataError:
        raise
    except UNREADABLE_ERRORS as err:  # a missing file too: a pair deleted since its listing is skipped alike
        raise DataError(f"cannot read label map {path}: {unreadable_reason(err)}{SKIP_HINT}") from None


def _label_files(label_dir: Path, image_dir: Path, suffix: str = LABEL_SUFFIX) -> dict[Path, Path]:
    """The label maps under ``label_dir`` (not in ``image_dir``, where that lies inside it) by
    their path relative to it less ``suffix`` (``a_mask.png`` -> ``a`` for ``_mask.png``), the
    suffix in any case (``.PNG`` as some tools and cameras write it)."""
    found: dict[Path, Path] = {}
    for path in leave_out_folder(list_images(label_dir), label_dir, image_dir):
        if not path.name.lower().endswith(suffix.lower()) or len(path.name) == len(suffix):
            continue
        stem = path.relative_to(label_dir).with_name(path.name[: -len(suffix)])
        if stem in found:  # a.png and a.PNG, both there on a case-sensitive file system
            raise DataError(f"{found[stem]} and {path} are two annotations of one image: keep one of them")
        found[stem] = path
    return found


def _missing_annotation(image: Path, expected: Path, stem: str) -> str:
    """Why ``image`` has no label map at ``expected`` (``<stem><suffix>``), naming a label map
    of that name in another format (only PNGs are read), or one of the stem and another suffix."""
    base = expected.name[: -len(".png")]
    others = sorted(p for p in expected.parent.glob(f"{glob.escape(base)}.*")
                    if p.stem == base and p.suffix.lower() in IMG_EXTENSIONS)
    if not others:
        # a_mask.png, a-label.png (not a1.png: another image's)
        named = sorted(p.name for p in expected.parent.glob(f"{glob.escape(stem)}[_-]*.png"))
        hint = (f", found {named[0]}: where label maps are named so, pass data.label_suffix={named[0][len(stem):]}"
                if named else "")
        return f"image {image} has no annotation: expected {expected}{hint}"
    lossy = others[0].suffix.lower() in JPEG_EXTENSIONS
    why = f" ({LOSSY_LABELS})" if lossy else ""
    return (f"image {image} has no annotation: expected {expected}, found {others[0].name}; label maps are read "
            f"from PNGs only{why}: save the class indices as PNG")


def _orientation_note(path: str, image: np.ndarray) -> str:
    """Where the image's EXIF orientation turned it, what the file stores: a viewer that ignores
    the tag shows both files at one size, and the mismatch would make no sense."""
    with opened(path) as img:
        stored = img.size
    if stored == (image.shape[1], image.shape[0]):
        return ""
    return f" as its EXIF orientation turns it (stored {stored[0]}x{stored[1]}: rotate the label map or drop the tag)"


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255, ``v`` -> ``v - 1``, 255 stays 255."""
    out = label - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


class SegSample(NamedTuple):
    """One item: ``image`` (3, H, W) (uint8 untransformed, float32 transformed), ``label``
    (H, W) int64 (reduced; 255 = ignore), ``meta`` (``path``, ``label_path``, ``ori_shape``
    and what the transform drew). On a problem ``image``/``label`` are None and ``error`` says
    what (naming the file); ``fatal`` errors (bad labels, sizes) are never skipped."""

    image: torch.Tensor | None
    label: torch.Tensor | None
    meta: dict[str, Any]
    error: str | None = None
    fatal: bool = False


class SegBatch(NamedTuple):
    """``images`` (B, 3, H, W), ``labels`` (B, H, W) int64, ``metas``; ``unreadable`` lists
    the unreadable files (skippable) and ``invalid`` the bad-data messages (always errors)."""

    images: torch.Tensor
    labels: torch.Tensor
    metas: list[dict[str, Any]]
    unreadable: list[str]
    invalid: list[str]


Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]


class SegmentationDataset(Dataset):
    """Image/label pairs of one folder pair.

    ``transform(image (H, W, 3) uint8, label (H, W) uint8) -> (image, label, meta)`` (e.g.
    :class:`.transforms.SegTrainTransform`); without one an item holds the image as a
    ``(3, H, W)`` uint8 tensor and the label at the image's own size (evaluation resizes).
    An image's label map is ``<its relative path and stem><label_suffix>`` in ``label_dir``
    (``a.jpg`` -> ``a.png``, or ``a_mask.png`` with ``label_suffix="_mask.png"``; any case).
    ``label_colours`` (one ``[R, G, B]`` per class) reads colour-coded label maps, each of
    ``ignore_colours`` as 255 (:class:`.colours.LabelColours`); they are the overlays' colours
    too unless ``palette`` gives others.
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path,
        classes: str | Path | Sequence[str],
        reduce_zero_label: bool = False,
        transform: Transform | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        label_suffix: str = LABEL_SUFFIX,
        label_colours: Sequence[Sequence[int]] | None = None,
        ignore_colours: Sequence[Sequence[int]] = (),
    ) -> None:
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        for folder, what in ((self.image_dir, "image"), (self.label_dir, "annotation")):
            if not folder.is_dir():
                raise DataError(f"{what} folder not found: {folder}")
        if self.image_dir.resolve() == self.label_dir.resolve():  # each label map would be read as an image too
            raise DataError(f"images and label maps share the folder {self.image_dir}: keep them in separate folders")
        self.classes = load_class_list(classes)
        # counted from 1 (reduce-zero-label), class 254 would be stored as 255 and read as ignored
        most = IGNORE_INDEX - 1 if reduce_zero_label else IGNORE_INDEX
        if len(self.classes) > most:
            counted = ", counted from 1 (reduce_zero_label)," if reduce_zero_label else ""
            raise DataError(f"{len(self.classes)} classes: label maps{counted} hold at most {most} classes (255 = ignore)")
        if len(self.classes) == 1:  # every pixel's argmax would be it: a loss of 0 and an mIoU of 100 that mean nothing
            raise DataError(f"the class list names one class ({self.classes[0]!r}); a segmentor chooses a class per pixel, "
                            f"so list at least two: add 'background' (label value 0) before {self.classes[0]!r} (value 1)")
        # colour k is class k, stored as k + 1 where label maps count classes from 1
        self.label_colours = None if label_colours is None else LabelColours(
            label_colours, ignore_colours, len(self.classes), offset=1 if reduce_zero_label else 0)
        if palette is None and self.label_colours is not None:  # the classes' colours, drawn as they are read
            palette = self.label_colours.colours
        self.palette = class_colours(palette, len(self.classes), "data.palette")
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        # label maps in a subfolder of the images (or images under the labels) are no images
        found = find_images(self.image_dir)
        images, self.left_out = (leave_out_folder(files, self.image_dir, self.label_dir)
                                 for files in (found.images, found.left_out))  # .heic...: left_out_line names them
        if not images:
            raise no_images_error(f"no images in {self.image_dir}", self.left_out)
        label_files = _label_files(self.label_dir, self.image_dir, label_suffix)
        self.samples: list[tuple[str, str]] = []
        paired: dict[Path, str] = {}  # annotation -> its image: one annotation scored twice skews every metric
        for image in images:
            stem = image.relative_to(self.image_dir).with_suffix("")
            label = label_files.get(stem)
            if label is None:
                raise DataError(_missing_annotation(image, self.label_dir / stem.parent / (stem.name + label_suffix), stem.name))
            if label in paired:
                raise DataError(f"images {paired[label]} and {image} share the annotation {label} (one name, two "
                                "extensions): keep one of them")
            paired[label] = str(image)
            self.samples.append((str(image), str(label)))
        # an annotation left unpaired means a lost image, or one of a format this build cannot read
        unread = {image.relative_to(self.image_dir).with_suffix(""): image for image in self.left_out}
        for stem, label in label_files.items():
            if label in paired:
                continue
            if stem in unread:
                raise DataError(f"annotation {label} has no image this build can read, only {unread[stem]}: "
                                "convert it to JPEG or PNG")
            raise DataError(f"annotation {label} has no image: expected {self.image_dir / stem}.jpg (or .png, "
                            ".jpeg, ...); add the image or move the annotation away")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image (H, W, 3) uint8, label (H, W) uint8 reduced)``, checked; DataError otherwise."""
        image_path, label_path = self.samples[index]
        image, raw = read_image(image_path), read_label(label_path, self.label_colours)
        if raw.shape != image.shape[:2]:
            raise DataError(
                f"label map {label_path} is {raw.shape[1]}x{raw.shape[0]} but its image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]} (width x height){_orientation_note(image_path, image)}; they must match"
            )
        highest = self.num_classes if self.reduce_zero_label else self.num_classes - 1
        bad = raw[(raw > highest) & (raw != IGNORE_INDEX) | (raw < 0)]
        if bad.size:
            valid = f"0 (unlabelled), 1-{highest}" if self.reduce_zero_label else f"0-{highest}"
            # one past the last class: most likely classes counted from 1, as ADE20K's
            hint = ("; if 0 means unlabelled and classes count from 1, pass data.reduce_zero_label=true"
                    if not self.reduce_zero_label and int(bad.max()) == self.num_classes else "")
            raise DataError(
                f"label map {label_path} holds value {int(bad.max())}, out of range for {self.num_classes} classes "
                f"(valid: {valid}, 255 = ignore){hint}"
            )
        label = reduce_zero_label(raw) if self.reduce_zero_label else raw
        return image, label.astype(np.uint8)

    def __getitem__(self, index: int) -> SegSample:
        image_path, label_path = self.samples[index]
        meta: dict[str, Any] = {"path": image_path, "label_path": label_path}
        try:
            image, label = self.load(index)
        except DataError as err:
            return SegSample(None, None, meta, str(err), fatal=not str(err).startswith("cannot read"))
        meta["ori_shape"] = image.shape[:2]
        if self.transform is None:
            return SegSample(torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label).long(), meta)
        tensor, target, drawn = self.transform(image, label)
        meta.update(drawn)
        return SegSample(tensor, target, meta)


def ade20k_dataset(
    root: str | Path, split: str = "training", transform: Transform | None = None,
    palette: Sequence[Sequence[int]] | None = None, label_colours: Sequence[Sequence[int]] | None = None,
    ignore_colours: Sequence[Sequence[int]] = (),
) -> SegmentationDataset:
    """An ADE20K-layout split (``training``/``train`` or ``validation``/``val``), reduced labels.

    Classes: ``classes.txt`` beside ``images/`` if present (palette generated), otherwise the
    150 ADE20K classes with mmseg's palette; ``palette``, else ``label_colours``, replaces either.
    """
    ade = find_ade_root(root)
    if split not in ADE_SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(ADE_SPLITS)}")
    folder = ADE_SPLITS[split]
    classes, own_palette = ade_classes(ade)
    if palette is None and label_colours is None:
        palette = own_palette
    return SegmentationDataset(
        ade / "images" / folder, ade / "annotations" / folder, classes, reduce_zero_label=True,
        transform=transform, palette=palette, label_colours=label_colours, ignore_colours=ignore_colours,
    )


class EvaluationStops(Dataset):
    """What would stop an evaluation at each sample of ``dataset``, read as evaluation reads it:
    a bad label map (a value out of range, another size than its image) or, unless
    ``skip_corrupt``, an unreadable file; None for a good sample. With it, the sample's label
    value counts ``(256,)`` (reduced values: classes and 255; zeros where it was not read).
    Loader workers hand back these, not the decoded pixels."""

    def __init__(self, dataset: SegmentationDataset, skip_corrupt: bool) -> None:
        self.dataset, self.skip_corrupt = dataset, skip_corrupt

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str | None, np.ndarray]:
        sample = self.dataset[index]
        stop = sample.error if sample.fatal or not self.skip_corrupt else None
        if sample.label is None:
            return stop, np.zeros(IGNORE_INDEX + 1, np.int64)
        return stop, np.bincount(sample.label.flatten().numpy(), minlength=IGNORE_INDEX + 1)


# How a class that no label map holds is scored (mmseg's rule): said by the warning and the table.
ABSENT_SCORES = ("Acc reads nan, and IoU 0 where the model predicts the class (counted in mIoU), "
                 "else nan (left out of it)")


def absent_classes_note(counts: Sequence[float], dataset: SegmentationDataset) -> str | None:
    """A line naming the classes that no label map of ``dataset`` holds (``counts``: pixels per
    label value, summed as :class:`EvaluationStops` or :meth:`.evaluate.SegMetrics.label_counts`
    gives them), or None when every class occurs: the warning of training's data check and of
    ``crossformer evaluate``. Where one class alone occurs beside 255, it says so: masks saved
    as 0/255 store every object as "ignored"."""
    absent = [c for c in range(dataset.num_classes) if counts[c] == 0]
    if not absent:
        return None
    offset = 1 if dataset.reduce_zero_label else 0  # the value stored in the files
    colours = dataset.label_colours
    named = listing([f"{dataset.classes[c]!r} (value {c + offset}"
                     + (f", colour {hex_colour(colours.colours[c])})" if colours is not None else ")") for c in absent], 3)
    line = f"no label map in {dataset.label_dir} holds class{'' if len(absent) == 1 else 'es'} {named}: {ABSENT_SCORES}"
    ignored = counts[IGNORE_INDEX] / max(sum(counts), 1)
    if ignored and dataset.num_classes - len(absent) <= 1:
        line += (f"; {ignored:.0%} of the pixels are 255 (ignored), the rest one class: store each object as its class "
                 "value (a mask saved as 0/255 stores it as ignored)")
    return line


def collate_segmentation(samples: Sequence[SegSample]) -> SegBatch:
    """Stack the good samples (all of one size: transformed crops, or batch size 1); list the rest."""
    good = [s for s in samples if s.error is None]
    unreadable = [s.error for s in samples if s.error is not None and not s.fatal]
    invalid = [s.error for s in samples if s.error is not None and s.fatal]
    if not good:
        return SegBatch(torch.empty(0, 3, 0, 0), torch.empty(0, 0, 0, dtype=torch.long), [], unreadable, invalid)
    if len({tuple(s.image.shape) for s in good}) > 1:
        raise ValueError("samples of different sizes cannot be batched: untransformed data sets need batch size 1")
    return SegBatch(
        torch.stack([s.image for s in good]), torch.stack([s.label for s in good]), [s.meta for s in good], unreadable, invalid
    )


def skipped_file(failure: str) -> str:
    """An unreadable file's error without the advice to skip it: ``cannot read image PATH: reason``."""
    return failure.removesuffix(SKIP_HINT)


def validation_file(line: str) -> str:
    """A skipped file's line (``cannot read image PATH: reason``, as :func:`skipped_file` gives
    it; or ``label map``) as the log names an unreadable validation file: ``file PATH: reason``,
    the words of training's data check, which reads headers without telling an image from a
    label map. Evaluation names it so too, and the run counts it once."""
    for kind in ("image", "label map"):
        if line.startswith(f"cannot read {kind} "):
            return "file " + line[len(f"cannot read {kind} "):]
    return line


def check_batch(batch: SegBatch, skip_corrupt: bool, on_skip: Callable[[str], None] | None = None) -> int:
    """Raise the batch's first bad-data error; raise on unreadable files unless ``skip_corrupt``,
    in which case ``on_skip`` is given each (``cannot read image PATH: reason``, no advice) and
    their number returned."""
    if batch.invalid:
        raise DataError(batch.invalid[0])
    if batch.unreadable and not skip_corrupt:
        raise DataError(batch.unreadable[0])
    if on_skip is not None:
        for failure in batch.unreadable:
            on_skip(skipped_file(failure))
    return len(batch.unreadable)
