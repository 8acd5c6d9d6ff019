"""Segment image files and write, per image, a colour overlay and a label-map PNG.

For ``photo.jpg`` the output folder gets:

- ``photo_overlay.png``: the image with each predicted class painted in its colour (50%
  opacity) and a legend of the classes present, largest area first;
- ``photo_labels.png``: the predicted label map at the image's size, a single-channel 8-bit
  PNG. Its values are the class indices (0..C-1) -- or, for data sets with reduce-zero-label
  (ADE20K), class index + 1, so the file follows the data set's own annotation convention
  (value 0, "unlabelled", never appears) and can be evaluated like a ground-truth map. For data
  whose label maps are colour-coded (``data.label_colours``) it is a palette PNG of the same
  values that shows each class in its colour.

Images honour EXIF orientation; grayscale, palette and alpha images are converted to RGB.
The outputs mirror the input folders (``photos/a/x.jpg`` of ``photos``: ``a/x_overlay.png``);
two inputs of one name there get ``_2``, ``_3``... suffixes (:func:`crossformer.data.output_paths`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..atomic import check_output_folder, make_folder, save_image_atomic
from ..data import DataError, expand_image_inputs, output_paths
from ..data.folder import read_or_skip
from ..data.draw import Colour, class_colours
from ..modes import eval_mode
from .draw import overlay_segmentation, present_classes
from .inference import InferenceConfig, segment

__all__ = ["SegPrediction", "predict_images", "write_label_map"]

OUTPUT_ENDINGS = ("_overlay.png", "_labels.png")  # each input's overlay and label map


@dataclass
class SegPrediction:
    path: str  # the input image
    overlay: str  # the written overlay PNG
    label_map: str  # the written label-map PNG
    classes: list[str]  # classes present, largest area first


def write_label_map(label_map: np.ndarray, path: str | Path, reduce_zero_label: bool = False,
                    colours: Sequence[Colour] | None = None) -> None:
    """Save class indices ``(H, W)`` as an 8-bit grayscale PNG (``+1`` when ``reduce_zero_label``),
    or with ``colours`` (one per class) as a palette PNG of those values showing class ``k`` in
    ``colours[k]``: still read as the values (mode P), seen in the data set's colours."""
    offset = 1 if reduce_zero_label else 0
    values = label_map.astype(np.int64) + offset
    if values.max(initial=0) > 255:
        raise DataError(f"cannot write {path}: class values above 255 do not fit an 8-bit label map")
    image = Image.fromarray(values.astype(np.uint8), mode="L")
    if colours is not None:
        table = np.zeros((256, 3), np.uint8)  # unused values (0 of reduce-zero-label data) black
        table[offset: offset + len(colours)] = np.asarray(colours, np.uint8)
        image.putpalette(table.tobytes())  # mode L -> P, the values kept
    save_image_atomic(image, path)  # whole or not at all: a cut label map would pass for a prediction


@torch.no_grad()
def predict_images(
    segmentor: torch.nn.Module,
    paths: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    class_names: Sequence[str],
    palette: Sequence[Colour] | None = None,
    inference: InferenceConfig | None = None,
    reduce_zero_label: bool = False,
    skip_corrupt: bool = False,
    opacity: float = 0.5,
    autocast: Callable[[], Any] | None = None,
    log: Callable[[str], None] | None = None,
    coloured_labels: bool = False,
    on_result: Callable[[SegPrediction], None] | None = None,
) -> tuple[list[SegPrediction], list[str]]:
    """Segment image files and folders (searched recursively); returns the predictions and the
    unreadable files skipped (with ``skip_corrupt``; otherwise the first is a DataError).
    ``coloured_labels``: label maps as palette PNGs in ``palette`` (colour-coded data's).
    ``on_result`` hears of each image's prediction once its files are written (the command
    prints it then: a long folder shows its progress, and what an error stops leaves said).
    ``log`` hears of the skipped files and of a folder's files left out as of a format this
    build cannot read (``.heic``...)."""
    if len(class_names) != segmentor.num_classes:
        raise DataError(f"{len(class_names)} class names given for a segmentor with {segmentor.num_classes} classes")
    palette = class_colours(palette, len(class_names))
    inference = inference or InferenceConfig()
    inputs = expand_image_inputs(paths, output_dir, log)
    output = check_output_folder(output_dir)  # before any work: a file of that name is one line
    written = output_paths(inputs, output, OUTPUT_ENDINGS)  # the input's folders mirrored; none replaces an input
    make_folder(output)
    device = next(segmentor.parameters()).device
    results: list[SegPrediction] = []
    skipped: list[str] = []
    with eval_mode(segmentor):
        for (path, _), (overlay_path, label_path) in zip(inputs, written):
            read = read_or_skip(path, skip_corrupt, log)
            if read is None:
                skipped.append(str(path))
                continue
            image = np.asarray(read).copy()  # (H, W, 3) uint8, as the segmentor's pipeline reads it
            label_map = segment(segmentor, image, inference, device, autocast).cpu().numpy()
            save_image_atomic(overlay_segmentation(image, label_map, class_names, palette, opacity), overlay_path)
            write_label_map(label_map, label_path, reduce_zero_label, palette if coloured_labels else None)
            present = [class_names[c] for c in present_classes(label_map, len(class_names))]
            results.append(SegPrediction(str(path), str(overlay_path), str(label_path), present))
            if on_result is not None:
                on_result(results[-1])
    return results, skipped
