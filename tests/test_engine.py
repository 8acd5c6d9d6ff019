"""The task-independent engine: checkpoints, RNG capture, schedule, optimizer, AMP, guard, config."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from crossformer.engine import (
    DistContext,
    EngineConfig,
    NonFiniteLossError,
    RunLogger,
    apply_overrides,
    build_optimizer,
    capture_rng_state,
    check_finite_loss,
    load_training_state,
    resolve_precision,
    restore_rng_state,
    LRSchedule,
    ScheduleConfig,
    build_schedule,
    param_groups,
    require_model_files,
    save_atomic,
    scale_lr,
)
from crossformer.engine.config import parse_overrides
from crossformer.engine.distributed import align_grad_strides
from crossformer.engine.logging import Progress, SkippedFiles
from crossformer.engine.seeding import seed_everything
from crossformer.errors import UserInputError
from crossformer.models import CheckpointError


def test_save_atomic_replaces_whole_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt" / "last.pth"
    save_atomic({"global_step": 1, "optimizer": {}, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1

    def crash(*args, **kwargs):  # a crash while writing (disk full, killed) ...
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_atomic({"global_step": 2}, path)
    # ... leaves the previous checkpoint intact and no temporary file behind
    assert load_training_state(path)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]


def test_load_training_state_explains_weights_only_files(tmp_path: Path) -> None:
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="--pretrained"):
        load_training_state(tmp_path / "weights.pth")
    # the authors' training files hold their optimizer and epoch, but not our update count
    torch.save({"model": {"w": torch.ones(1)}, "optimizer": {}, "lr_scheduler": {}, "epoch": 299}, tmp_path / "theirs.pth")
    with pytest.raises(CheckpointError, match="theirs.pth: it holds weights only; pass it as --pretrained"):
        load_training_state(tmp_path / "theirs.pth")
    # what the file is, as every other command says it: not torch's "(101)" or its zip-reader essay
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"^cannot resume: .*junk.pth is not a PyTorch checkpoint \(it is text"):
        load_training_state(tmp_path / "junk.pth")
    good = tmp_path / "good.pth"
    save_atomic({"model": {"w": torch.ones(1)}, "optimizer": {}, "global_step": 1}, good)
    (tmp_path / "half.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"half.pth is a damaged or truncated PyTorch checkpoint \(the zip"):
        load_training_state(tmp_path / "half.pth")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_training_state(tmp_path / "missing.pth")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.gauss(), np.random.randn()  # each keeps the second normal of its pair for the next draw
    save_atomic({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    expected = (random.gauss(), np.random.randn(), random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert (random.gauss(), np.random.randn(), random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_learning_rates_scale_with_the_global_batch() -> None:
    assert scale_lr(5e-4, global_batch=8 * 128) == pytest.approx(1e-3)  # the authors' 8 GPUs x 128
    assert scale_lr(5e-6, global_batch=64, reference_batch=512) == pytest.approx(6.25e-7)


def test_cosine_schedule_with_warmup_at_chosen_steps() -> None:
    # the authors' shape: warm-up from 0.001 x peak over 10 updates, cosine to 0.01 x peak at 100
    factor = LRSchedule("cosine", total=100, warmup=10, warmup_ratio=0.001, min_ratio=0.01).factor
    assert factor(0) == pytest.approx(0.001)
    assert factor(5) == pytest.approx(0.5005)  # 1 - (1 - 5/10) x 0.999
    assert factor(10) == pytest.approx(0.9757729756)  # 0.01 + 0.495 x (1 + cos(pi/10)) = 0.01 + 0.495 x 1.9510565163
    assert factor(50) == pytest.approx(0.505)  # 0.01 + 0.495 x (1 + 0)
    assert factor(100) == pytest.approx(0.01) and factor(150) == pytest.approx(0.01)


def test_step_schedule_of_the_detection_recipe() -> None:
    # x0.1 at epochs 8 and 11 (100 updates per epoch), 500 warm-up updates from 0.001
    config = ScheduleConfig(name="step", milestones=(8, 11), gamma=0.1, warmup_iters=500, warmup_ratio=0.001)
    schedule = build_schedule(config, lr=2e-4, min_lr=0.0, total_updates=1200, updates_per_epoch=100, by_iterations=False)
    assert schedule.milestones == (800, 1100)
    assert [schedule.factor(t) for t in (0, 250, 499)] == pytest.approx([0.001, 0.5005, 0.998002])  # 1 - (1 - 499/500) x 0.999
    assert [schedule.factor(t) for t in (500, 799, 800, 1099, 1100, 1199)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    optimizer = build_optimizer(nn.Linear(2, 2), lr=2e-4, weight_decay=0.05)
    assert schedule.apply(optimizer, 800) == pytest.approx(2e-5)
    assert all(group["lr"] == pytest.approx(2e-5) for group in optimizer.param_groups)
    assert schedule.apply(optimizer, 1100) == pytest.approx(2e-6)  # from the peak rate, whatever the rate was
    # in an iteration run the milestones are updates already
    by_updates = build_schedule(config, lr=2e-4, min_lr=0.0, total_updates=1200, updates_per_epoch=100, by_iterations=True)
    assert by_updates.milestones == (8, 11)


def test_poly_schedules_of_the_segmentation_recipes() -> None:
    # power 1.0 over 160k updates with 1500 warm-up updates from 1e-6
    warm = build_schedule(ScheduleConfig(name="poly", power=1.0, warmup_iters=1500, warmup_ratio=1e-6),
                          lr=6e-5, min_lr=0.0, total_updates=160_000, updates_per_epoch=1000, by_iterations=True)
    assert warm.factor(0) == pytest.approx(1e-6)
    assert warm.factor(750) == pytest.approx(0.49765674765625)  # (1 - 750/160000) x (1 - 0.5 x (1 - 1e-6))
    assert warm.factor(1500) == pytest.approx(0.990625)  # 1 - 1500/160000
    assert warm.factor(80_000) == pytest.approx(0.5) and warm.factor(160_000) == 0.0
    # power 0.9 to min_lr 1e-4 from 0.01 over 80k, no warm-up: 0.99 x 0.5^0.9 + 0.01 at the middle
    plain = build_schedule(ScheduleConfig(name="poly", power=0.9), lr=0.01, min_lr=1e-4, total_updates=80_000,
                           updates_per_epoch=1000, by_iterations=True)
    assert plain.factor(0) == pytest.approx(1.0)
    assert plain.factor(40_000) == pytest.approx(0.99 * 0.535886731268146 + 0.01)
    assert plain.factor(80_000) == pytest.approx(0.01)
    assert plain.factor(100_000) == pytest.approx(0.01)  # past the end (a resume of a longer run): the floor


def test_schedule_settings_are_checked() -> None:
    with pytest.raises(UserInputError, match="schedule.name=step needs schedule.milestones"):
        ScheduleConfig(name="step").validate()
    with pytest.raises(UserInputError, match="at most one of schedule.warmup_epochs and schedule.warmup_iters"):
        ScheduleConfig(warmup_epochs=1, warmup_iters=5).validate()
    with pytest.raises(UserInputError, match="schedule.milestones must rise"):
        ScheduleConfig(name="step", milestones=(11, 8)).validate()
    # a floor above the peak made the cosine schedule climb from lr to min_lr, silently
    with pytest.raises(UserInputError, match=r"schedule.min_lr \(0.01\) must not exceed optimizer.lr \(0.001\)"):
        apply_overrides(EngineConfig(), {"epochs": 1, "lr": 1e-3, "min_lr": 1e-2}).validate()
    apply_overrides(EngineConfig(), {"epochs": 1, "lr": 1e-3, "min_lr": 1e-3}).validate()


@pytest.mark.parametrize("setting", ["batch_size", "accum_steps", "log_every"])
def test_run_counts_of_zero_are_refused(setting: str) -> None:
    with pytest.raises(UserInputError, match=rf"^run.{setting} must be at least 1, got 0$"):
        apply_overrides(EngineConfig(), {"epochs": 1, setting: 0}).validate()


@pytest.mark.parametrize("setting, value, message", [
    # torch's "Invalid beta parameter" traceback at the optimizer's construction
    ("betas", [1.5, 0.9], r"^optimizer.betas must each be in \[0, 1\), got \[1.5, 0.9\]$"),
    ("betas", [0.9, 1.0], r"^optimizer.betas must each be in \[0, 1\), got \[0.9, 1.0\]$"),
    ("betas", [-0.1, 0.9], r"^optimizer.betas must each be in \[0, 1\)"),
    # accepted, then a NaN loss whose message advised a lower learning rate
    ("eps", 0, r"^optimizer.eps must be above 0, got 0"),
    # accepted: a negative rate after the milestone (gradient ascent), exit 0
    ("gamma", -1, r"^schedule.gamma must be above 0, got -1"),
])
def test_optimizer_and_schedule_values_that_cannot_train_are_refused(setting: str, value, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        apply_overrides(EngineConfig(), {"epochs": 1, setting: value}).validate()
    apply_overrides(EngineConfig(), {"epochs": 1, "betas": [0.0, 0.99], "eps": 1e-12, "gamma": 2.0}).validate()


def test_an_average_that_never_moves_is_refused() -> None:
    with pytest.raises(UserInputError, match=r"^run.model_ema_decay must be in \[0, 1\), got 1.0$"):
        apply_overrides(EngineConfig(), {"epochs": 1, "model_ema_decay": 1.0}).validate()


def test_a_start_file_must_be_a_file(tmp_path: Path) -> None:
    # said as readable_checkpoint says it of --checkpoint (a folder was "checkpoint not found")
    with pytest.raises(CheckpointError, match=r"^model.pretrained: .* is a folder, not a checkpoint file$"):
        require_model_files("classification", pretrained=str(tmp_path))


def test_a_run_folder_given_as_a_checkpoint_names_the_file_to_give(tmp_path: Path) -> None:
    # "output/demo is a folder, not a checkpoint file" said what was wrong, not which file was meant
    from crossformer.checkpoint_files import checkpoint_file

    for name in ("last.pth", "best.pth", "notes.txt", "a.safetensors"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path} is a folder, not a checkpoint file: give the file, "
                                              rf"e.g. {tmp_path / 'best.pth'}$"):
        checkpoint_file(tmp_path)
    (tmp_path / "best.pth").unlink()
    with pytest.raises(CheckpointError, match=r"e.g. .*last.pth$"):
        checkpoint_file(tmp_path)


def test_a_whole_model_of_the_task_starts_it_through_init_from_only(tmp_path: Path) -> None:
    whole = tmp_path / "segmentor.pth"
    torch.save({"task": "segmentation", "model": {"w": torch.ones(1)}}, whole)
    require_model_files("segmentation", init_from=str(whole))  # fine-tuning a segmentor of ours
    with pytest.raises(UserInputError, match=r"^model.pretrained: .*segmentor.pth is a whole segmentation model, not "):
        require_model_files("segmentation", pretrained=str(whole))


def test_no_decay_keys_follow_mmsegs_norm_rule() -> None:
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4, 4))
    model.add_module("norm_scale", nn.Linear(4, 4, bias=False))  # 2-d, but its name contains "norm"
    groups = param_groups(model, 0.01, no_decay_keys=("norm",))
    assert [len(g["params"]) for g in groups] == [2, 1] and [g["weight_decay"] for g in groups] == [0.0, 0.01]
    assert groups[1]["params"][0] is model.proj.weight
    # mmseg's recipes decay biases too (decay_1d): only the named norm parameters are spared
    model.add_module("norm", nn.LayerNorm(4))
    spared, decayed = param_groups(model, 0.01, no_decay_keys=("norm",), decay_1d=True)
    assert {id(p) for p in decayed["params"]} == {id(model.proj.weight), id(model.proj.bias)}
    assert {id(p) for p in spared["params"]} == {id(model.norm_scale.weight), id(model.norm.weight), id(model.norm.bias)}


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(1, 1, 3))
    optimizer = build_optimizer(model, 1e-3, 0.05)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay == {id(model[0].weight), id(model[2].weight)}
    assert no_decay == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    # nor on the names a model's no_weight_decay() gives, whatever their shape (a ViT's 3-d pos_embed)
    model.pos_embed = nn.Parameter(torch.zeros(1, 4, 4))
    model.no_weight_decay = lambda: {"pos_embed"}
    spared, decayed = param_groups(model, 0.05)
    assert any(p is model.pos_embed for p in spared["params"]) and not any(p is model.pos_embed for p in decayed["params"])


def test_the_optimizer_takes_the_betas_and_eps_it_is_given() -> None:
    optimizer = build_optimizer(nn.Linear(2, 2), 1e-3, 0.05, betas=(0.8, 0.95), eps=1e-6)
    assert all((group["betas"], group["eps"]) == ((0.8, 0.95), 1e-6) for group in optimizer.param_groups)


def test_seed_everything_seeds_python_numpy_and_torch() -> None:
    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first


def test_optimizer_is_fused_adamw_with_the_loops_updates() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    twin = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, 1e-2, 0.05)
    assert optimizer.defaults["fused"]
    plain = torch.optim.AdamW(param_groups(twin, 0.05), lr=1e-2, foreach=False)
    x = torch.randn(16, 4)
    for _ in range(5):
        for net, opt in ((model, optimizer), (twin, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for ours, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # float64 parameters take the fused kernel too
    double = nn.Linear(2, 2).double()
    optimizer = build_optimizer(double, 1e-3, 0.05)
    double(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
    before = double.weight.detach().clone()
    optimizer.step()
    assert optimizer.defaults["fused"] and not torch.equal(double.weight, before)


def test_precision_choices_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype is None
    bf16 = resolve_precision("bf16", cpu)
    with bf16.autocast():
        assert nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    with pytest.raises(UserInputError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)


def test_bf16_on_a_cpu_without_bf16_instructions_warns_once_per_command(monkeypatch, capsys) -> None:
    # `--amp bf16` on an AVX2 CPU ran crossformer_tiny 7x slower than float32 in inference and 40x
    # in a training step (emulated bf16), without a word
    import warnings

    from crossformer import cli
    from crossformer.engine.amp import EMULATED_BF16
    from crossformer.errors import PerformanceWarning
    from crossformer.models import layers

    cpu = torch.device("cpu")
    monkeypatch.setattr(layers, "cpu_has_bf16_kernels", lambda: False)
    with pytest.warns(PerformanceWarning, match=r"^this CPU has no bf16 instructions .*many times slower than float32"):
        resolve_precision("bf16", cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_precision("none", cpu)
        resolve_precision("auto", cpu)
        resolve_precision("bf16", torch.device("cuda"))  # GPUs: their own bf16
        monkeypatch.setattr(layers, "cpu_has_bf16_kernels", lambda: True)
        resolve_precision("bf16", cpu)
    # the command line: one "warning:" line, though the benchmark resolves the precision per mode
    argv = ["benchmark", "--model", "crossformer_tiny", "--amp", "bf16", "--mode", "both", "--rounds", "1",
            "--batch-size", "1", "--img-size", "32", "--no-memory"]
    for native in (False, True):
        monkeypatch.setattr(layers, "cpu_has_bf16_kernels", lambda: native)
        assert cli.main(argv) == 0
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert said == ([] if native else ["warning: " + EMULATED_BF16])


def test_precision_step_clips_and_zeroes() -> None:
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precision = resolve_precision("none", torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    precision.backward(model(torch.full((1, 3), 100.0)).sum())
    norm = precision.step(optimizer, model.parameters(), clip_grad=5.0)
    assert norm == pytest.approx(float(torch.tensor([100.0, 100.0, 100.0, 1.0]).norm()))  # the norm before clipping
    assert all(p.grad is None for p in model.parameters())
    # the step took the gradient clipped to norm 5 (SGD at rate 1: the step is the gradient)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert float(step.norm()) == pytest.approx(5.0, rel=1e-5)


def test_guard_stops_on_non_finite_loss() -> None:
    assert check_finite_loss(1.5, DistContext(), epoch=0, step=3, last_checkpoint=None) == 1.5
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2 step 7.*last good checkpoint is x.pth"):
        check_finite_loss(float("nan"), DistContext(), epoch=2, step=7, last_checkpoint="x.pth")
    with pytest.raises(NonFiniteLossError, match=r"loss became inf at epoch 0 step 1.*no checkpoint was written yet"):
        check_finite_loss(float("inf"), DistContext(), epoch=0, step=1, last_checkpoint=None)



def _collectives_on_this_rank() -> dict:
    from crossformer.engine.distributed import setup_distributed

    ctx = setup_distributed("cpu")
    finite = 1.0 if ctx.rank == 0 else float("nan")  # a non-finite loss on rank 1 alone
    stopped = None
    try:
        ctx.raise_together(UserInputError(f"cannot read rank{ctx.rank}.png"))  # both ranks failed
    except UserInputError as err:
        stopped = str(err)
    # the progress line's loss under torchrun: the ranks' mean (it was each rank's own)
    mean = check_finite_loss(float(ctx.rank + 1), ctx, epoch=0, step=1, last_checkpoint=None)
    try:
        check_finite_loss(finite, ctx, epoch=0, step=1, last_checkpoint=None)
        guard = "went on"
    except NonFiniteLossError:
        guard = "stopped"
    return {"rank": ctx.rank, "sum": ctx.all_reduce_sum([ctx.rank + 1.0, 2.0]), "all": ctx.all_true(ctx.rank == 0),
            "both": ctx.all_true(True), "stopped": stopped, "guard": guard, "gathered": ctx.gather_lists([ctx.rank]),
            "mean": mean}


@pytest.mark.slow
def test_the_collectives_agree_on_two_ranks() -> None:
    from two_ranks import on_two_ranks

    assert on_two_ranks(_collectives_on_this_rank) == [
        {"rank": rank, "sum": [3.0, 4.0], "all": False, "both": True, "stopped": "cannot read rank0.png",
         "guard": "stopped", "gathered": [0, 1], "mean": 1.5} for rank in range(2)]

def _ddp_grads_on_this_rank(align: bool) -> dict:
    """Under :func:`~two_ranks.on_two_ranks`: two DDP backward passes of a 3x3 then 1x1
    convolution on channels-last input; the warnings raised and the 1x1 kernel's gradient."""
    import warnings

    torch.set_num_threads(2)  # oneDNN's backward writes the channels-last gradient with 2 threads, not with 1
    torch.manual_seed(0)  # the same weights on both ranks
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 3, 1))
    if align:
        align_grad_strides(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    images = torch.arange(2 * 4 * 36, dtype=torch.float32).reshape(2, 4, 6, 6).div(100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            ddp(images.contiguous(memory_format=torch.channels_last)).square().sum().backward()
    kernel = model[1].weight
    return {"warnings": [str(w.message).splitlines()[0] for w in caught], "grad": kernel.grad.clone(),
            "strides": (kernel.grad.stride(), kernel.stride())}


@pytest.mark.slow
def test_a_1x1_kernels_gradient_reaches_ddp_with_its_parameters_strides() -> None:
    from two_ranks import on_two_ranks

    # channels-last input gives the 1x1 kernel's gradient strides (8, 1, 8, 8) against the
    # parameter's (8, 1, 1, 1): the same memory, which DDP warned of on every rank
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 3, 1))
    images = torch.arange(2 * 4 * 36, dtype=torch.float32).reshape(2, 4, 6, 6).div(100)
    for _ in range(2):
        model(images).square().sum().backward()
    for rank in on_two_ranks(_ddp_grads_on_this_rank, True):
        assert not [w for w in rank["warnings"] if "strides" in w], rank["warnings"]
        assert rank["strides"] == ((8, 1, 1, 1), (8, 1, 1, 1))
        torch.testing.assert_close(rank["grad"], model[1].weight.grad, rtol=1e-5, atol=1e-5)


def test_logger_writes_jsonl_and_tensorboard_on_rank_zero_only(tmp_path: Path, capsys) -> None:
    RunLogger(tmp_path / "other", enabled=False).scalars(1, {"a": 1.0})
    assert not (tmp_path / "other").exists()
    logger = RunLogger(tmp_path / "main")
    logger.info("hello")
    logger.info("error: a line the caller prints itself", echo=False)
    assert capsys.readouterr().out == "hello\n"
    assert "error: a line the caller prints itself" in (tmp_path / "main" / "log.txt").read_text()
    logger.scalars(5, {"val/acc1": 50.0}, epoch=1)
    logger.close()
    assert json.loads((tmp_path / "main" / "metrics.jsonl").read_text()) == {"step": 5, "epoch": 1, "val/acc1": 50.0}
    assert "hello" in (tmp_path / "main" / "log.txt").read_text()
    assert list((tmp_path / "main" / "tensorboard").glob("events.out.tfevents.*"))


def test_skipped_files_said_by_an_earlier_session_count_against_the_limit() -> None:
    # an earlier session named 2 files and said the rest are counted only: nothing is said again
    said: list[str] = []
    named = SkippedFiles(said.append, "the rest are counted", limit=2)
    named.mark_said(["a", "b", "c", "d"])
    named("e")
    assert said == []


def test_progress_lines_show_four_figures_and_the_rate_of_this_session(tmp_path: Path, capsys, monkeypatch) -> None:
    clock = iter(range(100))
    monkeypatch.setattr("crossformer.engine.logging.time.perf_counter", lambda: float(next(clock)))
    progress = Progress(RunLogger(None), total=10, desc="epoch 1", initial=4, every=1)  # resumed at batch 4
    progress.update(loss=1.23456)
    progress.update(loss=0.5)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["epoch 1 [5/10] loss 1.235 (1.00 it/s)", "epoch 1 [6/10] loss 0.5 (1.00 it/s)"]
    quiet = Progress(RunLogger(None), total=100, desc="epoch 2", every=50, seconds=3.0)  # the clock: a second a call
    for _ in range(4):  # a line once 3 seconds have passed since the last
        quiet.update(loss=1.0)
    assert [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()] == ["epoch 2 [3/100] loss 1"]


@dataclasses.dataclass(frozen=True)
class _Settings:
    lr: float = 0.1
    epochs: int = 3
    flag: bool = False
    name: str = "x"
    kwargs: dict = dataclasses.field(default_factory=dict)


def test_overrides_are_typed_and_typos_rejected() -> None:
    values = parse_overrides(["lr=5e-4", "epochs=7", "flag=true", "kwargs.depths=[1,1,2,1]"])
    result = apply_overrides(_Settings(), values)
    assert result == _Settings(lr=5e-4, epochs=7, flag=True, kwargs={"depths": [1, 1, 2, 1]})
    with pytest.raises(UserInputError, match="unknown setting 'epoch'"):
        apply_overrides(_Settings(), {"epoch": 3})
    with pytest.raises(UserInputError, match="epochs must be an integer"):
        apply_overrides(_Settings(), {"epochs": "many"})
    with pytest.raises(UserInputError, match="expected KEY=VALUE"):
        parse_overrides(["epochs"])


def test_cpu_threads_zero_restores_torchs_default():
    from crossformer.engine import set_cpu_threads
    from crossformer.engine.distributed import TORCH_DEFAULT_THREADS

    before = torch.get_num_threads()
    try:
        set_cpu_threads(1)
        assert torch.get_num_threads() == 1
        set_cpu_threads(0)  # a run after one that chose 1 thread (demo --task all) gets torch's default back
        assert torch.get_num_threads() == TORCH_DEFAULT_THREADS
    finally:
        torch.set_num_threads(before)


def test_a_config_file_may_start_from_another_and_change_what_it_names(tmp_path: Path, capsys) -> None:
    from crossformer.cli import main
    from crossformer.engine.registry import resolve_config
    from cli_errors import one_error_line

    shared = tmp_path / "shared.yaml"
    shared.write_text("base: digits\nrun: {epochs: 3}\nmodel: {kwargs: {embed_dim: 16}}\n")
    mine = tmp_path / "runs" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("base: ../shared.yaml\noptimizer: {lr: 1.0e-3}\nschedule: {min_lr: 1.0e-6}\n")
    config = resolve_config(str(mine)).config
    digits = resolve_config("digits").config
    assert config.task == "classification" and config.run.epochs == 3 and config.optimizer.lr == 1e-3
    # mappings merge key by key at every depth; the rest of the chain stays
    assert config.model.kwargs == {**digits.model.kwargs, "embed_dim": 16}
    assert config.run.batch_size == digits.run.batch_size and config.augment == digits.augment
    # a bundled dense config as the base brings its task
    dense = tmp_path / "dense.yaml"
    dense.write_text("base: mask_rcnn_shapes_demo\nrun: {epochs: 1}\n")
    assert resolve_config(str(dense)).config.task == "detection"
    # what train --help shows is the merged file
    with pytest.raises(SystemExit):
        main(["train", "--config", str(mine), "--help"])
    assert "(default 3)" in " ".join(capsys.readouterr().out.split())
    # loops and missing bases are one-line errors naming the file
    shared.write_text("base: runs/mine.yaml\n")
    assert "leads back to" in one_error_line(capsys, ["train", "--config", str(mine)])
    shared.write_text("base: nowhere\n")
    assert "no config file 'nowhere'" in one_error_line(capsys, ["train", "--config", str(mine)])
    shared.write_text("base: [digits]\n")
    assert "base must name one config" in one_error_line(capsys, ["train", "--config", str(mine)])


def test_a_setting_given_twice_or_unreadable_is_refused_not_resolved_silently(tmp_path: Path, capsys) -> None:
    from cli_errors import one_error_line

    def error(text: bytes | str, *overrides: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return one_error_line(capsys, ["train", "--config", str(path), "--epochs", "1", *overrides])

    # PyYAML kept the last of two sections of one name: the first's lr was lost
    assert error("optimizer: {lr: 1.0e-3}\nrun: {epochs: 2}\noptimizer: {weight_decay: 0.1}\n").endswith(
        "is not valid YAML: 'optimizer' is given twice in one mapping (line 3): keep one")
    assert "'epochs' is given twice" in error("run:\n  epochs: 2\n  epochs: 3\n")
    # one setting under two names in one layer: the file's, the command line's
    assert error("epochs: 3\nrun: {epochs: 5}\n").endswith("run.epochs is set twice, as epochs and as run.epochs: "
                                                           "give it once")
    assert error("task: classification\n", "optimizer.lr=1e-3", "lr=2e-3").endswith(
        "overrides: optimizer.lr is set twice, as optimizer.lr and as lr: give it once")
    # NaN passed every range check (torch's traceback, or a "loss became nan" pointing elsewhere)
    for override, shown in (("optimizer.lr=nan", "nan"), ("run.clip_grad=.inf", "inf"),
                            ("augment.color_jitter=.nan", "nan")):
        assert error("task: classification\n", override).endswith(f"{override.split('=')[0]} must be a finite number, "
                                                                   f"got {shown}")
    # a Latin-1 file was a UnicodeDecodeError traceback
    assert error(b"task: clas\xe9sification\n").endswith("is not a UTF-8 text file: a config is YAML text "
                                                          "(save it as UTF-8)")
    # YAML's merge keys are no duplicates
    from crossformer.engine.config import load_yaml

    path = tmp_path / "merge.yaml"
    path.write_text("a: &x {b: 1}\nc:\n  <<: *x\n  b: 2\n")
    assert load_yaml(path) == {"a": {"b": 1}, "c": {"b": 2}}


def test_a_file_of_another_tasks_settings_without_a_task_line_is_told_to_name_it(tmp_path: Path) -> None:
    # "unknown setting 'model.kind'; model has: name, kwargs..." never said the file was read as classification
    from crossformer.engine.registry import resolve_config

    path = tmp_path / "mine.yaml"
    path.write_text("model: {kind: mask_rcnn, backbone: crossformer_small}\n")
    with pytest.raises(UserInputError, match=r"unknown setting 'model.kind'; .* \(the file names no task and is read as "
                                             r"classification; for detection settings add 'task: detection'\)$"):
        resolve_config(str(path))
    path.write_text("task: detection\n" + path.read_text())
    assert resolve_config(str(path)).config.model.kind == "mask_rcnn"
    path.write_text("model: {kind: upernet, backbone: crossformer_small}\n")  # segmentation's keys and values
    with pytest.raises(UserInputError, match=r"for segmentation settings add 'task: segmentation'\)$"):
        resolve_config(str(path))
    path.write_text("model: {kindd: mask_rcnn}\n")  # no task's setting: the error alone
    with pytest.raises(UserInputError, match=r"unknown setting 'model.kindd'; model has: [a-z_, ]+$"):
        resolve_config(str(path))


@pytest.mark.parametrize("config, override, expected", [
    ("fpn_crossformer_small", "model.aux_channels=64",
     "model.aux_channels=64 has no effect with model.kind=fpn: only UPerNet's auxiliary head reads it"),
    ("retinanet_crossformer_small_1x", "model.fc_channels=16", "model.fc_channels=16 has no effect with "
     "model.kind=retinanet: only a two-stage detector (mask_rcnn, cascade_mask_rcnn) reads it"),
    ("retinanet_crossformer_small_1x", "model.rpn_samples=64", "model.rpn_samples=64 has no effect with model.kind=retinanet"),
    ("digits", "schedule.milestones=[5]", "schedule.milestones=[5] has no effect with schedule.name=cosine: only the "
     "step schedule reads it; drop it (or set schedule.milestones=[])"),
    ("mask_rcnn_shapes_demo", "schedule.power=2", "schedule.power=2.0 has no effect with schedule.name=step"),
    ("digits", "optimizer.lr_batch_reference=16", None),  # digits scales its lr: read
])
def test_a_setting_nothing_reads_is_refused(config: str, override: str, expected: str | None) -> None:
    # Semantic FPN's aux_channels, RetinaNet's R-CNN sizes, a cosine run's milestones: accepted and ignored
    from crossformer.engine.registry import resolve_config

    overrides = parse_overrides([override])
    if expected is None:
        resolve_config(config, overrides)
        with pytest.raises(UserInputError, match=r"has no effect with optimizer.scale_lr=false: only the linear lr "
                                                 r"scaling reads it; drop it \(or set optimizer.lr_batch_reference=512\)$"):
            resolve_config(config, {**overrides, "optimizer.scale_lr": False})
        return
    with pytest.raises(UserInputError, match=re.escape(f"overrides: {expected}")):
        resolve_config(config, overrides)
    resolve_config(config)  # the bundled config itself sets nothing unread


def test_a_choice_above_a_layer_leaves_its_settings_unread_without_a_word(tmp_path: Path) -> None:
    # --kind retinanet over a Mask R-CNN file's head sizes, --schedule cosine over a step recipe's
    # milestones: the layer above chose otherwise (the other way round, or in one layer, is refused)
    from crossformer.engine.registry import resolve_config

    assert resolve_config("mask_rcnn_shapes_demo", {"model.kind": "retinanet"}).config.model.fc_channels == 256
    assert resolve_config("mask_rcnn_shapes_demo", {"schedule.name": "cosine"}).config.schedule.milestones == (11,)
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: mask_rcnn_shapes_demo\nschedule: {name: cosine}\n")
    assert resolve_config(str(mine)).config.schedule.name == "cosine"
    mine.write_text("base: mask_rcnn_shapes_demo\nschedule: {name: cosine, milestones: [3]}\n")
    with pytest.raises(UserInputError, match=r"mine\.yaml: schedule\.milestones=\[3\] has no effect with "
                                             r"schedule\.name=cosine"):
        resolve_config(str(mine))
    # a checkpoint's recorded configuration holds every field in one layer, the choice beside what
    # it left unread (trained with --kind fpn over upernet_demo): evaluate and predict refused it
    recorded = {"task": "segmentation", "model": {"kind": "fpn", "aux_channels": 32},
                "schedule": {"name": "cosine", "power": 1.0}}
    assert resolve_config(recorded, source="run/last.pth").config.model.aux_channels == 32
    with pytest.raises(UserInputError, match=r"^overrides: model\.aux_channels=16 has no effect with model\.kind=fpn"):
        resolve_config(recorded, {"model.aux_channels": 16}, source="run/last.pth")


def test_more_processes_than_gpus_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchrun --nproc-per-node 8 on a 4-GPU machine: ranks 4-7 asked for cuda:4-7 and failed deep
    # inside torch.cuda.set_device with CUDA's "invalid device ordinal" (and rank 0, which prints
    # the errors, had none to print). Now every rank of the node has the same one-line error.
    from crossformer.engine import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_device("auto", local_rank=3) == torch.device("cuda:3")
    # a fixed GPU for every process of the node: NCCL's "Duplicate GPU detected" at the first reduction
    with pytest.raises(UserInputError, match=r"^--device cuda:1 would put all 4 processes torchrun started on this "
                                             r"node on GPU 1: use --device cuda \(each process takes its own GPU\)$"):
        resolve_device("cuda:1", local_rank=3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    for local_rank in (0, 7):
        with pytest.raises(UserInputError, match=r"^torchrun started 8 processes on this node but 4 GPUs are visible "
                                                 r"\(0-3\): start at most 4 per node \(torchrun --nproc-per-node\) or "
                                                 r"use --device cpu$"):
            resolve_device("cuda", local_rank=local_rank)
    with pytest.raises(UserInputError, match=r"^--device cuda:4: 4 GPUs are visible \(0-3\)$"):
        resolve_device("cuda:4")


def test_the_command_line_choice_of_an_alternative_replaces_the_files(tmp_path: Path) -> None:
    # --iterations N over digits (epochs: 15) was refused ("set exactly one of run.epochs and
    # run.iterations") until --epochs 0 was added too; the same for warm-up and dense starts
    from crossformer.engine.registry import resolve_config

    config = resolve_config("digits", {"iterations": 3, "warmup_iters": 2}).config
    assert (config.run.epochs, config.run.iterations) == (0, 3)
    assert (config.schedule.warmup_epochs, config.schedule.warmup_iters) == (0, 2)
    assert resolve_config("digits", {"iterations": 0}).config.run.epochs == 15  # 0 chooses nothing
    # a file replaces the task's defaults the same way (segmentation's are 160k iterations)
    seg = tmp_path / "seg.yaml"
    seg.write_text("task: segmentation\nrun: {epochs: 2, eval_every: 1, checkpoint_every: 0}\nschedule: {warmup_epochs: 1}\n")
    config = resolve_config(str(seg)).config
    assert (config.run.epochs, config.run.iterations, config.schedule.warmup_iters) == (2, 0, 0)
    dense = tmp_path / "dense.yaml"
    dense.write_text("base: mask_rcnn_shapes_demo\nmodel: {pretrained: backbone.pth}\n")
    model = resolve_config(str(dense), {"model.init_from": "detector.pth"}).config.model
    assert (model.pretrained, model.init_from) == (None, "detector.pth")
    # one layer that sets both is still refused
    with pytest.raises(UserInputError, match="set exactly one of run.epochs and run.iterations"):
        resolve_config("digits", {"epochs": 2, "iterations": 3})
    seg.write_text("task: segmentation\nrun: {epochs: 2, iterations: 3}\n")
    with pytest.raises(UserInputError, match="set exactly one of run.epochs and run.iterations"):
        resolve_config(str(seg))
    # a negative length was "set exactly one of run.epochs and run.iterations", though one was set
    for name in ("epochs", "iterations"):
        with pytest.raises(UserInputError, match=rf"^run\.{name} must be at least 1 \(0: not set\), got -1$"):
            resolve_config("digits", {name: -1})


def test_an_iteration_run_keeps_each_tasks_warm_up(tmp_path: Path) -> None:
    # --iterations over digits (warmup_epochs: 1) stopped with "schedule.warmup_epochs needs an
    # epoch-based run": the warm-up in epochs is kept (as many passes' updates), as a detection
    # recipe's warmup_iters is in its epoch run and a segmentation recipe's in its iteration run
    from crossformer.engine.registry import resolve_config

    config = resolve_config("digits", {"iterations": 2}).config
    assert (config.run.epochs, config.run.iterations, config.schedule.warmup_epochs) == (0, 2, 1)
    in_updates = {"eval_every": 2, "checkpoint_every": 0, "milestones": [1]}  # the recipe's are in epochs
    config = resolve_config("mask_rcnn_shapes_demo", {"iterations": 2, **in_updates}).config
    assert (config.run.epochs, config.run.iterations, config.schedule.warmup_iters) == (0, 2, 30)
    seg = tmp_path / "seg.yaml"  # the task's default run: 160k iterations
    seg.write_text("base: upernet_demo\nschedule: {warmup_epochs: 2}\n")
    config = resolve_config(str(seg)).config
    assert (config.run.iterations, config.schedule.warmup_epochs, config.schedule.warmup_iters) == (300, 2, 0)
    seg.write_text("task: segmentation\nschedule: {warmup_epochs: 2}\n")
    config = resolve_config(str(seg)).config
    assert (config.run.iterations, config.schedule.warmup_epochs, config.schedule.warmup_iters) == (160_000, 2, 0)


def test_a_change_of_the_runs_unit_restates_what_counts_in_the_old_one(tmp_path: Path) -> None:
    # --iterations 1000 over a detection recipe (epochs: 12, milestones: [8, 11], checkpoint_every: 1)
    # cut the rate at updates 8 and 11 and wrote a checkpoint after every update, without a word;
    # segmentation's default eval_every: 16000 under a file's epochs: 2 never evaluated
    from crossformer.engine.registry import resolve_config

    with pytest.raises(UserInputError, match=re.escape(
            "overrides: run.iterations replaces run.epochs, but run.eval_every=12, run.checkpoint_every=1, "
            "schedule.milestones=[11] (from mask_rcnn_shapes_demo.yaml) count epochs: set them in iterations too "
            "(run.eval_every=... run.checkpoint_every=... schedule.milestones=...), or keep run.epochs")):
        resolve_config("mask_rcnn_shapes_demo", {"iterations": 1000})
    with pytest.raises(UserInputError, match=re.escape("schedule.milestones=[8, 11] (from the detection defaults) counts")):
        resolve_config(None, {"iterations": 1000}, task="detection")
    seg = tmp_path / "seg.yaml"
    seg.write_text("task: segmentation\nrun: {epochs: 2}\n")
    with pytest.raises(UserInputError, match=re.escape(
            f"{seg}: run.epochs replaces run.iterations, but run.eval_every=16000, run.checkpoint_every=16000 "
            "(from the segmentation defaults) count iterations")):
        resolve_config(str(seg))
    # a base file's settings count in its unit too; restating them, or 0 and [], which count nothing, is fine
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: mask_rcnn_shapes_demo\nrun: {iterations: 40, eval_every: 20}\n")
    with pytest.raises(UserInputError, match=re.escape(
            f"{mine}: run.iterations replaces run.epochs, but run.checkpoint_every=1, schedule.milestones=[11] (from "
            "mask_rcnn_shapes_demo.yaml) count epochs")):
        resolve_config(str(mine))
    mine.write_text("base: mask_rcnn_shapes_demo\nrun: {iterations: 40, eval_every: 20, checkpoint_every: 0}\n"
                    "schedule: {name: cosine, milestones: []}\n")
    run = resolve_config(str(mine)).config.run
    assert (run.iterations, run.eval_every, run.checkpoint_every) == (40, 20, 0)
    assert resolve_config(str(mine), {"iterations": 60}).config.run.iterations == 60  # another length, the file's unit
    assert resolve_config(str(mine), {"epochs": 3, "eval_every": 1}).config.run.epochs == 3  # back to epochs, restated
    # a change within one unit restates nothing; digits sets none of these
    assert resolve_config("mask_rcnn_shapes_demo", {"epochs": 2}).config.schedule.milestones == (11,)
    assert resolve_config("digits", {"iterations": 3}).config.run.iterations == 3


def test_a_files_choice_of_an_alternative_replaces_its_bases(tmp_path: Path, capsys) -> None:
    # a file naming iterations over a base naming epochs was refused as setting both ("set exactly
    # one of run.epochs and run.iterations"), though the command line could replace the base's choice
    from crossformer.cli import main
    from crossformer.engine.registry import resolve_config

    shared = tmp_path / "shared.yaml"
    shared.write_text("base: digits\nrun: {epochs: 3}\nschedule: {warmup_epochs: 1}\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: shared.yaml\nrun: {iterations: 20}\nschedule: {warmup_iters: 5}\n")
    config = resolve_config(str(mine)).config
    assert (config.run.epochs, config.run.iterations) == (0, 20)
    assert (config.schedule.warmup_epochs, config.schedule.warmup_iters) == (0, 5)
    with pytest.raises(SystemExit):  # what train --help shows is the child's choice
        main(["train", "--config", str(mine), "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "or set epochs) (default 20)" in help_text and "or set iterations) (default 0)" in help_text
    shared.write_text("base: digits\nepochs: 3\n")  # a bare or dotted key is the same setting
    mine.write_text("base: shared.yaml\nrun.iterations: 20\nwarmup_iters: 2\n")
    assert resolve_config(str(mine)).config.run.length == 20
    dense = tmp_path / "dense.yaml"
    dense.write_text("base: mask_rcnn_shapes_demo\nmodel: {pretrained: backbone.pth}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: dense.yaml\nmodel: {init_from: detector.pth}\n")
    model = resolve_config(str(child)).config.model
    assert (model.pretrained, model.init_from) == (None, "detector.pth")
    # a child's section setting replaces its base's bare or dotted one (it lost to them before:
    # the merge saw 'run' and 'epochs' as different keys)
    mine.write_text("base: shared.yaml\nrun: {epochs: 2}\n")
    assert resolve_config(str(mine)).config.run.epochs == 2
    shared.write_text("base: digits\nrun.epochs: 3\nmodel: {kwargs: {embed_dim: 16, depths: [1, 1, 1, 1]}}\n")
    mine.write_text("base: shared.yaml\nepochs: 4\nmodel.kwargs.embed_dim: 32\n")
    config = resolve_config(str(mine)).config
    assert config.run.epochs == 4  # mappings still merge entry by entry (digits' other kwargs kept)
    assert config.model.kwargs["embed_dim"] == 32 and config.model.kwargs["depths"] == [1, 1, 1, 1]
    # both in one file is still refused, naming the file
    mine.write_text("base: shared.yaml\nrun: {epochs: 2, iterations: 3}\n")
    with pytest.raises(UserInputError, match=f"^{mine}: run.epochs and run.iterations are both set "
                                             r"\(epochs=2, iterations=3\): set exactly one of run.epochs and run.iterations$"):
        resolve_config(str(mine))
    child.write_text("base: dense.yaml\nmodel: {pretrained: a.pth, init_from: b.pth}\n")
    with pytest.raises(UserInputError, match=f"^{child}: model.pretrained and model.init_from are both set .*: "
                                             "the whole model .init_from. brings its own backbone"):
        resolve_config(str(child))


def test_training_records_every_data_path_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crossformer.engine.config import with_absolute_paths
    from crossformer.engine.registry import task_module

    monkeypatch.chdir(tmp_path)
    paths = {
        "classification": {"data.root": "own"},
        "detection": {"data.root": "coco", "data.train_ann": "a/train.json", "data.train_images": "a/train",
                      "data.val_ann": "a/val.json", "data.val_images": "~/val"},
        "segmentation": {"data.train_images": "t", "data.train_labels": "tl", "data.val_images": "v",
                         "data.val_labels": "vl", "data.classes": "classes.txt"},
    }
    for task, values in paths.items():
        data = with_absolute_paths(apply_overrides(task_module(task).CONFIG(), values)).data
        for key, value in values.items():
            assert getattr(data, key.split(".")[1]) == str(Path(value).expanduser().absolute()), (task, key)
    assert with_absolute_paths(task_module("segmentation").CONFIG()).data.root is None  # unset stays unset


def test_path_settings_take_a_python_path(tmp_path: Path) -> None:
    # resolve_config(overrides={"data.root": Path(...)}) was refused ("data.root must be a
    # string"): a Python caller's os.PathLike goes wherever a path string does
    from crossformer.engine.registry import resolve_config

    config = resolve_config(overrides={"data.root": tmp_path, "output": tmp_path / "run",
                                       "model.pretrained": tmp_path / "backbone.pth"}).config
    assert (config.data.root, config.run.output) == (str(tmp_path), str(tmp_path / "run"))
    assert config.model.pretrained == str(tmp_path / "backbone.pth")
    dense = resolve_config(task="detection", overrides={"model.init_from": tmp_path / "detector.pth",
                                                        "data.train_ann": tmp_path / "train.json"}).config
    assert (dense.model.init_from, dense.data.train_ann) == (str(tmp_path / "detector.pth"), str(tmp_path / "train.json"))
    folders = {f"data.{name}": tmp_path / name for name in ("val_images", "val_labels", "classes")}
    seg = resolve_config(task="segmentation", overrides=folders).config
    assert seg.data.classes == str(tmp_path / "classes")
    with pytest.raises(UserInputError, match="data.root must be a string, got 3"):  # other types still refused
        resolve_config(overrides={"data.root": 3})


def test_text_read_as_a_number_and_an_entry_below_a_list_are_refused_in_one_line(capsys) -> None:
    # run.output=2024 said only "must be a string, got 2024" (YAML had read a number), and
    # model.kwargs.depths.x=1 over a list was a TypeError from dict()
    from crossformer.cli import main

    argv = ["train", "--epochs", "1", "--data", "/nonexistent"]
    for value, read in (("2024", "2024"), ("1e3", "1000.0"), ("2024-12-07", "datetime.date(2024, 12, 7)")):
        assert main([*argv, f"run.output={value}"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"""crossformer train: error: overrides: run.output must be a string, got {read}, which YAML read from """
            """unquoted text: quote it (KEY='"TEXT"' on a command line, KEY: "TEXT" in a file)"""]
    assert main([*argv, "run.output=\"2024\"", "model.kwargs.depths=[1,1,2,1]", "model.kwargs.depths.x=1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "crossformer train: error: overrides: model.kwargs.depths is [1, 1, 2, 1], not a mapping, "
        "so model.kwargs.depths.x cannot be set"]


# stochastic depth: one setting, model.drop_path, in every task ------------------------

_DROP_PATH_SPELLINGS = [("upernet_demo", "model.backbone_kwargs"), ("mask_rcnn_shapes_demo", "model.backbone_kwargs"),
                        ("digits", "model.kwargs")]


@pytest.mark.parametrize("config, kwargs_key", _DROP_PATH_SPELLINGS)
def test_the_constructors_drop_path_rate_is_refused_naming_model_drop_path(config: str, kwargs_key: str) -> None:
    # segmentation and classification ignored it beside the configs' drop_path; detection let it win
    from crossformer.engine.registry import resolve_config

    with pytest.raises(UserInputError, match=rf"{kwargs_key}\.drop_path_rate is set by model\.drop_path: "
                                             r"use model\.drop_path=0\.3 instead$"):
        resolve_config(config, {f"{kwargs_key}.drop_path_rate": 0.3})
    assert resolve_config(config, {"model.drop_path": 0.3}).config.model.drop_path == 0.3


@pytest.mark.parametrize("task, kwargs_key", [("detection", "backbone_kwargs"), ("segmentation", "backbone_kwargs")])
def test_a_checkpoint_recording_the_rate_in_its_kwargs_still_gives_its_config(
    task: str, kwargs_key: str, tmp_path: Path,
) -> None:
    # runs from before the rate had one name: evaluate and predict read their recorded config
    from crossformer.commands.common import recorded_config
    from crossformer.engine.registry import resolve_config

    path = tmp_path / "old.pth"
    torch.save({"task": task, "config": {"model": {kwargs_key: {"embed_dim": 48, "drop_path_rate": 0.3}}}}, path)
    recorded, source = recorded_config(str(path))
    model = resolve_config(recorded, task=task, source=source).config.model
    assert model.drop_path == 0.3 and getattr(model, kwargs_key) == {"embed_dim": 48}
