"""The train / evaluate / predict commands, their one-line errors, and torchrun over gloo."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cli_errors import one_error_line, one_torchrun_error_line, torchrun
from crossformer.cli import main
from crossformer.engine import load_training_state
from processes import run_process

TINY_ARGS = [
    "--model", "crossformer_tiny", "--img-size", "32", "--batch-size", "2", "--device", "cpu", "--num-workers", "0",
    "model.kwargs.embed_dim=16", "model.kwargs.depths=[1,1,1,1]", "model.kwargs.num_heads=[1,2,4,8]",
    "model.kwargs.group_size=[4,4,2,1]", "model.kwargs.interval=[2,2,1,1]", "warmup_epochs=0", "cpu_threads=1",
]


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err


def test_train_evaluate_predict_from_the_command_line(data: Path, tmp_path: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "run"
    # KEY=VALUE settings may stand anywhere among the flags (here: after them, then again after more flags)
    assert main(["train", *TINY_ARGS, "--data", str(data), "--output", str(output), "--epochs", "1", "log_every=3"]) == 0
    assert "epoch 0/1" in capsys.readouterr().out
    state = load_training_state(output / "last.pth")
    assert state["global_step"] == 12 and state["config"]["model"]["kwargs"]["embed_dim"] == 16
    assert state["config"]["run"]["log_every"] == 3

    assert main(["evaluate", "--checkpoint", str(output / "best.pth"), "--data", str(data), "--device", "cpu",
                 "--num-workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 9 and result["acc1"] == pytest.approx(state["metrics"]["val/acc1"])
    # without --data: the data the run was trained on, recorded in its checkpoint (as the dense tasks)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--checkpoint", str(output / "best.pth"), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == result
    moved = tmp_path / "moved.pth"
    state["config"]["data"]["root"] = str(tmp_path / "gone")
    torch.save(state, moved)
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(moved)],
                    f"data.root {tmp_path / 'gone'} is not on this machine; it came from {moved} (the config it was "
                    f"trained with): pass --data PATH")

    assert main(["predict", str(data / "val" / "eel"), "--checkpoint", str(output / "best.pth"), "--topk", "2",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith(str(data / "val" / "eel")) for line in lines)

    # --img-size takes N or H W everywhere; KEY=VALUE sets the same settings
    assert main(["evaluate", "num_workers=0", "--checkpoint", str(output / "best.pth"), "--data", str(data),
                 "--device", "cpu", "--img-size", "32", "48", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["img_size"] == [32, 48] and result["images"] == 9
    assert main(["predict", str(data / "val" / "eel" / "0.png"), "device=cpu", "--checkpoint", str(output / "best.pth"),
                 "--img-size", "48", "32", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["labels"]) == 3

    # --interpolation and --crop-pct replace what the checkpoint records, as --img-size does
    import importlib

    evaluating = importlib.import_module("crossformer.classification.evaluate")  # the package exports evaluate()
    transforms = []
    build = evaluating.build_eval_transform
    monkeypatch.setattr(evaluating, "build_eval_transform", lambda *args: transforms.append(args) or build(*args))
    assert main(["evaluate", "num_workers=0", "--checkpoint", str(output / "best.pth"), "--data", str(data),
                 "--device", "cpu", "--interpolation", "nearest", "--crop-pct", "1.0", "--json"]) == 0
    capsys.readouterr()
    assert transforms == [(32, 1.0, "nearest")]

    # settings and images between and after the flags; an existing file named like a setting is an image
    assert main(["evaluate", "num_workers=0", "--checkpoint", str(output / "best.pth"), "img_size=[32,48]", "--data",
                 str(data), "--json", "device=cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["img_size"] == [32, 48]
    monkeypatch.chdir(tmp_path)
    Path("topk=1.png").write_bytes((data / "val" / "eel" / "1.png").read_bytes())
    assert main(["predict", str(data / "val" / "eel" / "0.png"), "--checkpoint", str(output / "best.pth"), "device=cpu",
                 "--topk", "2", "topk=1.png", "--json", "img_size=32"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in results] == [str(data / "val" / "eel" / "0.png"), "topk=1.png"]
    assert all(len(r["labels"]) == 2 for r in results)

    # Converted to safetensors, the weights keep the model's name, settings, classes and size:
    # evaluate and predict read them as they read the checkpoint, with no --model or --model-arg.
    weights = tmp_path / "tiny.safetensors"
    assert main(["convert", str(output / "best.pth"), str(weights)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(weights), "--data", str(data), "--device", "cpu",
                 "--num-workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["acc1"] == pytest.approx(state["metrics"]["val/acc1"]) and result["img_size"] == 32
    predictions = []
    for checkpoint in (output / "best.pth", weights):
        assert main(["predict", str(data / "val" / "eel" / "0.png"), "--checkpoint", str(checkpoint), "--topk", "3",
                     "--device", "cpu", "--json"]) == 0
        predictions.append(json.loads(capsys.readouterr().out))
    assert predictions[0] == predictions[1] and sorted(predictions[1]["labels"]) == ["cat", "dog", "eel"]


def test_flops_takes_the_model_and_size_from_a_config(capsys) -> None:
    assert main(["flops", "--config", "crossformer_small", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "crossformer_small" and result["img_size"] == [224, 224]
    assert main(["flops", "--config", "crossformer_small", "--img-size", "256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["img_size"] == [256, 256]
    assert main(["train", "--config", "nope.yaml"]) == 2
    assert "config file not found: nope.yaml" in capsys.readouterr().err


def test_flops_and_benchmark_take_model_or_config(capsys) -> None:
    """The README runs both with --config alone; their help marked --model as required and,
    given neither, they named --model only."""
    for verb, others in (("flops", ""), ("benchmark", ", or any timm model")):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        # flops counts CrossFormers alone: its help and error offered any timm model, then refused resnet18
        assert "[--model NAME]" in capsys.readouterr().out
        _one_line_error(capsys, [verb], f"give --model NAME (crossformer_tiny ... crossformer_pp_huge{others}) "
                                        "or --config NAME_OR_FILE")


def test_flops_and_benchmark_build_the_model_as_the_config_configures_it(capsys) -> None:
    """The digits config's crossformer_tiny has its own widths and depths (model.kwargs) and the
    digits' 10 classes (their head had 1000)."""
    import timm

    from crossformer.models import count_params

    kwargs = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), group_size=(4, 4, 2, 1), interval=(2, 2, 1, 1))
    configured = count_params(timm.create_model("crossformer_tiny", num_classes=10, **kwargs))
    assert main(["flops", "--config", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"] == configured and result["img_size"] == [32, 32] and result["num_classes"] == 10
    assert "paper_params_m" not in result  # the paper's figures are for the variant as published
    assert main(["flops", "--config", "digits", "model.kwargs.embed_dim=16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] < configured
    # --model with a config is the model train builds from the same flags: the config's settings stay
    # (they were dropped: the registered crossformer_tiny was measured, 27.8M parameters, not the 0.4M trained)
    assert main(["flops", "--config", "digits", "--model", "crossformer_tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == configured
    from crossformer.engine.registry import resolve_config  # what train builds from --model over a config

    assert resolve_config("digits", {"model.name": "crossformer_tiny"}).config.model.kwargs == {
        k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    assert main(["benchmark", "--config", "digits", "--batch-size", "2", "--rounds", "1", "--warmup", "0",
                 "--no-memory", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"]["crossformer_tiny"]["params"] == configured
    assert main(["benchmark", "--config", "digits", "--batch-size", "2", "--rounds", "1", "--warmup", "0",
                 "--no-memory"]) == 0  # the summary says which model it timed
    captured = capsys.readouterr()
    assert "settings    crossformer_tiny: embed_dim=32, depths=[1, 1, 2, 1]," in captured.out
    assert "warmed up" not in captured.out + captured.err  # --warmup 0 ran no step (it said "warmed up" all the same)
    assert main(["benchmark", "--config", "digits", "--batch-size", "2", "--rounds", "1", "--warmup", "1",
                 "--no-memory"]) == 0
    captured = capsys.readouterr()
    assert "warmed up crossformer_tiny (infer): first step" in captured.out + captured.err


def test_model_verbs_size_the_classifier_by_the_configs_data(data: Path, tmp_path: Path, capsys) -> None:
    """As training does: the data's class count (listed, no image read), else ImageNet's 1000."""
    from safetensors import safe_open

    said: list[str] = []

    def flops(*argv: str) -> dict:
        assert main(["flops", "--json", *argv]) == 0
        captured = capsys.readouterr()
        said.append(captured.err)
        return json.loads(captured.out)

    assert flops("--config", "digits")["num_classes"] == 10
    assert flops("--config", "digits", f"data={data}")["num_classes"] == len(os.listdir(data / "train"))
    assert flops("--config", "digits", "--num-classes", "7")["num_classes"] == 7  # the flag wins
    imagenet = flops("--config", "crossformer_small")  # an ImageNet recipe names no data
    assert imagenet["num_classes"] == 1000 and imagenet["paper_params_m"] == 30.7
    assert flops("--config", "digits", f"data.root={tmp_path / 'elsewhere'}")["num_classes"] == 1000
    assert f"no class folders in {tmp_path / 'elsewhere'}/train here" in said[-1] and not any(said[:-1])
    weights = tmp_path / "digits.safetensors"
    assert main(["export", "--config", "digits", "--format", "safetensors", "-o", str(weights)]) == 0
    with safe_open(str(weights), "pt") as f:
        assert f.get_tensor("head.weight").shape[0] == 10


def test_export_builds_the_model_as_the_config_configures_it(tmp_path: Path, capsys) -> None:
    from crossformer.models import peek_checkpoint

    weights = tmp_path / "digits.safetensors"
    assert main(["export", "--config", "digits", "--format", "safetensors", "-o", str(weights)]) == 0
    recorded = peek_checkpoint(weights)
    assert recorded["model_name"] == "crossformer_tiny" and recorded["model_kwargs"]["depths"] == [1, 1, 2, 1]
    assert main(["export", "--config", "digits", "--format", "torchscript", "-o", str(tmp_path / "d.pt")]) == 0
    assert "traced at 32x32" in capsys.readouterr().out  # the config's size
    assert main(["export", "--config", "mask_rcnn_crossformer_small_1x", "--format", "onnx"]) == 2
    assert "--checkpoint is needed: the detector's weights" in capsys.readouterr().err  # the detection task's export


def test_bad_input_is_one_line_exit_2(data: Path, tmp_path: Path, capsys) -> None:
    out = ["--output", str(tmp_path / "x")]
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "nowhere"), *out, *TINY_ARGS], "data folder not found")
    _one_line_error(capsys, ["train", "--data", str(data), *out, *TINY_ARGS, "epoch=3"], "unknown setting 'epoch'")
    _one_line_error(capsys, ["train", "--data", str(data), "epoch=3", *out, *TINY_ARGS], "unknown setting 'epoch'")
    _one_line_error(capsys, ["train", "--data", str(data), *out, *TINY_ARGS, "--model", "resnet9000"], "unknown model")
    _one_line_error(capsys, ["train", "--data", str(data), *out, *TINY_ARGS, "--config", "nope"], "bundled: crossformer_base")
    _one_line_error(capsys, ["train", "--data", str(data), *out, *TINY_ARGS, "--batch-size", "64"], "fewer than one batch")
    _one_line_error(capsys, ["train", "--data", str(data), *out, *TINY_ARGS, "--img-size", "16"], "at least 32")
    _one_line_error(capsys, ["train", "--data", str(data), *out, *TINY_ARGS, "--interpolation", "cubic"],
                    "data.interpolation must be one of bicubic, bilinear, nearest, box, hamming, lanczos, got 'cubic'")
    _one_line_error(capsys, ["train", "--data", str(data), *out, *TINY_ARGS, "--resume", str(tmp_path / "none.pth")],
                    "checkpoint not found")
    _one_line_error(capsys, ["predict", str(tmp_path / "none.png"), "--checkpoint", str(tmp_path / "none.pth")],
                    "checkpoint not found")
    torch.save({}, tmp_path / "some.pth")  # the file is checked first, the flag before it is read
    _one_line_error(capsys, ["predict", str(tmp_path / "none.png"), "--checkpoint", str(tmp_path / "some.pth"),
                             "--topk", "0"], "--topk must be at least 1, got 0")


def test_a_missing_checkpoint_is_named_before_the_settings_it_would_have_taken(tmp_path: Path, capsys) -> None:
    """Without --config the task comes from the checkpoint; one that is not there was blamed on
    the dense settings given beside it ("unknown setting 'data.val_images'; data has: root, ...")."""
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "best.pth"), "data.val_images=img/val",
                             "data.classes=classes.txt"], f"checkpoint not found: {tmp_path / 'best.pth'}")
    # and not on its task's flags ("unrecognized arguments: --multi-scale")
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "best.pth"), "--data", str(tmp_path),
                             "--multi-scale"], f"checkpoint not found: {tmp_path / 'best.pth'}")
    # nor a TorchScript export's ("unrecognized arguments: --output x": the task was taken for classification)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "seg.pt")
    _one_line_error(capsys, ["predict", str(tmp_path), "--checkpoint", str(tmp_path / "seg.pt"), "--output", "x"],
                    f"{tmp_path / 'seg.pt'} is not a PyTorch checkpoint (a TorchScript module: run it with torch.jit.load")


def test_no_model_and_no_data_trains_the_digits_config_and_demo_reports(data: Path, tmp_path: Path, capsys,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import crossformer.data.digits

    # the built-in data set's writer is tested in test_data.py; here a tiny folder stands in for it
    monkeypatch.setattr(crossformer.data.digits, "prepare_digits", lambda: data)
    assert main(["train", "--output", str(tmp_path / "t"), "--epochs", "1", "--batch-size", "4"]) == 0
    state = load_training_state(tmp_path / "t" / "last.pth")
    assert state["config"]["model"]["kwargs"]["depths"] == [1, 1, 2, 1] and state["img_size"] == 32
    capsys.readouterr()
    # evaluate: --config digits names the built-in set, as in training; so does the checkpoint, trained on it
    assert main(["evaluate", "--config", "digits", "--checkpoint", str(tmp_path / "t" / "last.pth"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == len(list((data / "val").rglob("*.png")))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "t" / "last.pth"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)  # the recorded batch (4), not digits' 64: the loss sums round apart
    assert again.pop("loss") == pytest.approx(result.pop("loss"), rel=1e-6) and again == result
    # a config naming no data: the checkpoint's data (at the config's size, 224)
    assert main(["evaluate", "--config", "crossformer_tiny", "--checkpoint", str(tmp_path / "t" / "last.pth"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == result["images"]
    # a file that records no data (the authors'): no data given
    bare = tmp_path / "bare.pth"
    torch.save({"model": load_training_state(tmp_path / "t" / "last.pth")["model"]}, bare)
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(bare), "--model", "crossformer_tiny",
                             *(f"--model-arg={k}={v}".replace(" ", "") for k, v in state["config"]["model"]["kwargs"].items())],
                    "or --config digits")
    assert main(["demo", "--output", str(tmp_path / "demo"), "epochs=1", "batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "evaluate " in out and out.count("predict ") == 1 and "(true cat)" in out  # every 71st of 9 images
    assert "demo: held-out top-1" in out and "wall time" in out


def test_bundled_configs_hold_the_authors_recipe() -> None:
    from crossformer.classification import bundled_configs, resolve_config
    from crossformer.models import VARIANTS

    assert set(VARIANTS) <= set(bundled_configs())
    for name, variant in VARIANTS.items():
        config = resolve_config(model=name)  # the model's own config is the default
        assert config.task == "classification" and config.model.name == name
        assert config.model.drop_path is None  # the variant's own rate, which follows --model
        assert variant.arch["drop_path_rate"] == {"tiny": 0.1, "small": 0.2, "base": 0.3}.get(name.split("_")[-1], 0.5)
        run, optimizer, schedule, augment = config.run, config.optimizer, config.schedule, config.augment
        assert (run.epochs, schedule.warmup_epochs, run.batch_size, config.data.img_size) == (300, 20, 128, 224)
        # warm-up from 5e-7 = 5e-4 x 0.001, per 512 images like every rate
        assert (optimizer.lr, schedule.warmup_ratio, schedule.min_lr, optimizer.weight_decay) == (5e-4, 1e-3, 5e-6, 0.05)
        assert (schedule.name, optimizer.scale_lr, optimizer.lr_batch_reference) == ("cosine", True, 512)
        assert (augment.mixup, augment.cutmix, augment.label_smoothing, run.clip_grad) == (0.8, 1.0, 0.1, 5.0)
        assert (augment.auto_augment, augment.re_prob, config.data.interpolation) == ("rand-m9-mstd0.5-inc1", 0.25, "bicubic")


@pytest.mark.slow
def test_torchrun_two_processes_over_gloo(data: Path, tmp_path: Path) -> None:
    output = tmp_path / "ddp"
    # with freed memory kept (opt-in), in the processes torchrun starts
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CROSSFORMER_KEEP_FREED_MEMORY": "1"}
    proc = run_process(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "crossformer",
         "train", "--data", str(data), "--output", str(output), "--epochs", "2", *TINY_ARGS,
         "model_ema=true", "model_ema_decay=0.9"],
        timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("2 process(es)") == 1  # rank 0 alone logs
    state = load_training_state(output / "last.pth")
    # both ranks trained, each on its half: 24 images / (2 ranks x batch 2) = 6 updates per epoch
    assert state["world_size"] == 2 and state["global_step"] == 12
    assert [rank["meters"] for rank in state["rank_state"]] == [{}, {}]  # reset at the epoch's report
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "val/acc1" in r] == [0, 1]  # one writer
    assert sorted(p.name for p in output.iterdir() if p.suffix == ".pth") == ["best.pth", "last.pth"]
    # rank states differ (each rank draws its own augmentations) and metrics were reduced over ranks:
    assert not torch.equal(state["rank_state"][0]["rng"]["torch"], state["rank_state"][1]["rng"]["torch"])
    assert main(["evaluate", "--checkpoint", str(output / "last.pth"), "--data", str(data), "--device", "cpu",
                 "--num-workers", "0"]) == 0
    from crossformer.classification import evaluate

    single = evaluate(output / "last.pth", data, device="cpu", num_workers=0)
    assert single["acc1"] == pytest.approx(state["metrics"]["val/acc1"])
    assert single["loss"] == pytest.approx(state["metrics"]["val/loss"], rel=1e-5)
    # every rank averaged the same weights, so the reduced EMA metrics are rank 0's EMA's
    ema = evaluate(output / "last.pth", data, device="cpu", num_workers=0, use_ema=True)
    assert ema["loss"] == pytest.approx(state["metrics"]["val_ema/loss"], rel=1e-5)


@pytest.mark.slow
def test_commands_other_than_train_and_evaluate_say_they_run_in_one_process(data: Path, tmp_path: Path) -> None:
    # Every process did all the work: predict printed every line once per process, and predict's
    # PNGs and JSON, make-data's set and export's file were written by all of them at once.
    for argv in (["predict", str(data / "val"), "--checkpoint", str(tmp_path / "any.pth")],
                 ["make-data", "coco", str(tmp_path / "set"), "--images", "4"]):
        line = one_torchrun_error_line(argv)
        assert line.endswith("error: it runs in one process, but torchrun started 2: run it without torchrun"), line
    assert not (tmp_path / "set").exists()


@pytest.mark.slow
def test_evaluate_under_torchrun_names_the_images_every_rank_skipped(data: Path, tmp_path: Path) -> None:
    # Rank 0 alone named what it skipped: the unreadable images of the other ranks' shares were
    # counted but never named.
    assert main(["train", *TINY_ARGS, "--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "1"]) == 0
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    bad = broken / "val" / "cat" / "1.png"  # the second image: rank 1's share
    bad.write_bytes(b"not a picture")
    proc = torchrun(["evaluate", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--data", str(broken),
                     "--device", "cpu", "--num-workers", "0", "--batch-size", "2", "--skip-corrupt"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"skipping unreadable image {bad}: ") == 1, proc.stderr[-3000:]
    assert "(8 images, 1 unreadable skipped)" in proc.stdout


def test_flags_and_settings_of_other_fields_combine() -> None:
    from crossformer.cli import parse_command_line
    from crossformer.commands.common import command_line_settings

    args = parse_command_line(["train", "run.seed=7", "--config", "digits", "--epochs", "2", "optimizer.lr=0.01"])
    assert command_line_settings(args, args.overrides) == {"run.seed": 7, "run.epochs": 2, "optimizer.lr": 0.01}
    # a field of one value or several takes either after its flag: --img-size N or H W, and
    # segmentation's --classes a file or the names (--classes road car was "expected KEY=VALUE, got 'car'")
    for argv, expected in ((["--img-size", "48"], {"data.img_size": 48}),
                           (["--img-size", "48", "64"], {"data.img_size": [48, 64]}),
                           (["--config", "upernet_demo", "--classes", "names.txt"], {"data.classes": "names.txt"}),
                           (["--config", "upernet_demo", "--classes", "road", "car", "iterations=5"],
                            {"data.classes": ["road", "car"], "iterations": 5})):
        args = parse_command_line(["train", *argv])
        assert command_line_settings(args, args.overrides) == expected, argv


def test_a_flag_of_a_setting_that_may_be_null_takes_null() -> None:
    # --auto-augment null (as its help says: "null: none") was the policy 'null', refused by timm
    from crossformer.cli import parse_command_line
    from crossformer.commands.common import command_line_settings

    for word in ("null", "none", "None"):
        args = parse_command_line(["train", "--auto-augment", word])
        assert command_line_settings(args, args.overrides) == {"augment.auto_augment": None}
    args = parse_command_line(["train", "--auto-augment", "augmix-m5-w4-d2", "--clip-grad", "1"])
    assert command_line_settings(args, args.overrides) == {"augment.auto_augment": "augmix-m5-w4-d2", "run.clip_grad": 1.0}
    # a setting that may not be null keeps the word (a first version took "none" as None everywhere)
    args = parse_command_line(["train", "--device", "none", "--output", "~"])
    assert command_line_settings(args, args.overrides) == {"run.device": "none", "run.output": "~"}
    with pytest.raises(SystemExit):
        parse_command_line(["train", "--batch-size", "none"])  # argparse's "invalid int value"


@pytest.mark.parametrize("argv, expected", [
    # the flag used to win, and the bad setting was never read
    (["--epochs", "1", "epochs=abc"], "run.epochs is set twice, by --epochs and by epochs=abc: give it once"),
    (["run.epochs=7", "--epochs", "2"], "run.epochs is set twice, by --epochs and by run.epochs=7"),
    (["--model", "crossformer_tiny", "model=crossformer_small"], "model.name is set twice, by --model and by model="),
    (["--config", "upernet_demo", "--backbone", "crossformer_tiny", "model.backbone=crossformer_small"],
     "model.backbone is set twice, by --backbone and by model.backbone=crossformer_small"),
])
def test_a_field_set_by_a_flag_and_a_setting_is_refused(capsys, argv: list[str], expected: str) -> None:
    _one_line_error(capsys, ["train", *argv], expected)


@pytest.mark.parametrize("argv", [["--model", "crossformer_tiny"], ["--config", "crossformer_small"]])
def test_train_a_recipe_that_names_no_data_is_refused(capsys, tmp_path: Path, argv: list[str]) -> None:
    # It trained the ImageNet recipe (300 epochs at 224x224) on the built-in digits.
    _one_line_error(capsys, ["train", *argv, "--output", str(tmp_path / "run")],
                    "no data given for crossformer_")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [[], ["--data", "/nonexistent/imagenet"]])
def test_train_a_misspelt_model_is_said_before_the_data(capsys, tmp_path: Path, argv: list[str]) -> None:
    # "no data given" (or the missing folder) was said first: fixing it only led to this error
    _one_line_error(capsys, ["train", "--model", "crossformer_tinyy", *argv, "--output", str(tmp_path / "run")],
                    "unknown model 'crossformer_tinyy'; did you mean crossformer_tiny")


def test_train_on_the_digits_by_name_with_a_recipe(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import crossformer.data.digits

    monkeypatch.setattr(crossformer.data.digits, "prepare_digits", lambda: data)
    assert main(["train", *TINY_ARGS, "data.root=null", "--output", str(tmp_path / "t"), "--epochs", "1"]) == 0
    assert load_training_state(tmp_path / "t" / "last.pth")["config"]["data"]["root"] is None


def test_settings_and_images_may_follow_a_list_of_numbers() -> None:
    """argparse alone reads whatever follows ``--img-size H W`` as more sizes."""
    from crossformer.cli import parse_command_line

    args = parse_command_line(["train", "--config", "digits", "--img-size", "64", "48", "run.epochs=3", "--lr", "0.01"])
    assert args.overrides == ["run.epochs=3"]
    assert getattr(args, "config:data.img_size") == [64, 48]
    args = parse_command_line(["predict", "--checkpoint", "c.pth", "--img-size", "64", "a.jpg", "--topk", "3",
                               "b.jpg", "--img-size", "32", "48", "c.jpg"])
    assert args.inputs == ["a.jpg", "b.jpg", "c.jpg"]  # in the order given
    assert getattr(args, "config:data.img_size") == [32, 48]  # the last one wins, as in argparse
    assert args.topk == 3


def test_a_shortened_flag_names_the_whole_one(capsys) -> None:
    """argparse would take ``--img 64`` for ``--img-size 64``; the commands look for whole
    flags (``--img-size`` given beside ``--config``), so a shortened one is refused by name."""
    _one_line_error(capsys, ["flops", "--config", "digits", "--img", "64"], "--img: give the whole flag (--img-size)")
    _one_line_error(capsys, ["benchmark", "--model", "crossformer_tiny", "--no"], "--no: give the whole flag (--no-memory)")
    _one_line_error(capsys, ["evaluate", "--check=c.pth"], "--check: give the whole flag (--checkpoint)")
    assert main(["flops", "--config", "digits", "--img-size=48", "--json"]) == 0  # whole flags, with "=" too
    assert json.loads(capsys.readouterr().out)["img_size"] == [48, 48]


def test_resume_needs_no_pretrained_file(data: Path, tmp_path: Path, capsys) -> None:
    """Every weight of a resumed run comes from its checkpoint: the file the run started from
    may be gone (resuming used to stop on it as missing)."""
    assert main(["train", *TINY_ARGS, "--data", str(data), "--output", str(tmp_path / "first"), "--epochs", "1"]) == 0
    pretrained = tmp_path / "pretrained.pth"
    shutil.move(tmp_path / "first" / "last.pth", pretrained)
    argv = ["train", *TINY_ARGS, "--data", str(data), "--output", str(tmp_path / "run"), "--pretrained", str(pretrained)]
    assert main([*argv, "--epochs", "1"]) == 0
    pretrained.unlink()
    capsys.readouterr()
    assert main([*argv, "--epochs", "2", "--resume", "auto"]) == 0, capsys.readouterr().err
    assert load_training_state(tmp_path / "run" / "last.pth")["epoch"] == 2


def test_checkpoint_paths_under_the_home_folder(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys) -> None:
    """No shell expands ~ in --checkpoint=~/..., --pretrained=~/... or model.pretrained=~/...: each
    was 'checkpoint not found: ~/run/last.pth' while run.output=~/run wrote there."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY_ARGS, "--data", str(data), "--output=~/first", "--epochs", "1"]) == 0
    assert (tmp_path / "home" / "first" / "last.pth").is_file()
    assert main(["train", *TINY_ARGS, "--data", str(data), "--output=~/second", "--epochs", "1",
                 "model.pretrained=~/first/last.pth"]) == 0
    assert main(["train", *TINY_ARGS, "--data", str(data), "--output=~/second", "--epochs", "2",
                 "run.resume=~/second/last.pth"]) == 0
    assert load_training_state(tmp_path / "home" / "second" / "last.pth")["epoch"] == 2
    assert main(["evaluate", "--checkpoint=~/second/last.pth", "--data", str(data), "--device", "cpu",
                 "--num-workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["images"] == 9
    assert main(["predict", str(data / "val" / "eel"), "--checkpoint=~/second/last.pth", "--device", "cpu"]) == 0
    assert not (tmp_path / "~").exists()


def test_predict_reads_a_class_names_file_as_segmentation_reads_its_class_list(data: Path, tmp_path: Path,
                                                                               capsys) -> None:
    """--class-names for a file that records none: a byte-order mark and Windows line ends (as
    Windows editors save) are no part of the names, and a name listed twice is refused."""
    from crossformer.models import CrossFormer

    kwargs = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "group_size": [4, 4, 2, 1],
              "interval": [2, 2, 1, 1]}
    torch.save({"model": CrossFormer(**kwargs, num_classes=3).state_dict()}, tmp_path / "bare.pth")
    names = tmp_path / "names.txt"
    names.write_bytes("\ufeffwall\r\nbuilding\r\nsky\r\n\r\n".encode("utf-8"))
    argv = ["predict", str(data / "val" / "eel" / "0.png"), "--checkpoint", str(tmp_path / "bare.pth"), "--device", "cpu",
            "--img-size", "32", "--model", "crossformer_tiny", "--topk", "3", "--json",
            *(f"model.kwargs.{k}={v}".replace(" ", "") for k, v in kwargs.items())]
    assert main([*argv, "--class-names", str(names)]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["labels"]) == ["building", "sky", "wall"]
    names.write_text("wall\nsky\nwall\n", encoding="utf-8")
    _one_line_error(capsys, [*argv, "--class-names", str(names)], "class 'wall' is listed twice")


def test_a_pretrained_head_of_another_class_count_is_one_logged_line(data: Path, tmp_path: Path, capsys) -> None:
    """--pretrained FILE with a classifier of 5 classes on 3 class folders: the note that the head
    starts afresh was a two-line Python UserWarning on stderr (with a source line) and missing
    from log.txt; it is one line in the run's log. The Python API still warns."""
    import warnings

    from crossformer import load_checkpoint
    from crossformer.models import CrossFormer

    kwargs = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "group_size": [4, 4, 2, 1],
              "interval": [2, 2, 1, 1]}
    pretrained = tmp_path / "five.pth"
    torch.save({"model": CrossFormer(**kwargs, num_classes=5).state_dict()}, pretrained)
    output = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would stop the run here
        assert main(["train", *TINY_ARGS, "--data", str(data), "--output", str(output), "--epochs", "1",
                     "--pretrained", str(pretrained)]) == 0
    captured = capsys.readouterr()
    note = f"{pretrained}: classifier head (5, 128) does not fit the model's (3, 128); the head keeps its fresh initialisation\n"
    assert note in captured.out and note in (output / "log.txt").read_text() and "Warning" not in captured.err
    with pytest.warns(UserWarning, match="the head keeps its fresh initialisation"):
        load_checkpoint(CrossFormer(**kwargs, num_classes=3), pretrained)


def test_a_pretrained_head_of_other_classes_as_many_is_said(data: Path, tmp_path: Path, capsys) -> None:
    # a checkpoint of as many classes, other ones (bird, cat, dog against cat, dog, eel): the
    # head was kept by position without a word, "bird" now starting "cat"
    from crossformer.models import CrossFormer

    kwargs = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "group_size": [4, 4, 2, 1],
              "interval": [2, 2, 1, 1]}
    pretrained = tmp_path / "birds.pth"
    torch.save({"model": CrossFormer(**kwargs, num_classes=3).state_dict(), "class_names": ["bird", "cat", "dog"]},
               pretrained)
    assert main(["train", *TINY_ARGS, "--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "1",
                 "--pretrained", str(pretrained)]) == 0
    note = (f"{pretrained}: its head, of as many classes, was trained on other ones; each class starts from the row "
            f"in its place (cat <- bird, dog <- cat, eel <- dog)")
    assert note in capsys.readouterr().out and note in (tmp_path / "run" / "log.txt").read_text()
    # the data's classes in another order: each class its own row (detection and segmentation do so too)
    from crossformer.classification.task import ClassificationTask
    from crossformer.cli import parse_command_line
    from crossformer.commands.common import command_line_settings
    from crossformer.engine import DistContext
    from crossformer.engine.registry import resolve_config

    source = CrossFormer(**kwargs, num_classes=3).state_dict()
    torch.save({"model": source, "class_names": ["eel", "cat", "dog"]}, pretrained)
    args = parse_command_line(["train", *TINY_ARGS, "--data", str(data), "--output", str(tmp_path / "again"),
                               "--pretrained", str(pretrained)])
    task = ClassificationTask(resolve_config(None, command_line_settings(args, args.overrides)).config, DistContext())
    head = task.model.get_classifier()
    assert torch.equal(head.weight, source["head.weight"][[1, 2, 0]]) and torch.equal(head.bias, source["head.bias"][[1, 2, 0]])
    assert f"{pretrained} names the classes in another order: its head's rows are put in the data's" in task.notes


def test_a_pretrained_file_that_does_not_fit_names_the_model_kwargs_its_weights_show(
        reference_dir: Path, data: Path, tmp_path: Path, capsys) -> None:
    """train --pretrained v1_cls.pth on a model of other depths listed 20 of its 130 unexpected
    keys over two lines; the weights show which setting differs, as model.kwargs says it."""
    checkpoint = str(reference_dir / "v1_cls.pth")
    argv = ["train", "--data", str(data), "--model", "crossformer_tiny", "--pretrained", checkpoint, "--img-size", "32",
            "--batch-size", "4", "--output", str(tmp_path / "run"), "--device", "cpu", "model.kwargs.embed_dim=32",
            "model.kwargs.num_heads=[1,2,4,8]"]
    line = one_error_line(capsys, argv)
    assert line.startswith(f"crossformer train: error: {checkpoint} does not fit this model (missing: "), line
    assert "(208 in all); unexpected: " in line and "head." not in line  # the other class count is no misfit
    assert line.endswith("its weights show other settings: set model.kwargs.depths=[2,2,4,2]"), line
    assert not (tmp_path / "run" / "last.pth").exists()


def test_crossformer_pp_weights_for_a_v1_model_name_the_grouping_they_were_trained_with(
        data: Path, tmp_path: Path, capsys) -> None:
    """A ++ file (its activation cooling layers show) for a v1 model was told "set use_acl=true":
    so built, the model loaded the weights and kept v1's group sizes, intervals and long-distance
    groups, which no weight shows (2.5e-3 off the file's logits on the official ++ reference)."""
    from crossformer.models import CrossFormer
    from crossformer.variant_table import family_grouping

    arch = {"embed_dim": 16, "depths": [1, 1, 4, 1], "num_heads": [1, 2, 4, 8]}  # depth 4: one ACL
    torch.manual_seed(0)
    source = CrossFormer(**arch, **family_grouping(True), use_acl=True, num_classes=3).eval()
    pretrained = tmp_path / "pp.pth"
    torch.save({"model": source.state_dict()}, pretrained)
    grouping = "group_size=[4,4,14,7] interval=[4,2,1,1] long_distance=fixed_group"
    line = one_error_line(capsys, ["train", *TINY_ARGS, "model.kwargs.depths=[1,1,4,1]", "--epochs", "1", "--data",
                                   str(data), "--output", str(tmp_path / "run"), "--pretrained", str(pretrained)])
    hinted = " ".join(f"model.kwargs.{s}" for s in f"use_acl=true {grouping}".split())
    assert line.endswith(f"its weights show other settings: set {hinted}"), line
    line = one_error_line(capsys, ["predict", str(data / "val" / "cat" / "0.png"), "--checkpoint", str(pretrained),
                                   "--model", "crossformer_tiny", *(f"--model-arg={a}" for a in ("embed_dim=16",
                                   "depths=[1,1,4,1]", "num_heads=[1,2,4,8]"))])
    assert line.endswith(f"add {' '.join(f'--model-arg {s}' for s in f'use_acl=true {grouping}'.split())}"), line
    built = CrossFormer(**arch, use_acl=True, group_size=[4, 4, 14, 7], interval=[4, 2, 1, 1],
                        long_distance="fixed_group", num_classes=3).eval()
    built.load_state_dict(source.state_dict())
    x = torch.randn(1, 3, 64, 96)
    assert torch.equal(built(x), source(x))
    # our checkpoint records its grouping: that one, not the family's
    kwargs = {**arch, "use_acl": True, "group_size": [4, 4, 2, 1], "interval": [2, 2, 1, 1]}
    torch.save({"model": CrossFormer(**kwargs, num_classes=3).state_dict(), "model_name": "crossformer_tiny",
                "model_kwargs": kwargs}, pretrained)
    line = one_error_line(capsys, ["train", *TINY_ARGS, "model.kwargs.depths=[1,1,4,1]", "--epochs", "1", "--data",
                                   str(data), "--output", str(tmp_path / "run"), "--pretrained", str(pretrained)])
    assert line.endswith("set model.kwargs.use_acl=true model.kwargs.group_size=[4,4,2,1] model.kwargs.interval=[2,2,1,1] "
                         "model.kwargs.long_distance=fixed_interval"), line


def test_a_file_that_does_not_fit_the_model_args_is_one_line_with_a_hint(reference_dir: Path, data: Path,
                                                                        capsys) -> None:
    """v1_cls.pth (embed_dim 32, depths 2,2,4,2, num_heads 1,2,4,8) with num_heads left out
    was a two-line error listing all 20 mis-shaped tensors with no hint."""
    checkpoint = str(reference_dir / "v1_cls.pth")
    args = ["--checkpoint", checkpoint, "--model", "crossformer_tiny", "--model-arg", "embed_dim=32",
            "--model-arg", "depths=[2,2,4,2]", "--device", "cpu"]
    for argv in (["predict", str(data / "val" / "cat" / "0.png"), *args], ["evaluate", "--data", str(data), *args]):
        line = one_error_line(capsys, argv)
        assert f"{checkpoint} does not fit crossformer_tiny with embed_dim=32, depths=[2, 2, 4, 2] (wrong shape: " in line
        assert "layers.0.blocks.0.attn.pos.pos3.2.weight: file (1, 2) vs model (2, 2)" in line and "(20 in all)" in line
        assert line.endswith("its weights show other settings: add --model-arg num_heads=[1,2,4,8]"), line
    # a difference the weights do not spell out as a setting: the general hint
    line = one_error_line(capsys, ["predict", str(data), *args, "--model-arg", "num_heads=[1,2,4,8]",
                                   "--model-arg", "merge_kernel_sizes=[2]"])
    assert "unexpected: layers.0.downsample.reductions.1.bias" in line
    assert line.endswith("check --model and --model-arg against the settings the file was trained with"), line


def test_a_file_of_another_variant_or_model_names_it_rather_than_settings(data: Path, tmp_path: Path, capsys) -> None:
    """crossformer_small's weights under --model crossformer_pp_base were told to add depths and
    use_acl: so built, the model loaded and evaluated with ++'s group sizes and intervals, which
    no weight shows. A file of a registered variant names it; one of ours names its model."""
    import timm

    from crossformer.models import CrossFormer

    with torch.device("meta"):
        small = timm.create_model("crossformer_small", num_classes=3)
    variant = tmp_path / "small.pth"
    torch.save({"model": {k: torch.zeros(v.shape) for k, v in small.state_dict().items()}}, variant)
    argv = ["evaluate", "--data", str(data), "--checkpoint", str(variant), "--model", "crossformer_pp_base", "--device", "cpu"]
    line = one_error_line(capsys, argv)
    assert line.endswith("; its weights are crossformer_small's: pass --model crossformer_small"), line
    kwargs = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "group_size": [4, 4, 2, 1],
              "interval": [2, 2, 1, 1]}
    ours = tmp_path / "ours.pth"
    torch.save({"model_name": "crossformer_tiny", "model_kwargs": kwargs,
                "model": CrossFormer(**kwargs, num_classes=3).state_dict()}, ours)
    line = one_error_line(capsys, ["predict", str(data / "val" / "cat" / "0.png"), "--checkpoint", str(ours),
                                   "--model", "crossformer_small"])
    assert line.endswith("; the file names its model, crossformer_tiny: leave out --model"), line


def test_predict_crops_and_resizes_as_evaluate_does_and_as_asked(data: Path, tmp_path: Path, capsys) -> None:
    """``test.crop_pct=0.3`` (and data.interpolation) were taken by predict and changed nothing,
    while evaluate honoured them: predict now takes --crop-pct and --interpolation as evaluate does."""
    from crossformer.classification.predict import predict
    from crossformer.data import build_eval_transform, open_image
    from crossformer.models import CrossFormer

    kwargs = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "group_size": [4, 4, 2, 1],
              "interval": [2, 2, 1, 1]}
    torch.manual_seed(0)
    model = CrossFormer(**kwargs, num_classes=3).eval()
    torch.save({"model_name": "crossformer_tiny", "model_kwargs": kwargs, "img_size": 32, "model": model.state_dict()},
               tmp_path / "ours.pth")
    image = data / "val" / "eel" / sorted(p.name for p in (data / "val" / "eel").glob("*.png"))[0]
    expected = []
    for crop_pct, interpolation in ((None, None), (0.3, "nearest")):
        transform = build_eval_transform(32, crop_pct or 0.875, interpolation or "bicubic")
        with torch.no_grad():
            expected.append(model(transform(open_image(image)).unsqueeze(0)).softmax(-1)[0].sort(descending=True).values)
        result = predict(image, tmp_path / "ours.pth", topk=3, crop_pct=crop_pct, interpolation=interpolation,
                         device="cpu")[0]
        torch.testing.assert_close(torch.tensor(result.scores), expected[-1], rtol=0, atol=1e-6)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the crop changes what the model sees
    flags = ["--crop-pct", "0.3", "--interpolation", "nearest"]
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / "ours.pth"), "--topk", "3", "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["scores"] == pytest.approx(result.scores, abs=1e-6)


def test_predict_says_each_batch_as_it_is_done(data: Path, tmp_path: Path, capsys) -> None:
    """An unreadable file in a later batch stops the command (without --skip-corrupt): the
    earlier batches' lines were never printed, since the lines came only once all were done."""
    from crossformer.classification.predict import predict
    from crossformer.models import CrossFormer

    kwargs = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "group_size": [4, 4, 2, 1],
              "interval": [2, 2, 1, 1]}
    torch.save({"model": CrossFormer(**kwargs, num_classes=3).state_dict()}, tmp_path / "bare.pth")
    folder = tmp_path / "photos"
    shutil.copytree(data / "val" / "eel", folder)
    (folder / "zz.png").write_bytes(b"not a picture")
    argv = ["predict", str(folder), "--checkpoint", str(tmp_path / "bare.pth"), "--device", "cpu", "--img-size", "32",
            "--model", "crossformer_tiny", "--json", "--batch-size", "2",
            *(f"model.kwargs.{k}={v}".replace(" ", "") for k, v in kwargs.items())]
    readable = sorted(str(p) for p in folder.glob("*.png") if p.name != "zz.png")
    assert len(readable) == 3  # two batches of 2: the unreadable file is in the second
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert [json.loads(line)["path"] for line in captured.out.splitlines()] == readable[:2]
    assert captured.err.count("\n") == 1 and "zz.png" in captured.err, captured.err

    heard = []
    results = predict(folder, tmp_path / "bare.pth", model="crossformer_tiny", img_size=32, batch_size=2, device="cpu",
                      model_kwargs=kwargs, skip_corrupt=True, on_result=heard.append)
    assert heard == results and [r.path for r in results] == readable
