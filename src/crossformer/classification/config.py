"""The classification configuration: the engine's sections plus model, data, augmentation and
test settings. Defaults are the authors' ImageNet recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from ..engine.config import EngineConfig, RunConfig, ScheduleConfig, check_drop_path
from ..errors import UserInputError
from ..variant_table import require_known_model

__all__ = [
    "ModelConfig", "DataConfig", "AugmentConfig", "TestConfig", "ClassificationConfig", "TrainConfig",
    "bundled_configs", "default_config", "resolve_config", "CONFIG",
]


# the resize filters of timm's training and evaluation transforms (torchvision's names)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class ModelConfig:
    shorthand: ClassVar[str] = "name"

    name: str = ""  # crossformer_tiny ... crossformer_pp_huge, or any timm model
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor settings, e.g. embed_dim, depths
    drop_path: float | None = None  # None: the variant's rate (0.1 tiny ... 0.5 large)
    pretrained: str | None = None  # weights to start from (a head of another size is re-initialised)

    def validate(self) -> None:
        if self.name:  # before the data is looked for: a misspelt name is said first
            require_known_model(self.name)
        check_drop_path(self.drop_path, self.kwargs, "model.kwargs")

    def validate_build(self) -> None:
        """A CrossFormer's settings build (a one-line error where not); the variant as registered
        does, and other models are timm's."""
        if self.kwargs:
            from ..models.variants import VARIANTS, check_builds

            if self.name in VARIANTS:
                check_builds(_build_classifier, self.name, self.kwargs)


def _build_classifier(name: str, settings: dict[str, Any]) -> Any:
    """The classifier ``name`` with ``settings`` (a head of any size), as training builds it."""
    from .model import create_classifier

    return create_classifier(name, 1, model_kwargs=settings)


@dataclass(frozen=True)
class DataConfig:
    shorthand: ClassVar[str] = "root"
    path_fields: ClassVar[tuple[str, ...]] = ("root",)  # files and folders read (recorded absolute)

    root: str | None = None  # ImageNet-layout folder (train/<class>/*, val/<class>/*); unset, training takes the built-in digits
    img_size: int | tuple[int, int] = 224  # N (square) or H W
    interpolation: str = "bicubic"  # resize filter: bicubic, bilinear, nearest, box, hamming or lanczos
    skip_corrupt: bool = False  # count and skip unreadable images instead of stopping

    @property
    def size_hw(self) -> tuple[int, int]:
        size = self.img_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def known_classes(self) -> int | None:
        """The class count training on this data finds, where it is known without opening an
        image: the built-in digits' 10 with no ``root``, else the class folders of
        ``root/train``; None when that folder is not on this machine or holds none."""
        from ..data.digits import DIGITS_CLASSES
        from ..data.folder import DataError, training_classes

        if self.root is None:
            return DIGITS_CLASSES
        try:
            return len(training_classes(self.root)) or None
        except DataError:
            return None

    def folder(self) -> Path:
        """``root``, or with none the built-in digits (written on first use, safely by any
        number of processes at once)."""
        if self.root is not None:
            return Path(self.root)
        from ..data.digits import prepare_digits

        return prepare_digits()

    def validate(self) -> None:
        from ..pixels import MIN_INPUT_SIZE

        if self.interpolation not in INTERPOLATIONS:
            raise UserInputError(f"data.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                                 f"got {self.interpolation!r}")
        if min(self.size_hw) < MIN_INPUT_SIZE:
            raise UserInputError(
                f"data.img_size must be at least {MIN_INPUT_SIZE} (CrossFormer's smallest input), got {self.img_size}"
            )


@dataclass(frozen=True)
class AugmentConfig:
    """timm's training augmentation, Mixup/CutMix and label smoothing."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm policy (RandAugment); null: none
    color_jitter: float = 0.4  # brightness/contrast/saturation jitter (timm applies it without auto_augment)
    re_prob: float = 0.25  # random erasing probability
    re_mode: Literal["pixel", "rand", "const"] = "pixel"  # random erasing fill
    re_count: int = 1  # random erasing boxes per image
    scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: area fraction range
    hflip: float = 0.5  # horizontal flip probability
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"  # mix per batch, pair or element
    label_smoothing: float = 0.1  # target smoothing (with or without mixing)

    @property
    def mixes(self) -> bool:
        """Whether batches go through timm's Mixup/CutMix (which pairs each image with another)."""
        return self.mixup > 0 or self.cutmix > 0

    def validate(self) -> None:
        # timm asserts on some of these deep inside a loader worker, and takes others silently
        # (a flip probability of 2, a smoothing above 1, an inverted crop scale)
        for name in ("re_prob", "hflip", "mixup_prob", "mixup_switch_prob"):
            _in_range(f"augment.{name}", getattr(self, name), 0, 1)
        _in_range("augment.label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        for name in ("color_jitter", "mixup", "cutmix"):
            _in_range(f"augment.{name}", getattr(self, name), 0, None)
        _in_range("augment.re_count", self.re_count, 1, None)
        low, high = self.scale
        if not 0 < low <= high <= 1:  # fractions of the image's area: above 1 the crop falls back to the centre
            raise UserInputError(f"augment.scale must be [low, high] with 0 < low <= high <= 1 (fractions of the "
                                 f"image's area), got {list(self.scale)}")
        if self.auto_augment:
            from ..data.transforms import check_auto_augment

            check_auto_augment(self.auto_augment, "augment.auto_augment")


@dataclass(frozen=True)
class TestConfig:
    crop_pct: float = 0.875  # resize to img_size / crop_pct, centre-crop img_size

    def validate(self) -> None:
        if not 0 < self.crop_pct <= 1:
            raise UserInputError(f"test.crop_pct must be in (0, 1], got {self.crop_pct}")


@dataclass(frozen=True)
class ClassificationConfig(EngineConfig):
    """Everything a classification run depends on. Batch sizes are per process."""

    training_only = (*EngineConfig.training_only, "augment", "model.drop_path", "model.pretrained")
    task: str = "classification"
    run: RunConfig = field(default_factory=lambda: RunConfig(epochs=300, batch_size=128, clip_grad=5.0))
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(name="cosine", warmup_epochs=20, warmup_ratio=1e-3, min_lr=5e-6)
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    test: TestConfig = field(default_factory=TestConfig)


def _in_range(key: str, value: float, low: float, high: float | None, high_open: bool = False) -> None:
    """A one-line error unless ``low <= value <= high`` (``< high`` when ``high_open``; no bound when None)."""
    if high is None:
        if value < low:
            raise UserInputError(f"{key} must be at least {low}, got {value}")
    elif not low <= value <= high or (high_open and value == high):
        raise UserInputError(f"{key} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


TrainConfig = ClassificationConfig  # the name the Python API used before the engine had tasks
CONFIG = ClassificationConfig  # the task's configuration class, as the registry names it (CONFIG_MODULES)


def bundled_configs() -> dict[str, Path]:
    """Classification configs shipped in ``crossformer/configs/classification``: name -> file."""
    from ..engine.registry import bundled_configs as bundled

    return bundled("classification")


def default_config(values: Mapping[str, Any]) -> str | None:
    """With no config named: the model's own bundled config when there is one (e.g.
    ``crossformer_small``); with no model named either, the small ``digits`` one."""
    model = values.get("model.name")
    if model is None:
        return "digits"
    return model if model in bundled_configs() else None


def resolve_config(
    config: str | None = None, model: str | None = None, overrides: Mapping[str, Any] | None = None
) -> ClassificationConfig:
    """Defaults, then a YAML file (a path or a bundled name; by default the model's own bundled
    config, or ``digits`` with no model), then ``model`` and ``overrides``; validated."""
    from ..engine.registry import resolve_config as resolve

    values = dict(overrides or {})
    if model:
        values["model.name"] = model
    return resolve(config, values, task="classification").config
