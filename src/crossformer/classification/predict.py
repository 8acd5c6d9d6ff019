"""Top-k labels for image files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..data import DataError, build_eval_transform, expand_image_paths, load_class_list
from ..data.folder import read_or_skip
from ..engine import resolve_device, resolve_precision
from ..errors import UserInputError
from ..variant_table import IMAGENET_CLASSES
from .model import load_classifier

__all__ = ["Prediction", "predict", "imagenet_class_names"]


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's class names in index order: the first of each class's synonyms in timm's
    table ("tench", "goldfish", ...), as the authors' released classifiers number them."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(IMAGENET_CLASSES)]


@dataclass
class Prediction:
    path: str
    labels: list[str]  # best first
    scores: list[float]  # softmax probabilities, same order


@torch.no_grad()
def predict(
    paths: str | Path | Sequence[str | Path],
    checkpoint: str | Path,
    model: str | None = None,
    topk: int = 5,
    class_names: str | Path | Sequence[str] | None = None,
    img_size: int | tuple[int, int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    batch_size: int = 32,
    use_ema: bool = False,
    device: str = "auto",
    model_kwargs: dict[str, Any] | None = None,
    skip_corrupt: bool = False,
    on_note: Callable[[str], None] | None = None,
    on_result: Callable[[Prediction], None] | None = None,
    amp: str = "auto",
) -> list[Prediction]:
    """Classify images with a checkpoint; labels are its class names (or ``class_names``: a
    list, or a text file of one name per line as :func:`crossformer.data.load_class_list` reads).
    ``paths``: one image file or folder (searched recursively), or a list of them.
    A file that records none is taken, with 1000 classes, for an ImageNet-1k classifier (the
    authors' releases: :func:`imagenet_class_names`, and ``on_note`` says so); otherwise the
    class index is the label.

    An unreadable file is an error naming it; with ``skip_corrupt`` it is left out of the
    results and ``on_note`` names it. ``on_note`` also hears of images smaller than the
    model's input, which are upscaled (their predictions are less reliable), and of a folder's
    files of an image format this build cannot read, left out (:func:`crossformer.data.expand_image_paths`).
    ``on_result`` hears of each prediction as its batch is done (the command prints it then).
    ``amp``: as ``run.amp`` (``bf16``: autocast, on the CPU too; ``auto``: float32 on the CPU).
    Images are resized to ``img_size / crop_pct`` and centre-cropped, as :func:`.evaluate.evaluate`
    does; ``img_size``, ``crop_pct`` and ``interpolation`` default to the checkpoint's.
    """
    if topk < 1:  # before the model loads; 0 gave one label, quietly
        raise UserInputError(f"--topk must be at least 1, got {topk}")
    given_names = load_class_list(class_names) if class_names is not None else None
    loaded = load_classifier(checkpoint, model, img_size, use_ema, resolve_device(device), model_kwargs)
    names = given_names if given_names is not None else loaded.class_names
    if names is not None and len(names) != loaded.num_classes:
        raise DataError(f"{len(names)} class names given for a model with {loaded.num_classes} classes")
    note = on_note or (lambda message: None)
    if names is None and loaded.num_classes == IMAGENET_CLASSES:
        names = imagenet_class_names()
        note(f"{checkpoint} ({loaded.name}) records no class names: labels are ImageNet-1k's "
             "(--class-names FILE gives others)")
    names = names or [str(i) for i in range(loaded.num_classes)]
    transform = build_eval_transform(loaded.img_size, crop_pct or loaded.crop_pct, interpolation or loaded.interpolation)
    files = expand_image_paths(paths, on_note=note)
    device_ = next(loaded.model.parameters()).device
    precision = resolve_precision(amp, device_)
    k = min(topk, loaded.num_classes)
    height, width = (loaded.img_size, loaded.img_size) if isinstance(loaded.img_size, int) else loaded.img_size
    results: list[Prediction] = []
    skipped = 0
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for path in files[start : start + batch_size]:
            image = read_or_skip(path, skip_corrupt, note)
            if image is None:
                skipped += 1
                continue
            if image.width < width or image.height < height:
                # height x width, as --img-size H W and every other size the commands print
                note(f"{path} is {image.height}x{image.width} (height x width), a side shorter than the model's "
                     f"{height}x{width} input: upscaled, so its prediction is less reliable")
            chunk.append(path)
            images.append(transform(image))
        if not images:
            continue
        batch = torch.stack(images).to(device_)
        with precision.autocast():
            logits = loaded.model(batch)
        probs = logits.float().softmax(dim=1)
        scores, indices = probs.topk(k, dim=1)
        for path, row_scores, row_indices in zip(chunk, scores.tolist(), indices.tolist()):
            results.append(Prediction(str(path), [names[i] for i in row_indices], row_scores))
            if on_result is not None:
                on_result(results[-1])
    if skipped:
        note(f"{skipped} of {len(files)} files skipped as unreadable")
    return results
