"""Image classification as an engine task: ImageNet-layout folders, timm augmentation,
Mixup/CutMix, top-1/top-5 accuracy (registry entry ``classification``)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..data import (
    DataError,
    ImageBatch,
    ImageFolderDataset,
    ShardedSampler,
    build_eval_transform,
    build_loader,
    build_train_transform,
    check_readable,
    raise_or_count_unreadable,
)
from ..data.folder import left_out_notes
from ..engine import DistContext, Task, move_to_device, require_model_files, require_one_batch, resolve_precision
from ..engine import train as train_task
from ..errors import UserInputError, listing
from .config import CONFIG, AugmentConfig, ClassificationConfig, default_config
from .evaluate import evaluate_batches
from .model import create_classifier

__all__ = ["ClassificationTask", "train", "CONFIG", "TASK", "default_config", "check_train_command"]


def check_train_command(config: ClassificationConfig, given: dict[str, Any]) -> None:
    """Refuse ``crossformer train`` with no data named (``given``: the settings the config file
    and the command line set). The Python API, and a config that names the built-in digits
    (``data.root: null``, as ``digits`` does), train on the digits; a recipe that names no data
    (the ImageNet ones) would otherwise run its 300 epochs at 224x224 on them."""
    if config.data.root is None and "data.root" not in given:
        raise UserInputError(
            f"no data given for {config.model.name}: pass --data PATH (a folder with train/<class>/* and "
            "val/<class>/*), or data.root=null to train on the built-in digits"
        )


def _criterion(config: AugmentConfig, num_classes: int) -> tuple[Any, nn.Module]:
    """Mixup/CutMix (or None) and the matching loss: soft targets when mixing."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if config.mixes:
        mixup = Mixup(
            mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
            label_smoothing=config.label_smoothing, num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if config.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=config.label_smoothing)
    return None, nn.CrossEntropyLoss()


class ClassificationTask(Task):
    """A classifier on ``data.root`` (or the built-in digits); best checkpoint by top-1."""

    primary_metric = "acc1"

    def __init__(self, config: ClassificationConfig, ctx: DistContext) -> None:
        super().__init__(config, ctx)
        require_model_files(config.task, pretrained=config.model.pretrained)
        if not config.model.name:
            raise UserInputError("no model given: pass --model NAME (e.g. crossformer_small)")
        if config.augment.mixes and config.run.batch_size % 2:  # training only: inference batches may be odd
            raise UserInputError(
                f"run.batch_size must be even with Mixup/CutMix (each image is mixed with its pair), got "
                f"{config.run.batch_size}; use an even batch, or augment.mixup=0 augment.cutmix=0"
            )
        self._build_data()
        self._build_model()

    def _build_data(self) -> None:
        c, ctx = self.config, self.ctx
        if c.data.root is None:  # the built-in digits: written once, while the other ranks wait
            ctx.on_main(c.data.folder)
        root = c.data.folder()
        a, size = c.augment, c.data.img_size
        train_tf = build_train_transform(
            size, a.auto_augment, a.color_jitter, a.re_prob, a.re_mode, a.re_count, tuple(a.scale), a.hflip,
            c.data.interpolation,
        )
        eval_tf = build_eval_transform(size, c.test.crop_pct, c.data.interpolation)
        self.train_set = ImageFolderDataset(root, "train", transform=train_tf)
        self.val_set = ImageFolderDataset(root, "val", classes=self.train_set.classes, transform=eval_tf)
        self.classes = self.train_set.classes
        self.notes.extend(left_out_notes(self.train_set, self.val_set))
        if len(self.classes) < 2:
            raise DataError(f"{self.train_set.split_dir} has one class folder ({self.classes[0]}); a classifier "
                            f"needs at least two")
        batch = c.run.batch_size
        require_one_batch(len(self.train_set), batch, ctx.world_size,
                          f"{self.train_set.split_dir} has {len(self.train_set)} images")
        self.train_sampler = ShardedSampler(len(self.train_set), ctx.rank, ctx.world_size, shuffle=True, seed=c.run.seed)
        val_sampler = ShardedSampler(len(self.val_set), ctx.rank, ctx.world_size, shuffle=False, pad=False)
        pin = ctx.device.type == "cuda"
        workers, seed = c.run.num_workers, c.run.seed
        self.train_loader = build_loader(self.train_set, batch, self.train_sampler, workers, seed, drop_last=True, pin_memory=pin,
                                         seed_each_sample=True)
        self.val_loader = build_loader(self.val_set, batch, val_sampler, workers, seed, drop_last=False, pin_memory=pin)

    def _build_model(self) -> None:
        from ..models.weights import load_pretrained, read_checkpoint

        c = self.config
        model = create_classifier(c.model.name, len(self.classes), c.model.drop_path, c.model.kwargs,
                                  img_size=c.data.size_hw)
        if c.model.pretrained:
            checkpoint = read_checkpoint(c.model.pretrained)
            load_pretrained(model, c.model.pretrained, "model.kwargs", note=self.notes.append, checkpoint=checkpoint)
            trained = checkpoint.get("class_names")
            if isinstance(trained, (list, tuple)) and len(trained) == len(self.classes) and list(trained) != list(self.classes):
                self._match_head(model, trained)
        self.model = model.to(self.ctx.device)
        self.mixup, self.criterion = _criterion(c.augment, len(self.classes))
        self.precision = resolve_precision(c.run.amp, self.ctx.device)  # evaluation's autocast

    def _match_head(self, model: nn.Module, trained: Sequence[str]) -> None:
        """The pretrained head (loaded by position), trained on the classes ``trained``, as many
        as the data's: its rows put in the data's order where they are the data's classes in
        another order, else a note of whose row each class starts from."""
        pretrained = self.config.model.pretrained
        from ..models.weights import reordered_classes

        rows = reordered_classes(trained, self.classes)
        if rows is not None:
            order = torch.tensor(rows)
            head = model.get_classifier()
            with torch.no_grad():
                head.weight.copy_(head.weight[order])
                head.bias.copy_(head.bias[order])
            self.notes.append(f"{pretrained} names the classes in another order: its head's rows are put in the data's")
            return
        pairs = [f"{mine} <- {theirs}" for mine, theirs in zip(self.classes, trained) if mine != theirs]
        self.notes.append(f"{pretrained}: its head, of as many classes, was trained on other ones; each class starts "
                          f"from the row in its place ({listing(pairs, 3)})")

    # the Task interface ---------------------------------------------------------------

    def _trim(self, batch: ImageBatch) -> ImageBatch:
        """timm's Mixup mixes pairs: drop one image of an odd batch left by unreadable files."""
        images, targets, failures = batch
        if failures and self.mixup is not None and len(targets) % 2:
            return images[:-1], targets[:-1], failures
        return batch

    def check_data(self) -> None:
        """Every validation image's header (this rank's share), so that a bad file stops the run
        now rather than after the first epoch; with ``skip_corrupt`` the bad ones are named."""
        paths = [sample[0] for sample in self.val_set.samples]
        for failure in check_readable(paths, self.ctx, self.config.run.num_workers,
                                      self.config.data.skip_corrupt, self.log):
            self.skip_validation_file(f"image {failure}")  # once a run: evaluation meets it every epoch

    def batch_counts(self, batch: ImageBatch) -> dict[str, float]:
        images, targets, failures = self._trim(batch)
        unreadable = raise_or_count_unreadable(failures, self.config.data.skip_corrupt)
        return {"samples": float(len(targets)), "unreadable_images": float(unreadable)}

    def unreadable(self, batch: ImageBatch) -> list[str]:
        return [f"image {failure}" for failure in batch[2]]

    def to_device(self, batch: ImageBatch) -> ImageBatch:
        return move_to_device(self._trim(batch), self.ctx.device)

    def losses(self, model: nn.Module, batch: ImageBatch) -> dict[str, torch.Tensor]:
        images, targets, _ = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return {"loss": self.criterion(model(images), targets)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics = evaluate_batches(model, self.val_loader, self.ctx, self.precision, self.config.data.skip_corrupt,
                                   on_skip=self.skip_validation_file)
        return {k: metrics[k] for k in ("loss", "acc1", "acc5")}

    def checkpoint_extras(self) -> dict[str, Any]:
        c = self.config
        size = c.data.img_size
        return {
            "model_name": c.model.name,
            "model_kwargs": dict(c.model.kwargs),
            "class_names": list(self.classes),
            "img_size": size if isinstance(size, int) else list(size),
            "crop_pct": c.test.crop_pct,
            "interpolation": c.data.interpolation,
        }

    def check_resume(self, state: dict[str, Any], path: str) -> None:
        name = self.config.model.name
        if state.get("model_name") != name:
            raise UserInputError(f"{path} was trained as {state.get('model_name')!r}, not {name!r}; pass the same --model")
        if list(state.get("class_names", [])) != list(self.classes):
            raise UserInputError(f"{path} was trained on other classes than {self.train_set.split_dir}; use the same data")

    def describe(self) -> str:
        return self.describe_images(self.config.model.name, len(self.classes), len(self.train_set), len(self.val_set))


def train(config: ClassificationConfig, on_step_end: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train ``config.model`` and return the last report's metrics (``val/acc1`` ...), ``best_acc1``,
    ``epoch`` and ``global_step``. See :func:`crossformer.engine.train` (torchrun, checkpoints)."""
    return train_task(ClassificationTask, config, on_step_end)


TASK = ClassificationTask
