"""Training a classifier: one process or many (``torchrun``, DistributedDataParallel).

The loop is the authors' recipe (see :class:`TrainConfig`); what makes runs trustworthy
lives in :mod:`crossformer.engine`: atomic checkpoints with every piece of state needed to
resume exactly (mid-epoch included), rank-0-only logging, and the non-finite-loss guard.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..data import (
    DataError,
    ImageFolderDataset,
    ShardedSampler,
    build_eval_transform,
    build_loader,
    build_train_transform,
    prepare_digits,
)
from ..engine import (
    BEST,
    LAST,
    DistContext,
    RunLogger,
    build_optimizer,
    build_scheduler,
    capture_rng_state,
    check_finite_loss,
    config_to_dict,
    enable_determinism,
    load_training_state,
    resolve_precision,
    restore_rng_state,
    save_atomic,
    scale_learning_rates,
    seed_everything,
    setup_distributed,
    teardown_distributed,
)
from ..errors import UserInputError
from .config import TrainConfig
from .evaluate import evaluate_batches, raise_or_count_unreadable
from .model import create_classifier

__all__ = ["train", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "crossformer-classification-v1"
StepCallback = Callable[[int], None]


def _criterion(config: TrainConfig, num_classes: int) -> tuple[Any, nn.Module]:
    """Mixup/CutMix (or None) and the matching loss: soft targets when mixing."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if config.mixup > 0 or config.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
            label_smoothing=config.label_smoothing, num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if config.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=config.label_smoothing)
    return None, nn.CrossEntropyLoss()


class _Run:
    """State of one training run on one rank."""

    def __init__(self, config: TrainConfig, ctx: DistContext, on_step_end: StepCallback | None) -> None:
        self.config, self.ctx, self.on_step_end = config, ctx, on_step_end
        self.output = Path(config.output)
        self.log = RunLogger(self.output, enabled=ctx.is_main, tensorboard=config.tensorboard)
        if config.deterministic:
            enable_determinism()
        if config.cpu_threads and ctx.device.type == "cpu":
            torch.set_num_threads(config.cpu_threads)
        seed_everything(config.seed + ctx.rank)  # ranks draw different augmentations
        self._build_data()
        self._build_model()
        self.epoch = 0
        self.batches_done = 0  # micro-batches of the current epoch already trained
        self.global_step = 0  # optimizer updates so far
        self.best_acc1 = -1.0
        self.meters = [0.0, 0.0, 0.0]  # this rank's epoch loss sum, images, unreadable images
        self.last_loss = float("nan")
        self.last_checkpoint: str | None = None
        self._maybe_resume()

    # set-up ---------------------------------------------------------------------------

    def _build_data(self) -> None:
        c, ctx = self.config, self.ctx
        if c.data is None:
            if ctx.is_main:
                prepare_digits()
            ctx.barrier()  # the others wait for rank 0 to write the folder once
            root = prepare_digits()
        else:
            root = Path(c.data)
        self.data_root = root
        train_tf = build_train_transform(
            c.img_size, c.auto_augment, c.color_jitter, c.re_prob, c.re_mode, c.re_count,
            tuple(c.scale), c.hflip, c.interpolation,
        )
        eval_tf = build_eval_transform(c.img_size, c.crop_pct, c.interpolation)
        self.train_set = ImageFolderDataset(root, "train", transform=train_tf)
        self.val_set = ImageFolderDataset(root, "val", classes=self.train_set.classes, transform=eval_tf)
        self.classes = self.train_set.classes
        per_rank = len(self.train_set) // ctx.world_size
        if per_rank < c.batch_size:
            raise DataError(
                f"{self.train_set.split_dir} has {len(self.train_set)} images: fewer than one batch of "
                f"{c.batch_size} per process; lower --batch-size"
            )
        self.train_sampler = ShardedSampler(len(self.train_set), ctx.rank, ctx.world_size, shuffle=True, seed=c.seed)
        val_sampler = ShardedSampler(len(self.val_set), ctx.rank, ctx.world_size, shuffle=False, pad=False)
        pin = ctx.device.type == "cuda"
        self.train_loader = build_loader(self.train_set, c.batch_size, self.train_sampler, c.num_workers,
                                         seed=c.seed, drop_last=True, pin_memory=pin)
        self.val_loader = build_loader(self.val_set, c.batch_size, val_sampler, c.num_workers,
                                       seed=c.seed, drop_last=False, pin_memory=pin)
        self.batches_per_epoch = len(self.train_set) // ctx.world_size // c.batch_size
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / c.accum_steps)

    def _build_model(self) -> None:
        c, ctx = self.config, self.ctx
        from timm.utils import ModelEmaV3

        from ..models.weights import load_checkpoint

        model = create_classifier(c.model, len(self.classes), c.drop_path, c.model_kwargs)
        if c.pretrained:
            load_checkpoint(model, c.pretrained)
        self.model = model.to(ctx.device)
        self.ddp: nn.Module = self.model
        if ctx.distributed:  # DDP also copies rank 0's initial weights to every rank
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        # After DDP, so that every rank's average starts from the same (rank 0's) weights.
        self.ema = ModelEmaV3(self.model, decay=c.model_ema_decay) if c.model_ema else None
        global_batch = c.batch_size * ctx.world_size * c.accum_steps
        self.rates = scale_learning_rates(c.base_lr, c.warmup_lr, c.min_lr, global_batch, c.lr_batch_reference)
        self.optimizer = build_optimizer(self.model, self.rates.lr, c.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer, self.rates, c.epochs * self.updates_per_epoch, c.warmup_epochs * self.updates_per_epoch
        )
        self.precision = resolve_precision(c.amp, ctx.device)
        self.mixup, self.criterion = _criterion(c, len(self.classes))
        self.log.info(
            f"{c.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(self.classes)} classes, "
            f"{len(self.train_set)} train / {len(self.val_set)} val images, {ctx.world_size} process(es) on "
            f"{ctx.device.type}, {self.precision.name}, global batch {global_batch}, lr {self.rates.lr:.3g}"
        )

    # checkpoints ----------------------------------------------------------------------

    def _state(self, metrics: dict[str, float]) -> dict[str, Any] | None:
        """The full training state (rank 0), with every rank's RNG and meters gathered in."""
        per_rank = self.ctx.gather_objects({"rng": capture_rng_state(), "meters": list(self.meters)})
        if not self.ctx.is_main:
            return None
        c = self.config
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"global_step": self.global_step},  # the schedule is a function of the step
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "best_acc1": self.best_acc1,
            "metrics": dict(metrics),
            "world_size": self.ctx.world_size,
            "rank_state": per_rank,
            "model_name": c.model,
            "model_kwargs": config_to_dict(c)["model_kwargs"],
            "class_names": list(self.classes),
            "img_size": c.img_size,
            "crop_pct": c.crop_pct,
            "interpolation": c.interpolation,
            "config": config_to_dict(c),
        }
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        return state

    def _save(self, metrics: dict[str, float], best: bool = False) -> None:
        state = self._state(metrics)
        if state is not None:
            self.last_checkpoint = str(save_atomic(state, self.output / LAST))
            if best:
                save_atomic(state, self.output / BEST)
        self.ctx.barrier()  # nobody runs ahead of a checkpoint that might be resumed

    def _maybe_resume(self) -> None:
        c = self.config
        if not c.resume:
            return
        path = self.output / LAST if c.resume == "auto" else Path(c.resume)
        if c.resume == "auto" and not path.is_file():
            self.log.info(f"resume=auto: no {path} yet, starting from scratch")
            return
        state = load_training_state(path)
        if state.get("model_name") != c.model:
            raise UserInputError(f"{path} was trained as {state.get('model_name')!r}, not {c.model!r}; pass the same --model")
        if list(state.get("class_names", [])) != list(self.classes):
            raise UserInputError(f"{path} was trained on other classes than {self.train_set.split_dir}; use the same data")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and "model_ema" in state:
            self.ema.module.load_state_dict(state["model_ema"])
        if self.precision.scaler is not None and "scaler" in state:
            self.precision.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.global_step, self.best_acc1 = int(state["global_step"]), float(state["best_acc1"])
        self.scheduler.step_update(self.global_step)
        self.last_checkpoint = str(path)
        if int(state.get("world_size", 1)) == self.ctx.world_size:
            mine = state["rank_state"][self.ctx.rank]
            restore_rng_state(mine["rng"])
            self.meters = list(mine["meters"])
        else:  # another process count: the data order changes anyway, so restart the epoch
            self.log.info(f"{path} was written by {state.get('world_size')} processes: restarting epoch {self.epoch}")
            self.batches_done, self.meters = 0, [0.0, 0.0, 0.0]
        self.log.info(f"resumed from {path}: epoch {self.epoch}, batch {self.batches_done}, step {self.global_step}")

    # the loop -------------------------------------------------------------------------

    def _train_epoch(self) -> None:
        c, ctx = self.config, self.ctx
        self.train_sampler.set_epoch(self.epoch, start=self.batches_done * c.batch_size)
        self.train_loader.generator.manual_seed(c.seed * 100_003 + self.epoch)  # worker seeds per epoch
        self.ddp.train()
        progress = self.log.progress(self.batches_per_epoch, f"epoch {self.epoch}", self.batches_done, c.log_every)
        for images, targets, failures in self.train_loader:
            self.meters[2] += raise_or_count_unreadable(failures, c.skip_corrupt)
            if failures and self.mixup is not None and len(targets) % 2:
                images, targets = images[:-1], targets[:-1]  # timm's Mixup mixes pairs: keep it even
            if not len(targets) and ctx.distributed:
                raise DataError("a whole batch was unreadable; remove the broken files (ranks must stay in step)")
            self.batches_done += 1
            update = self.batches_done % c.accum_steps == 0 or self.batches_done == self.batches_per_epoch
            if len(targets):
                loss_value = self._forward_backward(images, targets, sync=update)
                self.last_loss = loss_value
                self.meters[0] += loss_value * len(targets)
                self.meters[1] += len(targets)
                progress.update(loss=loss_value, lr=self.optimizer.param_groups[0]["lr"])
            if update:
                self._update()
            if self.batches_done >= self.batches_per_epoch:
                break
        progress.close()

    def _forward_backward(self, images: torch.Tensor, targets: torch.Tensor, sync: bool) -> float:
        c, ctx = self.config, self.ctx
        images, targets = images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        # Accumulating: let DDP all-reduce gradients only on the micro-batch that updates.
        no_sync = self.ddp.no_sync() if ctx.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with self.precision.autocast():
                loss = self.criterion(self.ddp(images), targets)
            loss_value = float(loss.detach())
            check_finite_loss(loss_value, ctx, self.epoch, self.global_step, self.last_checkpoint)
            self.precision.backward(loss / c.accum_steps)
        return loss_value

    def _update(self) -> None:
        c = self.config
        self.precision.step(self.optimizer, self.model.parameters(), c.clip_grad)
        self.global_step += 1
        self.scheduler.step_update(self.global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        if self.global_step % c.log_every == 0:  # this rank's loss: a reduction every step would cost a sync
            values = {"train/lr": self.optimizer.param_groups[0]["lr"], "train/step_loss": self.last_loss}
            self.log.scalars(self.global_step, values, epoch=self.epoch)
        if c.save_every_steps and self.global_step % c.save_every_steps == 0 and self.batches_done < self.batches_per_epoch:
            self._save({})
        if self.on_step_end is not None:
            self.on_step_end(self.global_step)

    def _end_epoch(self) -> dict[str, float]:
        loss_sum, images, skipped = self.ctx.all_reduce_sum(self.meters)
        metrics = {"train/loss": loss_sum / max(images, 1)}
        val = evaluate_batches(self.model, self.val_loader, self.ctx, self.precision, self.config.skip_corrupt)
        metrics.update({f"val/{k}": v for k, v in val.items() if k in ("loss", "acc1", "acc5")})
        if self.ema is not None:
            ema = evaluate_batches(self.ema.module, self.val_loader, self.ctx, self.precision, self.config.skip_corrupt)
            metrics.update({f"val_ema/{k}": v for k, v in ema.items() if k in ("loss", "acc1", "acc5")})
        if skipped:
            metrics["train/unreadable_images"] = skipped
        is_best = metrics["val/acc1"] > self.best_acc1
        self.best_acc1 = max(self.best_acc1, metrics["val/acc1"])
        metrics["val/best_acc1"] = self.best_acc1
        self.log.scalars(self.global_step, metrics, epoch=self.epoch)
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.log.info(f"epoch {self.epoch}/{self.config.epochs}: {shown}")
        self.epoch, self.batches_done, self.meters = self.epoch + 1, 0, [0.0, 0.0, 0.0]
        self._save(metrics, best=is_best)
        return metrics

    def run(self) -> dict[str, float]:
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        while self.epoch < self.config.epochs:
            self._train_epoch()
            metrics = self._end_epoch()
        if not metrics:
            self.log.info(f"nothing to do: {self.last_checkpoint} already finished {self.config.epochs} epochs")
        else:
            self.log.info(f"done in {time.perf_counter() - start:.1f}s: best top-1 {self.best_acc1:.2f}% "
                          f"(checkpoints in {self.output})")
        self.log.close()
        return {**metrics, "best_acc1": self.best_acc1, "epoch": self.epoch, "global_step": self.global_step}


def train(config: TrainConfig, on_step_end: StepCallback | None = None) -> dict[str, float]:
    """Train ``config.model`` and return the last epoch's metrics (``val/acc1`` ...).

    Under ``torchrun`` each process calls this and they train together; rank 0 writes
    ``OUTPUT/last.pth`` (every epoch, and every ``save_every_steps`` updates), ``best.pth``,
    ``metrics.jsonl``, ``log.txt`` and ``tensorboard/``. ``on_step_end(global_step)`` is
    called after every optimizer update.
    """
    config = config.validate()
    ctx = setup_distributed(config.device)
    try:
        return _Run(config, ctx, on_step_end).run()
    finally:
        teardown_distributed(ctx)
