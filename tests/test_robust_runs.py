"""Issue 16, items 1-4, 6, 7, 11, 12: no lost runs, no tracebacks. Each item is fixed in the
engine, the command line or the data layer, so every task (and its commands) inherits it; the
engine's behaviour is tested on the tiny fake task, the classification commands on a tiny
CrossFormer. Bad input: exit 2, one line, nothing overwritten, nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from classification_fixtures import make_image_folder
from cli_errors import one_error_line
from crossformer.cli import main
from crossformer.data import find_unreadable
from crossformer.engine import (
    RunInterrupted,
    Task,
    claim_demo_output,
    claim_output,
    default_workers,
    load_training_state,
    train,
)
from crossformer.engine.distributed import stop_with_launcher
from crossformer.engine.logging import Progress, RunLogger
from crossformer.engine.output import EARLIER_RUN
from crossformer.errors import UserInputError
from engine_fixtures import FakeConfig, FakeTask, fake_config, resume_and_compare
from processes import run_process, running, started_process, wait_for

TESTS = Path(__file__).resolve().parent
# A CrossFormer that trains an epoch of 24 images in about a second on one CPU thread.
TINY_OVERRIDES = ["model.kwargs.embed_dim=16", "model.kwargs.depths=[1,1,1,1]", "model.kwargs.num_heads=[1,2,4,8]",
                  "model.kwargs.group_size=[4,4,2,1]", "model.kwargs.interval=[2,2,1,1]", "warmup_epochs=0",
                  "cpu_threads=1"]
FLAGS = ["--model", "crossformer_tiny", "--img-size", "32", "--batch-size", "2", "--device", "cpu", "--num-workers", "0",
         "--no-tensorboard"]


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run of the tiny model (embed_dim 16, no EMA)."""
    output = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--data", str(data), "--output", str(output), "--epochs", "1", *FLAGS, *TINY_OVERRIDES]) == 0
    return output


def _train_argv(data: Path, output: Path, *extra: str, overrides: tuple[str, ...] = ()) -> list[str]:
    return ["train", "--data", str(data), "--output", str(output), "--epochs", "1", *FLAGS, *extra,
            *TINY_OVERRIDES, *overrides]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


# -- 1. an earlier run is never overwritten silently ----------------------------------------


def test_a_folder_with_a_run_is_refused_unless_resuming_or_overwriting(tmp_path: Path, monkeypatch, capsys) -> None:
    from crossformer.engine import registry

    monkeypatch.setitem(registry.TASKS, "fake", "engine_fixtures")
    config = tmp_path / "fake.yaml"
    config.write_text("task: fake\nrun:\n  epochs: 1\n")
    output = tmp_path / "run"
    argv = ["train", "--config", str(config), "--output", str(output)]
    assert main(argv) == 0
    before = _snapshot(output)
    line = one_error_line(capsys, argv)
    assert f"output folder {output} already holds best.pth, last.pth, log.txt, metrics.jsonl:" in line
    assert "--resume auto" in line and "--overwrite" in line
    assert _snapshot(output) == before  # nothing touched, not even the log

    assert main([*argv, "--overwrite", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"--overwrite: deleted the earlier run's last.pth, best.pth, metrics.jsonl, log.txt in {output}" in out
    assert [r["epoch"] for r in _records(output) if "val/score" in r] == [0, 1]  # the new run's records alone
    assert "--overwrite: deleted the earlier run's" in (output / "log.txt").read_text()  # the new run's log
    assert main([*argv, "--resume", "auto", "--epochs", "3"]) == 0  # continuing is allowed
    assert load_training_state(output / "last.pth")["epoch"] == 3

    # a file in the way; a folder of someone else's files; a folder of an attempt's logs only
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in one_error_line(capsys, [*argv[:3], "--output", str(tmp_path / "file")])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "already holds notes.txt" in one_error_line(capsys, [*argv[:3], "--output", str(tmp_path / "mine")])
    assert claim_output(tmp_path / "mine", None, overwrite=True).displaced == ()
    assert (tmp_path / "mine" / "notes.txt").exists()
    (tmp_path / "tried").mkdir()
    (tmp_path / "tried" / "log.txt").write_text("an attempt that stopped on bad input\n")
    assert claim_output(tmp_path / "tried", None, overwrite=False).displaced == ()


def test_resume_and_overwrite_delete_checkpoints_half_written_by_a_killed_run(tmp_path: Path) -> None:
    # a SIGKILL inside save_atomic left ".last.pth.<pid>.tmp" (a checkpoint's size) in the folder for good
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth").write_bytes(b"whole")
    (run / "notes.txt").write_text("keep me")
    stale = [run / ".last.pth.4242.tmp", run / ".best.pth.17.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    with pytest.raises(UserInputError, match="already holds"):
        claim_output(run, None, overwrite=False)
    assert all(p.exists() for p in stale)  # refused: nothing touched
    claim = claim_output(run, "auto", overwrite=False)
    claim.release()  # the run's end
    assert claim.displaced == ()
    assert not any(p.exists() for p in stale)
    assert (run / "last.pth").read_bytes() == b"whole" and (run / "notes.txt").exists()
    stale[0].write_bytes(b"half")
    (run / "tensorboard").mkdir()
    claim = claim_output(run, None, overwrite=True)
    assert claim.displaced == ("last.pth", "tensorboard") and not stale[0].exists()
    claim.replace()
    claim.release()
    assert not (run / "tensorboard").exists() and sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_a_full_disk_at_the_lock_still_locks_the_folder(tmp_path: Path, monkeypatch) -> None:
    # writing the holder's pid into the lock file raised a bare OSError and left its descriptor open
    import errno

    from crossformer.engine import output as output_module

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(output_module.os, "write", full)
    claim = claim_output(run, "auto", overwrite=False)
    monkeypatch.undo()
    with pytest.raises(UserInputError, match="is in use by another run"):
        claim_output(run, "auto", overwrite=False)
    claim.release()
    claim_output(run, "auto", overwrite=False).release()


def test_a_demo_replaces_its_own_output_and_keeps_the_data_it_reuses(tmp_path: Path, capsys) -> None:
    # the segmentation demo reuses its generated data set; its default folder from before demos
    # marked theirs is taken over only while it holds nothing but what a demo writes
    folder = tmp_path / "demo-segmentation"
    for name in ("data", "train", "predict"):
        (folder / name).mkdir(parents=True)
    (folder / "data" / "scene.png").write_bytes(b"reused")
    (folder / "notes.md").write_text("mine")
    writes = ("data", "train", "predict")
    with pytest.raises(UserInputError, match="holds data, notes.md, predict, train, not an earlier segmentation demo"):
        claim_demo_output(folder, "segmentation", writes, folder, keep=("data",))
    assert sorted(p.name for p in folder.iterdir()) == ["data", "notes.md", "predict", "train"]
    (folder / "notes.md").unlink()
    claim_demo_output(folder, "segmentation", writes, folder, keep=("data",))
    assert sorted(p.name for p in folder.iterdir()) == ["crossformer-demo.txt", "data"]
    assert (folder / "data" / "scene.png").read_bytes() == b"reused"
    assert f"deleted the earlier segmentation demo's train, predict in {folder}" in capsys.readouterr().out


# -- 2. the default output folder is what --help says ------------------------------------------


def test_the_default_output_folder_is_the_one_help_names(capsys) -> None:
    from crossformer.engine.registry import bundled_configs, resolve_config

    assert resolve_config().config.run.output == "output/train"  # no config: the digits one
    for name, path in bundled_configs().items():
        assert "output:" not in path.read_text(), name  # no bundled config moves it (the demo passes its own)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default output/train)" in " ".join(capsys.readouterr().out.split())


def test_every_command_describes_itself_in_whole_sentences() -> None:
    from crossformer.cli import COMMANDS, build_parsers

    _, parsers = build_parsers()
    assert set(parsers) == set(COMMANDS)
    for name, parser in parsers.items():
        assert parser.description.startswith(f"``crossformer {name}") and parser.description.endswith("."), (
            name, parser.description)


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_every_config_flag_says_what_it_sets(task: str) -> None:
    """Each flag's help names its key and says what it is; an unset text or path is not shown
    as "(default None)" or "(default )"."""
    from crossformer.commands.common import config_flags
    from crossformer.engine.registry import task_module

    flags = config_flags(task_module(task).CONFIG)
    assert "--data" in flags and "--lr" in flags
    for flag, (key, help_text, _) in flags.items():
        assert help_text.startswith(f"{key}: ") and len(help_text) > len(key) + 10, (flag, help_text)
        assert "(default None)" not in help_text and "(default )" not in help_text, (flag, help_text)


# -- 3. bad data is found before training; an evaluation failure keeps the training ------------


def test_an_unreadable_validation_image_stops_before_training(data: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "data"
    make_image_folder(broken, {"train": 8, "val": 2})
    bad = broken / "val" / "dog" / "bad.png"
    bad.write_bytes(b"not a png at all")
    output = tmp_path / "run"
    line = one_error_line(capsys, _train_argv(broken, output))
    assert f"cannot read validation image {bad}:" in line and "--skip-corrupt" in line
    assert not output.exists()  # a start that fails leaves nothing behind, not even its log

    # --skip-corrupt: the run goes on, names each file once in the log, counts them in the summary
    (broken / "train" / "cat" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    (broken / "train" / "cat" / "extra.png").write_bytes((broken / "train" / "cat" / "0.png").read_bytes())  # 26: 13 batches
    assert main(_train_argv(broken, output, "--skip-corrupt")) == 0
    log = (output / "log.txt").read_text()
    assert log.count(f"skipping unreadable image {bad}:") == 1
    assert log.count(f"skipping unreadable image {broken / 'train' / 'cat' / 'bad.jpg'}:") == 1
    done = [line for line in log.splitlines() if " done in " in line][0]
    # the training image, skipped once in its one epoch, and the validation image every evaluation lacked
    assert ", 1 skip of unreadable images (1 file), 1 unreadable validation file left out of evaluation" in done


def test_a_validation_image_that_does_not_decode_is_counted_as_the_data_check_counts_one(tmp_path: Path, capsys) -> None:
    # as detection's and segmentation's (their tests): the header reads, so evaluation finds it
    folder = make_image_folder(tmp_path / "data", {"train": 4, "val": 2})
    bad = folder / "val" / "dog" / "0.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    assert not find_unreadable([str(bad)])
    line = one_error_line(capsys, _train_argv(folder, tmp_path / "stopped"))
    assert f"cannot read image {bad}: image file is truncated" in line and "--skip-corrupt" in line
    assert main(_train_argv(folder, tmp_path / "run", "--skip-corrupt", "--epochs", "2")) == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count(f"skipping unreadable image {bad}: image file is truncated") == 1, log  # 2 evaluations, once a run
    assert ", 1 unreadable validation file left out of evaluation (checkpoints in" in log.splitlines()[-1], log


class _OneUnreadableFile(FakeTask):
    """Rank ``rank`` skips an unreadable ``rank<rank>/bad.png`` in its first batch of every epoch
    (3 batches a rank)."""

    rank = 0

    def batch_counts(self, batch):
        return {**super().batch_counts(batch), "unreadable_images": float(len(self.unreadable(batch)))}

    def unreadable(self, batch):
        return [f"image rank{self.rank}/bad.png: broken data stream"] if self.ctx.rank == self.rank and self.calls % 3 == 0 else []


class _UnreadableOnRank1(_OneUnreadableFile):
    rank = 1


def test_the_done_line_counts_a_file_skipped_each_epoch_as_skips_of_one_file(tmp_path: Path) -> None:
    # one unreadable file over 2 epochs read "2 unreadable images"
    train(_OneUnreadableFile, fake_config(tmp_path, epochs=2, samples=12))  # 3 batches an epoch
    log = (tmp_path / "log.txt").read_text()
    assert log.count("skipping unreadable image rank0/bad.png") == 1, log
    assert ", 2 skips of unreadable images (1 file)" in log.splitlines()[-1], log


class _UnreadableFirstEpochMore(FakeTask):
    """The first batch of every epoch skips ``bad.png``; epoch 0's also ``gone.png`` (3 batches an epoch)."""

    def batch_counts(self, batch):
        return {**super().batch_counts(batch), "unreadable_images": float(len(self.unreadable(batch)))}

    def unreadable(self, batch):
        if self.calls % 3:
            return []
        return ["image bad.png: truncated"] + (["image gone.png: truncated"] if self.train_sampler.epoch == 0 else [])


def test_a_resumed_runs_done_line_counts_the_skips_before_the_resume(tmp_path: Path) -> None:
    # the done line of a resumed run counted only its own session's skips ("1 skip of unreadable
    # images (1 file)"), and named bad.png again: the counts were not in the checkpoint
    train(_UnreadableFirstEpochMore, fake_config(tmp_path, epochs=1, samples=12))
    assert ", 2 skips of unreadable images (2 files)" in (tmp_path / "log.txt").read_text().splitlines()[-1]
    train(_UnreadableFirstEpochMore, fake_config(tmp_path, epochs=2, samples=12, resume="auto"))
    log = (tmp_path / "log.txt").read_text()
    assert ", 3 skips of unreadable images (2 files)" in log.splitlines()[-1], log
    assert log.count("skipping unreadable image bad.png") == 1, log  # once a run
    # training progress: an exported weights file does not describe its model by them
    from crossformer.models.weights import checkpoint_description
    state = load_training_state(tmp_path / "last.pth")
    assert state["run_counts"]["unreadable_files"] and "run_counts" not in checkpoint_description(state)
    # a checkpoint from before the counts were kept resumes as before: this session's counts
    older = tmp_path / "older"
    train(_UnreadableFirstEpochMore, fake_config(older, epochs=1, samples=12))
    state = load_training_state(older / "last.pth")
    del state["run_counts"]
    torch.save(state, older / "last.pth")
    train(_UnreadableFirstEpochMore, fake_config(older, epochs=2, samples=12, resume="auto"))
    assert ", 1 skip of unreadable images (1 file)" in (older / "log.txt").read_text().splitlines()[-1]


class _UnreadableValidationFiles(FakeTask):
    """Every training batch skips ``bad.png``; the data check skips the validation file
    ``header.png``, and each evaluation skips it and, while ``body_broken``, ``body.png``
    (whose header reads: evaluation alone finds it)."""

    body_broken = True

    def check_data(self):
        self.skip_validation_file("image val/header.png: cannot identify image file")

    def batch_counts(self, batch):
        return {**super().batch_counts(batch), "unreadable_images": float(len(self.unreadable(batch)))}

    def unreadable(self, batch):
        return ["image bad.png: truncated"]

    def evaluate(self, model):
        self.skip_validation_file("image val/header.png: cannot identify image file")
        if self.body_broken:
            self.skip_validation_file("image val/body.png: image file is truncated")
        return super().evaluate(model)


def test_a_resumed_runs_done_line_counts_each_unreadable_validation_file_once(tmp_path: Path, monkeypatch) -> None:
    # The validation files were not in the checkpoint's run counts: the resumed run's data check
    # named header.png again, and body.png, skipped by the evaluation before the interrupt and
    # readable since, was not counted at all.
    with pytest.raises(RunInterrupted):
        train(_UnreadableValidationFiles, fake_config(tmp_path, epochs=2, samples=12),  # 3 batches an epoch
              on_step_end=_interrupt_at(4, signal.SIGINT))  # epoch 1, after epoch 0's evaluation
    monkeypatch.setattr(_UnreadableValidationFiles, "body_broken", False)  # fixed before the resume
    train(_UnreadableValidationFiles, fake_config(tmp_path, epochs=2, samples=12, resume="auto"))
    log = (tmp_path / "log.txt").read_text()
    for named in ("image bad.png", "image val/header.png", "image val/body.png"):
        assert log.count(f"skipping unreadable {named}: ") == 1, (named, log)  # once a run
    # 6 batches each skipped bad.png; the best score was measured without both validation files
    assert log.splitlines()[-1].endswith(", 6 skips of unreadable images (1 file), 2 unreadable validation files left "
                                         f"out of evaluation (checkpoints in {tmp_path})"), log


@pytest.mark.slow
def test_under_torchrun_the_unreadable_training_files_of_every_rank_are_named(tmp_path: Path) -> None:
    # --skip-corrupt: a training file that rank 1 skipped was counted but never named
    proc = _torchrun_train(tmp_path, "_UnreadableOnRank1", "task: fake\nrun:\n  epochs: 2\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert log.count("skipping unreadable image rank1/bad.png: broken data stream") == 1, log  # once a run
    assert ", 2 skips of unreadable images (1 file)" in log.splitlines()[-1], log  # skipped in both epochs


class _UnreadableBatchOnRank1(FakeTask):
    """Every file of rank 1's second batch of each epoch is unreadable (--skip-corrupt; 3 batches a rank)."""

    seen = 0

    def batch_counts(self, batch):
        self.seen += 1
        self.bad = [f"image rank1/all{self.seen}.png: truncated"] if self.ctx.rank == 1 and self.seen % 3 == 2 else []
        samples = 0.0 if self.bad else super().batch_counts(batch)["samples"]
        return {"samples": samples, "unreadable_images": float(len(self.bad))}

    def unreadable(self, batch):
        return self.bad


@pytest.mark.slow
def test_under_torchrun_a_batch_one_rank_could_not_read_at_all_is_passed_over(tmp_path: Path) -> None:
    # --skip-corrupt: it stopped the run ("a whole batch was unusable ... ranks must stay in step"),
    # as one process passes it over (segmentation: a batch of 2 with one unreadable image)
    proc = _torchrun_train(tmp_path, "_UnreadableBatchOnRank1", "task: fake\nrun:\n  epochs: 2\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert "skipping unreadable image rank1/all2.png" in log and "rank1/all5.png" in log, log
    assert ", 2 skips of unreadable images (2 files)" in log.splitlines()[-1], log
    assert load_training_state(tmp_path / "ddp" / "last.pth")["global_step"] == 6  # every rank made every update



def _accumulating_over_a_batch_rank1_could_not_read(output: Path) -> str:
    try:
        train(_UnreadableBatchOnRank1, fake_config(output, epochs=1, accum_steps=2))
    except UserInputError as err:
        return str(err)
    return "trained"


@pytest.mark.slow
def test_a_batch_one_rank_could_not_read_is_refused_where_accumulated_gradients_are_reduced(tmp_path: Path) -> None:
    # passed over, the update's micro-batch would run no backward pass, so the gradients of the
    # micro-batch before it would update each rank's weights unreduced: the ranks drift apart
    from two_ranks import on_two_ranks

    stops = on_two_ranks(_accumulating_over_a_batch_rank1_could_not_read, tmp_path / "run")
    assert stops == ["a whole batch was unusable (unreadable files?) where the gradients accumulated over "
                     "run.accum_steps are reduced; remove those files or set run.accum_steps=1"] * 2
    # the files to remove are named first (they were not: the error came before the names)
    assert "skipping unreadable image rank1/all2.png" in (tmp_path / "run" / "log.txt").read_text()


class _CountsOfTheirOwn(FakeTask):
    """Each rank counts something the other does not (a task's counts are its own to name):
    rank 0 one ``first`` a batch, rank 1 two ``second``."""

    def batch_counts(self, batch):
        own = {"first": 1.0} if self.ctx.rank == 0 else {"second": 2.0}
        return {**super().batch_counts(batch), **own}


def _train_counting(output: Path) -> dict:
    return train(_CountsOfTheirOwn, fake_config(output, epochs=1))


@pytest.mark.slow
def test_counts_that_only_some_ranks_make_are_summed_under_their_own_names(tmp_path: Path) -> None:
    # reduced in the order of each rank's own names, one rank's count was added to another's
    from two_ranks import on_two_ranks

    for metrics in on_two_ranks(_train_counting, tmp_path / "run"):
        assert (metrics["train/first"], metrics["train/second"]) == (3.0, 6.0)  # 3 batches a rank

class _ManyUnreadable(FakeTask):
    """Every batch skips 3 unreadable files, all different (27 in 3 epochs of 3 batches)."""

    def unreadable(self, batch):
        return [f"image bad{self.calls}-{i}.png: truncated" for i in range(3)]


def test_at_most_20_skipped_training_files_are_named(tmp_path: Path) -> None:
    train(_ManyUnreadable, fake_config(tmp_path))
    log = (tmp_path / "log.txt").read_text()
    assert log.count("skipping unreadable image bad") == 20 and "image bad6-2.png" not in log, log
    assert log.count("more unreadable training files are skipped: counted (train/unreadable_images), not named") == 1


class _FailingStart(FakeTask):
    def __init__(self, config, ctx) -> None:
        super().__init__(config, ctx)
        raise UserInputError("cannot read image train/3.png")


def test_a_run_that_fails_at_start_takes_back_the_files_it_wrote(tmp_path: Path) -> None:
    # it left log.txt and tensorboard/ (and the folder, and the parents it made) behind
    new = tmp_path / "new" / "run"
    with pytest.raises(UserInputError, match="train/3.png"):
        train(_FailingStart, fake_config(new, tensorboard=True))
    assert not (tmp_path / "new").exists()
    # an existing folder stays, as it was: its earlier attempt's log gets this error too
    (tmp_path / "tried").mkdir()
    (tmp_path / "tried" / "log.txt").write_text("an earlier attempt\n")
    with pytest.raises(UserInputError, match="train/3.png"):
        train(_FailingStart, fake_config(tmp_path / "tried", tensorboard=True))
    assert sorted(p.name for p in (tmp_path / "tried").iterdir()) == ["log.txt"]
    assert "error: cannot read image train/3.png" in (tmp_path / "tried" / "log.txt").read_text()


def test_overwrite_deletes_the_earlier_run_only_once_the_new_one_has_started(tmp_path: Path, data: Path,
                                                                            capsys) -> None:
    # --overwrite deleted the earlier run first: a typo in --data (or a bad image, a bad
    # setting) then stopped the new run and left the folder empty
    run = tmp_path / "run"
    train(FakeTask, fake_config(run, tensorboard=True))
    earlier = _snapshot(run)
    with pytest.raises(UserInputError, match="train/3.png"):
        train(_FailingStart, fake_config(run, tensorboard=True, overwrite=True))
    assert _snapshot(run) == earlier and not (run / EARLIER_RUN).exists()
    # through the command line, with a data folder that is not there
    output = tmp_path / "cli"
    assert main(_train_argv(data, output)) == 0
    earlier = _snapshot(output)
    one_error_line(capsys, _train_argv(tmp_path / "no_such_data", output, "--overwrite"))
    assert _snapshot(output) == earlier and not (output / EARLIER_RUN).exists()
    # started: the earlier run is gone, the new one alone is there
    train(FakeTask, fake_config(run, overwrite=True, epochs=2))
    assert sorted(p.name for p in run.iterdir()) == ["best.pth", "last.pth", "log.txt", "metrics.jsonl"]
    assert load_training_state(run / "last.pth")["epoch"] == 2
    # an --overwrite killed before its run started left the earlier run aside: the next one replaces it
    (run / EARLIER_RUN).mkdir()
    (run / EARLIER_RUN / "last.pth").write_bytes(b"older")
    train(FakeTask, fake_config(run, overwrite=True))
    assert not (run / EARLIER_RUN).exists()


def test_resuming_another_runs_checkpoint_into_a_folder_with_a_run_is_refused(tmp_path: Path) -> None:
    # --resume Q/last.pth --output P replaced P's last.pth with Q's and appended Q's records to P's
    mine, other = tmp_path / "mine", tmp_path / "other"
    train(FakeTask, fake_config(mine, epochs=2))
    train(FakeTask, fake_config(other))
    earlier = _snapshot(mine)
    with pytest.raises(UserInputError) as refused:
        train(FakeTask, fake_config(mine, resume=str(other / "last.pth"), epochs=2))
    assert str(refused.value) == (
        f"output folder {mine} already holds best.pth, last.pth, log.txt, metrics.jsonl, another run than the one "
        f"--resume {other / 'last.pth'} continues: pass that run's own folder, a new --output, or --overwrite to "
        f"replace the run in {mine}")
    assert _snapshot(mine) == earlier
    # resume auto with the last checkpoint moved away: starting afresh would replace best.pth
    (mine / "last.pth").rename(tmp_path / "moved.pth")
    earlier = _snapshot(mine)
    with pytest.raises(UserInputError, match=f"already holds best.pth, log.txt, metrics.jsonl but no last.pth to "
                                             f"continue from: pass --resume {re.escape(str(mine / 'best.pth'))}"):
        train(FakeTask, fake_config(mine, resume="auto"))
    assert _snapshot(mine) == earlier
    # what stays allowed: a checkpoint of the folder itself, and auto in a folder of a run that
    # stopped before its first checkpoint (a preempted job started again by the same command)
    assert train(FakeTask, fake_config(mine, resume=str(mine / "best.pth"), epochs=3))["epoch"] == 3
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "metrics.jsonl").write_text("")
    assert train(FakeTask, fake_config(tmp_path / "stopped", resume="auto"))["epoch"] == 3
    # another run's checkpoint into a new folder continues it there; with --overwrite, into this one
    assert train(FakeTask, fake_config(tmp_path / "new", resume=str(other / "last.pth"), epochs=4))["epoch"] == 4
    train(FakeTask, fake_config(mine, resume=str(other / "last.pth"), epochs=4, overwrite=True))
    assert load_training_state(mine / "last.pth")["epoch"] == 4 and not (mine / EARLIER_RUN).exists()


def test_resuming_a_folders_run_and_overwriting_it_at_once_is_refused(tmp_path: Path) -> None:
    # --resume auto --overwrite resumed, silently ignoring --overwrite
    run = tmp_path / "run"
    train(FakeTask, fake_config(run, epochs=2))
    earlier = _snapshot(run)
    for resume in ("auto", str(run / "last.pth"), str(run / "best.pth")):
        with pytest.raises(UserInputError) as refused:
            train(FakeTask, fake_config(run, resume=resume, epochs=3, overwrite=True))
        assert str(refused.value) == (
            f"--resume {resume} continues the run in {run} and --overwrite would replace it (run.resume and "
            f"run.overwrite, from the command line or the config file): keep one, turning the other off with "
            f"--no-overwrite or run.resume=null")
        assert _snapshot(run) == earlier
    # a link in the folder to a checkpoint elsewhere is the folder's too (--overwrite moved it aside)
    (tmp_path / "elsewhere.pth").write_bytes((run / "last.pth").read_bytes())
    (run / "linked.pth").symlink_to(tmp_path / "elsewhere.pth")
    with pytest.raises(UserInputError, match="continues the run in"):
        train(FakeTask, fake_config(run, resume=str(run / "linked.pth"), epochs=3, overwrite=True))
    (run / "linked.pth").unlink()
    # either alone goes on
    assert train(FakeTask, fake_config(run, resume="auto", epochs=3))["epoch"] == 3
    assert train(FakeTask, fake_config(run, epochs=1, overwrite=True))["epoch"] == 1
    # both where the folder holds no checkpoint to continue (a job's first start, one killed
    # before its first checkpoint, stray files) replace what is there and start afresh
    assert train(FakeTask, fake_config(tmp_path / "new", resume="auto", epochs=1, overwrite=True))["epoch"] == 1
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "train/step_loss": 1.0}\n')
    assert train(FakeTask, fake_config(killed, resume="auto", epochs=1, overwrite=True))["epoch"] == 1
    assert '"train/step_loss": 1.0}' not in (killed / "metrics.jsonl").read_text()  # the dead run's records went


def test_the_resume_line_turns_off_an_overwrite_the_config_file_sets() -> None:
    from crossformer.commands.train import resume_command

    argv = ["train", "--config", "mine.yaml", "--output", "out", "--overwrite", "--epochs", "3"]
    assert resume_command(argv) == "crossformer train --config mine.yaml --output out --epochs 3 --resume auto"
    assert resume_command(argv[:5], overwrite_configured=True) == (
        "crossformer train --config mine.yaml --output out --resume auto --no-overwrite")


@pytest.mark.parametrize("config, setting", [
    ("digits", "model.kwargs.mlp_ratio=-1"),
    ("mask_rcnn_shapes_demo", "data.root=missing"),
    ("upernet_demo", "data.root=missing"),
    ("upernet_demo", "model.backbone_kwargs.num_heads=0"),
])
def test_every_task_s_train_that_fails_at_start_leaves_no_files(config: str, setting: str, tmp_path: Path,
                                                                  monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # data.root=missing: a folder that is not there
    output = tmp_path / "run"
    one_error_line(capsys, ["train", "--config", config, setting, "--output", str(output), "--device", "cpu"])
    assert not output.exists()


class _FailingEvaluation(FakeTask):
    def evaluate(self, model):
        raise UserInputError("cannot read image val/7.png")


def test_a_failing_evaluation_keeps_the_epochs_training(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"cannot read image val/7.png \(evaluation failed; the training so far "
                                             r"is saved in .*last.pth: fix the data and pass --resume auto\)"):
        train(_FailingEvaluation, fake_config(tmp_path))
    state = load_training_state(tmp_path / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (1, 0, 6)
    assert "train/loss" in state["pending_evaluation"]  # the train means that evaluation was to report
    assert "error: cannot read image val/7.png" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("epochs", (1, 3))  # the failed evaluation was the run's last, or not
def test_a_resume_does_the_evaluation_that_failed_first(tmp_path: Path, epochs: int) -> None:
    """The data fixed, ``--resume auto`` evaluates the epoch whose evaluation failed (its record
    and best.pth) before it trains on; it went missing from the run."""
    with pytest.raises(UserInputError, match="evaluation failed"):
        train(_FailingEvaluation, fake_config(tmp_path, epochs=epochs))
    failed = load_training_state(tmp_path / "last.pth")
    assert not (tmp_path / "best.pth").exists()
    result = train(FakeTask, fake_config(tmp_path, resume="auto", epochs=epochs))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["epoch"] for r in records if "val/mse" in r]
    assert evaluated == list(range(epochs)), records  # epoch 0's evaluation, then the others
    first = next(r for r in records if "val/mse" in r)
    assert first["train/loss"] == failed["pending_evaluation"]["train/loss"]  # the failed epoch's own train mean
    assert result["epoch"] == epochs and (tmp_path / "best.pth").exists()
    assert "pending_evaluation" not in load_training_state(tmp_path / "last.pth")
    log = (tmp_path / "log.txt").read_text()
    assert "it was saved before its evaluation, which did not finish" in log and "nothing to do" not in log


def test_a_resumed_evaluation_keeps_the_updates_tensorboard_points(tmp_path: Path) -> None:
    # TensorBoard's purge at the step of the evaluation done again also dropped the loss and lr
    # points logged at that step before it (metrics.jsonl kept them)
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with pytest.raises(UserInputError, match="evaluation failed"):
        train(_FailingEvaluation, fake_config(tmp_path, epochs=1, tensorboard=True))
    train(FakeTask, fake_config(tmp_path, resume="auto", epochs=1, tensorboard=True))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in records)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("train/lr", "val/mse"):
        steps = [point.step for point in events.Scalars(key)]
        assert steps.count(last) == 1 and sorted(steps) == steps, (key, steps)
    assert [p.step for p in events.Scalars("train/lr")] == [r["step"] for r in records if "train/lr" in r]


class _CheckedTask(FakeTask):
    """A bad file in the share of rank ``samples % 2`` (rank 0 with the default 24 samples, 1 with 25)."""

    def check_data(self) -> None:
        if self.ctx.rank == self.config.fake.samples % 2:
            raise UserInputError(f"cannot read validation image rank{self.ctx.rank}.png")


def test_the_data_check_runs_before_training(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="rank0.png"):
        train(_CheckedTask, fake_config(tmp_path))
    assert not (tmp_path / "last.pth").exists() and not (tmp_path / "metrics.jsonl").exists()


_DDP_TRAIN = """
import sys
sys.path.insert(0, {tests!r})
import test_robust_runs
from crossformer.cli import main
from crossformer.data import find_unreadable
from crossformer.engine import registry
test_robust_runs.TASK = test_robust_runs.{task}
registry.TASKS["fake"] = "test_robust_runs"
sys.exit(main(["train", "--config", {config!r}, "--output", {output!r}, *{extra!r}]))
"""
# This module is the fake task's registry entry in the torchrun tests (TASK: set by the script).
CONFIG = FakeConfig
TASK: type[Task] = FakeTask


def _torchrun_command(tmp_path: Path, task: str, config: str, *extra: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``crossformer train EXTRA`` of the fake task ``task``
    (a class of this module) on 2 processes, into ``tmp_path / "ddp"``."""
    (tmp_path / "fake.yaml").write_text(config)
    script = tmp_path / "run.py"
    script.write_text(_DDP_TRAIN.format(tests=str(TESTS), task=task, config=str(tmp_path / "fake.yaml"),
                                        output=str(tmp_path / "ddp"), extra=list(extra)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)], env


def _torchrun_train(tmp_path: Path, task: str, config: str, *extra: str) -> subprocess.CompletedProcess:
    """``crossformer train EXTRA`` of the fake task ``task`` (a class of this module) on 2 processes."""
    command, env = _torchrun_command(tmp_path, task, config, *extra)
    return run_process(command, timeout=300, env=env)


def _assert_every_rank_stopped_with(proc: subprocess.CompletedProcess, tmp_path: Path, error: str) -> None:
    """The torchrun run ``proc`` failed with the one line ``crossformer train: error: ERROR``, and
    no rank died inside a collective: no gloo errors, no Python traceback from a worker."""
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("crossformer train: error:")]
    assert lines == [f"crossformer train: error: {error}"], proc.stderr[-3000:]
    assert "gloo" not in proc.stderr.lower() and 'File "' + str(tmp_path) not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_with_the_one_line(tmp_path: Path) -> None:
    proc = _torchrun_train(tmp_path, "_CheckedTask", "task: fake\nrun:\n  epochs: 1\nfake:\n  samples: 25\n")
    # 25 samples: rank 1's share fails
    _assert_every_rank_stopped_with(proc, tmp_path, "cannot read validation image rank1.png")


def _no_space_left(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _DiskFullOnRank0(FakeTask):
    """Rank 0's disk fills up before its first checkpoint: ``os.fsync`` says so, as on a full
    disk (the tests run as root: no folder is unwritable). Only in a process of its own (torchrun's)."""

    def __init__(self, config: FakeConfig, ctx) -> None:
        super().__init__(config, ctx)
        if ctx.rank == 0:
            os.fsync = _no_space_left


@pytest.mark.slow
def test_under_torchrun_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_its_line(tmp_path: Path) -> None:
    # rank 0 stopped alone; rank 1 waited for it after the checkpoint (until gloo saw rank 0 gone)
    # (the first write: last.pth before the evaluation)
    proc = _torchrun_train(tmp_path, "_DiskFullOnRank0", "task: fake\nrun:\n  epochs: 1\n")
    _assert_every_rank_stopped_with(proc, tmp_path, f"cannot write {tmp_path / 'ddp' / 'last.pth'}: no space left "
                                                    f"on the device; nothing was written")


class _MetricsFileAFolder(FakeTask):
    """Rank 0 cannot append to ``metrics.jsonl``: a folder took its name (as a full disk would fail it)."""

    def __init__(self, config: FakeConfig, ctx) -> None:
        super().__init__(config, ctx)
        if ctx.is_main:
            (Path(config.run.output) / "metrics.jsonl").mkdir()


def test_a_log_file_that_cannot_be_written_stops_the_run_at_its_checkpoint(tmp_path: Path) -> None:
    # an IsADirectoryError traceback from the first metrics line, on rank 0 alone; then a line
    # that said neither that last.pth was just saved nor how to go on from it
    line = (f"cannot write {tmp_path / 'metrics.jsonl'}: it is a folder (the training so far is saved in "
            f"{tmp_path / 'last.pth'}: free space or fix that file and pass --resume auto)")
    with pytest.raises(UserInputError, match=f"^{re.escape(line)}$"):
        train(_MetricsFileAFolder, fake_config(tmp_path, epochs=2))
    assert load_training_state(tmp_path / "last.pth")["epoch"] == 1  # the epoch trained is kept


def test_a_done_line_that_cannot_be_written_is_said_after_the_last_checkpoint(tmp_path: Path) -> None:
    # written after the last checkpoint, it would be lost without a word
    def folder_in_the_way(step: int) -> None:  # after the last update's checkpoint (6 updates an epoch)
        if step == 6:
            (tmp_path / "log.txt").unlink()
            (tmp_path / "log.txt").mkdir()

    with pytest.raises(UserInputError, match=f"^cannot write {tmp_path / 'log.txt'}: it is a folder$"):
        train(FakeTask, fake_config(tmp_path, epochs=1), on_step_end=folder_in_the_way)
    assert load_training_state(tmp_path / "last.pth")["epoch"] == 1


@pytest.mark.slow
def test_under_torchrun_a_log_file_rank_0_cannot_write_stops_every_rank_with_its_line(tmp_path: Path) -> None:
    proc = _torchrun_train(tmp_path, "_MetricsFileAFolder", "task: fake\nrun:\n  epochs: 1\n")
    _assert_every_rank_stopped_with(
        proc, tmp_path, f"cannot write {tmp_path / 'ddp' / 'metrics.jsonl'}: it is a folder (the training so far is "
                        f"saved in {tmp_path / 'ddp' / 'last.pth'}: free space or fix that file and pass --resume auto)")


@pytest.mark.slow
def test_under_torchrun_a_non_finite_loss_is_said_once(tmp_path: Path) -> None:
    # Every rank printed its own "stopped:" line, rank 0's and rank 1's worded differently.
    proc = _torchrun_train(tmp_path, "FakeTask", "task: fake\nrun:\n  epochs: 2\nfake:\n  nan_at_call: 3\n")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("crossformer train: stopped:")]
    assert len(lines) == 1 and "loss became nan at epoch 1 step 3" in lines[0], proc.stdout[-3000:]


# -- 4. SIGINT / SIGTERM: a checkpoint, a resume command, then the same result ------------------


def _interrupt_at(step: int, signum: int = signal.SIGINT):
    def on_step_end(global_step: int) -> None:
        if global_step == step:
            os.kill(os.getpid(), signum)

    return on_step_end


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_mid_epoch_and_resume_equals_an_unkilled_run(tmp_path: Path, signum: int) -> None:
    settings = dict(epochs=3, model_ema=True, model_ema_decay=0.9, accum_steps=2)  # 3 updates per epoch
    stopped, clean = tmp_path / "stopped", tmp_path / "clean"
    # what the process had before (a shell's background job starts with SIGINT ignored)
    before = signal.getsignal(signum)
    with pytest.raises(RunInterrupted, match=rf"interrupted by {signal.Signals(signum).name} at epoch 1, batch 2, "
                                             r"step 4; saved .*last.pth: resume with --resume auto"):
        train(FakeTask, fake_config(stopped, **settings), on_step_end=_interrupt_at(4, signum))
    assert signal.getsignal(signum) is before  # handlers restored
    state = load_training_state(stopped / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (1, 2, 4)
    assert "interrupted by" in (stopped / "log.txt").read_text()

    resume_and_compare(stopped, clean, **settings)


class _SignalledTask(FakeTask):
    """Rank 1 alone gets SIGTERM in its 4th training step (update 4: epoch 1, batch 1)."""

    def losses(self, model, batch):
        if self.calls == 3 and self.ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().losses(model, batch)


@pytest.mark.slow
def test_under_torchrun_the_ranks_agree_on_a_stop(tmp_path: Path) -> None:
    proc = _torchrun_train(tmp_path, "_SignalledTask", "task: fake\nrun:\n  epochs: 3\n")
    # 3 updates per epoch (24 samples, 2 ranks x batch 4); the ranks agree on the stop in the
    # micro-batch after the signal's, so both stop after update 5 (epoch 1, batch 2)
    saved = f"saved {tmp_path / 'ddp' / 'last.pth'}"
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("crossformer train:", "resume with:"))]
    assert lines == [f"crossformer train: interrupted by a stop signal on another rank at epoch 1, batch 2, step 5; "
                     f"{saved}: resume with --resume auto", "resume with: torchrun ... -m crossformer --resume auto"], \
        proc.stderr[-3000:]
    state = load_training_state(tmp_path / "ddp" / "last.pth")
    assert (state["world_size"], state["epoch"], state["batches_done"], state["global_step"]) == (2, 1, 2, 5)


class _SlowTask(FakeTask):
    """Writes its process id to ``rank<N>.pid`` beside the output folder, then takes 50 ms a step."""

    def __init__(self, config, ctx) -> None:
        super().__init__(config, ctx)
        (Path(config.run.output).parent / f"rank{ctx.rank}.pid").write_text(str(os.getpid()))

    def losses(self, model, batch):
        time.sleep(0.05)
        return super().losses(model, batch)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_torchrun_alone_stops_its_workers_with_a_checkpoint(tmp_path: Path) -> None:
    # `kill -9` of the torchrun launcher left both workers training, holding the folder (and GPUs)
    command, env = _torchrun_command(tmp_path, "_SlowTask", "task: fake\nrun:\n  epochs: 1000\n")
    with open(tmp_path / "out.txt", "w") as out:  # not a pipe: the orphans would hold it open
        # (the launcher leads the workers' process group: what is left of it when the test fails is ended)
        with started_process(command, stdout=out, stderr=subprocess.STDOUT, env=env) as launcher:
            try:
                trained_an_epoch = (tmp_path / "ddp" / "last.pth").exists
                assert wait_for(trained_an_epoch, 120), (tmp_path / "out.txt").read_text()[-3000:]
                workers = [int((tmp_path / f"rank{rank}.pid").read_text()) for rank in (0, 1)]
            finally:
                launcher.kill()
                launcher.wait()
            assert wait_for(lambda: not any(map(running, workers)), 20), (tmp_path / "out.txt").read_text()[-3000:]
    output = (tmp_path / "out.txt").read_text()
    # (rank 0 names SIGTERM, or "a stop signal on another rank" when rank 1's came first)
    assert "crossformer train: interrupted by " in output and "resume with --resume auto" in output, output[-3000:]
    # the run resumes where it stopped and finishes the next epoch
    epoch = load_training_state(tmp_path / "ddp" / "last.pth")["epoch"]
    proc = _torchrun_train(tmp_path, "FakeTask", f"task: fake\nrun:\n  epochs: {epoch + 1}\n", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_training_state(tmp_path / "ddp" / "last.pth")["epoch"] == epoch + 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_torchrun_worker_whose_launcher_is_gone_already_stops(tmp_path: Path) -> None:
    # the launcher died before the worker asked to be signalled: the kernel never would be
    code = "from crossformer.engine.distributed import stop_with_launcher; stop_with_launcher(parent=-1); print('ran on')"
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = run_process([sys.executable, "-c", code], timeout=120, env=env)
    assert proc.returncode == -signal.SIGTERM and "ran on" not in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_torchrun_worker_runs_on_when_only_the_launcher_thread_that_started_it_ends(tmp_path: Path) -> None:
    # Linux sends the death signal when the thread that started the worker ends, although the
    # launcher lives on: that stopped the worker
    worker = ("import sys, time; from crossformer.engine.distributed import stop_with_launcher; "
              "print(stop_with_launcher(), flush=True); time.sleep(2); print('ran on')")
    launcher = (
        "import subprocess, sys, threading\n"
        "procs = []\n"
        "def start():\n"
        f"    procs.append(subprocess.Popen([sys.executable, '-c', {worker!r}], stdout=subprocess.PIPE, text=True))\n"
        "    print(procs[0].stdout.readline().strip(), flush=True)  # armed; then this thread ends\n"
        "thread = threading.Thread(target=start); thread.start(); thread.join()\n"
        "print(procs[0].stdout.read().strip()); sys.exit(procs[0].wait())\n"
    )
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = run_process([sys.executable, "-c", launcher], timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "ran", "on"], (proc.stdout, proc.stderr[-3000:])


def test_outside_torchrun_nothing_waits_for_the_parent(monkeypatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not stop_with_launcher(parent=-1)  # (a SIGTERM would end the tests here)


class _InterruptedTask(FakeTask):
    """Sends itself SIGINT in its 8th training step (update 8: epoch 1, batch 2)."""

    def losses(self, model, batch):
        if self.calls == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return super().losses(model, batch)


def test_the_train_command_prints_how_to_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    import types

    from crossformer.engine import registry

    module = types.ModuleType("interrupted_task")
    module.CONFIG, module.TASK = FakeConfig, _InterruptedTask
    monkeypatch.setitem(sys.modules, "interrupted_task", module)
    monkeypatch.setitem(registry.TASKS, "fake", "interrupted_task")
    config = tmp_path / "fake.yaml"
    config.write_text("task: fake\nrun:\n  epochs: 2\n")
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "run"), "--overwrite"]
    monkeypatch.setattr(sys, "argv", ["crossformer", *argv])
    assert main(argv) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("crossformer train: interrupted by SIGINT at epoch 1, batch 2, step 8; saved ")
    assert err[1] == f"resume with: crossformer train --config {config} --output {tmp_path / 'run'} --resume auto"
    assert load_training_state(tmp_path / "run" / "last.pth")["global_step"] == 8
    # overwrite set by the config file: the line turns it off, and runs as printed
    config.write_text("task: fake\nrun:\n  epochs: 2\n  overwrite: true\n")
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "again")]
    monkeypatch.setattr(sys, "argv", ["crossformer", *argv])
    assert main(argv) == 130
    line = capsys.readouterr().err.splitlines()[1]
    assert line == f"resume with: crossformer train --config {config} --output {tmp_path / 'again'} --resume auto --no-overwrite"
    monkeypatch.setattr(_InterruptedTask, "losses", FakeTask.losses)  # not interrupted this time
    assert main(line.split()[3:]) == 0
    assert load_training_state(tmp_path / "again" / "last.pth")["epoch"] == 2

    # Ctrl-C twice: "interrupted" alone, though last.pth held epoch 0 and resumed exactly
    def twice(self, model, batch):
        if self.calls == 7:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return FakeTask.losses(self, model, batch)

    monkeypatch.setattr(_InterruptedTask, "losses", twice)
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "twice")]
    monkeypatch.setattr(sys, "argv", ["crossformer", *argv])
    assert main(argv) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-2] == (f"crossformer train: interrupted again while stopping; {tmp_path / 'twice' / 'last.pth'} holds the "
                       f"run up to its last checkpoint")
    assert err[-1].startswith("resume with: crossformer train --config ")
    assert load_training_state(tmp_path / "twice" / "last.pth")["epoch"] == 1

    # one KeyboardInterrupt with no stop under way (Ctrl-C while the run starts): interrupted, no more
    def at_once(self, model, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(_InterruptedTask, "losses", at_once)
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "once")]
    monkeypatch.setattr(sys, "argv", ["crossformer", *argv])
    assert main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "crossformer train: interrupted"


# -- 6. resuming with other settings names them ----------------------------------------------


def test_resume_with_other_settings_names_them(data: Path, trained: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "run"
    output.mkdir()
    checkpoint = (trained / "last.pth").read_bytes()
    (output / "last.pth").write_bytes(checkpoint)
    changes = ("model.kwargs.embed_dim=32", "optimizer.lr=1e-3")  # a new rate alone is allowed (docs/classification.md)
    line = one_error_line(capsys, _train_argv(data, output, "--resume", "auto", overrides=changes))
    assert f"cannot resume from {output / 'last.pth'}: it was trained with other settings (" in line
    assert "model.kwargs.embed_dim 32 (was 16)" in line and "run.output" not in line and "optimizer.lr" not in line
    assert (output / "last.pth").read_bytes() == checkpoint


# -- 7. values are checked, with one line ------------------------------------------------------


def test_bad_values_are_one_line(data: Path, trained: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "run"
    cases = {
        "optimizer.lr must be at least 0, got -1.0": _train_argv(data, output, "--lr", "-1"),
        "model.drop_path must be in [0, 1), got 1.5": _train_argv(data, output, overrides=("model.drop_path=1.5",)),
        "test.crop_pct must be in (0, 1], got 5.0": _train_argv(data, output, overrides=("crop_pct=5",)),
        "model.kwargs.depths=[1,1,2: not a valid YAML list or mapping": _train_argv(
            data, output, overrides=("model.kwargs.depths=[1,1,2",)),
        "cannot build crossformer_tiny with embed_dim=33": _train_argv(data, output, overrides=("model.kwargs.embed_dim=33",)),
        "data.img_size must be at least 32": ["evaluate", "--checkpoint", str(trained / "last.pth"), "--data", str(data),
                                             "--img-size", "20"],
        "run.batch_size must be at least 1, got 0": ["predict", str(data / "val"), "--checkpoint",
                                                     str(trained / "last.pth"), "--batch-size", "0"],
        "--topk must be at least 1, got 0": ["predict", str(data / "val"), "--checkpoint", str(trained / "last.pth"),
                                             "--topk", "0"],
    }
    for expected, argv in cases.items():
        assert expected in one_error_line(capsys, argv), argv
    line = one_error_line(capsys, ["predict", str(data / "val"), "--checkpoint", str(trained / "last.pth"),
                                   "--img-size", "20"])
    assert "data.img_size must be at least 32" in line
    assert not (output / "last.pth").exists()


@pytest.mark.parametrize("argv", [["flops", "--config", "retinanet_crossformer_small_1x"],
                                  ["flops", "--config", "upernet_crossformer_small"],
                                  ["benchmark", "--config", "mask_rcnn_crossformer_small_1x", "--device", "cpu"],
                                  ["benchmark", "--config", "fpn_crossformer_small", "--device", "cpu"]],
                         ids=["flops-detection", "flops-segmentation", "benchmark-detection", "benchmark-segmentation"])
def test_dense_backbone_settings_it_cannot_take_are_one_line(capsys, argv: list[str]) -> None:
    # was a traceback ending in the ValueError: every dense command builds through build_task_backbone
    line = one_error_line(capsys, [*argv, "model.backbone_kwargs.embed_dim=64"])
    assert "cannot build backbone crossformer_small with " in line and "embed_dim=64" in line, line
    assert line.endswith(": channels (64) must be divisible by num_heads (3)"), line


@pytest.mark.parametrize("argv, key", [
    (["flops", "--config", "mask_rcnn_shapes_demo", "model.num_classes=4"], "model.backbone_kwargs"),
    (["benchmark", "--config", "mask_rcnn_shapes_demo", "--device", "cpu", "model.num_classes=4"], "model.backbone_kwargs"),
    (["flops", "--config", "upernet_demo", "model.num_classes=7"], "model.backbone_kwargs"),
    (["benchmark", "--config", "upernet_demo", "--device", "cpu", "model.num_classes=7"], "model.backbone_kwargs"),
    (["flops", "--config", "digits"], "model.kwargs"),
    (["benchmark", "--config", "digits", "--device", "cpu"], "model.kwargs"),
], ids=["flops-detection", "benchmark-detection", "flops-segmentation", "benchmark-segmentation",
        "flops-classification", "benchmark-classification"])
@pytest.mark.parametrize("setting, reason", [
    # torch's "Trying to create tensor with negative dimension -32" traceback
    ("mlp_ratio=-1", "mlp_ratio must be a number above 0 that leaves the MLP at least one hidden channel "
                     "(embed_dim 32 x mlp_ratio >= 1), got -1"),
    # built, then a ZeroDivisionError in CPU inference (its chunking divides by the MLP's width)
    ("mlp_ratio=0", "mlp_ratio must be a number above 0 that leaves the MLP at least one hidden channel "
                    "(embed_dim 32 x mlp_ratio >= 1), got 0"),
    # classification's flops and benchmark built the model outside settings_that_fail: a traceback
    ("num_heads=0", "num_heads must be at least 1 in every stage, got (0, 0, 0, 0)"),
], ids=["negative-mlp-ratio", "zero-mlp-ratio", "zero-heads"])
def test_every_task_s_bad_model_numbers_are_one_line(capsys, argv: list[str], key: str, setting: str,
                                                     reason: str) -> None:
    line = one_error_line(capsys, [*argv, f"{key}.{setting}"])
    assert line.startswith(f"crossformer {argv[0]}: error: cannot build ") and line.endswith(f": {reason}"), line


@pytest.mark.parametrize("config, key", [("mask_rcnn_shapes_demo", "model.backbone_kwargs"),
                                         ("upernet_demo", "model.backbone_kwargs"), ("digits", "model.kwargs")])
def test_model_settings_are_checked_when_the_config_loads(config: str, key: str, tmp_path: Path, capsys) -> None:
    # found only when the task built its model, after it had read the data (COCO's annotations: minutes)
    line = one_error_line(capsys, ["train", "--config", config, f"{key}.mlp_ratio=-1",
                                   f"data.root={tmp_path / 'missing'}", "--output", str(tmp_path / "run")])
    assert "cannot build " in line and "embed_dim=32" in line and line.endswith(", got -1"), line


def test_only_errors_of_the_users_settings_become_one_line() -> None:
    from crossformer.errors import settings_that_fail

    with pytest.raises(UserInputError, match=r"^cannot build m with depths=\[1\] at 32x64: wrong$"):
        with settings_that_fail("m", {"depths": [1]}, img_size=(32, 64)):  # (H, W), shown HxW as --img-size H W
            raise ValueError("wrong")
    with pytest.raises(ValueError, match="^bug$"):  # the registered settings fail: ours to fix, traceback kept
        with settings_that_fail("m", {}):
            raise ValueError("bug")
    with pytest.raises(RuntimeError):  # not what a constructor raises for a setting it cannot take
        with settings_that_fail("m", {"depths": [1]}):
            raise RuntimeError("bug")


def test_a_run_that_could_read_no_training_image_stops(tmp_path: Path, capsys) -> None:
    # --skip-corrupt skipped every batch: the run logged "train/loss 0.0000" and finished as if trained
    data = make_image_folder(tmp_path / "data", {"train": 2, "val": 1})
    for path in (data / "train").rglob("*.png"):
        path.write_bytes(b"garbage")
    output = tmp_path / "run"
    line = one_error_line(capsys, _train_argv(data, output, "--skip-corrupt"))
    assert "no training sample could be used since the last evaluation (6 unreadable images)" in line
    assert not (output / "best.pth").exists()


def test_augmentation_settings_are_checked_before_training(data: Path, trained: Path, tmp_path: Path, capsys) -> None:
    # timm asserted on these inside the first training step (an odd batch under Mixup, an
    # unknown policy or erasing mode), or took them silently (a flip probability of 2)
    output = tmp_path / "run"
    cases = {
        "run.batch_size must be even with Mixup/CutMix": ("--batch-size", "3", "mixup=0.8"),
        "augment.auto_augment 'garbage' is not a timm augmentation policy": ("auto_augment=garbage",),
        # timm skipped a section without a number: magnitude 10 instead of an error
        "augment.auto_augment 'rand-mX-inc1' is not a timm augmentation policy (section 'mX'": ("auto_augment=rand-mX-inc1",),
        "augment.auto_augment 'augmix-m5-wide' is not a timm augmentation policy": ("auto_augment=augmix-m5-wide",),
        "augment.auto_augment 'original-mstdX' is not a timm augmentation policy": ("auto_augment=original-mstdX",),
        "augment.re_mode must be one of pixel, rand, const, got 'foo'": ("re_mode=foo",),
        "augment.mixup_mode must be one of batch, pair, elem": ("mixup_mode=xyz",),
        "augment.hflip must be in [0, 1], got 2": ("hflip=2",),
        "augment.label_smoothing must be in [0, 1), got 1.5": ("label_smoothing=1.5",),
        "augment.re_count must be at least 1, got 0": ("re_count=0",),
        "augment.mixup must be at least 0, got -1": ("mixup=-1",),
        "augment.scale must be [low, high] with 0 < low <= high <= 1 (fractions of the image's area), got [1.0, 0.1]":
            ("scale=[1,0.1]",),
        "augment.scale must be [low, high] with 0 < low <= high <= 1 (fractions of the image's area), got [0.08, 1.5]":
            ("scale=[0.08,1.5]",),
    }
    for expected, extra in cases.items():
        assert expected in one_error_line(capsys, _train_argv(data, output, overrides=extra)), extra
    assert not output.exists() or not (output / "last.pth").exists()
    # inference batches need not be even, whatever the checkpoint was trained with
    assert main(["predict", str(data / "val"), "--checkpoint", str(trained / "last.pth"), "--batch-size", "3"]) == 0
    capsys.readouterr()


# -- 11. visible: skipped files named, progress in log files, notes --------------------------


def test_predict_skips_unreadable_files_when_asked_and_notes_tiny_images(trained: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 40), (220, 40, 40)).save(folder / "a.png")
    Image.new("RGB", (10, 10), (40, 200, 40)).save(folder / "b.png")
    (folder / "c.png").write_bytes(b"garbage")
    line = one_error_line(capsys, ["predict", str(folder / "a.png"), str(folder / "c.png"), "--checkpoint",
                                   str(trained / "last.pth"), "--device", "cpu"])
    assert f"cannot read image {folder / 'c.png'}" in line and "--skip-corrupt" in line
    assert main(["predict", str(folder), "--checkpoint", str(trained / "last.pth"), "--device", "cpu",
                 "--skip-corrupt"]) == 0
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == [str(folder / "a.png"), str(folder / "b.png")]
    assert f"crossformer predict: skipped unreadable image {folder / 'c.png'}: " in err  # as detection's and segmentation's
    # a newline in a name split its result's line in two (all three tasks print through result_printer)
    named = tmp_path / "odd"
    named.mkdir()
    Image.new("RGB", (40, 40), (20, 40, 220)).save(named / "new\nline.png")
    assert main(["predict", str(named), "--checkpoint", str(trained / "last.pth"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(repr(str(named / "new\nline.png")) + ": ")
    assert "--skip-corrupt" not in err  # it was given: no advice to pass it
    assert "crossformer predict: 1 of 3 files skipped as unreadable" in err
    assert f"{folder / 'b.png'} is 10x10 (height x width), a side shorter than the model's 32x32 input: upscaled" in err
    assert str(folder / "a.png") + " is" not in err
    # sizes are height x width, as --img-size H W gives them (the note printed width x height)
    Image.new("RGB", (36, 40), (220, 40, 40)).save(folder / "tall.png")  # 36 wide, 40 high
    assert main(["predict", str(folder / "tall.png"), "--checkpoint", str(trained / "last.pth"), "--device", "cpu",
                 "--img-size", "32", "48"]) == 0
    assert f"{folder / 'tall.png'} is 40x36 (height x width), a side shorter than the model's 32x48 input" in \
        capsys.readouterr().err


def test_evaluate_prints_its_size_as_height_x_width(data: Path, trained: Path, capsys) -> None:
    argv = ["evaluate", "--checkpoint", str(trained / "last.pth"), "--data", str(data), "--device", "cpu"]
    assert main([*argv, "--img-size", "48", "64"]) == 0
    assert "crossformer_tiny at 48x64: top-1 " in capsys.readouterr().out  # not "at (48, 64)"
    assert main(argv) == 0
    assert "crossformer_tiny at 32x32: top-1 " in capsys.readouterr().out


def test_evaluate_prints_each_number_under_its_name(tmp_path: Path, capsys, monkeypatch) -> None:
    import importlib

    metrics = {"model": "m", "img_size": 32, "acc1": 25.0, "acc5": 75.0, "loss": 1.5, "images": 4, "skipped": 1}
    monkeypatch.setattr(importlib.import_module("crossformer.classification.evaluate"), "evaluate",
                        lambda *args, **kwargs: metrics)
    torch.save({}, tmp_path / "m.pth")  # the command checks that it is a checkpoint before it evaluates
    assert main(["evaluate", "--checkpoint", str(tmp_path / "m.pth"), "--data", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ("m at 32x32: top-1 25.00%  top-5 75.00%  loss 1.5000  "
                                       "(4 images, 1 unreadable skipped)\n")


def test_evaluate_names_each_skipped_file(trained: Path, tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", {"val": 2})
    bad = data / "val" / "eel" / "bad.png"
    bad.write_bytes(b"garbage")
    argv = ["evaluate", "--checkpoint", str(trained / "last.pth"), "--data", str(data), "--device", "cpu",
            "--num-workers", "0"]
    assert f"cannot read image {bad}:" in one_error_line(capsys, argv)
    assert main([*argv, "--skip-corrupt"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"skipping unreadable image {bad}:") and err.count("\n") == 1
    assert "(6 images, 1 unreadable skipped)" in out


def test_evaluate_names_the_first_20_skipped_files_and_counts_all(trained: Path, tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", {"val": 2})
    for i in range(23):
        (data / "val" / "eel" / f"bad{i:02d}.png").write_bytes(b"garbage")
    assert main(["evaluate", "--checkpoint", str(trained / "last.pth"), "--data", str(data), "--device", "cpu",
                 "--num-workers", "0", "--skip-corrupt"]) == 0
    out, err = capsys.readouterr()
    assert err.count("skipping unreadable image ") == 20 and "bad19.png" in err and "bad20.png" not in err, err
    assert err.count("more unreadable images are skipped: counted, not named") == 1
    assert "(6 images, 23 unreadable skipped)" in out


def test_progress_lines_come_every_few_seconds_when_not_on_a_terminal(tmp_path: Path, capsys) -> None:
    log = RunLogger(tmp_path)
    progress = Progress(log, total=100, desc="epoch 0", every=50, seconds=0.0)  # a line at every step
    progress.update(loss=1.0)
    progress.update(loss=0.5)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["epoch 0 [1/100] loss 1", "epoch 0 [2/100] loss 0.5"]
    quiet = Progress(log, total=60, desc="epoch 1", every=50, seconds=3600.0)
    for _ in range(49):
        quiet.update(loss=1.0)
    assert capsys.readouterr().out == ""
    quiet.update(loss=1.0)
    assert capsys.readouterr().out.startswith("epoch 1 [50/60]")
    for _ in range(10):  # and at the end, between the every-50 lines
        quiet.update(loss=1.0)
    assert [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()] == ["epoch 1 [60/60] loss 1"]


# -- 12. smaller ---------------------------------------------------------------------------------


def test_smaller_items(data: Path, trained: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    # one class
    one = make_image_folder(tmp_path / "one", {"train": 4, "val": 1}, classes=("cat",))
    assert "has one class folder (cat); a classifier needs at least two" in one_error_line(
        capsys, _train_argv(one, tmp_path / "o1"))
    # --ema on a checkpoint without EMA weights
    line = one_error_line(capsys, ["evaluate", "--checkpoint", str(trained / "last.pth"), "--data", str(data), "--ema"])
    assert f"{trained / 'last.pth'} holds no EMA weights" in line
    # a file as --data
    image = data / "val" / "cat" / "0.png"
    assert f"data {image} is a file, not a folder" in one_error_line(capsys, _train_argv(image, tmp_path / "o2"))
    # --version
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    import crossformer

    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"crossformer {crossformer.__version__}"
    # help texts
    for argv, flags in ((["train", "--help"], ("--epochs", "--seed", "--overwrite")),
                        (["predict", "x", "--help"], ("--topk", "--checkpoint", "--skip-corrupt"))):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        for flag in flags:
            entry = text[text.index(f"  {flag}"):].split("\n  -")[0]
            assert len(entry.split()) > 6, entry  # more than the flag, its metavar, key and default
    # default loader workers: the CPUs available, shared by the node's processes, 1 to 8
    cpus = len(os.sched_getaffinity(0))
    assert default_workers() == max(1, min(8, cpus))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 2))
    assert default_workers() == 1


def test_the_demo_says_where_its_logs_are_and_replaces_its_own_run(data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import crossformer.data.digits

    monkeypatch.setattr(crossformer.data.digits, "prepare_digits", lambda: data)  # as the demo's data
    monkeypatch.chdir(tmp_path)
    output = Path("output/demo")  # the default folder
    argv = ["demo", "epochs=1", "batch_size=8", "num_workers=0", "tensorboard=false", "model.kwargs.embed_dim=16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"demo: checkpoints {output / 'last.pth'} and {output / 'best.pth'}; logs {output / 'log.txt'}, " \
           f"{output / 'metrics.jsonl'}" in out
    assert main(argv) == 0  # a demo replaces its own earlier run, and says so
    assert f"demo: deleted the earlier classification demo's last.pth, best.pth, metrics.jsonl, log.txt " \
           f"in {output}" in capsys.readouterr().out
    assert [r["epoch"] for r in _records(output) if "val/acc1" in r] == [0]
    (output / "crossformer-demo.txt").unlink()  # as written before demos marked their folders
    assert main(argv) == 0 and "demo: deleted the earlier classification demo's" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--bogus"], "crossformer train: error: unrecognized arguments: --bogus (see crossformer train --help)"),
    (["evaluate", "--amp", "fp8"], "crossformer evaluate: error: argument --amp: invalid choice: 'fp8'"),
    (["bogus"], "crossformer: error: argument COMMAND: invalid choice: 'bogus'"),
    # a flag of the classifier's, refused for a detection config: the help with the config lists its flags
    (["evaluate", "--config", "mask_rcnn_shapes_demo", "--checkpoint", "x.pth", "--batch-size", "2"],
     "crossformer evaluate: error: unrecognized arguments: --batch-size (see crossformer evaluate --config "
     "mask_rcnn_shapes_demo --help)"),
])
def test_argparse_errors_are_one_line_pointing_at_help(argv: list[str], message: str, capsys) -> None:
    # argparse printed its usage block first: 40 lines for train
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert err.rstrip().endswith("--help)")


def test_running_out_of_memory_is_one_line(monkeypatch, capsys) -> None:
    # flops --traced at 20000 px, benchmark at batch 100000: the allocator's RuntimeError traceback
    from crossformer import cli
    from crossformer.commands import flops

    def asks_too_much(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 4800000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(flops, "run", asks_too_much)
    assert main(["flops", "--model", "crossformer_tiny", "--traced"]) == 1
    assert capsys.readouterr().err == ("crossformer flops: error: out of memory (4.8 GB asked for): lower --batch-size "
                                       "or --img-size, or free memory\n")
    assert cli._memory_asked(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == " (2.1 GB asked for)"
    assert cli._memory_asked(MemoryError()) == ""
    assert cli._memory_asked(RuntimeError("shape mismatch")) is None  # other errors go on as they are


def test_a_config_verb_runs_on_the_configs_cpu_threads(capsys) -> None:
    # benchmark --config digits timed 2 threads where the config (and its training) uses 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["benchmark", "--config", "digits", "--rounds", "1", "--warmup", "1", "--batch-size", "2",
                     "--no-memory"]) == 0
        assert " (1 thread), torch " in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_a_demo_leaves_a_folder_it_did_not_write_as_it_is(task: str, tmp_path: Path, capsys) -> None:
    # A demo replaces its output folder: pointed at a training run (or at ., or a home folder),
    # it deleted the run's checkpoints (detection: the whole folder)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pth", "best.pth", "log.txt", "notes.md"):
        (run / name).write_text("mine")
    err = one_error_line(capsys, ["demo", "--task", task, "--output", str(run)])
    assert f"output folder {run} already holds best.pth, last.pth, log.txt, notes.md, not an earlier {task} demo's " \
           "output" in err
    assert sorted(p.name for p in run.iterdir()) == ["best.pth", "last.pth", "log.txt", "notes.md"]
    other = tmp_path / "other-demo"  # another task's demo output is not this one's
    other.mkdir()
    (other / "crossformer-demo.txt").write_text("a task of another name\n")
    assert "not an earlier" in one_error_line(capsys, ["demo", "--task", task, "--output", str(other)])


def test_inference_flags_show_the_defaults_the_verb_uses(capsys) -> None:
    """evaluate and predict read size, crop and filter from the checkpoint and batch by 64 / 32
    when not told: their help says so, not the training config's defaults."""
    for verb, expected in (("evaluate", ("(default: 64)", "data.img_size: N (square) or H W (default: the checkpoint's)",
                                         "crop img_size (default: the checkpoint's)",
                                         "hamming or lanczos (default: the checkpoint's)")),
                           ("predict", ("(default: 32)", "(default: the checkpoint's)"))):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(part in text for part in expected), (verb, text)
        assert "(default 128)" not in text and "(default 224)" not in text
    # the batch size's help speaks of inference, not of the training's global batch
    assert "run.batch_size: images per forward pass, per process (default: 32)" in text
    assert "accum_steps" not in text


@pytest.mark.parametrize("config,verb,shown,hidden", [
    ("mask_rcnn_shapes_demo", "evaluate", ("--backbone", "--val-ann", "--min-size", "--eval-batch-size"),
     ("--pretrained", "--drop-path", "--rpn-samples", "--train-ann", "--recipe", "--crop-size-range", "--score-threshold")),
    ("mask_rcnn_shapes_demo", "predict", ("--backbone", "--min-size", "--score-threshold"),
     ("--pretrained", "--rcnn-samples", "--val-ann", "--multiscale-min-sizes", "--eval-batch-size")),
    ("upernet_demo", "evaluate", ("--kind", "--aux-channels", "--val-labels"), ("--pretrained", "--drop-path")),
    ("upernet_demo", "predict", ("--kind", "--channels"), ("--pretrained", "--drop-path", "--val-labels")),
])
def test_dense_inference_verbs_offer_only_the_settings_they_read(capsys, config, verb, shown, hidden) -> None:
    """A training-only flag on evaluate or predict would be taken and silently do nothing."""
    with pytest.raises(SystemExit):
        main([verb, "--config", config, "--help"])
    flags = set(capsys.readouterr().out.replace("[", " ").replace("]", " ").split())
    assert set(shown) <= flags and not set(hidden) & flags, (set(shown) - flags, set(hidden) & flags)


@pytest.mark.parametrize("config,kind", [("mask_rcnn_shapes_demo", "detector"), ("upernet_demo", "segmentor")])
@pytest.mark.parametrize("verb,flag", [("flops", ["--num-classes", "7"]), ("flops", ["--model", "crossformer_base"]),
                                       ("flops", ["--traced"]), ("benchmark", ["--num-classes", "0"]),
                                       ("benchmark", ["--model", "crossformer_base"]), ("benchmark", ["--peak"])])
def test_dense_flops_and_benchmark_refuse_the_classifier_flags_they_do_not_read(capsys, config, kind, verb,
                                                                                flag) -> None:
    """They counted or timed the config's model as it is, and printed "150 classes" after
    --num-classes 7: the flag was taken and silently did nothing."""
    small = ["--img-size", "64", "--rounds", "1", "--warmup", "0", "--batch-size", "1", "--no-memory"]
    line = one_error_line(capsys, [verb, "--config", config, *flag, *(small if verb == "benchmark" else [])])
    if flag[0] in ("--num-classes", "--model"):
        assert f"error: {flag[0]} is for classifiers; a {kind}'s config describes it: change the config with " \
               f"KEY=VALUE" in line, line
    else:  # no config setting stands for it: the advice to change the config pointed nowhere
        assert line.endswith(f"error: {flag[0]} is for classifiers; a {kind} is measured without it"), line


@pytest.mark.parametrize("config,shown", [
    ("mask_rcnn_shapes_demo", "detector    mask_rcnn on crossformer_tiny (depths=[1, 1, 1, 1], embed_dim=32, "
                              "num_heads=[1, 2, 4, 8]) at 800x1280, 80 classes"),
    ("upernet_demo", "model       upernet crossformer_small (depths=[1, 1, 2, 1], embed_dim=32, group_size=[4, 4, 4, 2], "
                     "interval=[4, 2, 1, 1], num_heads=[1, 2, 4, 8]) with channels=64, aux_channels=32 at 512x2048, "
                     "150 classes"),  # the heads' widths too: the demo's are narrower than the authors
])
def test_dense_flops_names_the_backbone_settings_and_classes_it_counts(capsys, config: str, shown: str) -> None:
    """A 2.4M-parameter count was printed as "upernet crossformer_small" (62M in the README's
    table), and the detector's line named no class count, as classification's flops does."""
    assert main(["flops", "--config", config]) == 0
    assert shown in capsys.readouterr().out


def test_dense_backbone_settings_leave_out_the_training_only_drop_path() -> None:
    from crossformer.commands.common import backbone_settings

    assert backbone_settings({"embed_dim": 32, "drop_path_rate": 0.2, "depths": [1, 1]}) == " (depths=[1, 1], embed_dim=32)"
    assert backbone_settings({"drop_path_rate": 0.2}) == backbone_settings({}) == ""


def test_demo_task_all_takes_no_output_or_settings(tmp_path: Path, capsys) -> None:
    for extra in (["--output", str(tmp_path / "demo")], ["epochs=1"]):
        line = one_error_line(capsys, ["demo", "--task", "all", *extra])
        assert line.endswith("--task all runs every demo as it is: no --output or KEY=VALUE settings"), line
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("argv,shown,hidden", [
    (["--config", "digits"],
     ("(default 15)", "optimizer.lr: peak rate; per lr_batch_reference images when scale_lr (default 0.004)"),
     ("(default 300)",)),
    (["--config", "mask_rcnn_shapes_demo"], ("when scale_lr (default 0.002)",), ("when scale_lr (default 0.0001)",)),
    ([], ("(default 15)",), ("(default 300)",)),  # no config, no model: train reads digits
    (["--model", "crossformer_small"], ("(default 300)", "when scale_lr (default 0.0005)"), ("(default 15)",)),
])
def test_train_help_shows_the_values_of_the_config_it_would_read(capsys, argv, shown, hidden) -> None:
    """``train [--config X | --model M] --help`` shows the settings of the file train would read
    (X, M's bundled recipe, or digits) as the defaults, not the config class's."""
    with pytest.raises(SystemExit):
        main(["train", *argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(part in text for part in shown), text
    assert not any(part in text for part in hidden), text


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_dense_inference_help_shows_the_config_the_checkpoint_records(capsys, tmp_path: Path, verb: str) -> None:
    """Without --config the verb reads the config the checkpoint was trained with: its help
    showed the task's defaults instead (crossformer_small, 1333 pixels) for a tiny 112-pixel run."""
    import torch

    checkpoint = tmp_path / "best.pth"
    torch.save({"task": "detection", "config": {"task": "detection", "model": {"backbone": "crossformer_tiny"},
                                                "data": {"max_size": 112, "min_size": 112}}}, checkpoint)
    with pytest.raises(SystemExit):
        main([verb, "--checkpoint", str(checkpoint), "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "CrossFormer variant (default crossformer_tiny)" in text and "(default 112)" in text, text
    assert "(default 1333)" not in text


def test_help_with_an_unreadable_config_shows_the_class_defaults(capsys, tmp_path: Path) -> None:
    """A file whose settings do not load still gives help (its error comes when the command runs)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: classification\nrun:\n  epochs: many\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(broken), "--help"])
    assert "(default 300)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("config,setting", [("digits", "pretrained"), ("mask_rcnn_shapes_demo", "pretrained"),
                                            ("mask_rcnn_shapes_demo", "init_from"), ("upernet_demo", "init_from")])
def test_a_missing_start_checkpoint_stops_training_before_the_data_is_read(config: str, setting: str, tmp_path: Path,
                                                                          capsys) -> None:
    # the data path does not exist either: the weights file is named first, before any data is read
    line = one_error_line(capsys, ["train", "--config", config, "--data", str(tmp_path / "no-data"), "--output",
                                   str(tmp_path / "run"), f"model.{setting}={tmp_path / 'gone.pth'}"])
    assert f"model.{setting}: checkpoint not found: {tmp_path / 'gone.pth'}" in line
    assert not (tmp_path / "run" / "last.pth").exists()


@pytest.mark.parametrize("argv", [["flops", "--model", "crossformer_tiny", "--traced", "--img-size", "64"],
                                  ["train", "--config", "digits", "--help"]])
def test_output_into_a_closed_pipe_ends_quietly(argv: list[str]) -> None:
    # `crossformer ... | head -1`: head has gone when the next line is written
    with started_process([sys.executable, "-m", "crossformer", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True) as process:
        process.stdout.close()
        assert process.wait(timeout=120) == 0
        assert process.stderr.read() == ""


_CTRL_C_INSIDE_TORCHS_IMPORT = """
import sys
sys.argv = ["crossformer"]  # this process is the command (its Ctrl-C handling is set up)
from crossformer import cli

class CtrlCInsideTorchsImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            import gets_ctrl_c  # noqa: F401
        return None

sys.meta_path.insert(0, CtrlCInsideTorchsImport())
sys.exit(cli.main(["flops", "--model", "crossformer_tiny", "--img-size", "64"]))
"""


def test_ctrl_c_inside_an_import_ends_the_command_before_the_module_unwinds(tmp_path: Path) -> None:
    # a KeyboardInterrupt raised into a library's import left numpy half set up ("cannot load module
    # more than once per process" at exit) or reached torch's C++ (abort): 1 run in 20 of the test below
    (tmp_path / "gets_ctrl_c.py").write_text(
        "import os, signal, time\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "finally:\n"
        "    print('the import unwound', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = run_process([sys.executable, "-c", _CTRL_C_INSIDE_TORCHS_IMPORT], timeout=120, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "crossformer flops: interrupted\n")


def _importing_torch(pid: int) -> bool:
    """Whether process ``pid`` has started loading torch (its library is mapped), or has ended."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the import under way")
@pytest.mark.parametrize("delay", [0.0, 0.4, 1.2, 2.5])
def test_ctrl_c_while_the_command_starts_ends_quietly(delay: float) -> None:
    # Ctrl-C while `crossformer` still imported torch and timm printed a KeyboardInterrupt traceback
    # (a command that needs them: --help no longer imports them)
    with started_process([sys.executable, "-m", "crossformer", "flops", "--model", "crossformer_tiny"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as process:
        assert wait_for(lambda: _importing_torch(process.pid), 60)
        time.sleep(delay)  # 0: inside torch's import; later: timm's, the model's (or the count done: exit 0)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    # 130 (stopped), 0 (the count was done), or killed by SIGINT itself: CPython restores the default
    # handler while the interpreter shuts down (seen with the count done), and exits by SIGINT where a
    # KeyboardInterrupt once left code it ran nested; a shell reports 130 for each. Quiet in all three.
    assert process.returncode in (130, 0, -signal.SIGINT) and "Traceback" not in err and len(err.splitlines()) <= 1, \
        (process.returncode, err[-3000:])


def test_a_file_named_tensorboard_in_the_output_is_one_line(tmp_path: Path) -> None:
    # the folder rule lets a run into a folder holding its logs; a plain file named tensorboard
    # there ended the run in a FileExistsError traceback from the logger
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").write_text("not a folder")
    with pytest.raises(UserInputError, match=re.escape(f"cannot write {run / 'tensorboard'}: a file of that name is in the way")):
        train(FakeTask, fake_config(run, epochs=1, tensorboard=True))
    assert sorted(p.name for p in run.iterdir()) == ["tensorboard"]  # nothing written, nothing taken


@pytest.mark.slow
def test_under_torchrun_an_output_folder_rank_0_cannot_make_stops_every_rank_with_its_line(tmp_path: Path) -> None:
    # rank 0 alone made the folder: it stopped with the line, rank 1 died in its next collective
    # with a gloo traceback ("Connection reset by peer"), which torchrun named as the cause
    (tmp_path / "file").write_text("x")
    output = tmp_path / "file" / "run"
    proc = _torchrun_train(tmp_path, "FakeTask", "task: fake\nrun:\n  epochs: 1\n", "--output", str(output))
    _assert_every_rank_stopped_with(proc, tmp_path, f"cannot write {output}: a folder on its path is a file")


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_goes_on(tmp_path: Path) -> None:
    # nothing kept two runs apart: a second one with --overwrite moved the running one's files
    # aside and deleted them, the first crashed on its vanished tensorboard file, and
    # metrics.jsonl ended with both runs' records
    run = tmp_path / "run"
    seen = {}

    def start_second(global_step: int) -> None:
        if global_step == 1:
            for overwrite in (True, False):
                with pytest.raises(UserInputError, match=re.escape(f"output folder {run} is in use by another run "
                                                                   f"(pid {os.getpid()} on ")):
                    train(FakeTask, fake_config(run, epochs=1, overwrite=overwrite))
            seen["files"] = sorted(p.name for p in run.iterdir())

    first = train(FakeTask, fake_config(run, epochs=2), on_step_end=start_second)
    assert seen["files"] == [".crossformer-lock", "log.txt", "metrics.jsonl"]  # the refusals moved nothing
    assert first["epoch"] == 2 and not (run / ".crossformer-lock").exists()  # let go at the end
    again = train(FakeTask, fake_config(run, epochs=3, resume="auto"))  # the folder is free again
    assert again["epoch"] == 3


class _Rank1Dies(FakeTask):
    """Rank 1's process ends at its third batch, as the kernel's OOM killer ends one."""

    def losses(self, model, batch):
        if self.ctx.rank == 1 and self.calls == 2:
            os._exit(9)
        return super().losses(model, batch)


def _stopped_with_one_line(proc: subprocess.CompletedProcess, output: Path) -> str | None:
    """Why ``proc`` (a torchrun run whose rank 1 ended) did not stop rank 0 with its one line; None if it did."""
    said = [line for line in proc.stderr.splitlines() if line.startswith("crossformer train: stopped on rank 0:")]
    want = (f"crossformer train: stopped on rank 0: another process of this run ended (killed? out of memory?) "
            f"while this one waited for it; its output says why; then resume from {output}")
    if proc.returncode == 0 or said != [want]:
        return f"exit {proc.returncode}, lines {said}: {proc.stderr[-3000:]}"
    if "[rank0]: Traceback" in proc.stderr or "Traceback" in (output / "log.txt").read_text():
        return f"a traceback: {proc.stderr[-3000:]}"
    return None


@pytest.mark.slow
def test_under_torchrun_a_process_that_ends_stops_the_others_with_one_line(tmp_path: Path) -> None:
    # the rank left printed gloo's 34-line traceback ("Connection closed by peer ... GLHF!"),
    # also into log.txt. Two tries: which of the launcher's SIGTERM and the peer's closed
    # connection reaches rank 0 first is the machine's (1 run in 46 went otherwise here)
    failures = []
    for attempt in range(2):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        failures.append(_stopped_with_one_line(_torchrun_train(folder, "_Rank1Dies", "task: fake\nrun:\n  epochs: 2\n"),
                                               folder / "ddp"))
        if failures[-1] is None:
            return
    pytest.fail("\n\n".join(failures))
