"""The training loop, once for every task: one process or many (``torchrun``, DDP).

:func:`train` builds a :class:`~crossformer.engine.task.Task` and drives it: gradient
accumulation (DDP ``no_sync`` on the micro-batches that do not update), mixed precision,
gradient clipping (the norm is logged either way), the per-update schedule, EMA weights,
evaluation and checkpoints every N epochs or N iterations, mid-run checkpoints every N
updates, exact resume (mid-epoch included), the non-finite-loss guard, and metrics reduced
over ranks; a data check before training, a stop on SIGINT / SIGTERM with a checkpoint, and
errors agreed across ranks so that every rank stops with the same one line. Rank 0 alone
writes ``OUTPUT/last.pth``, ``best.pth``, ``metrics.jsonl``, ``log.txt`` and ``tensorboard/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ..atomic import OutputError
from ..checkpoint_files import checkpoint_file
from ..errors import CheckpointError, UserInputError
from .amp import resolve_precision
from .checkpoint import BEST, LAST, load_training_state, resume_path, save_atomic, without_start_files
from .config import EngineConfig, config_differences, config_to_dict, with_absolute_paths
from .cpus import available_cpus, usable_workers
from .distributed import (DistContext, PeerLostError, align_grad_strides, lost_a_peer, set_cpu_threads,
                          setup_distributed, teardown_distributed)
from .guard import NonFiniteLossError, check_finite_loss
from .logging import RunLogger, SkippedFiles
from .output import OutputBefore, claim_output
from .optim import build_optimizer, scale_lr
from .schedule import build_schedule
from .seeding import capture_rng_state, deterministic_kernels, restore_rng_state, seed_everything
from .task import Task, require_one_batch

__all__ = ["Trainer", "train", "RunInterrupted", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "crossformer-train-v2"
StepCallback = Callable[[int], None]
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Settings that say where and how a run goes, not what it trains: they may change on resume unremarked.
_RUN_ONLY_SETTINGS = ("run.output", "run.resume", "run.overwrite", "run.num_workers", "run.log_every",
                      "run.tensorboard", "run.device", "run.cpu_threads")


# the optimizer settings that decide its parameter groups: changed, the saved state does not fit
_GROUPING_SETTINGS = ("optimizer.no_decay_keys", "optimizer.decay_1d")


def _unfitting(changed: list[str]) -> list[str]:
    """Of the settings a resumed run changed (``config_differences``), those that can make the
    checkpoint's weights or optimizer state not fit: the ``model`` section's, else the ones that
    regroup the parameters, else all of them. Run length and rates may change on resume."""
    return ([c for c in changed if c.startswith("model.")] or [c for c in changed if c.startswith(_GROUPING_SETTINGS)]
            or changed)


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after saving ``checkpoint`` (resume with ``resume=auto``)."""

    def __init__(self, message: str, checkpoint: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class InterruptedWhileStopping(KeyboardInterrupt):
    """A second SIGINT / SIGTERM while the first one's stop (its checkpoint) was under way."""


class Trainer:
    """State of one training run on one rank."""

    def __init__(self, task_cls: type[Task], config: EngineConfig, ctx: DistContext,
                 on_step_end: StepCallback | None = None, log: RunLogger | None = None) -> None:
        self.config, self.ctx, self.on_step_end = config, ctx, on_step_end
        run = self.run_config = config.run
        self.output = Path(run.output)
        self.log = log or RunLogger(self.output, enabled=ctx.is_main, tensorboard=run.tensorboard)
        if ctx.device.type == "cpu":
            set_cpu_threads(run.cpu_threads)
        self._note_workers()
        seed_everything(run.seed + ctx.rank)  # ranks draw different augmentations
        resume_from = self._resume_source()
        self.task = task_cls(without_start_files(config) if resume_from else config, ctx)
        self.task.log = self.log
        for line in self.task.notes:
            self.log.info(line)
        self.count_totals: dict[str, float] = {}  # train/<count> over the whole run (unreadable images...)
        self.name_skipped = SkippedFiles(  # training files skipped as unreadable (every rank's), once a run
            self.log.info, "more unreadable training files are skipped: counted (train/unreadable_images), not named")
        self.skipped_files: set[str] = set()  # each as named (every rank's): a file is skipped again each epoch
        saved = load_training_state(resume_from) if resume_from else None
        if saved is not None:  # before the data check, which names the validation files it skips once a run
            self._restore_run_counts(saved.get("run_counts", {}))  # none in a checkpoint from before they were kept
        self._check_data()
        self.batches_per_epoch = len(self.task.train_loader)
        if self.batches_per_epoch < 1:  # a task without its own check (the tasks name their data)
            require_one_batch(0, run.batch_size, self.ctx.world_size)
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / run.accum_steps)
        self.total_updates = run.iterations or run.epochs * self.updates_per_epoch
        self._build_optimisation()
        self.epoch = 0
        self.batches_done = 0  # micro-batches of the current epoch already trained
        self.global_step = 0  # optimizer updates so far
        self.update_epoch = 0  # the epoch of the last update: an evaluation after it is recorded under it
        self.best = -math.inf if task_cls.higher_is_better else math.inf
        self.meters: dict[str, float] = {}  # this rank's sums since the last report
        self.last_loss = float("nan")
        self.last_grad_norm = float("nan")
        self.last_checkpoint: str | None = None
        # the train means of an evaluation that failed (bad validation data), which the
        # checkpoint keeps and a resume evaluates first: no evaluation goes missing from the run
        self.pending_evaluation: dict[str, float] | None = None
        self.stop_signal: int | None = None  # set by SIGINT / SIGTERM
        if saved is not None:
            self._resume(saved, resume_from)
        self.schedule.apply(self.optimizer, self.global_step)

    # set-up ---------------------------------------------------------------------------

    def _note_workers(self) -> None:
        """Say once that ``run.num_workers`` is above the CPUs this process may use: every
        loader starts that many at most (:func:`~crossformer.data.build_loader`)."""
        requested = self.run_config.num_workers
        if usable_workers(requested) < requested:
            self.log.info(f"run.num_workers {requested}: this process may use {available_cpus()} CPUs, so its data "
                          f"loaders start {usable_workers(requested)} worker processes each")

    def _check_data(self) -> None:
        """The task's data check before any training; every rank stops if any rank's share fails."""
        error = None
        try:
            self.task.check_data()
        except UserInputError as err:
            error = err
        self.ctx.raise_together(error)

    def _build_optimisation(self) -> None:
        from timm.utils import ModelEmaV3

        c, ctx, model = self.config, self.ctx, self.task.model
        self.ddp: nn.Module = model
        if ctx.distributed:  # DDP also copies rank 0's initial weights to every rank
            align_grad_strides(model)
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        # After DDP, so that every rank's average starts from the same (rank 0's) weights.
        self.ema = ModelEmaV3(model, decay=c.run.model_ema_decay) if c.run.model_ema else None
        self.global_batch = c.run.batch_size * ctx.world_size * c.run.accum_steps
        lr, min_lr = c.optimizer.lr, c.schedule.min_lr
        if c.optimizer.scale_lr:
            lr = scale_lr(lr, self.global_batch, c.optimizer.lr_batch_reference)
            min_lr = scale_lr(min_lr, self.global_batch, c.optimizer.lr_batch_reference)
        self.optimizer = build_optimizer(
            model, lr, c.optimizer.weight_decay, c.optimizer.betas, c.optimizer.eps, c.optimizer.no_decay_keys,
            c.optimizer.decay_1d,
        )
        self.schedule = build_schedule(
            c.schedule, lr, min_lr, self.total_updates, self.updates_per_epoch, c.run.by_iterations
        )
        self.precision = resolve_precision(c.run.amp, ctx.device)
        self.log.info(
            f"{self.task.describe()}, {ctx.world_size} process(es) on {ctx.device.type}, {self.precision.name}, "
            f"global batch {self.global_batch}, lr {lr:.3g}, {c.schedule.name} schedule over {self.total_updates} updates"
            + (f", the first {self.schedule.warmup} of them a warm-up" if self.schedule.warmup else "")
        )
        if self.schedule.warmup >= self.total_updates:
            # e.g. a short trial run of a 300-epoch recipe whose warm-up alone is 20 epochs
            self.log.info(
                f"warning: the warm-up ({self.schedule.warmup} updates) is not shorter than the run "
                f"({self.total_updates}), so the rate never reaches {lr:.3g}; shorten schedule.warmup_epochs "
                "or schedule.warmup_iters"
            )
        unreached = [m for m, update in zip(c.schedule.milestones, self.schedule.milestones) if update >= self.total_updates]
        if c.schedule.name == "step" and unreached:
            # e.g. a 3-epoch trial of a 12-epoch recipe, whose rate drops after epochs 8 and 11
            self.log.info(
                f"warning: schedule.milestones {unreached} lie at or past the run's end ({c.run.length} "
                f"{c.run.unit}s), so the rate is never lowered there; give milestones within the run"
            )

    # checkpoints ----------------------------------------------------------------------

    def _state(self, metrics: dict[str, float]) -> dict[str, Any] | None:
        """The full training state (rank 0), with every rank's RNG and meters gathered in."""
        per_rank = self.ctx.gather_objects({"rng": capture_rng_state(), "meters": dict(self.meters)})
        if not self.ctx.is_main:
            return None
        state = {
            "format": CHECKPOINT_FORMAT,
            "task": self.config.task,
            "model": self.task.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"global_step": self.global_step},  # the schedule is a function of the step
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "update_epoch": self.update_epoch,
            "primary_metric": self.task.primary_metric,
            "best_metric": self.best,
            "metrics": dict(metrics),
            "world_size": self.ctx.world_size,
            "rank_state": per_rank,
            "config": config_to_dict(self.config),
            # the done line's run totals, the reports before this one included
            "run_counts": {"totals": dict(self.count_totals), "unreadable_files": sorted(self.skipped_files),
                           "unreadable_validation_files": sorted(self.task.skipped_validation)},
            **self.task.checkpoint_extras(),
        }
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        if self.pending_evaluation is not None:
            state["pending_evaluation"] = self.pending_evaluation
        return state

    def _save(self, metrics: dict[str, float], best: bool = False) -> None:
        """``last.pth`` (and ``best.pth``) by rank 0; a write that fails stops every rank with its line."""
        state = self._state(metrics)
        # on_main also keeps everyone from running ahead of a checkpoint that might be resumed
        self.ctx.on_main(lambda: self._write_checkpoints(state, best))

    def _write_checkpoints(self, state: dict[str, Any], best: bool) -> None:
        """Rank 0's ``state`` into ``last.pth``, and ``best.pth`` when ``best``; then a log file
        it could not write since (a full disk) stops the run, every rank agreeing here."""
        if best:  # first: a last.pth that records this epoch as the best one has its best.pth
            save_atomic(state, self.output / BEST)
        self.last_checkpoint = str(save_atomic(state, self.output / LAST))
        try:
            self.log.raise_failure()
        except OutputError as err:  # the run stops here: say the checkpoint just written and how to go on
            raise self._saved_note(err, fix="free space or fix that file") from None

    def _resume_source(self) -> Path | None:
        """The checkpoint ``run.resume`` continues from; None to start afresh (no resume, or
        ``auto`` with no ``last.pth`` yet)."""
        resume = self.run_config.resume
        if not resume:
            return None
        path = resume_path(resume, self.output)
        if resume == "auto" and (path.exists() or path.is_symlink()):
            checkpoint_file(path)  # a folder or special file there is said now, not at the first save
        if resume == "auto" and not path.is_file():
            self.log.info(f"resume=auto: no {path} yet, starting from scratch")
            self.log.resume_at(0)  # the records of a run that ended before its first checkpoint go (else twice)
            return None
        return path

    def _resume(self, state: dict[str, Any], path: Path) -> None:
        """Continue from ``state``, the checkpoint read from ``path`` (its run counts are restored already)."""
        if state.get("task", self.config.task) != self.config.task:
            raise UserInputError(f"{path} is a {state.get('task')} run, not {self.config.task}")
        self.task.check_resume(state, str(path))
        changed = config_differences(state.get("config", {}), config_to_dict(self.config), ignore=_RUN_ONLY_SETTINGS)
        try:
            self.task.model.load_state_dict(state["model"])
            self._load_optimizer_state(state["optimizer"])
            if self.ema is not None:  # turned on at this resume: the average starts from the resumed weights
                self.ema.module.load_state_dict(state.get("model_ema", state["model"]))
        except (RuntimeError, ValueError, KeyError) as err:
            what = "; ".join(_unfitting(changed)) if changed else str(err).strip().splitlines()[-1].strip()
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with other settings ({what}); use its settings, "
                f"or start afresh in another --output (or with --overwrite in place of --resume)"
            ) from None
        if changed:
            self.log.info(f"resuming {path} with changed settings: {'; '.join(changed)}")
        if self.precision.scaler is not None and "scaler" in state:
            self.precision.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.global_step, self.best = int(state["global_step"]), float(state["best_metric"])
        self.update_epoch = int(state.get("update_epoch", max(self.epoch - (self.batches_done == 0), 0)))
        saved_step = self.global_step
        self.last_checkpoint = str(path)
        self.pending_evaluation = state.get("pending_evaluation")
        saved_ranks = int(state.get("world_size", 1))
        same_ranks = saved_ranks == self.ctx.world_size
        if same_ranks:
            mine = state["rank_state"][self.ctx.rank]
            restore_rng_state(mine["rng"])
            self.meters = dict(mine["meters"])
        saved_run, run = state.get("config", {}).get("run", {}), self.run_config
        saved_batch = (saved_run.get("batch_size", run.batch_size), saved_run.get("accum_steps", run.accum_steps))
        restart_reason = None  # why the checkpoint's place in its epoch does not hold here
        if not same_ranks:
            restart_reason = f"was written by {saved_ranks} process{'es' if saved_ranks > 1 else ''}"
        elif saved_batch != (run.batch_size, run.accum_steps):
            restart_reason = f"was written with batch {saved_batch[0]} (x {saved_batch[1]} accumulated) per process"
        elif self.batches_done >= self.batches_per_epoch:  # the epoch would yield no batch: the loop never ended
            restart_reason = (f"stopped at batch {self.batches_done} of its epoch, which now has {self.batches_per_epoch} "
                       "(the training data changed)")
        restarted = None
        if restart_reason is not None:
            # the checkpoint counted its batches and updates in another division of the epoch:
            # restart the epoch, and the schedule at this run's updates to it
            self.batches_done, self.meters = 0, {}
            if not run.by_iterations:  # an iteration run's updates done stay done, and their records
                self.global_step = self.epoch * self.updates_per_epoch
            if not self.finished:  # else "nothing to do" follows: no epoch restarts
                restarted = None if run.by_iterations else self.epoch
                # the epochs done keep their records (their history), though counted in the old
                # batches their steps may reach past the new count: say that steps come twice
                renumbered = (f"; its updates are numbered from {self.global_step + 1}, which the epochs done, counted "
                              "in the old batches, may have logged too" if self.global_step < saved_step else "")
                self.log.info(f"{path} {restart_reason}: restarting epoch {self.epoch} "
                              f"at update {self.global_step} of {self.total_updates}{renumbered}")
        # the records logged after the checkpoint come again, a restarted epoch's all, and the
        # evaluation still to do (a kill after it was logged, before the checkpoint after it)
        self.log.resume_at(saved_step, restarted, redo_evaluation=self.pending_evaluation is not None)
        self.log.info(f"resumed from {path}: epoch {self.epoch}, batch {self.batches_done}, step {self.global_step}")

    def _restore_run_counts(self, saved: dict[str, Any]) -> None:
        """The earlier sessions' count totals and skipped files, training and validation ones
        (:meth:`_state`'s ``run_counts``): the done line counts the whole run, and a file named
        before is not named again."""
        self.count_totals = {key: float(value) for key, value in saved.get("totals", {}).items()}
        self.skipped_files = set(saved.get("unreadable_files", ()))
        self.name_skipped.mark_said(f"skipping unreadable {item}" for item in sorted(self.skipped_files))
        self.task.restore_skipped_validation(saved.get("unreadable_validation_files", ()))

    def _load_optimizer_state(self, saved: dict[str, Any]) -> None:
        """The checkpoint's moments and step counts with this run's settings: its peak rates
        (scaled to this run's global batch), weight decay, betas and eps, which a resume may change."""
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved)
        for group, mine in zip(self.optimizer.param_groups, settings):
            group.update(mine)

    # the loop -------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        run = self.run_config
        return self.global_step >= run.iterations if run.by_iterations else self.epoch >= run.epochs

    def _train_epoch(self) -> None:
        """Micro-batches from the current position to the end of the epoch (or of the run)."""
        run, ctx, task = self.run_config, self.ctx, self.task
        task.train_sampler.set_epoch(self.epoch, start=self.batches_done * run.batch_size)
        task.train_loader.generator.manual_seed(run.seed * 100_003 + self.epoch)  # worker seeds per epoch
        self.ddp.train()
        total = self.batches_per_epoch
        progress = self.log.progress(total, f"epoch {self.epoch}", self.batches_done, run.log_every)
        for batch in task.train_loader:
            counts, error, unreadable = None, None, []
            try:
                counts = task.batch_counts(batch)
                unreadable = task.unreadable(batch)
            except UserInputError as err:
                error = err
            try:
                stop, skipped, passed_over = self._agree(error, len(unreadable), counts is not None and not counts["samples"])
                if skipped:  # on every rank alike, so all join the gather; named before a pass-over's error
                    for item in ctx.gather_lists(unreadable):
                        self.name_skipped(f"skipping unreadable {item}")
                        self.skipped_files.add(item)
                if passed_over:
                    counts = self._pass_over(counts)
            except UserInputError as err:  # unreadable training data, raised on every rank
                if self.global_step and self.batches_done % run.accum_steps == 0:  # keep the updates done
                    raise self._saved_for_resume(err) from None
                raise
            for name, value in counts.items():
                self.meters[name] = self.meters.get(name, 0.0) + value
            self.batches_done += 1
            update = self._ends_update(self.batches_done)
            if counts["samples"]:
                self._forward_backward(batch, counts["samples"], sync=update)
                progress.update(loss=self.last_loss, lr=self.optimizer.param_groups[0]["lr"])
            if update:
                self._update()
                epoch_ended = self.batches_done >= total
                if epoch_ended:
                    self.epoch, self.batches_done = self.epoch + 1, 0
                self._after_update(epoch_ended)
                if (stop or self.stop_signal is not None and not ctx.distributed) and not self.finished:
                    progress.close()
                    self._stop()
                if epoch_ended or self.finished:
                    break
        progress.close()

    def _ends_update(self, batches_done: int) -> bool:
        """Whether the micro-batch that brings the epoch to ``batches_done`` ends an update (the
        last of ``run.accum_steps``, or of the epoch)."""
        return batches_done % self.run_config.accum_steps == 0 or batches_done == self.batches_per_epoch

    def _micro_batches_in_update(self) -> int:
        """How many micro-batches the update of the current one (the epoch's ``batches_done``-th)
        takes: ``run.accum_steps``, fewer in an epoch's last update where its micro-batches do not
        divide evenly. Each loss is divided by it, so that an update's gradient is its micro-batches'
        mean (as timm's ``train.py``): a shorter last update's was that much too small."""
        accum = self.run_config.accum_steps
        first = (self.batches_done - 1) // accum * accum
        return min(accum, self.batches_per_epoch - first)

    def _pass_over(self, counts: dict[str, float]) -> dict[str, float]:
        """``counts`` of a micro-batch that every rank passes over, as some rank has no usable
        sample in it (unreadable files skipped): the ranks stay in step without it."""
        run = self.run_config
        if self.ctx.distributed and self._ends_update(self.batches_done + 1) and run.accum_steps > 1:
            # the accumulated gradients are reduced by the update's backward pass, which no rank would run
            raise UserInputError("a whole batch was unusable (unreadable files?) where the gradients accumulated over "
                                 "run.accum_steps are reduced; remove those files or set run.accum_steps=1")
        return {**counts, "samples": 0.0}

    def _agree(self, error: UserInputError | None, unreadable: int, empty: bool = False) -> tuple[bool, bool, bool]:
        """Raise ``error`` on every rank if any rank has one; whether any rank was asked to stop,
        whether any skipped unreadable files in this micro-batch (``unreadable``: this rank's) and
        whether any rank has no sample to train on in it (``empty``: this rank's).

        One small reduction per micro-batch when distributed (ranks must leave together: one
        alone would leave the others waiting in DDP's gradient reduction); free otherwise.
        """
        ctx = self.ctx
        if not ctx.distributed:
            if error is not None:
                raise error
            return self.stop_signal is not None, unreadable > 0, empty
        failed, stopping, skipped, empties = ctx.all_reduce_sum(
            [float(error is not None), float(self.stop_signal is not None), float(unreadable), float(empty)])
        if failed:
            ctx.raise_together(error)
        return stopping > 0, skipped > 0, empties > 0

    def _stop(self) -> None:
        """After an update, on a stop signal: save the position (mid-epoch) and stop."""
        self._save({})
        name = signal.Signals(self.stop_signal).name if self.stop_signal is not None else "a stop signal on another rank"
        message = (f"interrupted by {name} at epoch {self.epoch}, batch {self.batches_done}, step {self.global_step}; "
                   f"saved {self.output / LAST}: resume with --resume auto")
        self.log.info(message, echo=False)  # the exception carries it (the train command prints it)
        raise RunInterrupted(message, str(self.output / LAST))

    def _forward_backward(self, batch: Any, samples: float, sync: bool) -> None:
        ctx = self.ctx
        batch = self.task.to_device(batch)
        # Accumulating: let DDP all-reduce gradients only on the micro-batch that updates.
        no_sync = self.ddp.no_sync() if ctx.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with self.precision.autocast():
                losses = self.task.losses(self.ddp, batch)
                loss = sum(losses.values())
            loss_value = float(loss.detach())
            # the progress line and train/step_loss: every rank's mean, in the guard's one reduction
            self.last_loss = check_finite_loss(loss_value, ctx, self.epoch, self.global_step, self.last_checkpoint)
            self.precision.backward(loss / self._micro_batches_in_update())
        self.meters["loss"] = self.meters.get("loss", 0.0) + loss_value * samples
        if len(losses) > 1:
            for name, value in losses.items():
                key = f"loss/{name}"
                self.meters[key] = self.meters.get(key, 0.0) + float(value.detach()) * samples

    def _update(self) -> None:
        run = self.run_config
        lr = self.optimizer.param_groups[0]["lr"]  # this update's, as the progress line shows it
        self.last_grad_norm = self.precision.step(self.optimizer, self.task.model.parameters(), run.clip_grad)
        self.global_step += 1
        self.update_epoch = self.epoch
        self.schedule.apply(self.optimizer, self.global_step)  # the next update's
        if self.ema is not None:
            self.ema.update(self.task.model, step=self.global_step)
        if self.global_step % run.log_every == 0:  # the loss is every rank's mean; lr and grad norm agree anyway
            values = {"train/lr": lr, "train/step_loss": self.last_loss,
                      "train/grad_norm": self.last_grad_norm}
            self.log.scalars(self.global_step, values, epoch=self.epoch)

    def _after_update(self, epoch_ended: bool) -> None:
        """Evaluation and checkpoints due after this update, then the step callback."""
        run = self.run_config
        if run.by_iterations or epoch_ended:
            position = self.global_step if run.by_iterations else self.epoch
            final = position >= run.length
            # eval_every 0: at each epoch's end, in an iteration run too (not after every update)
            evaluate = final or (position % run.eval_every == 0 if run.eval_every else epoch_ended)
            if evaluate:
                metrics, is_best = self._evaluate_or_save()
                self._save(metrics, best=is_best)
            elif run.checkpoint_every and position % run.checkpoint_every == 0:
                self._save({})
            elif run.save_every_steps and self.global_step % run.save_every_steps == 0:
                self._save({})
        elif run.save_every_steps and self.global_step % run.save_every_steps == 0:
            self._save({})
        if self.on_step_end is not None:
            self.on_step_end(self.global_step)

    def _evaluate_or_save(self, train_metrics: dict[str, float] | None = None) -> tuple[dict[str, float], bool]:
        """:meth:`_report` of ``train_metrics`` (by default :meth:`_train_means`). The training
        done is saved first, with the evaluation still to do (:attr:`pending_evaluation`), which a
        resume does before it trains on: a kill during a long evaluation (torchrun and batch
        schedulers kill 30 s after their SIGTERM) or bad validation data loses none of it."""
        if train_metrics is None:  # (else a resume's pending evaluation: its checkpoint holds it)
            train_metrics = self._train_means()
            self.pending_evaluation = dict(train_metrics)
            self._save({})
        self.pending_evaluation = dict(train_metrics)
        try:
            reported = self._report(train_metrics)
        except UserInputError as err:  # raised on every rank when the task's evaluate agrees errors
            raise self._saved_for_resume(err, "evaluation failed; ") from None  # (saved again: --resume PATH)
        self.pending_evaluation = None
        return reported

    def _saved_for_resume(self, err: UserInputError, what: str = "") -> UserInputError:
        """Save the position reached (every rank calls this), and ``err`` saying so."""
        self._save({})
        return self._saved_note(err, what)

    def _saved_note(self, err: UserInputError, what: str = "", fix: str = "fix the data") -> UserInputError:
        """``err`` (its own type) saying that ``last.pth`` holds the training so far and how to
        go on from it once ``fix`` is done."""
        return type(err)(f"{err} ({what}the training so far is saved in {self.output / LAST}: "
                         f"{fix} and pass --resume auto)")

    def _train_means(self) -> dict[str, float]:
        """Train means and counts since the last report, reduced over ranks (the same on every rank)."""
        keys = sorted(set().union(*self.ctx.gather_objects(sorted(self.meters))))
        sums = dict(zip(keys, self.ctx.all_reduce_sum([self.meters.get(k, 0.0) for k in keys])))
        samples = sums.pop("samples", 0.0)
        if not samples:  # every batch skipped (--skip-corrupt on unreadable files): no loss to report
            counted = ", ".join(f"{int(v)} {k.replace('_', ' ')}" for k, v in sums.items() if v and "loss" not in k)
            raise UserInputError(f"no training sample could be used since the last evaluation"
                                 f"{f' ({counted})' if counted else ''}: fix or replace the training data")
        metrics = {"train/loss": sums.pop("loss", 0.0) / samples}
        for key, value in sums.items():
            if key.startswith("loss/"):
                metrics[f"train/{key[5:]}"] = value / samples
            elif value:
                metrics[f"train/{key}"] = value
                self.count_totals[key] = self.count_totals.get(key, 0.0) + value
        self.meters = {}
        return metrics

    def _report(self, metrics: dict[str, float]) -> tuple[dict[str, float], bool]:
        """``metrics`` (:meth:`_train_means`) and the validation metrics, reduced over ranks; logged.
        Every rank evaluates rank 0's buffers, which the checkpoint holds (``share_buffers``)."""
        self.ctx.share_buffers(self.task.model)
        metrics.update({f"val/{k}": v for k, v in self.task.evaluate(self.task.model).items()})
        if self.ema is not None:
            self.ctx.share_buffers(self.ema.module)
            metrics.update({f"val_ema/{k}": v for k, v in self.task.evaluate(self.ema.module).items()})
        primary = self.task.primary_metric
        if f"val/{primary}" not in metrics:
            raise KeyError(f"{type(self.task).__name__}.evaluate() returned no {primary!r} (its primary_metric)")
        score = metrics[f"val/{primary}"]
        is_best = score > self.best if self.task.higher_is_better else score < self.best
        if is_best:
            self.best = score
        metrics[f"val/best_{primary}"] = self.best
        run = self.run_config
        done = self.epoch - 1 if not run.by_iterations else self.global_step
        self.log.scalars(self.global_step, metrics, epoch=self.update_epoch)
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.log.info(f"{run.unit} {done}/{run.length}: {shown}")
        self.last_metrics = metrics
        return metrics, is_best

    def run(self) -> dict[str, float]:
        start = time.perf_counter()
        self.last_metrics: dict[str, float] = {}
        already = self.finished and self.pending_evaluation is None
        with self._stop_signals():
            if self.pending_evaluation is not None:  # the evaluation still to do at this resume
                self.log.info(f"evaluating {self.last_checkpoint} first: it was saved before its evaluation, which "
                              "did not finish")
                metrics, is_best = self._evaluate_or_save(self.pending_evaluation)
                self._save(metrics, best=is_best)
            while not self.finished:
                self._train_epoch()
        primary = self.task.primary_metric
        if already:
            run = self.run_config
            reached = self.global_step if run.by_iterations else self.epoch
            # the checkpoint's own count: a resume may ask for fewer epochs than it trained
            self.log.info(f"nothing to do: {self.last_checkpoint} already trained {reached} {run.unit}s "
                          f"(this run asks for {run.length})")
        else:
            counted = "".join(f", {self._run_total(k, v)}" for k, v in self.count_totals.items())
            left_out = len(self.task.skipped_validation)
            if left_out:  # the best score was measured without them
                counted += f", {left_out} unreadable validation file{'s' * (left_out != 1)} left out of evaluation"
            self.log.info(f"done in {time.perf_counter() - start:.1f}s: best {primary} {self.best:.4f}{counted} "
                          f"(checkpoints in {self.output})")
        self.log.close()
        self.ctx.on_main(self.log.raise_failure)  # the lines since the last checkpoint
        return {**self.last_metrics, f"best_{primary}": self.best, "epoch": self.epoch, "global_step": self.global_step}

    def _run_total(self, key: str, value: float) -> str:
        """The done line's words for the run's total of the count ``key``: unreadable images are
        skips (one file, skipped in each of 2 epochs, is 2), with the files they were."""
        if key != "unreadable_images":
            return f"{int(value)} {key.replace('_', ' ')}"
        files = len(self.skipped_files)
        return (f"{int(value)} skip{'s' * (value != 1)} of unreadable images"
                + (f" ({files} file{'s' * (files != 1)})" if files else ""))

    @contextlib.contextmanager
    def _stop_signals(self):
        """While training, SIGINT / SIGTERM ask for a stop at the next update (checkpoint first);
        a second one acts as usual (Ctrl-C twice: KeyboardInterrupt at once)."""
        if threading.current_thread() is not threading.main_thread():  # handlers only in the main thread
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

        def request_stop(signum: int, frame: Any) -> None:
            self.stop_signal = signum
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def train(task_cls: type[Task], config: EngineConfig, on_step_end: StepCallback | None = None) -> dict[str, float]:
    """Train ``task_cls(config, ctx)`` and return the last report's metrics (``val/...``, ``train/...``)
    with ``best_<primary metric>``, ``epoch`` and ``global_step``.

    Under ``torchrun`` each process calls this and they train together. ``on_step_end(global_step)``
    is called after every optimizer update (and the checkpoints due then). ``config`` is
    validated already (:func:`~crossformer.engine.registry.resolve_config` does it).

    ``run.output`` must be new, empty or hold only logs, unless ``run.resume`` continues the run
    there or ``run.overwrite`` replaces it (:func:`~crossformer.engine.output.claim_output`: the
    earlier run's files are deleted once this run has started, kept if it fails to start).
    SIGINT / SIGTERM save a mid-epoch ``last.pth`` and raise :class:`RunInterrupted`. Errors and
    interrupts are also written to ``log.txt``.
    """
    config = with_absolute_paths(config)  # what the checkpoints record finds the data from anywhere
    # run.output=~/x (no shell expands it there) is the home folder's x, not a folder named "~" here
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, output=os.path.expanduser(config.run.output)))
    run = config.run
    ctx = setup_distributed(run.device)
    try:
        # before anyone writes into the folder
        claim = ctx.on_main(lambda: claim_output(run.output, run.resume, run.overwrite))
        before = OutputBefore.of(run.output)  # a start that fails takes back what it wrote
        log = RunLogger(run.output, enabled=False)  # writes nothing until rank 0 has made the folder
        trainer = None
        try:
            # one rank 0 cannot make stops every rank with its line, not rank 0 alone
            log = ctx.on_main(lambda: RunLogger(run.output, tensorboard=run.tensorboard)) or log
            if claim is not None:
                claim.lock()  # a folder this run made
            with deterministic_kernels(run.deterministic):  # run.deterministic: this run's kernels only
                trainer = Trainer(task_cls, config, ctx, on_step_end, log=log)
                if claim is not None and claim.displaced:  # started: data and settings hold
                    claim.replace()
                    log.info(f"--overwrite: deleted the earlier run's {', '.join(claim.displaced)} in {run.output}")
                return trainer.run()
        except RunInterrupted:
            raise  # logged already
        except (UserInputError, NonFiniteLossError) as err:
            log.info(f"error: {err}", echo=False)  # the caller prints it
            raise
        except BaseException as err:
            if ctx.distributed and lost_a_peer(err):  # a gloo traceback said it, 34 lines long
                lost = PeerLostError(f"another process of this run ended (killed? out of memory?) while this one "
                                     f"waited for it; its output says why; then resume from {run.output}")
                log.info(f"stopped: {lost}", echo=False)
                raise lost from None
            log.info(f"stopped by {type(err).__name__}: {err}\n{traceback.format_exc()}".rstrip(), echo=False)
            if isinstance(err, KeyboardInterrupt) and trainer is not None and trainer.stop_signal is not None:
                raise InterruptedWhileStopping() from err
            raise
        finally:
            log.close()
            if claim is not None:
                claim.release()  # first: its file is in a folder a failed start takes back
            if trainer is None and ctx.is_main:
                before.restore()
                if claim is not None:
                    claim.give_back()
    finally:
        teardown_distributed(ctx)
