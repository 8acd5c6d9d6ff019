"""The segmentation configuration: the engine's sections plus model, data and test settings.

Defaults are the authors' UPerNet recipe on ADE20K (mmseg 0.29, 8 GPUs x 2 images): 160k
iterations, AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01 (none on norms), linear
warm-up over 1500 iterations from 1e-6, poly decay (power 1.0) to 0, evaluation and a
checkpoint every 16k iterations. The bundled ``configs/segmentation/{fpn,upernet}_*.yaml``
name every row of the authors' tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..engine.config import EngineConfig, OptimizerConfig, RunConfig, ScheduleConfig, DENSE_ALTERNATIVES, DenseModelChecks
from ..errors import UserInputError
from ..pixels import IMAGENET_MEAN_255, IMAGENET_STD_255

if TYPE_CHECKING:
    from .inference import InferenceConfig

__all__ = [
    "SegModelConfig", "SegDataConfig", "TrainPipelineConfig", "SegTestConfig", "SegmentationConfig", "CONFIG",
    "IGNORE_INDEX", "MMSEG_MEAN", "MMSEG_STD",
]

# The label value the data, the loss and the metrics ignore (and crops are padded with).
# Here, with the pipeline's settings, since the configuration is read without torch.
IGNORE_INDEX = 255
# mmseg's ImageNet statistics on 0-255 RGB (the names its pipeline is documented by).
MMSEG_MEAN, MMSEG_STD = IMAGENET_MEAN_255, IMAGENET_STD_255


def _positive_pair(key: str, value: tuple[int, int] | tuple[float, float]) -> None:
    if min(value) <= 0:
        raise UserInputError(f"{key} must be two positive numbers, got {list(value)}")


@dataclass(frozen=True)
class SegModelConfig(DenseModelChecks):
    """A segmentor: its kind, its CrossFormer backbone and settings, the class count."""

    kind: Literal["fpn", "upernet"] = "upernet"  # Semantic FPN or UPerNet (+ auxiliary FCN head)
    backbone: str = "crossformer_small"  # any CrossFormer / CrossFormer++ variant (a timm name)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. group_size, interval, embed_dim, depths
    drop_path: float | None = None  # stochastic depth of the backbone (None: the variant's, as the authors)
    num_classes: int | None = 150  # None: the data set's class count
    channels: int | None = None  # decode-head width (None: the authors' 128 FPN / 512 UPerNet)
    aux_channels: int | None = None  # UPerNet auxiliary-head width (None: the authors' 256)
    pretrained: str | None = None  # an ImageNet checkpoint (official or ours) for the backbone
    # as mmseg's load_from: the classifiers start afresh where the data's class count differs
    init_from: str | None = None  # a whole segmentor to fine-tune (the authors' mmseg file or ours)

    def unread(self) -> list[tuple[str, str, str]]:
        """What Semantic FPN leaves unread (see :func:`~crossformer.engine.config.refuse_unread_settings`)."""
        return [("aux_channels", "kind", "UPerNet's auxiliary head")] if self.kind != "upernet" else []

    def validate(self) -> None:
        self.validate_backbone()
        for name in ("channels", "aux_channels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserInputError(f"model.{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SegDataConfig:
    """Where the images and label maps are, and the training pipeline's sizes.

    Either ``root`` (the ADE20K layout: ``images/{training,validation}``,
    ``annotations/{training,validation}``; 150 classes or ``classes.txt``; reduce-zero-label),
    or the four folders ``train_images`` / ``train_labels`` / ``val_images`` / ``val_labels``
    with ``classes`` (a file or the names; label values are class indices, 255 = ignore, unless
    ``reduce_zero_label``). ``label_colours`` reads colour-coded (RGB) label maps in either
    layout (:mod:`.colours`). The training transform's settings are the ``pipeline`` section.
    """

    shorthand: ClassVar[str] = "root"
    path_fields: ClassVar[tuple[str, ...]] = ("root", "train_images", "train_labels", "val_images", "val_labels", "classes")  # files and folders read (recorded absolute)

    root: str | None = None  # ADE20K layout: images/{training,validation}, annotations/{training,validation}
    train_images: str | None = None  # folder layout: training images
    train_labels: str | None = None  # folder layout: their label maps (same file stems, .png)
    val_images: str | None = None  # folder layout: validation images
    val_labels: str | None = None  # folder layout: their label maps
    classes: str | tuple[str, ...] | None = None  # folder layout: a text file, one class name per line, or the names
    reduce_zero_label: bool = False  # folder layout: 0 = unlabelled (as ADE20K)
    palette: tuple[tuple[int, int, int], ...] | None = None  # one [R, G, B] per class for overlays (None: generated)
    label_colours: tuple[tuple[int, int, int], ...] | None = None  # colour-coded label maps: each class's [R, G, B], in order
    ignore_colours: tuple[tuple[int, int, int], ...] = ()  # with label_colours: colours read as 255, ignored
    label_suffix: str = ".png"  # folder layout: a label map's name is its image's stem and this (e.g. _mask.png)
    skip_corrupt: bool = False  # count and skip unreadable images instead of stopping

    @property
    def folders(self) -> tuple[str | None, ...]:
        return (self.train_images, self.train_labels, self.val_images, self.val_labels, self.classes)

    @property
    def given(self) -> bool:
        """Whether images are named: ``root`` or a folder (``classes`` alone names only classes,
        which predict reads)."""
        return self.root is not None or any(f is not None for f in self.folders[:4])

    def known_classes(self) -> int | None:
        """The class count training on this data finds, where it is known without opening an
        image: the ``classes`` file's, or a ``root``'s (:func:`.classes.ade_classes`); None where
        the config names no data or it is not on this machine."""
        from ..data import DataError, load_class_list
        from .classes import ade_classes, find_ade_root

        try:
            if self.root is not None:
                return len(load_class_list(ade_classes(find_ade_root(self.root))[0]))
            return None if self.classes is None else len(load_class_list(self.classes))
        except DataError:
            return None

    def validate(self) -> None:
        if self.ignore_colours and self.label_colours is None:
            raise UserInputError("data.ignore_colours goes with data.label_colours (colour-coded label maps): give each "
                                 "class's [R, G, B] there too, or drop data.ignore_colours")
        if self.label_colours is not None and self.palette is not None:  # one source of the classes' colours
            raise UserInputError("data.palette and data.label_colours both give the classes' colours: data.label_colours "
                                 "colours the overlays too; drop data.palette")
        if not self.label_suffix.lower().endswith(".png"):  # label maps are PNGs: lossless, one channel
            raise UserInputError(f"data.label_suffix must end in .png (label maps are PNGs), got {self.label_suffix!r}")
        if self.root is not None and any(f is not None for f in self.folders):  # one layer set both
            raise UserInputError("data: give either data.root (ADE20K layout) or the image/label folders, not both")
        # evaluation reads the validation folders alone; training needs its own too (check_training_folders)
        if self.root is None and self.given and None in self.folders[2:]:
            raise UserInputError("data: the folder layout needs data.val_images, data.val_labels and data.classes")

    def check_training_folders(self) -> None:
        """Training on the folder layout also needs ``train_images`` and ``train_labels``."""
        if self.root is None and None in self.folders[:2]:
            raise UserInputError("data: training on the folder layout needs data.train_images and data.train_labels "
                                 "too (evaluation needs only the validation folders)")


@dataclass
class TrainPipelineConfig:
    """The authors' ADE20K training pipeline; smaller ``scale``/``crop_size`` for small runs.

    ``scale`` is mmcv's ``(long, short)`` bound; ``crop_size`` is ``(h, w)``. Labels are padded
    with :data:`IGNORE_INDEX`, the value the data, the loss and the metrics all ignore.
    """

    scale: tuple[int, int] = (2048, 512)  # (long, short) bound of the image before the random ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)  # random resize: ratio of scale, drawn uniformly
    crop_size: tuple[int, int] = (512, 512)  # random crop height, width
    cat_max_ratio: float = 0.75  # redraw crops where one class covers this much (1: never)
    flip_prob: float = 0.5  # horizontal flip probability
    photometric: bool = True  # random brightness, contrast, saturation and hue
    mean: tuple[float, float, float] = MMSEG_MEAN  # normalisation, 0-255 RGB
    std: tuple[float, float, float] = MMSEG_STD  # normalisation, 0-255 RGB
    # only 255 is valid; the setting stays because every checkpoint's recorded config names it
    ignore_index: int = IGNORE_INDEX  # label value ignored by loss and metrics, and the crops' padding: 255 only


def _validate_pipeline(p: TrainPipelineConfig) -> None:
    """The training transform's settings (``pipeline`` section) are possible."""
    from ..pixels import MIN_INPUT_SIZE

    _positive_pair("pipeline.scale", p.scale)
    _positive_pair("pipeline.ratio_range", p.ratio_range)
    _positive_pair("pipeline.crop_size", p.crop_size)
    if min(p.crop_size) < MIN_INPUT_SIZE:  # crops are padded up to it, never beyond: the network input
        raise UserInputError(f"pipeline.crop_size must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, the backbone's "
                             f"smallest input; got {list(p.crop_size)}")
    if p.ratio_range[0] > p.ratio_range[1]:
        raise UserInputError(f"pipeline.ratio_range must be [low, high], got {list(p.ratio_range)}")
    if not 0 < p.cat_max_ratio <= 1:
        raise UserInputError(f"pipeline.cat_max_ratio must be in (0, 1], got {p.cat_max_ratio}")
    if not 0 <= p.flip_prob <= 1:
        raise UserInputError(f"pipeline.flip_prob must be in [0, 1], got {p.flip_prob}")
    if not all(s > 0 for s in p.std):  # the normalisation divides by it
        raise UserInputError(f"pipeline.std must be above 0 in each channel, got {list(p.std)}")
    if p.ignore_index != IGNORE_INDEX:  # crops were padded with it, but data, loss and metrics ignore 255
        raise UserInputError(f"pipeline.ignore_index must be {IGNORE_INDEX}, got {p.ignore_index}: label value "
                             f"{IGNORE_INDEX} is the one ignored everywhere; store ignored pixels as {IGNORE_INDEX}")


@dataclass(frozen=True)
class SegTestConfig:
    """Inference for evaluation and prediction: single scale ``whole`` by default, as the
    authors' tables; ``multi_scale`` uses the ratios 0.5-1.75; ``slide`` uses windows of
    ``slide_crop`` every ``slide_stride`` pixels."""

    mode: Literal["whole", "slide"] = "whole"  # the whole image at once, or sliding windows
    multi_scale: bool = False  # average over the ratios 0.5-1.75 of the test scale
    flip: bool = False  # also average the horizontally flipped image
    scale: tuple[int, int] = (2048, 512)  # (long, short) bound of the single test scale
    slide_crop: tuple[int, int] = (512, 512)  # slide: window height, width
    slide_stride: tuple[int, int] = (341, 341)  # slide: step between windows

    def validate(self) -> None:
        _positive_pair("test.scale", self.scale)
        _positive_pair("test.slide_crop", self.slide_crop)
        _positive_pair("test.slide_stride", self.slide_stride)

    def inference(self, multi_scale: bool | None = None, flip: bool | None = None) -> InferenceConfig:
        """The :class:`.inference.InferenceConfig` these settings describe (``multi_scale`` and
        ``flip`` replace the section's when given)."""
        from .inference import InferenceConfig  # needs torch: imported when a command runs

        return InferenceConfig.build(
            self.mode, self.multi_scale if multi_scale is None else multi_scale, self.flip if flip is None else flip,
            scale=tuple(self.scale), crop_size=tuple(self.slide_crop), stride=tuple(self.slide_stride),
        )


# where the data is: an ADE20K root, or the folder layout's folders and classes file
DATA_ALTERNATIVES = tuple(("data.root", f"data.{name}")
                          for name in ("train_images", "train_labels", "val_images", "val_labels", "classes"))


@dataclass(frozen=True)
class SegmentationConfig(EngineConfig):
    """Everything a segmentation run depends on. Batch sizes are per process (the authors:
    2 per GPU on 8 GPUs, 16 images per step)."""

    alternatives = (*DENSE_ALTERNATIVES, *DATA_ALTERNATIVES)
    # not the pipeline's normalisation (every verb's input contract) or the training folders
    # (flops counts the heads for their classes); the crop is training's alone (export's default
    # example is what predict feeds the network, export_example)
    training_only = (
        *EngineConfig.training_only, "model.drop_path", "model.pretrained", "model.init_from", "pipeline.scale",
        "pipeline.ratio_range", "pipeline.crop_size", "pipeline.cat_max_ratio", "pipeline.flip_prob",
        "pipeline.photometric",
    )
    task: str = "segmentation"
    run: RunConfig = field(
        default_factory=lambda: RunConfig(iterations=160_000, eval_every=16_000, checkpoint_every=16_000, batch_size=2,
                                          num_workers=4)
    )
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=6e-5, weight_decay=0.01, no_decay_keys=("norm",), decay_1d=True, scale_lr=False)
    )
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(name="poly", power=1.0, min_lr=0.0, warmup_iters=1500, warmup_ratio=1e-6)
    )
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    pipeline: TrainPipelineConfig = field(default_factory=TrainPipelineConfig)  # the authors' ADE20K pipeline
    test: SegTestConfig = field(default_factory=SegTestConfig)

    def check_rules(self) -> None:
        super().check_rules()
        _validate_pipeline(self.pipeline)
        data = self.data
        if data.label_colours is not None:  # checked now, against the class count where it is known
            from .colours import LabelColours  # numpy and the data package: only where colours are given

            LabelColours(data.label_colours, data.ignore_colours, data.known_classes() or self.model.num_classes)


CONFIG = SegmentationConfig  # the task's configuration class, as the registry names it (CONFIG_MODULES)
