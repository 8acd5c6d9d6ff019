"""COCO box and mask AP of a detector over a COCO-format set, on one process or many.

Each rank runs the detector on its share of the images and converts the detections to COCO
results (boxes xywh in original pixels, the file's category ids, masks as RLE); rank 0
gathers them, writes the results JSON and runs pycocotools' ``COCOeval`` once per IoU type.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..atomic import write_text_atomic
from ..data import DataError, ShardedSampler, build_loader, gather_skipped, raise_or_count_unreadable
from ..engine import DistContext, Precision, RunLogger, evaluation_pass
from .data import CocoDetection, DetectionBatch, annotation_segmentation, collate_detection, load_coco_json

__all__ = ["COCO_METRICS", "metric_names", "detections_to_coco", "coco_evaluate", "load_ground_truth", "holds_masks",
           "require_objects", "evaluate_detector"]

# COCOeval.stats in order: AP at IoU .50:.95, .50, .75, by area; AR at 1, 10, 100 detections, by area.
COCO_METRICS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l")


def metric_names(iou_type: str) -> list[str]:
    """``bbox_mAP``, ``bbox_mAP_50``, ... (``iou_type`` "bbox" or "segm")."""
    return [f"{iou_type}_{name}" for name in COCO_METRICS]


def detections_to_coco(outputs: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int],
                       cat_ids: Sequence[int | None]) -> list[dict[str, Any]]:
    """Detector outputs (per image ``boxes`` (K, 4) xyxy original pixels, ``scores``, ``labels``
    0..C-1, optional ``masks`` bool (K, H0, W0)) -> COCO result records; none for a label whose
    category id is None (a class the annotation file lacks: nothing of it to score)."""
    records = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        scores = output["scores"].detach().float().cpu().numpy()
        labels = output["labels"].detach().cpu().numpy()
        rles = None
        if "masks" in output and len(boxes):
            # one mask at a time: all K as uint8, then again in Fortran order, were three copies of
            # (K, H0, W0) (100 masks of a 12-megapixel photo: 3.6 GB; predict on 96 megapixels was killed)
            masks = output["masks"].detach().cpu()
            rles = [mask_utils.encode(np.asfortranarray(masks[k].numpy().astype(np.uint8)[:, :, None]))[0]
                    for k in range(len(boxes))]
        for k in range(len(boxes)):
            cat_id = cat_ids[int(labels[k])]
            if cat_id is None:
                continue
            x1, y1, x2, y2 = boxes[k].tolist()
            record = {"image_id": int(image_id), "category_id": int(cat_id),
                      "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[k])}
            if rles is not None:
                record["segmentation"] = {"size": list(rles[k]["size"]), "counts": rles[k]["counts"].decode("ascii")}
            records.append(record)
    return records


def coco_evaluate(coco_gt: COCO, results: list[dict[str, Any]], iou_types: Sequence[str],
                  image_ids: Sequence[int] | None = None, log: Any = None) -> dict[str, float]:
    """The 12 COCOeval numbers per IoU type, named by :func:`metric_names`.

    With no detections at all, what COCOeval gives for none: 0, and -1 where there is nothing
    to find (a size range without ground truth); pycocotools cannot load an empty result list,
    so it is given one detection of a category the file does not have, which it leaves out.
    ``log`` (a callable) receives COCOeval's printed summary.
    """
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            coco_dt = coco_gt.loadRes(results or [_left_out_detection(coco_gt)])
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        if log is not None:
            log(f"{iou_type}:\n" + "\n".join(line for line in printed.getvalue().splitlines() if "Average" in line))
        metrics.update(zip(metric_names(iou_type), (float(v) for v in evaluator.stats)))
    return metrics


def _left_out_detection(coco_gt: COCO) -> dict[str, Any]:
    """A detection that COCOeval leaves out (its category is none of the file's, which are the
    ones it evaluates), on an image of the file as ``loadRes`` requires."""
    return {"image_id": next(iter(coco_gt.imgs)), "category_id": max(coco_gt.getCatIds(), default=0) + 1,
            "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.0}


def load_ground_truth(ann_file: Path, with_masks: bool) -> COCO:
    """The annotation file as COCOeval's ground truth. For mask AP every object's segmentation
    is checked as training checks it (an RLE of another size than its image would silently
    match nothing); polygons of fewer than 3 points are left out (pycocotools fails on them,
    or reads 2 points as a box), and an object left with none has an empty mask (its box is
    still evaluated). A file without any segmentation (box-only data) is read for box AP alone
    (:func:`holds_masks`), as mmdet's ``--eval bbox``. Annotation ids are renumbered from 1: COCOeval
    takes an object of id 0 (converters often number from 0) for "not matched", so it never
    counted as found."""
    data = load_coco_json(ann_file)
    if with_masks and _segmented(data["annotations"]):
        images = {image["id"]: image for image in data["images"]}
        for ann in data["annotations"]:
            image = images[ann["image_id"]]
            height, width = int(image["height"]), int(image["width"])
            where = f"{ann_file}: annotation {ann['id']} of image {image['file_name']}"
            segmentation = annotation_segmentation(ann, height, width, where,
                                                   fix="give every object one, or none for box AP alone")
            ann["segmentation"] = segmentation or {"size": [height, width], "counts": [height * width]}
    for number, ann in enumerate(data["annotations"], start=1):  # after the messages naming the file's ids
        ann["id"] = number
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints what it does
        coco.createIndex()
    return coco


def holds_masks(coco_gt: COCO) -> bool:
    """Whether the ground truth has object masks (mask AP can be computed): box-only files have none."""
    return _segmented(coco_gt.dataset["annotations"])


def _segmented(annotations: Sequence[dict[str, Any]]) -> bool:
    return any(ann.get("segmentation") is not None for ann in annotations)


def require_objects(dataset: CocoDetection) -> None:
    """A one-line :class:`DataError` for a file with no object to find, where every number
    COCOeval gives would be -1."""
    if not dataset.object_count:
        raise DataError(f"{dataset.ann_file} has no object to evaluate on (crowd regions and boxes with no area are not "
                        f"counted): its AP would be -1; give a file with annotated objects")


@torch.no_grad()
def evaluate_detector(
    detector: nn.Module,
    dataset: CocoDetection,
    ctx: DistContext | None = None,
    batch_size: int = 1,
    num_workers: int = 0,
    results_file: str | Path | None = None,
    skip_corrupt: bool = False,
    logger: RunLogger | None = None,
    precision: Precision | None = None,
    ground_truth: COCO | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Box AP (and mask AP when the detector returns masks) of ``detector`` on ``dataset``.

    ``dataset`` should use the test transform (:func:`build_test_transform`) and can skip its
    own masks (``with_masks=False``): COCOeval reads the ground truth from the annotation file.
    Returns the metrics (same dict on every rank) plus ``images`` (evaluated) and ``skipped``
    (unreadable, with ``skip_corrupt``); rank 0 writes ``results_file`` (COCO results JSON).
    Images skipped as unreadable are left out of the evaluation rather than counted as misses;
    otherwise an unreadable image in any rank's share stops every rank with the same error.
    ``on_skip("image PATH: reason")`` is given each skipped image of every rank's share, after
    the loop (:func:`~crossformer.data.gather_skipped`; a rank that names none may pass None).
    ``ground_truth``: ``dataset``'s annotation file as :func:`load_ground_truth` read it for this
    detector (read before the images are run, so that a file it refuses stops at once; rank 0
    uses it); None: read after.
    """
    if not len(dataset):  # else "no readable images", as if images were there and failed
        raise DataError(f"{dataset.ann_file} lists no images: nothing to evaluate")
    require_objects(dataset)
    ctx = ctx or DistContext()
    sampler = ShardedSampler(len(dataset), ctx.rank, ctx.world_size, shuffle=False, pad=False)
    loader = build_loader(dataset, batch_size, sampler, num_workers, seed=0, drop_last=False,
                          pin_memory=ctx.device.type == "cuda", collate_fn=collate_detection)
    results: list[dict[str, Any]] = []
    evaluated: list[int] = []
    skipped: list[str] = []  # this rank's unreadable images, as "image PATH: reason"
    with_masks = False

    def step(batch: DetectionBatch) -> None:
        nonlocal with_masks
        if not len(batch):
            return
        images = batch.images.to(ctx.device, non_blocking=True)
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            outputs = detector(images, batch.metas)
        image_ids = [m["image_id"] for m in batch.metas]
        with_masks = with_masks or any("masks" in o for o in outputs)
        results.extend(detections_to_coco(outputs, image_ids, dataset.cat_ids))
        evaluated.extend(image_ids)

    def check(batch: DetectionBatch) -> None:
        raise_or_count_unreadable(batch.failures, skip_corrupt, skipped.append)

    evaluation_pass(detector, loader, ctx, check, step, logger.progress(len(loader), "eval") if logger is not None else None)
    skipped_count = gather_skipped(ctx, skipped, on_skip)
    gathered = ctx.gather_objects((results, evaluated, with_masks))
    if not any(part[1] for part in gathered):  # on every rank, as the gather
        raise DataError(f"no readable images to evaluate in {dataset.image_dir}")
    iou_types = ["bbox", "segm"] if any(part[2] for part in gathered) else ["bbox"]

    def score() -> dict[str, float]:  # rank 0's: its errors (ground truth, results file) stop every rank
        coco_gt = ground_truth or load_ground_truth(dataset.ann_file, "segm" in iou_types)
        types = iou_types if holds_masks(coco_gt) else ["bbox"]  # box-only data: box AP alone
        results = [r for part in gathered for r in part[0]]
        evaluated = sorted(i for part in gathered for i in part[1])
        if results_file is not None:
            write_text_atomic(results_file, json.dumps(results))
        metrics = coco_evaluate(coco_gt, results, types, evaluated, logger.info if logger is not None else None)
        return {**metrics, "images": len(evaluated), "skipped": skipped_count}

    return ctx.gather_objects(ctx.on_main(score))[0]
