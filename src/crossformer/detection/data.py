"""COCO-format detection data: annotations through pycocotools, images as the detectors take them.

Works on the COCO layout (``ROOT/annotations/instances_{train,val}2017.json`` beside
``ROOT/{train,val}2017/``) and on any COCO-format JSON plus an image folder. Follows
mmdetection 2.x's ``CocoDataset`` where it makes a choice:

- category ids are sorted and mapped to contiguous labels ``0..C-1`` (and back for results);
- crowd annotations (``iscrowd=1``) are never training targets (mmdet keeps them as
  ``gt_bboxes_ignore``, which its detectors' configs do not collect); COCOeval reads them
  from the annotation file itself;
- an annotation whose box has no area (``w < 1``, ``h < 1`` or ``area <= 0``) or lies wholly
  outside its image is dropped; a box partly outside is clipped to the image; both are counted
  and reported once through ``log``;
- training (``filter_empty_gt``) skips images without annotations and images smaller than
  32 pixels; evaluation keeps every image.

Things mmdet passes over silently but that mean the data is wrong are one-line
:class:`~crossformer.data.DataError` s: a file that is not COCO JSON, a category id missing
from ``categories``, an image file that does not exist, an image whose size differs from the
annotation file's. Unreadable images are reported per sample (``DetectionSample.failure``) so
the main process decides between an error and a counted skip (``--skip-corrupt``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from ..data import DataError, read_rgb, size_difference
from ..data.folder import UNREADABLE_ERRORS, opened, unreadable_reason
from ..errors import listing
from .config import SIZE_DIVISOR

__all__ = [
    "DetectionSample", "DetectionBatch", "CocoDetection", "collate_detection", "coco_paths", "load_coco_json", "decode_segmentation",
    "valid_polygons", "annotation_segmentation",
]

COCO_SPLITS = {"train": "train2017", "val": "val2017"}
# mmdet's CocoDataset._filter_imgs(min_size=32) in training.
MIN_TRAIN_IMAGE_SIZE = 32


@dataclass
class DetectionSample:
    """One image and its targets, carried through the transforms.

    ``image``: float32 (3, h, w), RGB in 0..255 until normalised. ``boxes``: float32 (N, 4) xyxy
    in the current image's pixels; ``labels``: int64 (N,) in 0..C-1; ``masks``: uint8 (N, h, w)
    or None when masks are not loaded. ``scale_factor``: (w / W0, h / H0) of the resizes so far.
    ``failure``: "path: reason" for an unreadable image (then ``image`` is None).
    """

    image: torch.Tensor | None
    boxes: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    image_id: int
    file_name: str
    ori_shape: tuple[int, int]
    scale_factor: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    failure: str | None = None

    @property
    def img_shape(self) -> tuple[int, int]:
        assert self.image is not None
        return int(self.image.shape[1]), int(self.image.shape[2])


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of ``split`` (train / val) in the COCO layout under ``root``."""
    root = Path(root)
    expected = ("expected the COCO layout annotations/instances_{train,val}2017.json with train2017/ and val2017/ "
                f"image folders, or name the files: data.{split}_ann=FILE data.{split}_images=FOLDER")
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} ({expected})")
    folder = COCO_SPLITS.get(split, split)
    ann_file = root / "annotations" / f"instances_{folder}.json"
    image_dir = root / folder
    if not ann_file.is_file():
        raise DataError(f"{root} has no annotations/{ann_file.name}; {expected}")
    if not image_dir.is_dir():
        raise DataError(f"{root} has no {folder}/ image folder beside {ann_file}")
    return ann_file, image_dir


# Field checks run once per value of COCO's 860k annotations: exact types (JSON gives int, float,
# str, list, bool and no subclasses) keep them cheap.
_NUMBER_TYPES = (int, float)
_NUMBER_TYPE_SET = set(_NUMBER_TYPES)  # for set(map(type, values)) <= ..., a check of many values in C


def _is_integer(value: Any) -> bool:
    return type(value) is int


def _is_side(value: Any) -> bool:
    """A positive whole number of pixels (some tools write 640.0)."""
    return type(value) in _NUMBER_TYPES and value >= 1 and float(value).is_integer()


def _is_number(value: Any) -> bool:
    return type(value) in _NUMBER_TYPES and math.isfinite(value)


def _is_box(value: Any) -> bool:
    # unrolled (the check's main cost); the sum is finite only where every coordinate is
    return (type(value) is list and len(value) == 4 and type(value[0]) in _NUMBER_TYPES and type(value[1]) in _NUMBER_TYPES
            and type(value[2]) in _NUMBER_TYPES and type(value[3]) in _NUMBER_TYPES
            and math.isfinite(value[0] + value[1] + value[2] + value[3]))


# What each field must hold: ids stay integers, since COCOeval matches results to images by id
# and a string id read as a number would match nothing.
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "id": (_is_integer, "an integer"),
    "image_id": (_is_integer, "an integer (an image's id)"),
    "category_id": (_is_integer, "an integer (a category's id)"),
    "file_name": (lambda v: type(v) is str and bool(v), "a non-empty path relative to the image folder"),
    "width": (_is_side, "a whole number of pixels, at least 1"),
    "height": (_is_side, "a whole number of pixels, at least 1"),
    "name": (lambda v: type(v) is str, "a string"),
    "bbox": (_is_box, "[x, y, width, height], 4 numbers"),
    "iscrowd": (lambda v: v in (0, 1), "0 or 1"),
    "area": (_is_number, "a number"),
}


def _check_fields(path: Path, kind: str, entries: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """A one-line :class:`DataError` naming the first entry whose ``key`` fails its check
    (KeyError or TypeError where an entry lacks a key or is not a mapping)."""
    for key in keys:
        check, expected = _FIELD_CHECKS[key]
        if not all(map(check, map(itemgetter(key), entries))):
            entry = next(entry for entry in entries if not check(entry[key]))
            raise DataError(f"{path}: an entry of '{kind}' (id {str(entry['id'])[:20]}) has {key} "
                            f"{repr(entry[key])[:60]}; it must be {expected}")


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """A COCO instances file as a dict, checked for the keys and fields detection needs; an
    annotation without ``iscrowd`` is not a crowd, one without ``area`` takes its box's."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows tools) is no part of the JSON
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not JSON ({err}); expected a COCO instances file") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise DataError(f"{path} is not a COCO instances file: it needs lists 'images', 'annotations' and 'categories'")
    for kind, keys in (("images", ("id", "file_name", "width", "height")), ("categories", ("id", "name")),
                       ("annotations", ("id", "image_id", "category_id", "bbox"))):
        try:
            _check_fields(path, kind, data[kind], keys)
        except (KeyError, TypeError):  # an entry without one of the keys, or not a mapping: name it
            entry, key = next((e, k) for e in data[kind] for k in keys if not isinstance(e, dict) or k not in e)
            raise DataError(f"{path}: an entry of '{kind}' lacks {key!r} ({str(entry)[:80]}); not COCO format") from None
        seen: set[Any] = set()
        for entry in data[kind]:  # pycocotools indexes each list by id: a repeated id loses an entry silently
            if entry["id"] in seen:
                raise DataError(f"{path}: id {entry['id']} appears twice in '{kind}'; ids must be unique")
            seen.add(entry["id"])
    for ann in data["annotations"]:  # optional in many exports; COCOeval reads both of every object
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])  # the box's, for lack of the mask's
    _check_fields(path, "annotations", data["annotations"], ("iscrowd", "area"))
    category_of_name: dict[Any, Any] = {}
    for category in data["categories"]:  # checkpoints and evaluation match classes by name: two of one name are one
        first = category_of_name.setdefault(category["name"], category["id"])
        if first != category["id"]:
            raise DataError(f"{path}: categories {first} and {category['id']} are both named {category['name']!r}; "
                            "give each category its own name")
    image_of_file: dict[str, Any] = {}
    for image in data["images"]:  # two entries of one file split its objects: each copy trains / evaluates on a part
        first = image_of_file.setdefault(image["file_name"], image["id"])
        if first != image["id"]:
            raise DataError(f"{path}: image {image['file_name']} is listed twice in 'images' (ids {first} and "
                            f"{image['id']}); list each image once, with all its annotations on its one id")
    return data


def valid_polygons(polygons: list[Any]) -> list[Any]:
    """The parts of a COCO polygon segmentation with 3 points or more (an even count of
    coordinates, at least 6), as mmdetection keeps them: pycocotools reads a 4-number part as
    a box and fails on shorter ones."""
    return [p for p in polygons if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]


def _is_coordinate_list(part: Any) -> bool:
    """A list of finite numbers (bools, strings and None are not); the sum is finite only where
    every value is."""
    return type(part) is list and set(map(type, part)) <= _NUMBER_TYPE_SET and math.isfinite(sum(part))


def _compressed_counts(counts: str | bytes) -> list[int] | None:
    """The run lengths of a compressed COCO RLE ``counts`` string, or None where it is not one.

    Each run length is written in 5-bit groups, lowest first, as characters ``'0' + group``:
    bit 0x20 says another group follows, bit 0x10 of the last group is the sign; from the fourth
    run on, the value written is the difference from the run two before.
    """
    if isinstance(counts, str) and not counts.isascii():
        return None
    codes = counts.encode() if isinstance(counts, str) else counts
    runs: list[int] = []
    value = shift = 0
    for code in codes:
        group = code - 48
        if not 0 <= group < 64:
            return None
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift
        runs.append(value + runs[-2] if len(runs) > 2 else value)
        value = shift = 0
    return runs if shift == 0 else None  # a group announcing another at the end is a cut string


def _is_run_lengths(runs: Any, pixels: int) -> bool:
    """Whole numbers, none negative, covering ``pixels`` exactly (pycocotools reads past the mask
    or leaves it partly unwritten otherwise)."""
    return (type(runs) is list and set(map(type, runs)) <= {int} and min(runs, default=0) >= 0
            and sum(runs) == pixels)


def checked_segmentation(segmentation: Any, height: int, width: int, where: str) -> Any:
    """``segmentation`` as :func:`decode_segmentation` takes it, or None when it holds no polygon.

    Polygons of fewer than 3 points are left out (:func:`valid_polygons`). A polygon list whose
    parts are not lists of numbers (a flat ``[x0, y0, ...]``, a string or null coordinate), an
    RLE whose ``size`` is not the image's or whose ``counts`` are not run lengths covering it, or
    a segmentation of another form, is a :class:`DataError` naming ``where`` (the file, annotation
    and image).
    """
    if isinstance(segmentation, list):
        if not all(isinstance(part, list) for part in segmentation):  # one polygon without the outer list
            raise DataError(f"{where} has a polygon segmentation that is not a list of polygons "
                            f"({str(segmentation)[:60]}); COCO format is [[x0, y0, x1, y1, ...], ...]")
        if not all(map(_is_coordinate_list, segmentation)):
            part = next(part for part in segmentation if not _is_coordinate_list(part))
            raise DataError(f"{where} has a polygon holding a value that is not a finite number "
                            f"({str(part)[:60]}); polygon coordinates are numbers of pixels")
        return valid_polygons(segmentation) or None
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes, list)):
        size, counts = segmentation.get("size"), segmentation["counts"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and set(map(type, size)) <= _NUMBER_TYPE_SET):
            raise DataError(f"{where} has an RLE segmentation whose 'size' is {json.dumps(size)[:40]}, not "
                            f"[height, width]; write [{height}, {width}], its image's")
        if list(size) != [height, width]:
            raise DataError(f"{where} has an RLE segmentation of size {str(size)[:40]}, but the image is "
                            f"{height}x{width} (height x width); fix the annotation's 'size' or the image's height/width")
        runs = counts if isinstance(counts, list) else _compressed_counts(counts)
        if not _is_run_lengths(runs, height * width):
            raise DataError(f"{where} has an RLE segmentation whose counts ({str(counts)[:60]}) are not run lengths "
                            f"(whole numbers, none negative) summing to its {height}x{width} pixels; "
                            f"re-encode the mask (pycocotools.mask.encode)")
        return segmentation
    raise DataError(f"{where} has a segmentation that is neither a polygon list nor an RLE "
                    f"({str(segmentation)[:60]}); COCO format expected")


def annotation_segmentation(annotation: dict[str, Any], height: int, width: int, where: str,
                            fix: str = "for box-only data use a box detector: --kind retinanet") -> Any:
    """``annotation``'s segmentation through :func:`checked_segmentation`; a :class:`DataError`
    naming ``where`` and ``fix`` when it has none or null (masks are trained and evaluated on every object)."""
    if annotation.get("segmentation") is None:  # box-only exports leave it out or write null
        raise DataError(f"{where} has no 'segmentation'; mask training and mask AP need one per object ({fix})")
    return checked_segmentation(annotation["segmentation"], height, width, where)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A polygon list, uncompressed RLE or compressed RLE -> uint8 (height, width) bitmap."""
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode([rle])[..., 0]  # a list: pycocotools' single-RLE path warns under numpy 2


def _label_categories(categories: list[dict[str, Any]], classes: Sequence[str] | None
                      ) -> tuple[list[str], list[int | None]]:
    """``(name, category id)`` per label: ``classes`` in their order where the file's names are
    those names or some of them, each once (id None for each class the file lacks: a validation
    file of fewer categories); else ``categories`` as they are (the caller compares the names
    and says what differs)."""
    by_name = {str(c["name"]): int(c["id"]) for c in categories}
    if classes is None or len(by_name) != len(categories) or not set(by_name) <= set(classes):
        return [str(c["name"]) for c in categories], [int(c["id"]) for c in categories]
    return list(classes), [by_name.get(name) for name in classes]


@dataclass
class _Record:
    """One image's parsed annotations (original pixels)."""

    image_id: int
    path: Path
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # (N, 4) xyxy, clipped to the image
    labels: np.ndarray  # (N,)
    segmentations: list[Any] = field(default_factory=list)
    has_annotations: bool = False  # any annotation at all, crowd included (mmdet's filter_empty_gt)


class CocoDetection(Dataset):
    """Images with their boxes, labels and masks from a COCO-format file.

    ``train=True`` applies mmdet's training filter (images with annotations, at least 32 px);
    ``with_masks=False`` skips mask decoding (box-only detectors, evaluation). ``transform``
    maps a :class:`DetectionSample` to a :class:`DetectionSample` (see
    :mod:`crossformer.detection.transforms`). ``log`` receives the one-line report of dropped
    and clipped boxes. Labels number the categories by sorted id, or, given ``classes`` (a
    model's class names, as mmdetection's ``CLASSES``) that the file's names are an order of,
    in that order: a file that numbers the same categories otherwise (converters that number
    them as they meet them, split by split) still labels each object by its name, and a file of
    some of them (a validation file without a rare class) is evaluated over those it has: its
    ``cat_ids`` hold None for the others (:attr:`absent_classes`). An image of
    the file missing from ``image_dir`` is an error unless ``skip_missing`` (``--skip-corrupt``)
    and some of them are there: then each is read as an unreadable image (counted and skipped).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        train: bool = False,
        with_masks: bool = True,
        transform: Callable[[DetectionSample], DetectionSample] | None = None,
        log: Callable[[str], None] | None = None,
        classes: Sequence[str] | None = None,
        skip_missing: bool = False,
    ) -> None:
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.skip_missing = skip_missing
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir}")
        data = load_coco_json(self.ann_file)
        self.train, self.with_masks, self.transform = train, with_masks, transform
        self.class_names, self.cat_ids = _label_categories(sorted(data["categories"], key=lambda c: c["id"]), classes)
        self.cat_id_to_label = {cat: i for i, cat in enumerate(self.cat_ids) if cat is not None}
        self.shapeless_masks = 0  # objects left out for want of a polygon of 3 points (counted by _parse)
        self.records, dropped, clipped = self._parse(data)
        if train:
            empty = sum(not r.has_annotations for r in self.records)
            small = sum(r.has_annotations and min(r.height, r.width) < MIN_TRAIN_IMAGE_SIZE for r in self.records)
            self.records = [r for r in self.records if r.has_annotations
                            and min(r.height, r.width) >= MIN_TRAIN_IMAGE_SIZE]
            if (empty or small) and log is not None:  # else images vanish from the count without a word
                reasons = [f"{n} {why}" for n, why in ((empty, "without annotations"),
                                                       (small, f"under {MIN_TRAIN_IMAGE_SIZE} px a side")) if n]
                log(f"{self.ann_file.name}: training leaves out {' and '.join(reasons)} (as mmdetection)")
        if (dropped or clipped) and log is not None:
            log(f"{self.ann_file.name}: dropped {dropped} boxes with no area or outside their image, "
                f"clipped {clipped} boxes to their image (as mmdetection)")
        if self.shapeless_masks and log is not None:
            log(f"{self.ann_file.name}: left out {self.shapeless_masks} objects whose segmentation has no polygon "
                f"of 3 points or more (as mmdetection)")
        self.dropped_boxes, self.clipped_boxes = dropped, clipped

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def absent_classes(self) -> list[str]:
        """The names of ``classes`` (given to the constructor) that the file has no category of."""
        return [name for name, cat in zip(self.class_names, self.cat_ids) if cat is None]

    def absent_note(self) -> str | None:
        """A line saying which classes the file lacks and that evaluation scores the others;
        None where it has every one."""
        absent = self.absent_classes
        if not absent:
            return None
        return (f"{self.ann_file.name} has no category {listing([repr(n) for n in absent], 3)} of the detector's {self.num_classes}: evaluated over "
                f"the {self.num_classes - len(absent)} it has")

    @property
    def object_count(self) -> int:
        """The objects the records keep (crowds and dropped boxes left out)."""
        return sum(len(r.boxes) for r in self.records)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    @property
    def landscape(self) -> list[int]:
        """1 for each image wider than tall, else 0 (from the file's sizes): mmdetection's
        group flag, which training batches by."""
        return [int(r.width > r.height) for r in self.records]

    def label_to_cat_id(self, labels: Sequence[int] | torch.Tensor) -> list[int | None]:
        """Contiguous labels 0..C-1 -> the file's category ids (None: a class it lacks)."""
        return [self.cat_ids[int(i)] for i in labels]

    def _check_images_exist(self, images: dict[int, dict[str, Any]]) -> None:
        """A one-line :class:`DataError` naming the first image of the file missing from the
        image folder, with how many more are (all of them: the folder is likely the wrong one,
        which ``skip_missing`` does not pass over)."""
        missing = [(i, image) for i, image in images.items() if not (self.image_dir / image["file_name"]).is_file()]
        if not missing or self.skip_missing and len(missing) < len(images):
            return
        image_id, image = missing[0]
        name = image["file_name"]
        where = f"image {name} (id {image_id}) of {self.ann_file.name} not found at {self.image_dir / name}"
        if len(missing) > 1:
            where += f" ({len(missing) - 1} more images of it are missing)"
        if Path(name).is_absolute():  # e.g. Label Studio's /data/upload/...: the image folder plays no part
            where += f"; its file names are absolute paths, which leave out {self.image_dir}: make them relative to it"
        elif len(missing) == len(images) > 1:
            where += f"; none of its images is in {self.image_dir}: give the folder its file names are relative to"
        if "\\" in name:  # written on Windows: here a backslash is part of the name, not a folder separator
            where += "; its file names separate folders with '\\': COCO files use '/'"
        elif len(missing) < len(images) and not Path(name).is_absolute():  # a few deleted: skipping them may help
            where += "; restore it or drop it from the file, or pass --skip-corrupt to skip missing images"
        raise DataError(where)

    def _parse(self, data: dict[str, Any]) -> tuple[list[_Record], int, int]:
        images = {int(img["id"]): img for img in data["images"]}
        per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
        for ann in data["annotations"]:
            image = images.get(int(ann["image_id"]))
            if image is None:
                raise DataError(f"{self.ann_file}: annotation {ann['id']} refers to image id {ann['image_id']}, "
                                f"which is not in 'images'")
            if int(ann["category_id"]) not in self.cat_id_to_label:
                raise DataError(f"{self.ann_file}: annotation {ann['id']} of image {image['file_name']} has category id "
                                f"{ann['category_id']}, which is not in 'categories' (ids {sorted(self.cat_id_to_label)})")
            per_image[int(ann["image_id"])].append(ann)
        self._check_images_exist(images)
        records, dropped, clipped = [], 0, 0
        for image_id, image in images.items():
            path = self.image_dir / image["file_name"]
            height, width = int(image["height"]), int(image["width"])
            boxes, labels, segmentations = [], [], []
            for ann in per_image[image_id]:
                if ann["iscrowd"] or ann.get("ignore", False):
                    continue
                x, y, w, h = map(float, ann["bbox"])
                x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
                # wholly outside on either side (both sides: a positive product of two negatives)
                if x2 <= x1 or y2 <= y1 or w < 1 or h < 1 or ann["area"] <= 0:
                    dropped += 1
                    continue
                if self.with_masks:
                    where = f"{self.ann_file}: annotation {ann['id']} of image {image['file_name']}"
                    segmentation = annotation_segmentation(ann, height, width, where)
                    if segmentation is None:  # no polygon of 3 points or more: ignored, as mmdetection 3
                        self.shapeless_masks += 1
                        continue
                    segmentations.append(segmentation)
                clipped += (x1, y1, x2, y2) != (x, y, x + w, y + h)
                boxes.append((x1, y1, x2, y2))
                labels.append(self.cat_id_to_label[int(ann["category_id"])])
            records.append(_Record(image_id, path, str(image["file_name"]), height, width,
                                   np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                                   segmentations, has_annotations=bool(per_image[image_id])))
        return records, dropped, clipped

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> DetectionSample:
        record = self.records[index]
        sample = DetectionSample(
            image=None, boxes=torch.from_numpy(record.boxes.copy()), labels=torch.from_numpy(record.labels.copy()),
            masks=None, image_id=record.image_id, file_name=record.file_name, ori_shape=(record.height, record.width),
        )
        try:
            image = read_rgb(record.path)
        except UNREADABLE_ERRORS as err:  # FileNotFoundError too (an OSError): skipped with --skip-corrupt
            sample.failure = f"{record.path}: {unreadable_reason(err)}"
            return sample
        if (image.height, image.width) != (record.height, record.width):
            with opened(record.path) as stored:  # the header again: the size before the EXIF orientation
                differs = size_difference((image.height, image.width), (record.height, record.width),
                                          (stored.height, stored.width))
            sample.failure = f"{record.path}: {differs}"
            return sample
        sample.image = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy())
        if self.with_masks:
            masks = [decode_segmentation(s, record.height, record.width) for s in record.segmentations]
            sample.masks = (torch.from_numpy(np.stack(masks)) if masks
                            else torch.zeros(0, record.height, record.width, dtype=torch.uint8))
        return self.transform(sample) if self.transform is not None else sample


@dataclass
class DetectionBatch:
    """What the detectors take: ``detector(images, metas, targets)`` (training) or
    ``detector(images, metas)`` (inference).

    ``images``: float32 (B, 3, Hp, Wp), normalised, zero-padded bottom/right to a multiple of
    ``size_divisor``. ``metas``: per image ``img_shape`` (h, w) after resize before padding,
    ``ori_shape`` (H0, W0), ``scale_factor`` (w / W0, h / H0), ``image_id``, ``file_name``,
    ``flip``. ``targets``: per image ``boxes`` float32 (N, 4) xyxy in resized pixels,
    ``labels`` int64 (N,) in 0..C-1, and ``masks`` uint8 (N, Hp, Wp) when loaded.
    ``failures``: "path: reason" of the samples left out as unreadable.
    """

    images: torch.Tensor
    metas: list[dict[str, Any]]
    targets: list[dict[str, torch.Tensor]]
    failures: list[str]

    def __len__(self) -> int:
        return len(self.metas)

    def to(self, device: torch.device | str) -> "DetectionBatch":
        """The same batch with images and targets on ``device``."""
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in self.targets]
        return DetectionBatch(self.images.to(device, non_blocking=True), self.metas, targets, self.failures)


def collate_detection(samples: Sequence[DetectionSample], size_divisor: int = SIZE_DIVISOR) -> DetectionBatch:
    """Pad the readable samples to the batch's largest image rounded up to ``size_divisor``.

    Unreadable samples are listed in ``failures`` instead of raising in a loader worker, so
    the main process decides (see ``raise_or_count_unreadable``).
    """
    good = [s for s in samples if s.failure is None]
    failures = [s.failure for s in samples if s.failure is not None]
    if not good:
        return DetectionBatch(torch.empty(0, 3, 0, 0), [], [], failures)
    pad_h = -(-max(s.img_shape[0] for s in good) // size_divisor) * size_divisor
    pad_w = -(-max(s.img_shape[1] for s in good) // size_divisor) * size_divisor
    images = good[0].image.new_zeros(len(good), 3, pad_h, pad_w)
    metas, targets = [], []
    for i, s in enumerate(good):
        h, w = s.img_shape
        images[i, :, :h, :w] = s.image
        metas.append({"img_shape": (h, w), "ori_shape": s.ori_shape, "scale_factor": s.scale_factor,
                      "image_id": s.image_id, "file_name": s.file_name, "flip": s.flip})
        target = {"boxes": s.boxes.float(), "labels": s.labels.long()}
        if s.masks is not None:
            masks = s.masks.new_zeros(len(s.masks), pad_h, pad_w)
            masks[:, :h, :w] = s.masks
            target["masks"] = masks
        targets.append(target)
    return DetectionBatch(images, metas, targets, failures)
