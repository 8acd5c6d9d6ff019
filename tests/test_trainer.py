"""The engine's training loop on a tiny fake task (no images): epoch and iteration runs, exact
resume after SIGKILL, the NaN stop, best-checkpoint selection, the registry and derived flags,
and two processes under torchrun."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from crossformer.engine import DistContext, NonFiniteLossError, cosine_factor, load_training_state, train
from crossformer.errors import UserInputError
from engine_fixtures import FakeTask, fake_config, resume_and_compare
from processes import run_process

TESTS = Path(__file__).resolve().parent


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_epoch_mode_evaluates_every_n_epochs_and_follows_the_schedule(tmp_path: Path) -> None:
    metrics = train(FakeTask, fake_config(tmp_path, epochs=4, eval_every=2))
    assert (metrics["epoch"], metrics["global_step"]) == (4, 24)  # 24 samples / batch 4 = 6 updates per epoch
    records = _records(tmp_path)
    evals = [r for r in records if "val/score" in r]
    assert [(r["epoch"], r["step"]) for r in evals] == [(1, 12), (3, 24)]
    steps = [r for r in records if "train/lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
    # the rate logged at update s is the one it used (as the progress line shows it): peak x factor(s - 1)
    for r in steps:
        assert r["train/lr"] == pytest.approx(0.05 * cosine_factor(r["step"] - 1, 24, 2, 0.001, 0.0), rel=1e-12)
    assert all(r["train/grad_norm"] > 0 for r in steps)
    assert evals[-1]["train/loss"] == pytest.approx(evals[-1]["train/mse"] + evals[-1]["train/l1"], rel=1e-6)  # float32 sum
    assert evals[-1]["val/mse"] < evals[0]["val/mse"] < 30  # it learns (the untrained model: about 32)
    state = load_training_state(tmp_path / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"], state["task"]) == (4, 0, 24, "fake")
    assert state["fake_samples"] == 24 and state["config"]["run"]["epochs"] == 4


def test_an_output_under_the_home_folder_is_not_a_folder_named_tilde(tmp_path: Path, monkeypatch) -> None:
    # run.output=~/runs/x (no shell expands it in KEY=VALUE) wrote the run into ./~/runs/x.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    train(FakeTask, fake_config("~/runs/x", epochs=1))
    assert (tmp_path / "home" / "runs" / "x" / "last.pth").is_file() and not (tmp_path / "~").exists()


def test_a_deterministic_run_leaves_the_process_as_it_found_it(tmp_path: Path) -> None:
    # run.deterministic turned torch's deterministic mode on for good: every test that a test
    # process ran after such a run (whichever xdist gave it) ran in that mode too
    during = []
    train(FakeTask, fake_config(tmp_path, epochs=1, deterministic=True),
          on_step_end=lambda step: during.append(torch.are_deterministic_algorithms_enabled()))
    assert during and all(during)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_a_warm_up_as_long_as_the_run_is_reported(tmp_path: Path, capsys) -> None:
    train(FakeTask, fake_config(tmp_path / "short", epochs=1, warmup_iters=6))  # 6 updates in all
    out = capsys.readouterr().out
    assert "cosine schedule over 6 updates, the first 6 of them a warm-up" in out
    assert "warning: the warm-up (6 updates) is not shorter than the run (6), so the rate never reaches 0.05" in out
    assert "warning: the warm-up" in (tmp_path / "short" / "log.txt").read_text()
    train(FakeTask, fake_config(tmp_path / "long", epochs=2, warmup_iters=6))
    out = capsys.readouterr().out
    assert "over 12 updates, the first 6 of them a warm-up" in out and "warning" not in out


def test_milestones_past_the_runs_end_are_reported(tmp_path: Path, capsys) -> None:
    # a 2-epoch trial of a step recipe with milestones [2, 8]: the rate never dropped, unsaid
    train(FakeTask, fake_config(tmp_path / "short", epochs=2, schedule="step", milestones=[1, 2, 8]))
    out = capsys.readouterr().out
    assert "warning: schedule.milestones [2, 8] lie at or past the run's end (2 epochs), so the rate is never " \
           "lowered there" in out
    train(FakeTask, fake_config(tmp_path / "long", iterations=9, schedule="step", milestones=[4, 8]))
    assert "warning" not in capsys.readouterr().out


def test_a_warm_up_in_epochs_lasts_as_many_epochs_in_an_iteration_run(tmp_path: Path, capsys) -> None:
    # iterations over a recipe's warmup_epochs stopped with "schedule.warmup_epochs needs an
    # epoch-based run"; the warm-up is the updates of that many passes over the training data
    metrics = train(FakeTask, fake_config(tmp_path, iterations=15, warmup_epochs=2))  # 6 updates per epoch
    assert metrics["global_step"] == 15
    assert "cosine schedule over 15 updates, the first 12 of them a warm-up" in capsys.readouterr().out
    rates = [r["train/lr"] for r in _records(tmp_path) if "train/lr" in r]
    assert rates[10] == pytest.approx(0.05 * cosine_factor(10, 15, 12, 0.001, 0.0), rel=1e-12)  # still warming up


def test_loader_workers_stop_at_the_cpus_this_process_may_use(tmp_path: Path, capsys) -> None:
    """run.num_workers 4 on 2 cores: every loader started 4 workers and PyTorch warned of each."""
    import warnings

    cpus = len(os.sched_getaffinity(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(FakeTask, fake_config(tmp_path, epochs=1, num_workers=cpus + 2))
    assert not [w for w in caught if "worker processes" in str(w.message)], [str(w.message) for w in caught]
    line = f"run.num_workers {cpus + 2}: this process may use {cpus} CPUs, so its data loaders start {cpus} worker"
    assert capsys.readouterr().out.count(line) == 1 and (tmp_path / "log.txt").read_text().count(line) == 1
    train(FakeTask, fake_config(tmp_path / "fits", epochs=1, num_workers=cpus))
    assert "run.num_workers" not in capsys.readouterr().out


def test_resuming_a_finished_run_says_how_far_it_got(tmp_path: Path, capsys) -> None:
    train(FakeTask, fake_config(tmp_path, epochs=2))
    capsys.readouterr()
    metrics = train(FakeTask, fake_config(tmp_path, epochs=1, resume="auto"))
    assert (metrics["epoch"], metrics["global_step"]) == (2, 12)  # nothing trained
    # the checkpoint's 2 epochs, not the 1 this run asks for
    assert "already trained 2 epochs (this run asks for 1)" in capsys.readouterr().out


class _BadFifthBatch(FakeTask):
    """The fifth batch of the run holds an unreadable file (as a task's batch_counts reports it)."""

    bad_batch = 5

    def batch_counts(self, batch):
        self.seen = getattr(self, "seen", 0) + 1
        if self.seen == self.bad_batch:
            raise UserInputError("cannot read image bad.png")
        return super().batch_counts(batch)


def test_bad_training_data_mid_epoch_keeps_the_updates_done(tmp_path: Path) -> None:
    # the run stopped with the error and no checkpoint: the epoch's updates were lost
    with pytest.raises(UserInputError, match=r"^cannot read image bad.png \(the training so far is saved in .*last.pth: "
                                             r"fix the data and pass --resume auto\)$"):
        train(_BadFifthBatch, fake_config(tmp_path / "stopped", epochs=2, model_ema=True))
    state = load_training_state(tmp_path / "stopped" / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (0, 4, 4)  # before the bad batch
    # with the data fixed, the resumed run retries that batch and ends where an unstopped one does
    resume_and_compare(tmp_path / "stopped", tmp_path / "clean", epochs=2, model_ema=True)


class _BadSixthBatch(_BadFifthBatch):
    bad_batch = 6


def test_bad_training_data_mid_accumulation_keeps_the_last_whole_update(tmp_path: Path) -> None:
    # a checkpoint taken there would hold the updates done but not the gradient accumulated since:
    # the resumed run's next update would be made of half its micro-batches
    settings = dict(epochs=2, accum_steps=2, save_every_steps=1, model_ema=True)
    with pytest.raises(UserInputError, match=r"^cannot read image bad.png$"):  # no "saved" note: nothing new was
        train(_BadSixthBatch, fake_config(tmp_path / "stopped", **settings))
    state = load_training_state(tmp_path / "stopped" / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (0, 4, 2)  # the last whole update
    resume_and_compare(tmp_path / "stopped", tmp_path / "clean", **settings)


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def on_step_end(global_step: int) -> None:
        if global_step == step:
            raise _Stop
    return on_step_end


def _rates_from_epoch_1(output: Path) -> list[tuple[int, int, float]]:
    return [(r["epoch"], r["step"], r["train/lr"]) for r in _records(output) if "train/lr" in r and r["epoch"] >= 1]


def test_resuming_with_another_process_count_follows_the_schedule_from_the_epoch(tmp_path: Path) -> None:
    # The position in the schedule is the update count, whose meaning depends on the process
    # count: resumed by one process, the updates of a 2-process run (3 per epoch, not 6) put the
    # schedule behind, and the run went past its total, its last updates at the cosine's end
    # (resumed by more processes, the rate fell to the floor half-way through).
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path / "run", epochs=4, save_every_steps=1), on_step_end=_stop_at(4))
    path = tmp_path / "run" / "last.pth"
    state = load_training_state(path)
    # as 2 processes of this batch would have written it after 4 updates: epoch 1, batch 1 of 3
    state.update(world_size=2, rank_state=state["rank_state"] * 2, epoch=1, batches_done=1, global_step=4)
    torch.save(state, path)
    metrics = train(FakeTask, fake_config(tmp_path / "run", epochs=4, resume="auto"))
    assert metrics["global_step"] == 24  # as a 1-process run of 4 epochs: 6 updates each
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "was written by 2 processes: restarting epoch 1 at update 6 of 24" in log
    clean = train(FakeTask, fake_config(tmp_path / "clean", epochs=4))
    assert clean["global_step"] == 24

    assert _rates_from_epoch_1(tmp_path / "run")[-18:] == _rates_from_epoch_1(tmp_path / "clean")



def _stopped_then_resumed_and_unstopped(root: Path) -> tuple[dict, dict]:
    """On each of 2 ranks: a run stopped mid-epoch (update 2 of 3 in epoch 0) and resumed, and the
    same run unstopped."""
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(root / "run", epochs=2, save_every_steps=1), on_step_end=_stop_at(2))
    resumed = train(FakeTask, fake_config(root / "run", epochs=2, resume="auto"))
    return resumed, train(FakeTask, fake_config(root / "clean", epochs=2))


@pytest.mark.slow
def test_a_two_process_run_resumed_mid_epoch_equals_an_unstopped_one(tmp_path: Path) -> None:
    # each rank must take back its own random state and its own place in its shard
    from two_ranks import on_two_ranks

    for resumed, unstopped in on_two_ranks(_stopped_then_resumed_and_unstopped, tmp_path):
        assert resumed == unstopped  # every metric, bit for bit
    a, b = load_training_state(tmp_path / "run" / "last.pth"), load_training_state(tmp_path / "clean" / "last.pth")
    assert a["world_size"] == 2 and a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert [rank["rng"]["torch"].tolist() for rank in a["rank_state"]] == \
        [rank["rng"]["torch"].tolist() for rank in b["rank_state"]]


def _train_scaling_the_rate(output: Path) -> None:
    train(FakeTask, fake_config(output, epochs=1, scale_lr=True, lr_batch_reference=16))


@pytest.mark.slow
def test_the_rate_scales_with_the_batch_of_every_process(tmp_path: Path) -> None:
    from two_ranks import on_two_ranks

    on_two_ranks(_train_scaling_the_rate, tmp_path / "run")
    # 2 processes x batch 4 = 8, half the reference batch: half the rate (0.05)
    assert "global batch 8, lr 0.025," in (tmp_path / "run" / "log.txt").read_text()

@pytest.mark.parametrize("saved_batch, stop", [(2, 15), (8, 4)])
def test_resuming_with_another_batch_size_follows_the_schedule_from_the_epoch(tmp_path: Path, saved_batch: int,
                                                                              stop: int) -> None:
    # As with another process count: the checkpoint's batches and updates were counted in its own
    # batches, so the epoch resumed at the wrong image and the run ended off its schedule's end
    # (with batch 2 before batch 4: at update 30 of 24; with batch 8 before: at 21 of 24).
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path / "run", epochs=4, batch_size=saved_batch, save_every_steps=1),
              on_step_end=_stop_at(stop))
    assert load_training_state(tmp_path / "run" / "last.pth")["epoch"] == 1
    metrics = train(FakeTask, fake_config(tmp_path / "run", epochs=4, resume="auto"))
    assert metrics["global_step"] == 24  # as a run of batch 4: 6 updates an epoch
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"was written with batch {saved_batch} (x 1 accumulated) per process: restarting epoch 1 at update 6 of 24" in log
    if saved_batch == 2:  # epoch 0's 12 updates are 6 of batch 4: its steps 7-12 come again (it keeps its records)
        assert "restarting epoch 1 at update 6 of 24; its updates are numbered from 7, which the epochs done" in log
    train(FakeTask, fake_config(tmp_path / "clean", epochs=4))
    assert _rates_from_epoch_1(tmp_path / "run")[-18:] == _rates_from_epoch_1(tmp_path / "clean")
    # the finished run resumed with another batch and fewer epochs: nothing restarts ("restarting
    # epoch 4 at update 12 of 6" came before "nothing to do")
    train(FakeTask, fake_config(tmp_path / "run", epochs=2, batch_size=8, resume="auto"))
    tail = (tmp_path / "run" / "log.txt").read_text()[len(log):]
    assert "nothing to do" in tail and "restarting epoch" not in tail


def test_a_resumed_run_takes_its_own_rate_and_decay(tmp_path: Path) -> None:
    # The optimizer's state restored the checkpoint's peak rate and weight decay over this run's:
    # a changed --lr (which the run logs as a changed setting) or another global batch under
    # linear scaling (another process count) was ignored.
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path, epochs=2, save_every_steps=1), on_step_end=_stop_at(4))
    train(FakeTask, fake_config(tmp_path, epochs=2, resume="auto", lr=0.1, weight_decay=0.02))
    # where the run writes and that it resumes are no changed settings
    assert ("with changed settings: optimizer.lr 0.1 (was 0.05); optimizer.weight_decay 0.02 (was 0.01); "
            "run.save_every_steps 0 (was 1)\n") in (tmp_path / "log.txt").read_text()
    resumed = [r for r in _records(tmp_path) if "train/lr" in r and r["step"] > 4]
    assert [r["step"] for r in resumed] == list(range(5, 13))
    for r in resumed:
        assert r["train/lr"] == pytest.approx(0.1 * cosine_factor(r["step"] - 1, 12, 2, 0.001, 0.0), rel=1e-12)
    state = load_training_state(tmp_path / "last.pth")
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.0, 0.02]


def test_iteration_mode_counts_updates_across_epochs(tmp_path: Path) -> None:
    metrics = train(FakeTask, fake_config(tmp_path, epochs=0, iterations=10, eval_every=4, accum_steps=2))
    # 6 micro-batches per epoch, 2 per update: 3 updates per epoch; 10 updates end in epoch 3 after 2 batches
    assert (metrics["epoch"], metrics["global_step"]) == (3, 10)
    assert [r["step"] for r in _records(tmp_path) if "val/score" in r] == [4, 8, 10]
    state = load_training_state(tmp_path / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (3, 2, 10)
    assert "iteration 8/10" in (tmp_path / "log.txt").read_text()


def test_an_iteration_run_resumed_with_another_batch_keeps_the_records_of_its_updates(tmp_path: Path) -> None:
    # The restarted epoch's records were deleted as in an epoch run, but an iteration run keeps
    # its update count, so updates 7-9 and the evaluation at 8 were never written again; and an
    # evaluation after an update that ended an epoch was recorded under the next epoch.
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path, epochs=0, iterations=12, eval_every=4, save_every_steps=1),
              on_step_end=_stop_at(9))  # 6 updates per epoch: stopped in epoch 1 after 3 batches
    before = _records(tmp_path)
    metrics = train(FakeTask, fake_config(tmp_path, epochs=0, iterations=12, eval_every=4, batch_size=2,
                                          resume="auto"))
    assert metrics["global_step"] == 12
    assert "restarting epoch 1 at update 9 of 12" in (tmp_path / "log.txt").read_text()
    records = _records(tmp_path)
    assert records[:len(before)] == before
    assert [r["step"] for r in records if "train/lr" in r] == list(range(1, 13))
    assert [(r["step"], r["epoch"]) for r in records if "val/score" in r] == [(4, 0), (8, 1), (12, 1)]


def test_an_iteration_run_that_sets_no_eval_every_evaluates_once_an_epoch(tmp_path: Path) -> None:
    # `train --config digits --iterations N` evaluated after every update: the default period counted updates
    metrics = train(FakeTask, fake_config(tmp_path, epochs=0, iterations=14))
    assert metrics["global_step"] == 14  # 6 updates per epoch
    assert [r["step"] for r in _records(tmp_path) if "val/score" in r] == [6, 12, 14]
    assert "iteration 12/14" in (tmp_path / "log.txt").read_text()


def test_accumulated_micro_batches_update_as_one_batch_as_large(tmp_path: Path) -> None:
    # each micro-batch's whole loss was back-propagated: the update's gradient (its logged norm,
    # what clip_grad cuts) was accum_steps times the batch's (AdamW's steps hide the scale)
    exact = {"fake.noise": 0.0, "fake.dropout": 0.0}  # no draws, so that both runs see the same numbers
    whole = train(FakeTask, fake_config(tmp_path / "whole", epochs=1, batch_size=8, **exact))
    parts = train(FakeTask, fake_config(tmp_path / "parts", epochs=1, batch_size=4, accum_steps=2, **exact))
    assert whole["global_step"] == parts["global_step"] == 3  # the same 8 samples in each update
    norms = {run: [r["train/grad_norm"] for r in _records(tmp_path / run) if "train/grad_norm" in r]
             for run in ("whole", "parts")}
    assert norms["parts"] == pytest.approx(norms["whole"], rel=1e-5)
    assert parts["train/loss"] == pytest.approx(whole["train/loss"], rel=1e-5)
    assert parts["val/mse"] == pytest.approx(whole["val/mse"], rel=1e-5)
    # an epoch of 1 micro-batch: its update, the epoch's last, is that micro-batch alone, whatever
    # accum_steps says; its gradient was divided by 2 (timm's train.py divides by the count)
    alone = {**exact, "fake.samples": 4}
    for accum_steps in (1, 2):
        train(FakeTask, fake_config(tmp_path / f"alone{accum_steps}", epochs=1, batch_size=4, accum_steps=accum_steps,
                                    **alone))
    one, two = ([r["train/grad_norm"] for r in _records(tmp_path / run) if "train/grad_norm" in r]
                for run in ("alone1", "alone2"))
    assert len(one) == 1 and two == pytest.approx(one, rel=1e-6)


def test_an_epoch_that_does_not_divide_into_updates_ends_with_a_shorter_one(tmp_path: Path, capsys) -> None:
    # 5 micro-batches an epoch, 2 an update: updates after batches 2, 4 and 5 (the last alone)
    metrics = train(FakeTask, fake_config(tmp_path, epochs=2, accum_steps=2, **{"fake.samples": 20}))
    assert (metrics["epoch"], metrics["global_step"]) == (2, 6)
    assert "cosine schedule over 6 updates" in capsys.readouterr().out  # 3 an epoch, not 2
    assert [(r["epoch"], r["step"]) for r in _records(tmp_path) if "val/score" in r] == [(0, 3), (1, 6)]


def test_checkpoints_and_step_records_come_as_often_as_asked(tmp_path: Path) -> None:
    with pytest.raises(_Stop):  # 6 updates an epoch; evaluations only at the end
        train(FakeTask, fake_config(tmp_path, epochs=3, eval_every=3, checkpoint_every=1, log_every=4),
              on_step_end=_stop_at(7))
    state = load_training_state(tmp_path / "last.pth")  # run.checkpoint_every=1: after epoch 0, unevaluated
    assert (state["epoch"], state["batches_done"], state["global_step"], state["metrics"]) == (1, 0, 6, {})
    assert [r["step"] for r in _records(tmp_path)] == [4]  # run.log_every=4: a record at update 4 of 7


def test_a_resumed_run_keeps_the_best_score_of_the_run_before(tmp_path: Path) -> None:
    train(FakeTask, fake_config(tmp_path, epochs=1, **{"fake.scores": [0.9]}))
    metrics = train(FakeTask, fake_config(tmp_path, epochs=2, resume="auto", **{"fake.scores": [0.5]}))
    assert (metrics["val/score"], metrics["best_score"]) == (0.5, 0.9)
    assert load_training_state(tmp_path / "best.pth")["global_step"] == 6  # not replaced by the worse epoch


def test_a_resumed_run_logs_each_step_once(tmp_path: Path) -> None:
    # the records of the updates after the checkpoint (a stop, a kill) were logged again by the
    # resumed run: metrics.jsonl held step 5 twice; a line cut short by a kill stayed
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path / "run", epochs=2, save_every_steps=4), on_step_end=_stop_at(5))
    assert [r["step"] for r in _records(tmp_path / "run")] == [1, 2, 3, 4, 5]
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "epo')
    train(FakeTask, fake_config(tmp_path / "run", epochs=2, resume="auto"))
    train(FakeTask, fake_config(tmp_path / "clean", epochs=2))
    assert _records(tmp_path / "run") == _records(tmp_path / "clean")


def test_a_resume_that_restarts_the_epoch_keeps_the_records_of_the_epochs_done(tmp_path: Path) -> None:
    # cut at the restarted epoch's renumbered update (12 updates of batch 2 are 6 of batch 4), the
    # records of epoch 0 went, and a finished run resumed with another batch lost half its history
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path, epochs=4, batch_size=2, save_every_steps=1, tensorboard=True),
              on_step_end=_stop_at(15))
    done = [r for r in _records(tmp_path) if r["epoch"] == 0]
    train(FakeTask, fake_config(tmp_path, epochs=4, resume="auto", tensorboard=True))  # epoch 1 restarts at update 6
    records = _records(tmp_path)
    # TensorBoard forgets the restarted epoch's points as metrics.jsonl does (13-15 of batch 2 stayed)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/lr")] == [r["step"] for r in records if "train/lr" in r]
    assert [r for r in records if r["epoch"] == 0] == done and done[-1]["step"] == 12 and "val/score" in done[-1]
    assert [r["step"] for r in records if r["epoch"] == 1] == [7, 8, 9, 10, 11, 12, 12]  # once, counted anew
    assert [r["epoch"] for r in records if "val/score" in r] == [0, 1, 2, 3]
    train(FakeTask, fake_config(tmp_path, epochs=2, batch_size=8, resume="auto"))  # nothing to do
    assert _records(tmp_path) == records


def test_a_resumed_loggers_tensorboard_forgets_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from crossformer.engine import RunLogger

    log = RunLogger(tmp_path)
    for step in range(1, 6):
        log.scalars(step, {"train/loss": float(step)})
    log.close()
    log = RunLogger(tmp_path)
    log.resume_at(3)  # the checkpoint's step: 4 and 5 come again
    for step in (4, 5):
        log.scalars(step, {"train/loss": 10.0 * step})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert [r["train/loss"] for r in _records(tmp_path)] == [1.0, 2.0, 3.0, 40.0, 50.0]


def test_resuming_where_the_data_now_ends_earlier_restarts_the_epoch(tmp_path: Path) -> None:
    # a checkpoint at batch 5 of 6, resumed on data of 4 batches an epoch: the epoch yielded no
    # batch and never ended, at full CPU, deaf to Ctrl-C
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path, epochs=2, save_every_steps=5), on_step_end=_stop_at(5))

    def too_long(*_: object) -> None:
        raise TimeoutError("the resumed run did not end")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(120)
    try:
        metrics = train(FakeTask, fake_config(tmp_path, epochs=2, resume="auto", **{"fake.samples": 16}))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert (metrics["epoch"], metrics["global_step"]) == (2, 8)  # two epochs of 4 updates
    log = (tmp_path / "log.txt").read_text()
    assert ("last.pth stopped at batch 5 of its epoch, which now has 4 (the training data changed): "
            "restarting epoch 0 at update 0 of 8") in log


def test_a_kill_during_or_after_an_evaluation_keeps_the_training_before_it(tmp_path: Path, monkeypatch) -> None:
    # last.pth was written after the evaluation only: a kill during a long one (torchrun and
    # batch schedulers kill 30 s after their SIGTERM) lost the epoch's training. Killed after
    # the evaluation was logged, the resumed run's evaluation is its one record.
    from crossformer.engine import trainer

    save_atomic = trainer.save_atomic

    def killed(state, path):
        if state["global_step"] == 12 and "pending_evaluation" not in state:
            raise _Stop  # the checkpoint after the second evaluation
        return save_atomic(state, path)

    monkeypatch.setattr(trainer, "save_atomic", killed)
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path, epochs=3))
    saved = load_training_state(tmp_path / "last.pth")
    assert (saved["global_step"], "pending_evaluation" in saved) == (12, True)
    assert [r["step"] for r in _records(tmp_path) if "val/score" in r] == [6, 12]
    monkeypatch.setattr(trainer, "save_atomic", save_atomic)
    train(FakeTask, fake_config(tmp_path, epochs=3, resume="auto"))
    assert "evaluating " in (tmp_path / "log.txt").read_text()
    assert [r["step"] for r in _records(tmp_path) if "val/score" in r] == [6, 12, 18]
    assert [r["step"] for r in _records(tmp_path) if "train/lr" in r] == list(range(1, 19))


def test_an_evaluation_done_again_after_a_restarted_epoch_keeps_its_epoch(tmp_path: Path, monkeypatch) -> None:
    # killed at the evaluation after update 8 (epoch 1), resumed with another batch (the epoch
    # restarted at its batch 0): the evaluation was recorded under epoch 0
    from crossformer.engine import trainer

    save_atomic = trainer.save_atomic

    def killed(state, path):
        if state["global_step"] == 8 and "pending_evaluation" not in state:
            raise _Stop
        return save_atomic(state, path)

    monkeypatch.setattr(trainer, "save_atomic", killed)
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path, epochs=0, iterations=12, eval_every=4))
    monkeypatch.setattr(trainer, "save_atomic", save_atomic)
    train(FakeTask, fake_config(tmp_path, epochs=0, iterations=12, eval_every=4, batch_size=2, resume="auto"))
    assert [(r["step"], r["epoch"]) for r in _records(tmp_path) if "val/score" in r] == [(4, 0), (8, 1), (12, 1)]


def test_a_best_checkpoint_that_cannot_be_written_is_written_by_the_resumed_run(tmp_path: Path, monkeypatch) -> None:
    # last.pth was written first, recording the epoch as the best: resumed, the run never wrote best.pth
    from crossformer.atomic import OutputError
    from crossformer.engine import trainer

    save_atomic = trainer.save_atomic

    def full_disk(state, path):
        if Path(path).name == "best.pth" and state["global_step"] == 12:
            raise OutputError(f"cannot write {path}: no space left on the device")
        return save_atomic(state, path)

    monkeypatch.setattr(trainer, "save_atomic", full_disk)
    scores = {"fake.scores": [0.3, 0.9, 0.5]}
    with pytest.raises(OutputError):
        train(FakeTask, fake_config(tmp_path, epochs=3, **scores))
    saved = load_training_state(tmp_path / "last.pth")  # before the evaluation, which the resume does again
    assert (saved["global_step"], saved["pending_evaluation"] is not None) == (12, True)
    monkeypatch.setattr(trainer, "save_atomic", save_atomic)
    metrics = train(FakeTask, fake_config(tmp_path, epochs=3, resume="auto", **{"fake.scores": [0.9, 0.5]}))
    assert metrics["best_score"] == 0.9
    best = load_training_state(tmp_path / "best.pth")
    assert (best["global_step"], best["best_metric"]) == (12, 0.9)


def test_a_resume_that_regroups_the_parameters_names_that_setting_alone(tmp_path: Path) -> None:
    # the refusal listed every changed setting, run.epochs among them, which a resume may change
    from crossformer.errors import CheckpointError

    train(FakeTask, fake_config(tmp_path, epochs=1))
    with pytest.raises(CheckpointError) as caught:
        train(FakeTask, fake_config(tmp_path, epochs=2, resume="auto", **{"optimizer.decay_1d": True}))
    assert "other settings (optimizer.decay_1d True (was False)); use its settings" in str(caught.value)


def test_a_folder_where_resume_auto_looks_for_last_pth_is_said_before_training(tmp_path: Path) -> None:
    # it said "no last.pth yet, starting from scratch", trained, and failed at the first save
    from crossformer.errors import CheckpointError

    (tmp_path / "last.pth").mkdir()
    with pytest.raises(CheckpointError, match=r"last.pth is a folder, not a checkpoint file$"):
        train(FakeTask, fake_config(tmp_path, epochs=1, resume="auto"))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_weight_average_starts_from_the_weights_of_the_first_update(tmp_path: Path) -> None:
    # timm's ModelEmaV3 given the update count: the first update copies the weights (decay 0), so the
    # average never holds the untrained initial weights
    train(FakeTask, fake_config(tmp_path, epochs=0, iterations=1, model_ema=True, model_ema_decay=0.9))
    state = load_training_state(tmp_path / "last.pth")
    assert all(torch.equal(state["model_ema"][k], v) for k, v in state["model"].items())


def test_a_tasks_samples_are_by_default_the_length_of_the_batchs_first_item() -> None:
    # the train means weigh each batch by it: a short last batch (drop_last=False) counts less
    task = FakeTask(fake_config("unused"), DistContext())
    x, y = torch.zeros(3, 4), torch.zeros(3)
    assert task.batch_counts((x, y)) == task.batch_counts([x, y]) == {"samples": 3.0}


def test_best_checkpoint_follows_the_primary_metric(tmp_path: Path) -> None:
    metrics = train(FakeTask, fake_config(tmp_path, **{"fake.scores": [0.3, 0.9, 0.5]}))
    assert metrics["best_score"] == 0.9 and metrics["val/best_score"] == 0.9 and metrics["val/score"] == 0.5
    best, last = load_training_state(tmp_path / "best.pth"), load_training_state(tmp_path / "last.pth")
    assert (best["global_step"], best["best_metric"], best["metrics"]["val/score"]) == (12, 0.9, 0.9)
    assert last["global_step"] == 18 and last["primary_metric"] == "score"


def test_a_score_that_only_equals_the_best_keeps_the_earlier_best_checkpoint(tmp_path: Path) -> None:
    # best.pth is written when the primary metric improves; an equal score is no improvement
    train(FakeTask, fake_config(tmp_path, epochs=2, **{"fake.scores": [0.9, 0.9]}))
    assert load_training_state(tmp_path / "best.pth")["global_step"] == 6


class _LowerIsBetter(FakeTask):
    higher_is_better = False


def test_best_checkpoint_of_a_metric_where_lower_is_better(tmp_path: Path) -> None:
    metrics = train(_LowerIsBetter, fake_config(tmp_path, **{"fake.scores": [0.5, 0.3, 0.9]}))
    assert (metrics["best_score"], metrics["val/best_score"]) == (0.3, 0.3)
    assert load_training_state(tmp_path / "best.pth")["global_step"] == 12


def test_the_log_shows_each_figure_to_four_places(tmp_path: Path) -> None:
    train(FakeTask, fake_config(tmp_path, epochs=2, **{"fake.scores": [0.123456, 0.5]}))
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert " val/score 0.1235 val/best_score 0.1235" in next(line for line in lines if " epoch 0/2: " in line)
    assert " done in " in lines[-1] and ": best score 0.5000 (checkpoints in " in lines[-1]


class _WeightsSeen(FakeTask):
    """Keeps the weights each training step starts from (those of the updates before it)."""

    seen: list[dict[str, torch.Tensor]] = []

    def losses(self, model, batch):
        self.seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return super().losses(model, batch)


def test_the_weight_average_moves_by_its_decay_from_the_second_update(tmp_path: Path, monkeypatch) -> None:
    # ModelEmaV3 given the update count: a copy at update 1, then ema = decay x ema + (1 - decay) x weights
    monkeypatch.setattr(_WeightsSeen, "seen", [])
    train(_WeightsSeen, fake_config(tmp_path, epochs=0, iterations=2, model_ema=True, model_ema_decay=0.25))
    after_first, state = _WeightsSeen.seen[1], load_training_state(tmp_path / "last.pth")
    for key, weights in state["model"].items():
        torch.testing.assert_close(state["model_ema"][key], 0.25 * after_first[key] + 0.75 * weights)
        assert not torch.equal(after_first[key], weights)  # the two updates moved the weights


def test_a_weight_average_turned_on_at_a_resume_starts_from_the_resumed_weights(tmp_path: Path, monkeypatch) -> None:
    # the checkpoint has no average: it started from the untrained initial weights, 0.5^6 of them
    # still in it after the 6 updates of the resumed epoch
    train(FakeTask, fake_config(tmp_path, epochs=1))
    monkeypatch.setattr(_WeightsSeen, "seen", [])
    train(_WeightsSeen, fake_config(tmp_path, epochs=2, resume="auto", model_ema=True, model_ema_decay=0.5))
    state = load_training_state(tmp_path / "last.pth")
    average = _WeightsSeen.seen[0]  # the resumed weights
    for weights in [*_WeightsSeen.seen[1:], state["model"]]:  # after each of the 6 updates
        average = {k: 0.5 * v + 0.5 * weights[k] for k, v in average.items()}
    for key, value in average.items():
        torch.testing.assert_close(state["model_ema"][key], value)


def test_the_weight_average_is_evaluated_with_its_own_weights(tmp_path: Path) -> None:
    metrics = train(FakeTask, fake_config(tmp_path, epochs=1, model_ema=True, model_ema_decay=0.9))
    state = load_training_state(tmp_path / "last.pth")
    task = FakeTask(fake_config(tmp_path / "unused"), DistContext())
    for key, weights in (("val/mse", "model"), ("val_ema/mse", "model_ema")):
        task.model.load_state_dict(state[weights])
        assert metrics[key] == pytest.approx(task.evaluate(task.model)["mse"], rel=1e-6)
    assert metrics["val/mse"] != metrics["val_ema/mse"]


def test_the_rate_and_its_floor_scale_with_the_samples_of_an_update(tmp_path: Path, capsys) -> None:
    # batch 4 x 2 accumulated = 8 samples an update, half the reference 16: half the rate and half the floor
    train(FakeTask, fake_config(tmp_path, epochs=1, accum_steps=2, scale_lr=True, lr_batch_reference=16, min_lr=0.01))
    assert "global batch 8, lr 0.025," in capsys.readouterr().out
    rates = [r["train/lr"] for r in _records(tmp_path) if "train/lr" in r]
    assert len(rates) == 3 and rates[0] == pytest.approx(0.025 * 0.001, rel=1e-12)  # the warm-up's start
    # the cosine's floor at its end: the rate set after the last update
    state = load_training_state(tmp_path / "last.pth")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005, rel=1e-12)


def test_a_stop_signal_at_the_last_update_lets_the_run_finish(tmp_path: Path) -> None:
    # the run is done and saved: no "interrupted ... resume with --resume auto"
    def interrupt_at_the_end(step: int) -> None:
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    metrics = train(FakeTask, fake_config(tmp_path, epochs=1), on_step_end=interrupt_at_the_end)
    assert metrics["global_step"] == 6 and "interrupted" not in (tmp_path / "log.txt").read_text()


def test_bad_training_data_before_any_update_saves_nothing(tmp_path: Path) -> None:
    # no update to keep: a checkpoint of the untrained weights would only be a resume of nothing
    class BadFirstBatch(_BadFifthBatch):
        bad_batch = 1

    with pytest.raises(UserInputError, match=r"^cannot read image bad.png$"):
        train(BadFirstBatch, fake_config(tmp_path, epochs=1))
    assert not (tmp_path / "last.pth").exists()


def test_a_resumed_epochs_progress_counts_from_the_batch_it_resumed_at(tmp_path: Path, capsys) -> None:
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path, epochs=1, save_every_steps=1), on_step_end=_stop_at(2))
    capsys.readouterr()
    train(FakeTask, fake_config(tmp_path, epochs=1, resume="auto"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 0 [")]
    assert [line.split(" ")[2] for line in lines] == ["[3/6]", "[4/6]", "[5/6]", "[6/6]"]


def test_clip_grad_clips_the_updates(tmp_path: Path) -> None:
    # the logged norm is the one before clipping whatever run.clip_grad is: compare the weights
    def weights(clip_grad: float) -> dict[str, torch.Tensor]:
        train(FakeTask, fake_config(tmp_path / str(clip_grad), epochs=1, clip_grad=clip_grad))
        return load_training_state(tmp_path / str(clip_grad) / "last.pth")["model"]

    unclipped, above_every_norm, clipped = weights(0.0), weights(1e9), weights(1e-3)
    assert all(torch.equal(unclipped[k], above_every_norm[k]) for k in unclipped)
    assert not all(torch.equal(unclipped[k], clipped[k]) for k in unclipped)


class _EmptySecondBatch(FakeTask):
    """The run's second batch has no usable sample (all its files unreadable); keeps the batches trained on."""

    trained: list[int] = []

    def batch_counts(self, batch):
        self.batches = getattr(self, "batches", 0) + 1
        return {"samples": 0.0 if self.batches == 2 else float(len(batch[0]))}

    def losses(self, model, batch):
        self.trained.append(self.batches)
        return super().losses(model, batch)


def test_a_batch_without_a_usable_sample_is_not_trained_on(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(_EmptySecondBatch, "trained", [])
    assert train(_EmptySecondBatch, fake_config(tmp_path, epochs=1))["global_step"] == 6
    assert _EmptySecondBatch.trained == [1, 3, 4, 5, 6]


def test_fewer_training_samples_than_a_batch_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"^fewer than one batch of 4 per process; lower --batch-size$"):
        train(FakeTask, fake_config(tmp_path, epochs=1, **{"fake.samples": 3}))
    # under torchrun: "DIR has 5 images: fewer than one batch of 3 per process" (5 > 3: the
    # processes' share was not said, nor that fewer of them would do too)
    from crossformer.engine import require_one_batch

    with pytest.raises(UserInputError, match=r"^DIR has 5 images over 2 processes, 2 each: fewer than one batch of 3 "
                                             r"per process; lower --batch-size or run fewer processes$"):
        require_one_batch(5, 3, 2, "DIR has 5 images")
    require_one_batch(6, 3, 2, "DIR has 6 images")


def test_resuming_another_tasks_checkpoint_is_refused(tmp_path: Path) -> None:
    train(FakeTask, fake_config(tmp_path, epochs=1))
    state = load_training_state(tmp_path / "last.pth")
    torch.save({**state, "task": "segmentation"}, tmp_path / "last.pth")
    with pytest.raises(UserInputError, match=r"last.pth is a segmentation run, not fake$"):
        train(FakeTask, fake_config(tmp_path, epochs=2, resume="auto"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1 step 7;.*last good checkpoint is .*last.pth"):
        train(FakeTask, fake_config(tmp_path, save_every_steps=3, **{"fake.nan_at_call": 7}))
    state = load_training_state(tmp_path / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (1, 0, 6)  # the end of epoch 0
    assert all(torch.isfinite(v).all() for v in state["model"].values())


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from engine_fixtures import FakeTask, fake_config
from crossformer.engine import train
def kill(step):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
train(FakeTask, fake_config({output!r}, **{settings!r}), on_step_end=kill)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["epochs", "iterations"])
def test_sigkill_then_resume_equals_an_unkilled_run(mode: str, tmp_path: Path) -> None:
    if mode == "epochs":  # killed at update 9 (epoch 1, batch 3); last saved at update 8 (epoch 1, batch 2)
        settings = dict(epochs=3, save_every_steps=4, model_ema=True, model_ema_decay=0.9)
        kill_at, saved = 9, (1, 2, 8)
    else:  # 3 updates per epoch; killed at update 8, last saved at 7 (evaluation every 7: epoch 2, batch 2)
        settings = dict(epochs=0, iterations=14, eval_every=7, accum_steps=2, model_ema=True, model_ema_decay=0.9,
                        **{"schedule.name": "poly", "schedule.warmup_iters": 3})
        kill_at, saved = 8, (2, 2, 7)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = textwrap.dedent(_KILLED_RUN).format(tests=str(TESTS), output=str(killed), settings=settings, kill_at=kill_at)
    proc = run_process([sys.executable, "-c", script], timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = load_training_state(killed / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == saved

    a, b = resume_and_compare(killed, clean, **settings)
    for group_a, group_b in zip(a["optimizer"]["param_groups"], b["optimizer"]["param_groups"]):
        assert group_a["lr"] == group_b["lr"]  # the schedule
    for index, moments in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][index][k], v) for k, v in moments.items())
    # the resumed run's records after the checkpoint repeat the unkilled run's exactly
    tail = [r for r in _records(killed) if r["step"] > saved[2]][-len([r for r in _records(clean) if r["step"] > saved[2]]):]
    assert tail == [r for r in _records(clean) if r["step"] > saved[2]]


def _epoch_samples(num_workers: int, start: int, epoch: int = 1) -> torch.Tensor:
    """The augmented training inputs of one epoch of the fake task from sample ``start`` on."""
    task = FakeTask(fake_config("unused", num_workers=num_workers, **{"fake.augment": 1.0}), DistContext())
    task.train_sampler.set_epoch(epoch, start=start)
    return torch.cat([x for x, _ in task.train_loader])


def _epoch_order(epoch: int) -> list[int]:
    """The order in which :func:`_epoch_samples` draws the samples of ``epoch``."""
    task = FakeTask(fake_config("unused"), DistContext())
    task.train_sampler.set_epoch(epoch)
    return list(task.train_sampler)


def test_a_samples_augmentation_depends_on_its_seed_epoch_and_index_only() -> None:
    whole = _epoch_samples(num_workers=0, start=0)
    assert torch.equal(_epoch_samples(num_workers=2, start=0), whole)  # whichever worker draws it
    assert torch.equal(_epoch_samples(num_workers=2, start=8), whole[8:])  # whatever was drawn before it
    # each epoch draws each sample anew, not only in another order
    again, orders = _epoch_samples(num_workers=0, start=0, epoch=2), [_epoch_order(epoch) for epoch in (1, 2)]
    assert all(not torch.equal(whole[orders[0].index(i)], again[orders[1].index(i)]) for i in range(len(whole)))
    before = torch.get_rng_state()
    _epoch_samples(num_workers=0, start=0)
    assert torch.equal(torch.get_rng_state(), before)  # the main process's stream (dropout) is left as it was


@pytest.mark.slow
def test_sigkill_then_resume_with_loader_workers_equals_an_unkilled_run(tmp_path: Path) -> None:
    # the workers of the resumed epoch start afresh and are dealt its batches anew (batch 2 to worker 0)
    settings = dict(epochs=2, save_every_steps=4, num_workers=2, model_ema=True, model_ema_decay=0.9, **{"fake.augment": 0.5})
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = textwrap.dedent(_KILLED_RUN).format(tests=str(TESTS), output=str(killed), settings=settings, kill_at=9)
    proc = run_process([sys.executable, "-c", script], timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = load_training_state(killed / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (1, 2, 8)
    resume_and_compare(killed, clean, **settings)


def test_a_task_plugs_in_through_the_registry_and_gets_flags_from_its_config(tmp_path: Path, monkeypatch, capsys) -> None:
    from crossformer.cli import main
    from crossformer.engine import registry

    monkeypatch.setitem(registry.TASKS, "fake", "engine_fixtures")
    config = tmp_path / "fake.yaml"
    config.write_text("task: fake\nrun:\n  epochs: 2\n  batch_size: 6\nfake:\n  noise: 0.0\n")
    resolved = registry.resolve_config(str(config), {"samples": 12})
    assert type(resolved.config).__name__ == "FakeConfig" and resolved.config.run.batch_size == 6
    assert resolved.given == {"run.epochs": 2, "run.batch_size": 6, "fake.noise": 0.0, "fake.samples": 12}
    output = tmp_path / "run"
    # --samples and --noise come from the fake task's own section; --epochs from the engine's
    assert main(["train", "--config", str(config), "--output", str(output), "--samples", "12", "--epochs", "1",
                 "--no-tensorboard", "optimizer.lr=0.01"]) == 0
    state = load_training_state(output / "last.pth")
    assert state["global_step"] == 2 and state["fake_samples"] == 12 and state["config"]["optimizer"]["lr"] == 0.01
    assert main(["train", "--config", str(config), "--output", str(output), "epoch=3"]) == 2
    assert "unknown setting 'epoch'" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--output", str(output), "--batch-size", "0"]) == 2
    assert "run.batch_size must be at least 1, got 0" in capsys.readouterr().err
    # a task without a commands module beside it has no verbs beyond train
    assert registry.task_commands(registry.task_module("fake")) == {}
    assert main(["evaluate", "--config", str(config)]) == 2
    assert "the fake task has no evaluate command" in capsys.readouterr().err


_VERBS_ON_DEMAND = """
import sys
from crossformer.engine.registry import TASKS, task_commands, task_module

modules = [task_module(task) for task in TASKS]
helpers = sorted(m for m in sys.modules if m.startswith("crossformer.commands") or m.endswith(".commands"))
assert not helpers, helpers  # importing a task imports no command-line code
verbs = {"evaluate", "predict", "benchmark", "flops", "export"}
for task, module in zip(TASKS, modules):
    assert set(task_commands(module)) == verbs, module.__name__
    assert f"{module.__package__}.commands" in sys.modules
"""


def test_a_task_imports_its_verbs_only_when_they_are_asked_for() -> None:
    proc = run_process([sys.executable, "-c", _VERBS_ON_DEMAND], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


_DDP_RUN = """
import sys
sys.path.insert(0, {tests!r})
from engine_fixtures import FakeTask, fake_config
from crossformer.engine import train
train(FakeTask, fake_config({output!r}, epochs=2, accum_steps=2, model_ema=True, model_ema_decay=0.5))
"""


@pytest.mark.slow
def test_torchrun_two_processes_over_gloo(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_DDP_RUN).format(tests=str(TESTS), output=str(tmp_path / "ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_process([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("2 process(es)") == 1  # rank 0 alone logs
    state = load_training_state(tmp_path / "ddp" / "last.pth")
    # 24 samples / (2 ranks x batch 4) = 3 micro-batches per epoch; accumulating 2 (DDP no_sync on the
    # first), the third updates alone at the epoch's end: 2 updates per epoch
    assert state["world_size"] == 2 and state["global_step"] == 4 and len(state["rank_state"]) == 2
    assert not torch.equal(state["rank_state"][0]["rng"]["torch"], state["rank_state"][1]["rng"]["torch"])
    # validation was split over the ranks and reduced: the same as one process on all 8 samples
    from crossformer.engine import DistContext

    task = FakeTask(fake_config(tmp_path / "x"), DistContext())
    for key, weights in (("val/mse", "model"), ("val_ema/mse", "model_ema")):
        task.model.load_state_dict(state[weights])
        assert state["metrics"][key] == pytest.approx(task.evaluate(task.model)["mse"], rel=1e-6)


def test_the_logged_rate_is_the_one_its_update_used(tmp_path: Path) -> None:
    # train/lr at step s was the rate set for update s + 1 (one ahead of the progress line; the
    # last record read min_lr, which no update used)
    from crossformer.engine.schedule import build_schedule

    config = fake_config(tmp_path / "run", epochs=2)
    train(FakeTask, config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/lr"] for r in records if "train/lr" in r]  # log_every 1: every update's
    schedule = build_schedule(config.schedule, config.optimizer.lr, config.schedule.min_lr, len(rates),
                              len(rates) // 2, False)
    assert rates == pytest.approx([config.optimizer.lr * schedule.factor(t) for t in range(len(rates))])
    assert rates[0] == pytest.approx(config.optimizer.lr * config.schedule.warmup_ratio)  # the warm-up's start


class _BatchNormTask(FakeTask):
    """FakeTask with a BatchNorm before its linear layer; each evaluation records, on this rank,
    the statistics it evaluated with."""

    def __init__(self, config, ctx) -> None:
        super().__init__(config, ctx)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), *self.model).to(ctx.device)
        self.seen: list[list[float]] = []

    def evaluate(self, model):
        self.seen.append(model[0].running_mean.tolist())
        return super().evaluate(model)


def _evaluated_statistics(output: Path) -> list[list[float]]:
    seen: list[list[float]] = []

    class Recorded(_BatchNormTask):
        def evaluate(self, model):
            result = super().evaluate(model)
            seen[:] = self.seen
            return result

    train(Recorded, fake_config(output, epochs=2, model_ema=True))
    return seen


@pytest.mark.slow
def test_every_rank_evaluates_the_statistics_the_checkpoint_holds(tmp_path: Path) -> None:
    # each rank's BatchNorm statistics saw its own last batches: rank 1 scored its share of the
    # validation set with statistics no checkpoint holds (detection's Cascade heads: the logged
    # bbox_mAP differed from evaluate's of the saved checkpoint); segmentation alone shared them
    from two_ranks import on_two_ranks

    ranks = on_two_ranks(_evaluated_statistics, tmp_path / "run")
    assert len(ranks[0]) == 4 and ranks[0] == ranks[1]  # 2 epochs x (model, EMA)
    saved = load_training_state(tmp_path / "run" / "last.pth")
    assert saved["model"]["0.running_mean"].tolist() == ranks[0][-2]


def test_resume_auto_before_any_checkpoint_starts_the_records_afresh(tmp_path: Path) -> None:
    # a run that ended before its first checkpoint (a killed process), then --resume auto: it
    # started from scratch after the old metrics.jsonl, so steps 1-3 were there twice
    with pytest.raises(_Stop):
        train(FakeTask, fake_config(tmp_path, epochs=1), on_step_end=_stop_at(3))
    assert not (tmp_path / "last.pth").exists() and [r["step"] for r in _records(tmp_path)] == [1, 2, 3]
    train(FakeTask, fake_config(tmp_path, epochs=1, resume="auto"))
    steps = [r["step"] for r in _records(tmp_path) if "val/score" not in r]
    assert steps == list(range(1, 7))
    # without --resume: the folder holds no checkpoint to continue from, which the refusal says
    from crossformer.errors import UserInputError

    (tmp_path / "last.pth").unlink()
    (tmp_path / "best.pth").unlink()
    with pytest.raises(UserInputError, match=r"already holds log.txt, metrics.jsonl but no checkpoint \(that run ended "
                                             r"before its first\): pass --overwrite to start it again, or another --output"):
        train(FakeTask, fake_config(tmp_path, epochs=1))
