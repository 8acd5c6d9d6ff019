"""A tiny fake task for the engine's tests: linear regression on synthetic numbers (no images)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from crossformer.data import ShardedSampler, build_loader
from crossformer.engine import (
    DistContext,
    EngineConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    Task,
    apply_overrides,
    load_training_state,
    train,
)

__all__ = ["FakeConfig", "FakeTask", "fake_config", "resume_and_compare", "CONFIG", "TASK"]


@dataclass(frozen=True)
class FakeSettings:
    samples: int = 24  # training samples (validation: 8)
    noise: float = 0.1  # drawn from the global torch RNG in every training step (exercises RNG resume)
    dropout: float = 0.1  # the model's dropout rate (also draws from the global torch RNG)
    nan_at_call: int = -1  # the losses() call (0-based) whose loss is NaN
    scores: tuple[float, ...] = ()  # scripted validation scores, one per evaluation (else -MSE)
    augment: float = 0.0  # noise each training sample draws from random, NumPy and torch (in loader workers)


@dataclass(frozen=True)
class FakeConfig(EngineConfig):
    task: str = "fake"
    run: RunConfig = field(default_factory=lambda: RunConfig(
        epochs=3, batch_size=4, num_workers=0, device="cpu", amp="none", log_every=1, tensorboard=False))
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=0.05, weight_decay=0.01, scale_lr=False))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="cosine", warmup_iters=2))
    fake: FakeSettings = field(default_factory=FakeSettings)


def _data(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.25
    return TensorDataset(x, y)


class Augmented(Dataset):
    """``data``'s samples with noise drawn from Python's, NumPy's and torch's generators, as
    image augmentations draw."""

    def __init__(self, data: TensorDataset, strength: float) -> None:
        self.data, self.strength = data, strength

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data[index]
        noise = torch.randn(4) + random.gauss(0.0, 1.0) + torch.from_numpy(np.random.randn(4)).float()
        return x + self.strength * noise, y


class FakeTask(Task):
    """y = w.x + b with a dropout layer (draws from the RNG) and noisy targets."""

    primary_metric = "score"

    def __init__(self, config: FakeConfig, ctx: DistContext) -> None:
        super().__init__(config, ctx)
        with torch.random.fork_rng():  # the same initial weights in every run, the global RNG untouched
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Dropout(config.fake.dropout), nn.Linear(4, 1), nn.Flatten(0)).to(ctx.device)
        train_set, self.val_set = _data(config.fake.samples, 1), _data(8, 2)
        self.train_sampler = ShardedSampler(len(train_set), ctx.rank, ctx.world_size, shuffle=True, seed=config.run.seed)
        if config.fake.augment:
            train_set = Augmented(train_set, config.fake.augment)
        self.train_loader = build_loader(train_set, config.run.batch_size, self.train_sampler, config.run.num_workers,
                                         config.run.seed, drop_last=True, collate_fn=default_collate,
                                         seed_each_sample=True)
        self.calls = 0
        self.evaluations = 0

    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        y = y + self.config.fake.noise * torch.randn_like(y)
        mse = ((model(x) - y) ** 2).mean()
        if self.calls == self.config.fake.nan_at_call:
            mse = mse * float("nan")
        self.calls += 1
        return {"mse": mse, "l1": 0.01 * sum(p.abs().sum() for p in model.parameters())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        shard = self.val_set.tensors[0][self.ctx.rank :: self.ctx.world_size], self.val_set.tensors[1][self.ctx.rank :: self.ctx.world_size]
        squared, count = self.ctx.all_reduce_sum([float(((model(shard[0]) - shard[1]) ** 2).sum()), float(len(shard[1]))])
        model.train(was_training)
        scores = self.config.fake.scores
        score = scores[self.evaluations] if self.evaluations < len(scores) else -squared / count
        self.evaluations += 1
        return {"mse": squared / count, "score": score}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"fake_samples": self.config.fake.samples}


def fake_config(output, **values: Any) -> FakeConfig:
    return apply_overrides(FakeConfig(), {"output": str(output), **values}).validate()


def resume_and_compare(stopped, clean, **settings: Any) -> tuple[dict, dict]:
    """Resume the run stopped in ``stopped``, run it unstopped in ``clean``, and check that both
    end with the same metrics, weights and EMA weights; returns both final training states."""
    resumed = train(FakeTask, fake_config(stopped, resume="auto", **settings))
    unkilled = train(FakeTask, fake_config(clean, **settings))
    assert resumed == unkilled  # every metric, bit for bit
    a, b = load_training_state(stopped / "last.pth"), load_training_state(clean / "last.pth")
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key])
    return a, b


CONFIG = FakeConfig
TASK = FakeTask
