"""The detection configuration: the engine's sections plus model, data and test settings.

Defaults are the authors' COCO 1x recipe as they ran it on mmdetection (8 GPUs x 2 images):
12 epochs, AdamW lr 1e-4 and weight decay 1e-4 on every parameter, the rate x0.1
after epochs 8 and 11, a linear warm-up over 500 iterations from 0.001, no gradient
clipping, the variant's drop path (0.2 S / ++S, 0.3 B / ++B), no linear lr scaling,
evaluation every epoch, best by box AP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..engine.config import EngineConfig, OptimizerConfig, RunConfig, ScheduleConfig, DENSE_ALTERNATIVES, DenseModelChecks
from ..errors import UserInputError

__all__ = [
    "DetectionModelConfig", "DetectionDataConfig", "DetectionTestConfig", "DetectionConfig", "data_paths", "CONFIG", "SIZE_DIVISOR",
    "DEFAULT_SCALE", "MULTISCALE_SHORT", "CROP_SHORT", "CROP_RANGE",
]

DetectorKind = Literal["retinanet", "mask_rcnn", "cascade_mask_rcnn"]
# mmdet's COCO scales: (longer side limit, shorter side); the data section's defaults and the
# pipelines' (:mod:`.transforms`). Here, since the configuration is read without torch.
DEFAULT_SCALE = (1333, 800)
MULTISCALE_SHORT = tuple(range(480, 801, 32))  # 480, 512, ..., 800: the 3x recipe
CROP_SHORT = (400, 500, 600)  # the Swin config's resize before its random crop
CROP_RANGE = (384, 600)
SIZE_DIVISOR = 32  # mmdet pads every batch (and the test image) to a multiple of this


@dataclass(frozen=True)
class DetectionModelConfig(DenseModelChecks):
    """The detector: its kind, its CrossFormer backbone and the head sizes.

    ``backbone_kwargs`` override the backbone's architecture on top of the authors' detection
    grouping (group size 7, intervals 8, 4, 2, 1 in every stage, CrossFormer++ included),
    e.g. ``embed_dim`` / ``depths`` / ``num_heads`` for small demo models.
    """

    # no shorthand: "--model NAME" is a classification model's name everywhere else, so the
    # detector is --kind (as segmentation's segmentor) and its backbone --backbone
    kind: DetectorKind = "mask_rcnn"  # the detector
    backbone: str = "crossformer_small"  # a CrossFormer variant
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = 80  # None: the training data's category count
    drop_path: float | None = None  # the backbone's stochastic depth (None: the variant's, as the authors)
    pretrained: str | None = None  # an ImageNet checkpoint for the backbone (the authors' or ours)
    # as mmdet's load_from: the classifier layers start afresh where the data's class count differs
    init_from: str | None = None  # a whole detector to fine-tune (the authors' mmdet file or ours)
    channels: int = 256  # FPN and head convolutions (the authors' 256)
    fc_channels: int = 1024  # R-CNN box head fully connected layers (the authors' 1024)
    rpn_samples: int = 256  # anchors sampled per image to train the RPN
    rcnn_samples: int = 512  # proposals sampled per image to train each R-CNN stage
    # Training proposals (mmdet's train_cfg.rpn_proposal): the best anchors per level entering
    # NMS, and the proposals kept per image; null: the authors' 2000 / 1000 (cascade 2000 / 2000).
    rpn_train_pre_nms: int | None = None  # training: best anchors per level entering NMS (null: 2000)
    rpn_train_proposals: int | None = None  # training: proposals kept per image (null: 1000, cascade 2000)

    def unread(self) -> list[tuple[str, str, str]]:
        """What a one-stage detector leaves unread: the RPN's and R-CNN's sizes (see
        :func:`~crossformer.engine.config.refuse_unread_settings`)."""
        two_stage = ("fc_channels", "rpn_samples", "rcnn_samples", "rpn_train_pre_nms", "rpn_train_proposals")
        return [(name, "kind", "a two-stage detector (mask_rcnn, cascade_mask_rcnn)") for name in two_stage
                if self.kind == "retinanet"]

    def validate(self) -> None:
        self.validate_backbone()
        for name in ("channels", "fc_channels", "rpn_samples", "rcnn_samples", "rpn_train_pre_nms", "rpn_train_proposals"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserInputError(f"model.{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DetectionDataConfig:
    """COCO-format data and the authors' pipelines (see :mod:`crossformer.detection.transforms`).

    ``root`` is the COCO layout (``annotations/instances_{train,val}2017.json``, ``train2017/``,
    ``val2017/``); ``train_ann`` / ``train_images`` / ``val_ann`` / ``val_images`` name any
    COCO-format files and folders instead (each overrides its part of ``root``).
    """

    shorthand: ClassVar[str] = "root"
    path_fields: ClassVar[tuple[str, ...]] = ("root", "train_ann", "train_images", "val_ann", "val_images")  # files and folders read (recorded absolute)

    root: str | None = None  # COCO layout: annotations/instances_{train,val}2017.json, train2017/, val2017/
    train_ann: str | None = None  # a COCO-format annotation file (instead of root's)
    train_images: str | None = None  # its image folder
    val_ann: str | None = None  # a COCO-format annotation file (instead of root's)
    val_images: str | None = None  # its image folder
    recipe: Literal["1x", "3x"] = "1x"  # 3x: multi-scale training with the Swin random crop
    max_size: int = DEFAULT_SCALE[0]  # longer side at most (train and test)
    min_size: int = DEFAULT_SCALE[1]  # shorter side (1x training and test)
    multiscale_min_sizes: tuple[int, ...] = MULTISCALE_SHORT  # 3x: shorter sides to draw from
    crop_min_sizes: tuple[int, ...] = CROP_SHORT  # 3x: shorter side before the random crop
    crop_size_range: tuple[int, int] = CROP_RANGE  # 3x: crop height / width range
    skip_corrupt: bool = False  # count and skip unreadable images instead of stopping

    def validate(self) -> None:
        sizes = (self.max_size, self.min_size, *self.multiscale_min_sizes, *self.crop_min_sizes, *self.crop_size_range)
        if min(sizes) < 32:
            raise UserInputError(f"data: image sizes must be at least 32 pixels, got {min(sizes)}")
        if self.crop_size_range[0] > self.crop_size_range[1]:
            raise UserInputError(f"data.crop_size_range must be (low, high), got {list(self.crop_size_range)}")
        if not self.multiscale_min_sizes or not self.crop_min_sizes:
            raise UserInputError("data.multiscale_min_sizes and data.crop_min_sizes need at least one size")

    def known_classes(self) -> int | None:
        """The category count training builds the heads for (no image opened); None where the
        config names no annotation file on this machine. The training file's, though it is much
        larger (COCO's: 450 MB against 25 MB): a validation file may list some of its
        categories; the validation file's where the training file is not here."""
        from ..data import DataError
        from .data import load_coco_json

        for split in ("train", "val"):
            try:
                return len(load_coco_json(data_paths(self, split)[0])["categories"])
            except DataError:
                continue
        return None

    def train_transform(self):
        from .transforms import build_train_transform

        return build_train_transform(self.recipe, self.max_size, self.min_size, self.multiscale_min_sizes,
                                     self.crop_min_sizes, self.crop_size_range)

    def test_transform(self):
        from .transforms import build_test_transform

        return build_test_transform(self.max_size, self.min_size)


@dataclass(frozen=True)
class DetectionTestConfig:
    eval_batch_size: int = 1  # images per process in evaluation (mmdet: 1)
    score_threshold: float = 0.3  # predict: draw detections scoring at least this

    def validate(self) -> None:
        if self.eval_batch_size < 1:
            raise UserInputError(f"test.eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if not 0 <= self.score_threshold <= 1:
            raise UserInputError(f"test.score_threshold must be in [0, 1], got {self.score_threshold}")


@dataclass(frozen=True)
class DetectionConfig(EngineConfig):
    """Everything a detection run depends on. Batch sizes are per process."""

    alternatives = DENSE_ALTERNATIVES
    # --data ROOT over a layer's explicit files (a checkpoint's recorded config, a config file)
    # means ROOT's files: else evaluate --data ROOT evaluated the recorded files, without a word
    covers = (("data.root", tuple(f"data.{name}" for name in DetectionDataConfig.path_fields if name != "root")),)
    # (not data.train_ann: flops counts the heads for the training file's classes)
    training_only = (
        *EngineConfig.training_only, "model.drop_path", "model.pretrained", "model.init_from", "model.rpn_samples",
        "model.rcnn_samples", "model.rpn_train_pre_nms", "model.rpn_train_proposals", "data.recipe",
        "data.multiscale_min_sizes", "data.crop_min_sizes", "data.crop_size_range",
    )
    # (evaluation scores every detection the model keeps, as mmdet's AP does)
    predict_only = ("test.score_threshold",)
    task: str = "detection"
    run: RunConfig = field(default_factory=lambda: RunConfig(epochs=12, batch_size=2, num_workers=2, output="output/detection"))
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, weight_decay=1e-4, decay_1d=True, scale_lr=False))
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(name="step", milestones=(8, 11), gamma=0.1, warmup_iters=500, warmup_ratio=0.001)
    )
    model: DetectionModelConfig = field(default_factory=DetectionModelConfig)
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    test: DetectionTestConfig = field(default_factory=DetectionTestConfig)


CONFIG = DetectionConfig  # the task's configuration class, as the registry names it (CONFIG_MODULES)


def data_paths(data: DetectionDataConfig, split: Literal["train", "val"]) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of ``split``: the explicit paths, else the COCO layout
    under ``data.root``; a one-line error naming what is missing."""
    from ..data import DataError
    from .data import coco_paths

    ann, images = (data.train_ann, data.train_images) if split == "train" else (data.val_ann, data.val_images)
    if ann is not None and images is not None:
        return Path(ann), Path(images)
    if data.root is None:
        if (ann is None) != (images is None):  # one of the pair, and no root to take the other from
            have, lack = ("ann", "images") if ann is not None else ("images", "ann")
            raise DataError(f"data.{split}_{have} is set but data.{split}_{lack} is not: give both "
                            f"(or --data COCO_ROOT for the COCO layout)")
        raise DataError(f"no {split} data given: pass --data COCO_ROOT, or data.{split}_ann and data.{split}_images")
    default_ann, default_images = coco_paths(data.root, split)
    return Path(ann or default_ann), Path(images or default_images)
