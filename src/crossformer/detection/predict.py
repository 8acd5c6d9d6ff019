"""Detections for image files: a PNG per image with boxes, class names, scores and mask overlays,
and one JSON of every detection in COCO result format."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..atomic import check_output_folder, make_folder, save_image_atomic, write_text_atomic
from ..data import expand_image_inputs, output_paths
from ..data.draw import draw_boxes, overlay_masks, palette
from ..data.folder import read_or_skip
from ..engine import Precision
from ..modes import eval_mode
from .data import DetectionSample, collate_detection
from .evaluate import detections_to_coco
from .transforms import build_test_transform

__all__ = ["DetectionPrediction", "PredictOutput", "predict_detections", "render_detections", "image_sample"]


def image_sample(image: Image.Image, image_id: int = 0, file_name: str = "") -> DetectionSample:
    """An RGB image as the transforms take it: float32 ``(3, H, W)`` on 0-255, no targets."""
    return DetectionSample(
        image=torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()),
        boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64), masks=None,
        image_id=image_id, file_name=file_name, ori_shape=(image.height, image.width),
    )


@dataclass
class DetectionPrediction:
    """One image's result, as :func:`predict_detections` tells ``on_result`` once its PNG is written."""

    path: str  # the input image
    image: str  # the PNG drawn
    shown: list[dict[str, Any]]  # the detections drawn (score >= the threshold), best first:
    # category_id, category_name, score, bbox (COCO's x, y, w, h in the input's pixels)
    detections: int  # all of the image's detections (its records in detections.json)


@dataclass
class PredictOutput:
    """What :func:`predict_detections` wrote."""

    json_path: Path  # every detection, COCO result records plus "file_name"
    images: list[Path] = field(default_factory=list)  # one PNG per readable input
    detections: int = 0  # records in the JSON
    skipped: list[str] = field(default_factory=list)  # the unreadable inputs' paths (the log gives the reasons)


def render_detections(image: Image.Image, output: dict[str, torch.Tensor], class_names: Sequence[str],
                      score_threshold: float) -> Image.Image:
    """``image`` with the detections scoring at least ``score_threshold``: masks blended in,
    boxes outlined, captions "name score"; one colour per class."""
    keep = output["scores"] >= score_threshold
    labels = output["labels"][keep].tolist()
    colours = palette(len(class_names))
    per_object = [colours[i] for i in labels]
    if "masks" in output:
        image = overlay_masks(image, output["masks"][keep].cpu().numpy(), per_object)
    captions = [f"{class_names[i]} {s:.2f}" for i, s in zip(labels, output["scores"][keep].tolist())]
    return draw_boxes(image, output["boxes"][keep].cpu().numpy(), captions, per_object)


@torch.no_grad()
def predict_detections(
    detector: nn.Module,
    paths: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    class_names: Sequence[str],
    cat_ids: Sequence[int] | None = None,
    transform: Callable[[DetectionSample], DetectionSample] | None = None,
    score_threshold: float = 0.3,
    skip_corrupt: bool = False,
    log: Callable[[str], None] | None = None,
    precision: Precision | None = None,
    on_result: Callable[[DetectionPrediction], None] | None = None,
) -> PredictOutput:
    """Run ``detector`` on image files and folders (recursively), one image at a time.

    Images are read with their EXIF orientation and converted to RGB; ``transform`` defaults to
    the test pipeline (shorter side 800, longer <= 1333). Writes ``OUTPUT_DIR/<stem>.png`` (boxes
    of score >= ``score_threshold``; under the input's subfolders: :func:`~crossformer.data.output_paths`) and ``OUTPUT_DIR/detections.json`` (every detection; image
    ids number the inputs from 1 in the order read, category ids are ``cat_ids`` or 1..C, each
    record names its class as ``category_name``).
    Unreadable files are an error naming the file, or with ``skip_corrupt`` named in the log,
    counted and skipped; a folder's files of an image format this build cannot read (``.heic``...)
    are left out and named in the log. ``precision`` (``--amp``) runs the detector under its autocast, as
    evaluation does. ``on_result`` hears of each image once its PNG is written (the command prints
    it then: a long folder shows its progress). ``detections.json`` is written however the run
    ends, with the detections of the images drawn (an unreadable file that stops the run leaves
    the earlier images' PNGs and records, never PNGs without their records).
    """
    inputs = expand_image_inputs(paths, output_dir, log)
    output_dir = check_output_folder(output_dir)  # before any work: a file of that name is one line
    pngs = output_paths(inputs, output_dir, [".png"])  # the input's folders mirrored; none replaces an input
    make_folder(output_dir)
    transform = transform or build_test_transform()
    cat_ids = list(cat_ids) if cat_ids is not None else list(range(1, len(class_names) + 1))
    name_of = dict(zip(cat_ids, class_names))  # the records name their class: no annotation file says it here
    device = next(detector.parameters(), torch.empty(0)).device
    result = PredictOutput(output_dir / "detections.json")
    records: list[dict[str, Any]] = []
    with eval_mode(detector):
        try:
            for image_id, ((path, _), [png]) in enumerate(zip(inputs, pngs), start=1):
                image = read_or_skip(path, skip_corrupt, log)
                if image is None:
                    result.skipped.append(str(path))
                    continue
                batch = collate_detection([transform(image_sample(image, image_id, str(path)))])
                with precision.autocast() if precision is not None else contextlib.nullcontext():
                    raw = detector(batch.images.to(device), batch.metas)[0]
                # float32 boxes, scores and masks whatever autocast computed them in (NumPy has no bfloat16)
                output = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in raw.items()}
                found = [{**r, "category_name": name_of[r["category_id"]], "file_name": str(path)}
                         for r in detections_to_coco([output], [image_id], cat_ids)]
                save_image_atomic(render_detections(image, output, class_names, score_threshold), png)
                records.extend(found)
                result.images.append(png)
                if on_result is not None:
                    shown = sorted((r for r in found if r["score"] >= score_threshold), key=lambda r: -r["score"])
                    on_result(DetectionPrediction(str(path), str(png), [
                        {k: r[k] for k in ("category_id", "category_name", "score", "bbox")} for r in shown], len(found)))
        finally:
            write_text_atomic(result.json_path, json.dumps(records))
    result.detections = len(records)
    if result.skipped and log is not None:
        log(f"skipped {len(result.skipped)} unreadable image(s)")
    return result
