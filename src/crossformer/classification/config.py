"""The classification training configuration: defaults are the authors' ImageNet recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ..engine.config import apply_overrides, load_yaml
from ..errors import UserInputError

__all__ = ["TrainConfig", "bundled_configs", "resolve_config"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Batch sizes are per process."""

    # model
    model: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. embed_dim, depths (custom sizes)
    drop_path: float | None = None  # None: the variant's rate (0.1 tiny ... 0.5 large)
    pretrained: str | None = None  # weights to start from (head of another size is re-initialised)
    # data
    data: str | None = None  # ImageNet-layout folder; None: the built-in digits set
    img_size: int = 224
    batch_size: int = 128
    num_workers: int = 8
    skip_corrupt: bool = False
    # augmentation (timm), test-time crop
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1
    # optimisation; rates are per 512 images and scaled to the global batch
    epochs: int = 300
    warmup_epochs: int = 20
    base_lr: float = 5e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_batch_reference: int = 512
    weight_decay: float = 0.05
    clip_grad: float = 5.0
    accum_steps: int = 1
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    amp: str = "auto"  # auto | none | bf16 | fp16
    # run
    output: str = "output/train"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    cpu_threads: int = 0  # torch threads per process on the CPU (0: torch's default)
    resume: str | None = None  # "auto" (OUTPUT/last.pth if present) or a file
    save_every_steps: int = 0  # also checkpoint every N updates (0: once per epoch)
    log_every: int = 50
    tensorboard: bool = True

    def validate(self) -> "TrainConfig":
        if not self.model:
            raise UserInputError("no model given: pass --model NAME (e.g. crossformer_small)")
        for name in ("img_size", "batch_size", "epochs", "accum_steps", "lr_batch_reference"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_workers", "warmup_epochs", "save_every_steps"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.img_size < 32:
            raise UserInputError(f"img_size must be at least 32 (CrossFormer's smallest input), got {self.img_size}")
        if not 0 < self.crop_pct <= 1:
            raise UserInputError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        return self


def bundled_configs() -> dict[str, Path]:
    """Configs shipped in ``crossformer/configs``: name -> file."""
    folder = resources.files("crossformer") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def resolve_config(
    config: str | None = None, model: str | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then a YAML file (a path or a bundled name; by default the model's own
    bundled config when there is one), then ``overrides``; validated."""
    result = TrainConfig()
    bundled = bundled_configs()
    if config is None and model in bundled:
        config = model
    if config is not None:
        path = bundled[config] if config in bundled and not Path(config).is_file() else Path(config)
        if not path.is_file() and path.suffix not in (".yaml", ".yml"):
            raise UserInputError(f"no config file {config!r} and no bundled config of that name; bundled: {', '.join(sorted(bundled))}")
        result = apply_overrides(result, load_yaml(path), source=str(path))
    if model:
        result = apply_overrides(result, {"model": model})
    return apply_overrides(result, dict(overrides or {}), source="overrides").validate()
