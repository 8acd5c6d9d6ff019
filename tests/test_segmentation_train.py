"""Segmentation training on the engine: the bundled recipes, a training step of each segmentor
through the Task (auxiliary loss included), exact resume after SIGKILL, torchrun over gloo."""

from __future__ import annotations

import dataclasses
import json
import re
import os
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossformer.models import VARIANTS
from crossformer.data import DataError
from crossformer.engine import DistContext, load_training_state
from crossformer.engine.config import build_config
from crossformer.engine.registry import bundled_configs, resolve_config
from crossformer.engine.seeding import seed_everything
from crossformer.errors import UserInputError
from crossformer.segmentation.config import SegmentationConfig
from crossformer.segmentation.data import SegmentationDataset, collate_segmentation
from crossformer.segmentation.task import SegmentationTask, build_model, min_train_batch, train
from crossformer.segmentation.transforms import TrainPipelineConfig
from segmentation_fixtures import make_tiny_ade, tiny_config
from processes import run_process

TESTS = Path(__file__).resolve().parent
ROWS = {"small": 0.2, "base": 0.3, "large": 0.5, "pp_small": 0.2, "pp_base": 0.3}  # the authors' drop path


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_ade(tmp_path_factory.mktemp("ade"))


def _config(output: Path, root: Path, kind: str = "upernet", **values) -> SegmentationConfig:
    layers = tiny_config(kind, data={"root": str(root)}, run={"output": str(output)})
    return build_config(SegmentationConfig, (layers, "tiny"), (values, "test"))


def test_every_bundled_config_is_a_row_of_the_authors_tables() -> None:
    rows = {name: path for name, path in bundled_configs("segmentation").items() if name != "upernet_demo"}
    assert sorted(rows) == sorted(f"{k}_crossformer_{v}" for k in ("fpn", "upernet") for v in ROWS)
    for name in rows:
        config = resolve_config(name).config
        kind, _, variant = name.partition("_crossformer_")
        m, run, opt, sched = config.model, config.run, config.optimizer, config.schedule
        assert isinstance(config, SegmentationConfig) and (m.kind, m.backbone) == (kind, f"crossformer_{variant}")
        assert m.num_classes == 150 and m.pretrained is None
        assert m.drop_path is None and VARIANTS[m.backbone].arch["drop_path_rate"] == ROWS[variant]  # the variant's
        assert (m.channels, m.aux_channels) == (None, None)  # the authors' head widths
        large_fpn = name == "fpn_crossformer_large"  # its own grouping in the authors' config
        assert m.backbone_kwargs == ({"group_size": [14, 14, 7, 7], "interval": [16, 8, 2, 1]} if large_fpn
                                     else {"group_size": [7, 7, 7, 7], "interval": [8, 4, 2, 1]})
        assert config.pipeline == TrainPipelineConfig()  # (2048, 512) x 0.5-2.0, 512 crops, 0.75, flip, photometric
        assert (config.test.mode, config.test.multi_scale, config.test.flip) == ("whole", False, False)
        assert (run.batch_size, opt.scale_lr, opt.betas, sched.name, sched.min_lr) == (2, False, (0.9, 0.999), "poly", 0.0)
        if kind == "fpn":
            assert (run.iterations, run.eval_every, run.checkpoint_every) == (80_000, 8_000, 8_000)
            assert (opt.lr, opt.weight_decay, opt.no_decay_keys, sched.power, sched.warmup_iters) == (1e-4, 1e-4, (), 0.9, 0)
        else:
            assert (run.iterations, run.eval_every, run.checkpoint_every) == (160_000, 16_000, 16_000)
            assert (opt.lr, opt.weight_decay, opt.no_decay_keys) == (6e-5, 0.01, ("norm",))
            assert (sched.power, sched.warmup_iters, sched.warmup_ratio) == (1.0, 1500, 1e-6)
        with torch.device("meta"):  # the settings reach the segmentor
            segmentor = build_model(config.model)
        settings = segmentor.backbone.settings
        assert segmentor.kind == kind and segmentor.num_classes == 150 and segmentor.backbone.name == m.backbone
        assert (list(settings["group_size"]), list(settings["interval"])) == (m.backbone_kwargs["group_size"],
                                                                            m.backbone_kwargs["interval"])
        # the variant's rate reaches the blocks: stochastic depth rises to it in the last block
        assert segmentor.backbone.model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(ROWS[variant])


def test_config_errors_name_the_key(ade: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="pipeline.ratio_range must be"):
        resolve_config("upernet_crossformer_small", {"pipeline.ratio_range": [2.0, 0.5]})
    # a crop under 32x32 was the backbone's ValueError traceback at the first step
    with pytest.raises(UserInputError, match=r"pipeline.crop_size must be at least 32x32, .* got \[16, 16\]"):
        resolve_config("upernet_crossformer_small", {"pipeline.crop_size": [16, 16]})
    # a NaN loss at the first step: the normalisation divides by it
    with pytest.raises(UserInputError, match=r"pipeline.std must be above 0 in each channel, got \[58.4, 0.0, 57.4\]"):
        resolve_config("upernet_crossformer_small", {"pipeline.std": [58.4, 0, 57.4]})
    # another ignore value padded the crops with a class the loss trained on (data, loss, metrics ignore 255)
    with pytest.raises(UserInputError, match="pipeline.ignore_index must be 255, got 0"):
        resolve_config("upernet_crossformer_small", {"pipeline.ignore_index": 0})
    with pytest.raises(UserInputError, match="set exactly one of data.root and data.classes"):
        resolve_config("upernet_crossformer_small", {"data.root": "x", "data.classes": "y"})
    with pytest.raises(UserInputError, match="model.num_classes is 150 but .* has 7 classes; set model.num_classes=7"):
        SegmentationTask(_config(tmp_path, ade, **{"model.num_classes": 150}), DistContext())


def test_the_task_hands_its_segmentor_to_syncbn(ade: Path, tmp_path: Path, monkeypatch) -> None:
    """UPerNet's heads train with the authors' SyncBN under DDP on GPUs (DistContext.sync_batchnorm)."""
    seen = []
    monkeypatch.setattr(DistContext, "sync_batchnorm", lambda self, model: seen.append(model) or model)
    task = SegmentationTask(_config(tmp_path, ade), DistContext())
    assert seen == [task.model]


def test_a_layers_choice_of_data_root_or_folders_replaces_the_layers_below(tmp_path: Path) -> None:
    # a checkpoint trained on the folder layout, evaluated with --data ADE_ROOT, was refused with
    # "give either data.root or the image/label folders, not both; set the other to null
    # (data.root=null ...)": following it undid --data; the five recorded folder settings had to
    # be nulled one by one. The same for a root recorded (or in a base file) under folders given.
    folders = {"train_images": "img/train", "train_labels": "lbl/train", "val_images": "img/val",
               "val_labels": "lbl/val", "classes": "classes.txt"}
    recorded = {"task": "segmentation", "data": folders}
    data = resolve_config(recorded, {"data.root": "ade"}, use_default=False, source="ckpt").config.data
    assert (data.root, data.folders) == ("ade", (None,) * 5)
    val = {"data.val_images": "v", "data.val_labels": "l", "data.classes": "c"}
    data = resolve_config({"task": "segmentation", "data": {"root": "ade"}}, val, source="ckpt").config.data
    assert (data.root, data.folders) == (None, (None, None, "v", "l", "c"))
    data = resolve_config(recorded, {"data.val_images": "v"}, source="ckpt").config.data  # a folder of the same layout
    assert data.folders == ("img/train", "lbl/train", "v", "lbl/val", "classes.txt")
    base = tmp_path / "base.yaml"
    base.write_text("base: upernet_crossformer_small\ndata: {root: ade}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ndata: {val_images: v, val_labels: l, classes: c}\n")
    assert resolve_config(str(child)).config.data.root is None
    # both in one layer is still refused, naming the layer
    with pytest.raises(UserInputError, match="^overrides: data.root and data.val_images are both set"):
        resolve_config(recorded, {"data.root": "ade", "data.val_images": "v"}, source="ckpt")


def test_a_class_list_given_by_its_names_in_the_config(ade: Path) -> None:
    # docs/segmentation.md promises "a class list (a text file ... or a list)"; the config
    # refused the list ("data.classes must be a string, got ['sky', ...]").
    from crossformer.commands.common import _check_recorded_paths
    from crossformer.engine.config import with_absolute_paths
    from crossformer.segmentation.task import build_datasets

    ade = ade / "ADEChallengeData2016"
    names = (ade / "classes.txt").read_text().split("\n")[:-1]
    folders = {"val_images": str(ade / "images/validation"), "val_labels": str(ade / "annotations/validation"),
               "classes": names, "reduce_zero_label": True}
    config = with_absolute_paths(build_config(SegmentationConfig, (tiny_config(data=folders), "tiny")))
    assert config.data.classes == tuple(names) and config.data.known_classes() == len(names)
    _check_recorded_paths(config, None, {}, "best.pth")  # the names are no file to look for
    assert build_datasets(config.data, training=False)[1].classes == names
    empty = dataclasses.replace(config.data, classes=())
    with pytest.raises(DataError, match=r"^the class list is empty$"):  # was "the class list () is empty"
        build_datasets(empty, training=False)


def test_a_wrong_kind_of_list_says_what_its_items_must_be() -> None:
    # Class names given as numbers (data.classes=[0,1]) said "must be a string or a list of 2 or
    # null": a list it was, and of any length; the items had to be text.
    with pytest.raises(UserInputError, match=r"^test: data.classes must be a string or a list of strings or null, "
                                             r"got \[0, 1\]$"):
        build_config(SegmentationConfig, ({"data": {"classes": [0, 1]}}, "test"))
    from crossformer.engine.config import _describe

    assert _describe(tuple[tuple[int, int, int], ...] | str) == "a list of lists of 3 or a string"


@pytest.mark.parametrize("kind", ["fpn", "upernet"])
def test_a_training_step_of_each_segmentor_through_the_task(kind: str, ade: Path, tmp_path: Path) -> None:
    task = SegmentationTask(_config(tmp_path, ade, kind), DistContext())
    batch = task.to_device(next(iter(task.train_loader)))
    assert task.batch_counts(batch) == {"samples": 2.0, "unreadable_images": 0.0}
    assert batch.images.shape == (2, 3, 32, 32) and batch.labels.shape == (2, 32, 32)
    model = task.model.train()
    torch.manual_seed(1)  # the heads' dropout draws the same masks in both computations
    losses = task.losses(model, batch)
    assert sorted(losses) == (["loss_aux", "loss_decode"] if kind == "upernet" else ["loss_decode"])

    def cross_entropy(logits: torch.Tensor) -> torch.Tensor:  # mmseg 0.29: summed over valid pixels / all pixels
        logits = F.interpolate(logits, size=batch.labels.shape[1:], mode="bilinear", align_corners=False)
        per_pixel = F.cross_entropy(logits, batch.labels, ignore_index=255, reduction="none")
        return per_pixel.sum() / batch.labels.numel()

    torch.manual_seed(1)
    maps = model.backbone(batch.images)
    assert torch.allclose(losses["loss_decode"], cross_entropy(model.decode(maps)), rtol=1e-5)
    if kind == "upernet":
        aux = 0.4 * cross_entropy(model.auxiliary_head(maps[2]))
        assert torch.allclose(losses["loss_aux"], aux, rtol=1e-5)
    # one engine update: both heads (and the backbone) learn from the summed losses
    config = _config(tmp_path / "run", ade, kind, **{"run.iterations": 1, "run.eval_every": 1})
    seed_everything(config.run.seed)  # as the trainer does before building the task: the same initial weights
    before = SegmentationTask(config, DistContext()).model.state_dict()
    metrics = train(config)
    after = load_training_state(tmp_path / "run" / "last.pth")["model"]
    changed = {k.split(".")[0] for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])}
    assert changed == ({"backbone", "decode_head", "auxiliary_head"} if kind == "upernet" else {"backbone", "neck", "decode_head"})
    assert 0.0 <= metrics["val/mIoU"] <= 1.0 and metrics["global_step"] == 1
    expected = {"train/loss", "train/loss_decode", "train/loss_aux"} if kind == "upernet" else {"train/loss"}
    assert expected <= set(metrics)


def test_a_batch_too_small_for_batchnorm_is_one_line_or_passed_over(ade: Path, tmp_path: Path) -> None:
    # UPerNet's pyramid pooling at scale 1 normalises a 1x1 map: one image per batch stopped training
    # with torch's "Expected more than 1 value per channel"; so did a batch that --skip-corrupt left
    # with one readable image.
    assert min_train_batch("upernet", (512, 512)) == 2 and min_train_batch("fpn", (512, 512)) == 1
    assert min_train_batch("fpn", (32, 32)) == 2
    with pytest.raises(UserInputError, match=r"--batch-size 1: upernet trains BatchNorm on a 1x1 map .* needs at least 2 "
                                             r"images per process; use --batch-size 2 or more"):
        SegmentationTask(_config(tmp_path, ade, **{"run.batch_size": 1}), DistContext())
    task = SegmentationTask(_config(tmp_path, ade, **{"data.skip_corrupt": True}), DistContext())
    samples = [task.train_set[0], task.train_set[1]]
    unreadable = samples[1]._replace(image=None, label=None, error="cannot read image x.jpg: broken")
    assert task.batch_counts(collate_segmentation([samples[0], unreadable])) == {"samples": 0.0, "unreadable_images": 1.0}
    assert task.batch_counts(collate_segmentation(samples)) == {"samples": 2.0, "unreadable_images": 0.0}


def test_an_unreadable_validation_file_stops_before_training(ade: Path, tmp_path: Path) -> None:
    # It stopped the run at the first evaluation (16k iterations into the authors' UPerNet recipe).
    broken = tmp_path / "broken"
    shutil.copytree(ade, broken)
    bad = sorted((broken / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))[0]
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"cannot read validation file {bad}: .*--skip-corrupt"):
        train(_config(tmp_path / "run", broken))
    assert not (tmp_path / "run" / "last.pth").exists()
    # --skip-corrupt: named once, and the done line says evaluation went without it
    train(_config(tmp_path / "skipped", broken, **{"data.skip_corrupt": True}))
    log = (tmp_path / "skipped" / "log.txt").read_text()
    assert log.count(f"skipping unreadable file {bad}: ") == 1
    assert ", 1 unreadable validation file left out of evaluation" in log.splitlines()[-1], log


@pytest.mark.parametrize("problem, message", [
    ("value", r"label map .* holds value 200, out of range for 7 classes"),
    ("size", r"label map .* is 10x8 but its image .* they must match"),
])
def test_a_bad_validation_label_map_stops_before_training(ade: Path, tmp_path: Path, problem: str, message: str) -> None:
    # Only the headers were checked before training: a label value out of range or a label map of
    # another size than its image stopped the run at the first evaluation, an epoch (or 16k
    # iterations of the authors' recipe) into it.
    from PIL import Image

    broken = tmp_path / "broken"
    shutil.copytree(ade, broken)
    bad = sorted((broken / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))[-1]
    with Image.open(bad) as label:
        values = np.asarray(label).copy()
    values[0, 0] = 200
    Image.fromarray(values if problem == "value" else values[:8, :10]).save(bad)
    steps: list[int] = []
    for skip_corrupt in (False, True):  # never skipped: evaluation would stop on it either way
        with pytest.raises(DataError, match=message):
            train(_config(tmp_path / f"run{skip_corrupt}", broken, **{"data.skip_corrupt": skip_corrupt}),
                  on_step_end=steps.append)
    assert steps == [] and not (tmp_path / "runFalse" / "last.pth").exists()


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_segmentation_train import _config
from crossformer.segmentation.task import train
from pathlib import Path
def kill(step):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
train(_config(Path({output!r}), Path({root!r}), **{settings!r}), on_step_end=kill)
"""


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_unkilled_run(ade: Path, tmp_path: Path) -> None:
    # 10 training images, batch 2: 5 batches per epoch. Checkpoints every 2 updates; killed
    # after update 5, so the resume starts from update 4, mid-epoch (epoch 0, batch 4).
    settings = {"run.iterations": 7, "run.eval_every": 7, "run.save_every_steps": 2, "run.deterministic": True}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = textwrap.dedent(_KILLED_RUN).format(tests=str(TESTS), output=str(killed), root=str(ade),
                                                  settings=settings, kill_at=5)
    proc = run_process([sys.executable, "-c", script], timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = load_training_state(killed / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (0, 4, 4)

    resumed = train(_config(killed, ade, **settings, **{"run.resume": "auto"}))
    unkilled = train(_config(clean, ade, **settings))
    assert resumed == unkilled  # mIoU, mAcc, aAcc and the training losses, bit for bit
    assert 0 < unkilled["val/mIoU"] < 1
    a, b = load_training_state(killed / "last.pth"), load_training_state(clean / "last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    for index, moments in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][index][k], v) for k, v in moments.items())


def test_resume_refuses_another_segmentor(ade: Path, tmp_path: Path) -> None:
    train(_config(tmp_path, ade, **{"run.iterations": 1, "run.eval_every": 1}))
    with pytest.raises(UserInputError, match="was trained with model kind 'upernet', not 'fpn'"):
        train(_config(tmp_path, ade, "fpn", **{"run.iterations": 2, "run.resume": "auto"}))


@pytest.mark.slow
def test_torchrun_two_processes_over_gloo(ade: Path, tmp_path: Path) -> None:
    from crossformer.cli import main
    from segmentation_fixtures import write_config

    config = write_config(tmp_path / "tiny.yaml", data={"root": str(ade)}, run={"iterations": 3, "eval_every": 3})
    output = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_process(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "crossformer",
         "train", "--config", str(config), "--output", str(output)],
        timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("2 process(es)") == 1  # rank 0 alone logs
    state = load_training_state(output / "last.pth")
    # 10 images / (2 ranks x batch 2) = 2 updates per epoch; each rank draws its own crops
    assert state["world_size"] == 2 and state["global_step"] == 3 and state["epoch"] == 1
    assert not torch.equal(state["rank_state"][0]["rng"]["torch"], state["rank_state"][1]["rng"]["torch"])
    # the validation images were split over the ranks and the areas summed: one process agrees
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--config", str(config), "--checkpoint", str(output / "last.pth"), "--json",
                 "--output", str(out)]) == 0
    single = json.loads(out.read_text())
    assert single["images"] == 2
    assert single["mIoU"] == pytest.approx(state["metrics"]["val/mIoU"], abs=1e-12)
    assert single["aAcc"] == pytest.approx(state["metrics"]["val/aAcc"], abs=1e-12)


def test_init_from_fine_tunes_a_whole_segmentor_of_other_classes(ade: Path, tmp_path: Path) -> None:
    """mmseg's load_from: every weight of a 150-class UPerNet in mmseg's layout but the two heads'
    classifiers, which the data's classes need fresh."""
    config = _config(tmp_path / "run", ade)
    torch.manual_seed(1)
    source = build_model(config.model, 150).state_dict()
    mmseg_keys = {k.replace("backbone.model.", "backbone.", 1): v for k, v in source.items()}
    whole = tmp_path / "ade_upernet.pth"
    torch.save({"state_dict": mmseg_keys}, whole)
    task = SegmentationTask(_config(tmp_path / "run", ade, **{"model.init_from": str(whole)}), DistContext())
    mine = task.model.state_dict()
    fresh = {k for k in mine if mine[k].shape != source[k].shape}
    assert {k.rsplit(".", 1)[0] for k in fresh} == {"decode_head.conv_seg", "auxiliary_head.conv_seg"}
    assert all(torch.equal(mine[k], source[k]) for k in mine if k not in fresh)
    assert "(its classifiers of another class count start afresh: auxiliary_head.conv_seg, decode_head.conv_seg)" in task.describe()
    # anything else that does not fit is still an error naming it
    source["decode_head.bottleneck.conv.weight"] = source["decode_head.bottleneck.conv.weight"][:, :-1]
    torch.save({"model": source}, whole)
    with pytest.raises(UserInputError, match="wrong shape: decode_head.bottleneck.conv.weight"):
        SegmentationTask(_config(tmp_path / "run", ade, **{"model.init_from": str(whole)}), DistContext())


def test_init_from_a_segmentor_of_the_same_classes_in_another_order_keeps_each_class_its_row(ade: Path,
                                                                                             tmp_path: Path) -> None:
    # the classifier rows were loaded by position: each class started from another's weights
    config = _config(tmp_path / "run", ade)
    names = list(SegmentationTask(config, DistContext()).train_set.classes)
    torch.manual_seed(1)
    source = build_model(config.model, len(names)).state_dict()
    whole = tmp_path / "reversed.pth"
    torch.save({"model": source, "meta": {"classes": names[::-1]}}, whole)
    task = SegmentationTask(_config(tmp_path / "run", ade, **{"model.init_from": str(whole)}), DistContext())
    mine = task.model.state_dict()
    reordered = [k for k in mine if ".conv_seg." in k]
    assert len(reordered) == 4 and all(torch.equal(mine[k], source[k].flip(0)) for k in reordered)
    assert all(torch.equal(mine[k], source[k]) for k in mine if k not in reordered)
    assert f"{whole} names the classes in another order: its classifier rows are put in the data's" in task.notes


@pytest.mark.slow
def test_torchrun_names_the_unreadable_validation_files_of_every_rank(ade: Path, tmp_path: Path) -> None:
    # With --skip-corrupt, the check before training named in log.txt only the files of rank 0's
    # share; the evaluations skip them without naming them.
    from cli_errors import torchrun
    from segmentation_fixtures import write_config

    broken = tmp_path / "broken"
    shutil.copytree(ade, broken)
    # the check reads image, label map, image, ...: the first label map is rank 1's
    bad = sorted((broken / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))[0]
    bad.write_bytes(b"not a picture")
    config = write_config(tmp_path / "tiny.yaml", data={"root": str(broken), "skip_corrupt": True},
                          run={"iterations": 1, "eval_every": 1})
    proc = torchrun(["train", "--config", str(config), "--output", str(tmp_path / "ddp")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "log.txt").read_text().count(f"skipping unreadable file {bad}: ") == 1


def test_resume_needs_no_pretrained_file(ade: Path, tmp_path: Path) -> None:
    """Every weight of a resumed run comes from its checkpoint: the backbone file the run
    started from may be gone (resuming used to stop on it as missing)."""
    import timm

    from segmentation_fixtures import TINY_BACKBONE

    backbone = tmp_path / "backbone.pth"
    torch.save({"model": timm.create_model("crossformer_small", **TINY_BACKBONE).state_dict()}, backbone)
    settings = {"model.pretrained": str(backbone), "run.eval_every": 1}
    train(_config(tmp_path / "run", ade, **settings, **{"run.iterations": 1}))
    backbone.unlink()
    resumed = train(_config(tmp_path / "run", ade, **settings, **{"run.iterations": 2, "run.resume": "auto"}))
    assert resumed["global_step"] == 2
    with pytest.raises(UserInputError, match="model.pretrained: checkpoint not found"):  # a fresh run needs it
        train(_config(tmp_path / "fresh", ade, **settings, **{"run.iterations": 1, "run.resume": "auto"}))


def test_resume_refuses_another_label_convention(ade: Path, tmp_path: Path) -> None:
    # The same class list read with reduce_zero_label switched resumed silently: each label
    # value then meant the class before (or after) the one the checkpoint learnt for it.
    ade = ade / "ADEChallengeData2016"
    classes = tmp_path / "classes.txt"  # one more class: values 0..7 fit both conventions
    classes.write_text((ade / "classes.txt").read_text() + "other\n")
    folders = {"train_images": str(ade / "images/training"), "train_labels": str(ade / "annotations/training"),
               "val_images": str(ade / "images/validation"), "val_labels": str(ade / "annotations/validation"),
               "classes": str(classes)}

    def config(**values) -> SegmentationConfig:
        layers = tiny_config(data=folders, run={"output": str(tmp_path / "run"), "iterations": 1, "eval_every": 1})
        return build_config(SegmentationConfig, (layers, "tiny"), (values, "test"))

    train(config())
    with pytest.raises(UserInputError, match=r"was trained with data.reduce_zero_label=false \(label maps count classes "
                                             r"from 0\); resume with the same setting"):
        train(config(**{"data.reduce_zero_label": True, "run.iterations": 2, "run.resume": "auto"}))


def test_a_class_no_validation_label_holds_is_a_warning(ade: Path, tmp_path: Path) -> None:
    # Binary masks saved as 0/255 trained silently: 255 is "ignored", so the object class was in
    # no label, never learnt, and mIoU (its IoU nan, left out) read as good as the background.
    from PIL import Image

    ade = ade / "ADEChallengeData2016"
    masks = tmp_path / "masks"
    for split in ("training", "validation"):
        (masks / split).mkdir(parents=True)
        for path in (ade / "annotations" / split).glob("*.png"):
            with Image.open(path) as label:
                Image.fromarray(np.where(np.asarray(label) == 1, 255, 0).astype(np.uint8)).save(masks / split / path.name)
    folders = {"train_images": str(ade / "images/training"), "train_labels": str(masks / "training"),
               "val_images": str(ade / "images/validation"), "val_labels": str(masks / "validation"),
               "classes": ["background", "sky"]}
    layers = tiny_config(data=folders, run={"output": str(tmp_path / "run"), "iterations": 1, "eval_every": 1})
    train(build_config(SegmentationConfig, (layers, "tiny")))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert re.search(rf"warning: no label map in {masks / 'validation'} holds class 'sky' \(value 1\): Acc reads nan, and "
                     r"IoU 0 where the model predicts the class \(counted in mIoU\), else nan \(left out of it\); \d+% of the pixels are 255 \(ignored\), the rest one class: store each "
                     r"object as its class value \(a mask saved as 0/255 stores it as ignored\)\n", log)
    from crossformer.segmentation.data import absent_classes_note

    # every class in some label map: no line
    val = SegmentationDataset(ade / "images/validation", masks / "validation", ["background", "sky"])
    assert absent_classes_note([5, 1] + [0] * 253 + [9], val) is None



def _data_check_lines(config: SegmentationConfig) -> list[str]:
    from crossformer.engine.distributed import setup_distributed

    task = SegmentationTask(config, setup_distributed("cpu"))
    lines: list[str] = []
    task.log = type("Lines", (), {"info": staticmethod(lines.append)})()
    task.check_data()
    return lines


@pytest.mark.slow
def test_a_class_only_another_ranks_validation_labels_hold_is_no_warning(ade: Path, tmp_path: Path) -> None:
    # The pixels of each class are summed over the ranks' shares: 'sky' only in rank 1's share
    # (the second of 2 validation label maps) is in the set.
    from PIL import Image
    from two_ranks import on_two_ranks

    ade = ade / "ADEChallengeData2016"
    masks = tmp_path / "masks"
    for split in ("training", "validation"):
        (masks / split).mkdir(parents=True)
        for i, path in enumerate(sorted((ade / "annotations" / split).glob("*.png"))):
            with Image.open(path) as label:
                values = np.asarray(label) == 1 if split == "training" or i == 1 else np.zeros(label.size[::-1], bool)
            Image.fromarray(values.astype(np.uint8)).save(masks / split / path.name)
    folders = {"train_images": str(ade / "images/training"), "train_labels": str(masks / "training"),
               "val_images": str(ade / "images/validation"), "val_labels": str(masks / "validation"),
               "classes": ["background", "sky"]}
    config = build_config(SegmentationConfig, (tiny_config(data=folders, run={"output": str(tmp_path / "run")}), "tiny"))
    assert len(list((masks / "validation").iterdir())) == 2 and _data_check_lines(config) == []
    assert on_two_ranks(_data_check_lines, config) == [[], []]

def test_resume_on_data_of_another_class_count_names_the_data(ade: Path, tmp_path: Path) -> None:
    # It said "was trained with model num_classes 7, not 8; resume with the same config", where
    # the config (model.num_classes: null) was the same and the data had changed.
    ade = ade / "ADEChallengeData2016"
    classes = tmp_path / "classes.txt"
    classes.write_text((ade / "classes.txt").read_text())
    folders = {"train_images": str(ade / "images/training"), "train_labels": str(ade / "annotations/training"),
               "val_images": str(ade / "images/validation"), "val_labels": str(ade / "annotations/validation"),
               "classes": str(classes), "reduce_zero_label": True}
    layers = tiny_config(data=folders, run={"output": str(tmp_path / "run"), "iterations": 1, "eval_every": 1})
    train(build_config(SegmentationConfig, (layers, "tiny")))
    classes.write_text(classes.read_text() + "other\n")
    with pytest.raises(UserInputError, match=r"run/last\.pth was trained on 7 classes but the class list of .*training "
                                             r"has 8; resume with the same data$"):
        train(build_config(SegmentationConfig, (layers, "tiny"), ({"run.iterations": 2, "run.resume": "auto"}, "test")))
