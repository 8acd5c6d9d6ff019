"""Object detection and instance segmentation as an engine task: COCO-format data, the
authors' mmdetection pipelines, box (and mask) AP through pycocotools (registry entry
``detection``).

The trainer sums the detector's losses (mmdet's names: ``loss_rpn_cls``, ``loss_rpn_bbox``,
``loss_cls``, ``loss_bbox``, ``loss_mask``; ``s0.``/``s1.``/``s2.`` per cascade stage) and
logs each as ``train/<name>``; evaluation reports COCOeval's 12 box numbers (``bbox_mAP`` ...)
and, for the mask models, 12 mask numbers (``segm_mAP`` ...). best.pth is kept by box AP.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..checkpoint_files import peek_checkpoint, sniff
from ..data import DataError, ShardedSampler, build_loader, check_readable, raise_or_count_unreadable
from ..engine import DistContext, Task, require_model_files, require_one_batch, resolve_precision, resume_path, start_from
from ..engine import train as train_task
from ..errors import UserInputError
from .config import CONFIG, DetectionConfig, DetectionModelConfig, data_paths
from .data import MIN_TRAIN_IMAGE_SIZE, CocoDetection, DetectionBatch, collate_detection
from .checkpoint import load_detector_state, recorded_class_names
from ..data.class_list import first_category_difference
from .detectors import Detector, build_detector
from .evaluate import evaluate_detector, holds_masks, load_ground_truth, require_objects

__all__ = ["DetectionTask", "train", "build_configured_detector", "CONFIG", "TASK"]


def build_configured_detector(model: DetectionModelConfig, num_classes: int, pretrained: bool = True) -> Detector:
    """The detector ``model`` describes, with ``num_classes`` classes; the ImageNet backbone
    checkpoint ``model.pretrained`` is loaded when ``pretrained``."""
    detector = build_detector(
        model.kind, model.backbone, num_classes, model.backbone_settings(),
        model.pretrained if pretrained else None, model.channels, model.fc_channels,
    )
    if model.kind == "retinanet":
        return detector
    detector.rpn_head.num_samples = model.rpn_samples
    detector.roi_head.num_samples = model.rcnn_samples
    proposals = detector.train_proposals
    detector.train_proposals = dataclasses.replace(
        proposals, nms_pre=model.rpn_train_pre_nms or proposals.nms_pre, max_per_img=model.rpn_train_proposals or proposals.max_per_img
    )
    return detector


def resolve_num_classes(model: DetectionModelConfig, data_classes: int, source: str) -> int:
    """The class count: the data's, which ``model.num_classes`` (when set) must equal."""
    if model.num_classes is not None and model.num_classes != data_classes:
        raise UserInputError(
            f"{source} has {data_classes} categories but model.num_classes is {model.num_classes}: "
            f"pass model.num_classes={data_classes} (or null to take the data's)"
        )
    return data_classes


def _fine_tune_load(detector: nn.Module, checkpoint: dict[str, Any], source: str) -> list[str]:
    """``model.init_from``: a whole detector, classifiers of another class count left fresh."""
    return load_detector_state(detector, checkpoint, source, use_ema=False, other_classes=True)


def _class_order_source(config: DetectionConfig) -> str | None:
    """The checkpoint whose class order labels the training file: the one the run resumes
    (``run.resume``; ``auto``: ``OUTPUT/last.pth`` where there is one), else ``model.init_from``."""
    if config.run.resume:
        path = resume_path(config.run.resume, config.run.output)
        if path.is_file():
            return str(path)
    return config.model.init_from or None


def _recorded_class_names(path: str) -> list[str] | None:
    """The class names the detector checkpoint ``path`` records, its tensors left unread where
    the file format allows (the authors' pre-zip files are read whole)."""
    from ..models.weights import read_checkpoint

    plain = peek_checkpoint(path)
    if not plain and sniff(Path(path).expanduser())[0] == "pickle":  # no structure to peek at
        plain = read_checkpoint(path)
    return recorded_class_names(plain)


def _nothing_to_train(dataset: CocoDetection, kind: str) -> str:
    """Why a training file whose images have annotations gives no object to train on."""
    reasons = []
    if dataset.shapeless_masks:  # box-only exports often write "segmentation": []
        reasons.append(f"{dataset.shapeless_masks} of its objects have no segmentation polygon of 3 points or more, "
                       f"and a {kind} trains on masks: for box-only data use --kind retinanet")
    if dataset.dropped_boxes:
        reasons.append(f"{dataset.dropped_boxes} of its objects have a box with no area or outside their image")
    why = "; ".join(reasons) or "its objects are all crowd regions (iscrowd=1), which are never training targets"
    return f"{dataset.ann_file} has no object to train on: {why}"


class DetectionTask(Task):
    """A detector trained on COCO-format data; best checkpoint by box AP."""

    primary_metric = "bbox_mAP"

    def __init__(self, config: DetectionConfig, ctx: DistContext) -> None:
        super().__init__(config, ctx)
        c = config
        require_model_files(c.task, pretrained=c.model.pretrained, init_from=c.model.init_from)
        with_masks = c.model.kind != "retinanet"
        train_ann, train_images = data_paths(c.data, "train")
        val_ann, val_images = data_paths(c.data, "val")
        self.train_set = self._training_set(train_ann, train_images, with_masks)
        # COCOeval reads the ground truth from the file: evaluation needs no decoded masks.
        # labelled by the training file's names: the two files may number the categories differently
        self.val_set = CocoDetection(val_ann, val_images, with_masks=False, transform=c.data.test_transform(),
                                     classes=self.train_set.class_names, skip_missing=c.data.skip_corrupt)
        differ = first_category_difference(self.val_set.class_names, self.train_set.class_names,
                                           "the validation file", "the training file")
        if differ is not None:
            raise DataError(f"{val_ann} and {train_ann} list different categories ({differ}); the validation file "
                            f"needs the training file's categories (or some of them)")
        absent = self.val_set.absent_note()
        if absent is not None:
            self.notes.append(absent)
        self.class_names = self.train_set.class_names
        num_classes = resolve_num_classes(c.model, self.train_set.num_classes, str(train_ann))
        batch = c.run.batch_size
        if not len(self.train_set):  # no batch size helps: say what training keeps
            raise DataError(f"{train_ann} has no training images: training keeps the images that have annotations "
                            f"and sides of at least {MIN_TRAIN_IMAGE_SIZE} px (as mmdetection), and it has none")
        if not len(self.val_set):  # found at the first evaluation otherwise, an epoch into the run
            raise DataError(f"{val_ann} lists no images: training evaluates on the validation images after each "
                            f"epoch (and at the end); give a file with at least one")
        require_objects(self.val_set)  # else every evaluation's AP is -1, and best.pth is kept by it
        if not self.train_set.object_count:  # else every update trains on background alone
            raise DataError(_nothing_to_train(self.train_set, c.model.kind))
        require_one_batch(len(self.train_set), batch, ctx.world_size,
                          f"{train_ann} has {len(self.train_set)} training images (with objects)")
        # one orientation per batch, as mmdetection: less padding to the batch's largest sides
        self.train_sampler = ShardedSampler(len(self.train_set), ctx.rank, ctx.world_size, shuffle=True, seed=c.run.seed,
                                            groups=self.train_set.landscape, batch_size=batch)
        self.train_loader = build_loader(
            self.train_set, batch, self.train_sampler, c.run.num_workers, c.run.seed, drop_last=True,
            pin_memory=ctx.device.type == "cuda", collate_fn=collate_detection, seed_each_sample=True,
        )
        detector = build_configured_detector(c.model, num_classes)
        self.started_from = c.model.init_from and start_from(detector, c.model.init_from, _fine_tune_load)
        self.model = ctx.sync_batchnorm(detector).to(ctx.device)  # the cascade heads' BatchNorm
        self.precision = resolve_precision(c.run.amp, ctx.device)  # evaluation's autocast

    def _training_set(self, train_ann: str, train_images: str, with_masks: bool) -> CocoDetection:
        """The training file's images, labelled in the class order of the checkpoint the run
        resumes or starts from (``model.init_from``) where the file names the same classes (else
        in the file's): a checkpoint's classifier rows are its classes', and a file numbering
        them otherwise would start each class from another's."""
        c = self.config
        source = _class_order_source(c)
        start = _recorded_class_names(source) if source is not None else None

        def read(classes: list[str] | None) -> CocoDetection:
            return CocoDetection(train_ann, train_images, train=True, with_masks=with_masks, classes=classes,
                                 transform=c.data.train_transform(), log=self.notes.append,
                                 skip_missing=c.data.skip_corrupt)

        said = len(self.notes)
        dataset = read(start)
        if start is not None and dataset.absent_classes:  # some of its classes only: the file's own order
            del self.notes[said:]
            dataset = read(None)
        elif dataset.cat_ids != sorted(dataset.cat_ids):
            self.notes.append(f"{train_ann} numbers the classes of {source} in another order: "
                              f"labelled in the checkpoint's order ({', '.join(dataset.class_names)})")
        return dataset

    # the Task interface ---------------------------------------------------------------

    def check_data(self) -> None:
        """The validation images' headers (each image's size too, as the file gives it) and
        (for mask models) the validation objects' segmentations, so that a bad file stops the
        run now rather than at the first evaluation; with ``skip_corrupt`` unreadable images
        are named (evaluation skips them)."""
        c = self.config
        paths = [str(record.path) for record in self.val_set.records]
        sizes = [(record.height, record.width) for record in self.val_set.records]
        for failure in check_readable(paths, self.ctx, c.run.num_workers, c.data.skip_corrupt,
                                      self.log, sizes=sizes):
            self.skip_validation_file(f"image {failure}")
        ground_truth = load_ground_truth(self.val_set.ann_file, with_masks=self.model.has_masks)  # as evaluation will
        if self.model.has_masks and not holds_masks(ground_truth):
            self.log.info(f"note: {self.val_set.ann_file} has no object masks: evaluation gives box AP only")

    def batch_counts(self, batch: DetectionBatch) -> dict[str, float]:
        unreadable = raise_or_count_unreadable(batch.failures, self.config.data.skip_corrupt)
        return {"samples": float(len(batch)), "unreadable_images": float(unreadable)}

    def unreadable(self, batch: DetectionBatch) -> list[str]:
        return [f"image {failure}" for failure in batch.failures]

    def to_device(self, batch: DetectionBatch) -> DetectionBatch:
        return batch.to(self.ctx.device)

    def losses(self, model: nn.Module, batch: DetectionBatch) -> dict[str, torch.Tensor]:
        return model(batch.images, batch.metas, batch.targets)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """COCOeval's box (and mask) numbers and ``eval_seconds``, the evaluation's wall time."""
        c = self.config
        start = time.perf_counter()
        metrics = evaluate_detector(model, self.val_set, self.ctx, c.test.eval_batch_size, c.run.num_workers,
                                    skip_corrupt=c.data.skip_corrupt, precision=self.precision,
                                    on_skip=self.skip_validation_file)
        scores = {k: v for k, v in metrics.items() if k.startswith(("bbox_", "segm_"))}
        return {**scores, "eval_seconds": time.perf_counter() - start}

    def checkpoint_extras(self) -> dict[str, Any]:
        m = self.config.model
        return {
            "detector": m.kind,
            "backbone": m.backbone,
            "backbone_kwargs": m.backbone_settings(),
            "num_classes": self.model.num_classes,
            "class_names": list(self.class_names),
            "cat_ids": list(self.train_set.cat_ids),
            "channels": m.channels,
            "fc_channels": m.fc_channels,
        }

    def check_resume(self, state: dict[str, Any], path: str) -> None:
        m = self.config.model
        if (state.get("detector"), state.get("backbone")) != (m.kind, m.backbone):
            raise UserInputError(f"{path} is a {state.get('detector')} on {state.get('backbone')}, not a {m.kind} on "
                                 f"{m.backbone}; use the config it was trained with")
        differ = first_category_difference(self.class_names, list(state.get("class_names", [])),
                                           "the training file", "the checkpoint")
        if differ is not None:
            raise UserInputError(f"{path} was trained on other categories than {self.train_set.ann_file} ({differ}); "
                                 f"use the same data")

    def describe(self) -> str:
        m = self.config.model
        return self.describe_images(f"{m.kind} on {m.backbone}", self.model.num_classes, len(self.train_set),
                                    len(self.val_set), self.started_from)


def train(config: DetectionConfig, on_step_end: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train ``config.model`` and return the last report's metrics (``val/bbox_mAP`` ...),
    ``best_bbox_mAP``, ``epoch`` and ``global_step``. See :func:`crossformer.engine.train`."""
    return train_task(DetectionTask, config, on_step_end)


TASK = DetectionTask
