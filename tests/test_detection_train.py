"""Detection training through the engine: the bundled recipes, a training run of each detector
kind on a tiny model, exact resume after SIGKILL, and two processes under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from crossformer.models import VARIANTS
from crossformer.data import DataError
from crossformer.detection import DETECTOR_KINDS
from crossformer.detection.config import DetectionConfig, DetectionModelConfig
from crossformer.detection.data import CocoDetection
from crossformer.detection.evaluate import evaluate_detector
from crossformer.detection.task import DetectionTask, build_configured_detector, train
from crossformer.engine import DistContext, load_training_state
from crossformer.engine.optim import param_groups
from crossformer.engine.registry import bundled_configs, resolve_config
from crossformer.errors import UserInputError
from detection_train_fixtures import make_tiny_coco, tiny_config, write_tiny_config
from processes import run_process

TESTS = Path(__file__).resolve().parent
EXPECTED_LOSSES = {
    "retinanet": {"loss_cls", "loss_bbox"},
    "mask_rcnn": {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"},
    "cascade_mask_rcnn": {"loss_rpn_cls", "loss_rpn_bbox"} | {f"s{i}.{n}" for i in range(3) for n in ("loss_cls", "loss_bbox", "loss_mask")},
}
# The rows of the authors' tables: (kind, recipe) -> backbones.
AUTHORS_ROWS = {
    ("retinanet", "1x"): {"crossformer_small", "crossformer_base", "crossformer_pp_small", "crossformer_pp_base"},
    ("mask_rcnn", "1x"): {"crossformer_small", "crossformer_base", "crossformer_pp_small", "crossformer_pp_base"},
    ("mask_rcnn", "3x"): {"crossformer_small", "crossformer_base", "crossformer_pp_small", "crossformer_pp_base"},
    ("cascade_mask_rcnn", "3x"): {"crossformer_small"},
}
# The authors' stochastic depth per detection backbone (their detection/crossformer_factory.py:
# CrossFormer_S, CrossFormer_S2 = ++S, CrossFormer_B, CrossFormer_B2 = ++B).
AUTHORS_DROP_PATH = {"crossformer_small": 0.2, "crossformer_pp_small": 0.2, "crossformer_base": 0.3, "crossformer_pp_base": 0.3}


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_tiny_coco(tmp_path_factory.mktemp("coco"))


def _edited_copy(coco: Path, tmp_path: Path, split: str, edit: Callable[[dict], Any]) -> Path:
    """A copy of ``coco`` whose ``split`` annotation file ``edit`` changed (in place)."""
    copy = tmp_path / "edited"
    shutil.copytree(coco, copy)
    ann = copy / "annotations" / f"instances_{split}2017.json"
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))
    return copy


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


# the recipes ------------------------------------------------------------------------


def test_every_row_of_the_authors_tables_has_a_config_with_its_recipe() -> None:
    configs = {name: path for name, path in bundled_configs("detection").items() if not name.endswith("_demo")}
    found: dict[tuple[str, str], set[str]] = {}
    for name in configs:
        c = resolve_config(name).config
        recipe = name.rsplit("_", 1)[1]
        assert name == f"{c.model.kind}_{c.model.backbone}_{recipe}" and c.data.recipe == recipe
        found.setdefault((c.model.kind, recipe), set()).add(c.model.backbone)
        epochs, milestones = (12, (8, 11)) if recipe == "1x" else (36, (27, 33))
        assert (c.run.epochs, c.schedule.name, c.schedule.milestones, c.schedule.gamma) == (epochs, "step", milestones, 0.1)
        assert (c.schedule.warmup_iters, c.schedule.warmup_ratio, c.run.clip_grad) == (500, 0.001, 0.0)
        assert (c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.scale_lr) == (1e-4, 1e-4, False)
        # the authors' optimizer has no paramwise_cfg: mmdet decays every parameter
        assert (c.optimizer.decay_1d, c.optimizer.no_decay_keys) == (True, ())
        assert (c.run.batch_size, c.run.eval_every, c.run.amp) == (2, 1, "auto")
        assert (c.model.num_classes, c.data.max_size, c.data.min_size) == (80, 1333, 800)
        # the variant's own rate, the authors' for each backbone, so that --backbone takes its own
        assert c.model.drop_path is None and VARIANTS[c.model.backbone].arch["drop_path_rate"] == AUTHORS_DROP_PATH[c.model.backbone]
    assert found == AUTHORS_ROWS
    other = resolve_config("mask_rcnn_crossformer_small_1x", {"model.backbone": "crossformer_base"}).config.model
    assert "drop_path_rate" not in other.backbone_settings()  # not small's 0.2 kept for base (whose is 0.3)


@pytest.mark.parametrize("name", ["mask_rcnn_crossformer_pp_base_3x", "cascade_mask_rcnn_crossformer_small_3x"])
def test_a_config_builds_its_detector_with_the_detection_grouping(name: str) -> None:
    # detmodels' tests check every kind x backbone's parameter count; here: config -> detector
    c = resolve_config(name).config
    with torch.device("meta"):
        detector = build_configured_detector(c.model, 80, pretrained=False)
    assert detector.kind == c.model.kind and detector.num_classes == 80
    blocks = [m for m in detector.backbone.modules() if type(m).__name__ == "CrossFormerBlock"]
    assert {b.group_size for b in blocks} == {7}
    assert sorted({b.interval for b in blocks}) == [1, 2, 4, 8]  # one interval per stage, CrossFormer++ too
    drop = [m.drop_prob for m in detector.backbone.modules() if hasattr(m, "drop_prob")]
    assert max(drop) == pytest.approx(AUTHORS_DROP_PATH[c.model.backbone])


def test_the_default_recipe_decays_every_parameter_as_mmdet_without_paramwise_cfg() -> None:
    # the authors' `optimizer = dict(type='AdamW', lr=0.0001, weight_decay=0.0001)`: norms,
    # biases and the position-bias MLPs decay too
    c = DetectionConfig()
    with torch.device("meta"):
        detector = build_configured_detector(c.model, 80, pretrained=False)
    spared, decayed = param_groups(detector, c.optimizer.weight_decay, c.optimizer.no_decay_keys, c.optimizer.decay_1d)
    assert not spared["params"] and len(decayed["params"]) == len(list(detector.parameters()))


@pytest.mark.parametrize("backbone", sorted(AUTHORS_DROP_PATH))
def test_without_a_drop_path_setting_the_backbone_keeps_its_variants_rate(backbone: str) -> None:
    # `--backbone crossformer_base` on the default config: the authors' 0.3, not small's 0.2
    with torch.device("meta"):
        detector = build_configured_detector(DetectionModelConfig(backbone=backbone), 80, pretrained=False)
    drop = [m.drop_prob for m in detector.backbone.modules() if hasattr(m, "drop_prob")]
    assert max(drop) == pytest.approx(AUTHORS_DROP_PATH[backbone])


# training through the Task ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", DETECTOR_KINDS)
def test_training_each_detector_logs_every_loss_term_and_evaluates(kind: str, coco: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "c.yaml", kind, coco, tmp_path / "run", schedule={"milestones": [1]},
                         epochs=0, iterations=2, eval_every=2)
    metrics = train(config)
    assert {k[len("train/"):] for k in metrics if k.startswith("train/loss_") or k.startswith("train/s")} == EXPECTED_LOSSES[kind]
    assert metrics["train/loss"] == pytest.approx(sum(metrics[f"train/{k}"] for k in EXPECTED_LOSSES[kind]), rel=1e-5)
    iou_types = ("bbox",) if kind == "retinanet" else ("bbox", "segm")
    for iou_type in iou_types:
        assert 0 <= metrics[f"val/{iou_type}_mAP"] <= 1 and f"val/{iou_type}_AR_l" in metrics
    assert ("val/segm_mAP" in metrics) == (kind != "retinanet")
    state = load_training_state(tmp_path / "run" / "last.pth")
    assert state["global_step"] == 2 and state["detector"] == kind and state["cat_ids"] == [1, 3, 6, 9]
    assert state["class_names"] == ["circle", "rectangle", "triangle", "star"] and state["num_classes"] == 4


def test_on_several_gpus_the_cascade_heads_batchnorm_is_synced(coco: Path, tmp_path: Path, monkeypatch) -> None:
    """The authors' cascade heads (Swin's) use SyncBN: under DDP on GPUs their BatchNorm layers
    become SyncBatchNorm, state dict keys unchanged; on one process or the CPU they stay."""
    config = tiny_config(tmp_path / "c.yaml", "cascade_mask_rcnn", coco, tmp_path / "run")
    detector = build_configured_detector(config.model, 4)
    norms = {name for name, m in detector.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    keys = list(detector.state_dict())
    assert norms and DistContext(world_size=2).sync_batchnorm(detector) is detector  # gloo on CPUs
    assert DistContext(device=torch.device("cuda")).sync_batchnorm(detector) is detector  # one GPU
    synced = DistContext(world_size=2, device=torch.device("cuda")).sync_batchnorm(detector)
    assert {name for name, m in synced.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)} == norms
    assert list(synced.state_dict()) == keys
    seen = []
    monkeypatch.setattr(DistContext, "sync_batchnorm", lambda self, model: seen.append(model) or model)
    task = DetectionTask(config, DistContext())
    assert seen == [task.model]


def test_the_task_checks_its_data_and_checkpoints(coco: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "c.yaml", "mask_rcnn", coco, tmp_path / "run")
    task = DetectionTask(config, DistContext())
    batch = next(iter(task.train_loader))
    assert task.batch_counts(batch) == {"samples": 2.0, "unreadable_images": 0.0}
    # 9 train images, each orientation padded to whole batches of 2 (as mmdetection's group sampler)
    landscape = sum(task.train_set.landscape)
    assert len(task.train_loader) == -(-landscape // 2) + -(-(9 - landscape) // 2)
    extras = task.checkpoint_extras()
    task.check_resume(extras, "x.pth")
    with pytest.raises(UserInputError, match="is a retinanet on crossformer_tiny, not a mask_rcnn"):
        task.check_resume({**extras, "detector": "retinanet"}, "x.pth")
    with pytest.raises(UserInputError, match="has 4 categories but model.num_classes is 80"):
        DetectionTask(replace(config, model=replace(config.model, num_classes=80)), DistContext())


def test_each_training_batch_holds_one_orientation_as_mmdetection(coco: Path, tmp_path: Path) -> None:
    # a portrait and a landscape image in one batch pad to a square of their longer sides
    config = tiny_config(tmp_path / "c.yaml", "retinanet", coco, tmp_path / "run")
    task = DetectionTask(config, DistContext())
    assert 0 < sum(task.train_set.landscape) < len(task.train_set)  # the fixture has both
    for epoch in range(3):
        task.train_sampler.set_epoch(epoch)
        for batch in task.train_loader:
            wide = {meta["ori_shape"][1] > meta["ori_shape"][0] for meta in batch.metas}
            assert len(wide) == 1, [meta["ori_shape"] for meta in batch.metas]


@pytest.mark.parametrize("split, message", [
    # "0 training images (with objects): fewer than one batch of 2 per process; lower --batch-size"
    # pointed at the batch size, which no value fixes.
    ("train", r"instances_train2017\.json has no training images: training keeps the images that have annotations "
              r"and sides of at least 32 px"),
    # COCOeval gave -1 for every number at every evaluation, and best.pth was kept by that -1.
    ("val", r"instances_val2017\.json has no object to evaluate on \(crowd regions and boxes with no area are not "
            r"counted\): its AP would be -1"),
])
def test_a_split_without_annotations_says_so(coco: Path, tmp_path: Path, split: str, message: str) -> None:
    empty = _edited_copy(coco, tmp_path, split, lambda data: data.update(annotations=[]))
    config = tiny_config(tmp_path / "c.yaml", "mask_rcnn", empty, tmp_path / "run")
    with pytest.raises(DataError, match=message):
        DetectionTask(config, DistContext())


@pytest.mark.parametrize("flaw", ["empty_segmentation", "no_area", "crowd"])
def test_a_training_file_whose_objects_are_all_dropped_says_why(coco: Path, tmp_path: Path, flaw: str) -> None:
    # A box-only export's "segmentation": [] trained Mask R-CNN an epoch on background alone
    # (loss_bbox 0), with one "left out 37 objects" line as the only sign.
    def spoil(data: dict) -> None:
        for annotation in data["annotations"]:
            if flaw == "empty_segmentation":
                annotation["segmentation"] = []
            elif flaw == "no_area":
                annotation["bbox"][2] = 0
            else:
                annotation["iscrowd"] = 1

    flawed = _edited_copy(coco, tmp_path, "train", spoil)
    count = sum(not a["iscrowd"] for a in json.loads((coco / "annotations" / "instances_train2017.json").read_text())["annotations"])
    why = {"empty_segmentation": rf"{count} of its objects have no segmentation polygon of 3 points or more, and a "
                                 rf"mask_rcnn trains on masks: for box-only data use --kind retinanet",
           "no_area": rf"{count} of its objects have a box with no area or outside their image",
           "crowd": r"its objects are all crowd regions \(iscrowd=1\), which are never training targets"}[flaw]
    config = tiny_config(tmp_path / "c.yaml", "mask_rcnn", flawed, tmp_path / "run")
    with pytest.raises(DataError, match=rf"instances_train2017\.json has no object to train on: {why}$"):
        DetectionTask(config, DistContext())


def test_splits_numbering_the_categories_otherwise_match_them_by_name(coco: Path, tmp_path: Path) -> None:
    # A validation file numbering the same categories otherwise (converters number them as they
    # meet them, split by split) was refused with "list different categories"; other names are
    # still refused, now naming the first that differs.
    def renumber(data: dict) -> None:  # circle 1 <-> star 9
        swap = {1: 9, 9: 1}
        data["categories"] = [{**c, "id": swap.get(c["id"], c["id"])} for c in data["categories"]]
        data["annotations"] = [{**a, "category_id": swap.get(a["category_id"], a["category_id"])} for a in data["annotations"]]

    renumbered = _edited_copy(coco, tmp_path / "renumbered", "val", renumber)
    task = DetectionTask(tiny_config(tmp_path / "c.yaml", "mask_rcnn", renumbered, tmp_path / "run"), DistContext())
    assert task.val_set.class_names == task.train_set.class_names == ["circle", "rectangle", "triangle", "star"]
    assert task.val_set.label_to_cat_id([0, 3]) == [9, 1]  # circle and star by their ids in the validation file

    def rename(data: dict) -> None:
        data["categories"] = [{**c, "name": "étoile"} if c["name"] == "star" else c for c in data["categories"]]

    renamed = _edited_copy(coco, tmp_path / "renamed", "val", rename)
    with pytest.raises(DataError, match=r"list different categories \(label 3 is 'étoile' in the validation file, "
                                        r"'star' in the training file\); the validation file needs the training file's categories \(or some of them\)"):
        DetectionTask(tiny_config(tmp_path / "c.yaml", "mask_rcnn", renamed, tmp_path / "run"), DistContext())


def test_a_validation_file_of_some_of_the_categories_is_evaluated_over_those(coco: Path, tmp_path: Path, capsys) -> None:
    # A validation file without a rare class was refused: "list different categories" in training,
    # "has 3 categories; ... detects 4 classes" in evaluate. It is matched by name and scored over its own.
    from crossformer.cli import main
    from crossformer.detection.evaluate import detections_to_coco

    def drop_rectangles(data: dict) -> None:
        data["categories"] = [c for c in data["categories"] if c["name"] != "rectangle"]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 3]

    fewer = _edited_copy(coco, tmp_path / "fewer", "val", drop_rectangles)
    config = tiny_config(tmp_path / "c.yaml", "retinanet", fewer, tmp_path / "run")
    assert config.data.known_classes() == 4  # flops' and benchmark's head count: the training file's, not 3
    metrics = train(config)
    assert metrics["val/bbox_mAP"] >= 0
    note = "instances_val2017.json has no category 'rectangle' of the detector's 4: evaluated over the 3 it has"
    assert note in (tmp_path / "run" / "log.txt").read_text()
    capsys.readouterr()
    # on stderr, with --json too (it was left out there: stdout held the JSON alone, stderr nothing)
    assert main(["evaluate", "--config", str(tmp_path / "c.yaml"), "--checkpoint", str(tmp_path / "run" / "last.pth"),
                 "--data", str(fewer), "--results", str(tmp_path / "r.json"), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count(f"warning: {note}") == 1 and "bbox_mAP" in json.loads(captured.out)
    names = ["circle", "rectangle", "triangle", "star"]  # the training file's
    val = CocoDetection(fewer / "annotations" / "instances_val2017.json", fewer / "val2017", classes=names)
    assert (val.class_names, val.cat_ids, val.absent_classes) == (names, [1, None, 6, 9], ["rectangle"])
    # a detection of the class the file lacks is no result: nothing of it there to score
    found = {"boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5]]), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}
    assert [r["category_id"] for r in detections_to_coco([found], [7], val.cat_ids)] == [6]


def test_what_reading_the_training_file_dropped_is_in_the_run_log(coco: Path, tmp_path: Path) -> None:
    # It went to stdout alone (printed while the task was built, before the run log opened).
    flawed = tmp_path / "flawed"
    shutil.copytree(coco, flawed)
    ann = flawed / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"][2] = 0
    ann.write_text(json.dumps(data))
    train(tiny_config(tmp_path / "c.yaml", "mask_rcnn", flawed, tmp_path / "run"))
    assert "instances_train2017.json: dropped 1 boxes with no area" in (tmp_path / "run" / "log.txt").read_text()


def test_a_validation_file_without_images_stops_before_training(coco: Path, tmp_path: Path) -> None:
    # It trained an epoch, then stopped with "no readable images to evaluate in .../val2017".
    empty = _edited_copy(coco, tmp_path, "val", lambda data: data.update(images=[], annotations=[]))
    config = tiny_config(tmp_path / "c.yaml", "mask_rcnn", empty, tmp_path / "run")
    with pytest.raises(DataError, match=r"instances_val2017\.json lists no images: training evaluates on the validation"):
        train(config)
    assert not (tmp_path / "run" / "last.pth").exists()
    dataset = CocoDetection(empty / "annotations" / "instances_val2017.json", empty / "val2017", with_masks=False)
    with pytest.raises(DataError, match=r"instances_val2017\.json lists no images: nothing to evaluate"):
        evaluate_detector(build_configured_detector(config.model, 4, pretrained=False), dataset)


def test_an_unreadable_validation_image_stops_before_training(coco: Path, tmp_path: Path) -> None:
    # It stopped the run at the end of the first epoch (hours into the authors' recipe).
    broken = tmp_path / "broken"
    shutil.copytree(coco, broken)
    bad = sorted((broken / "val2017").glob("*.jpg"))[0]
    bad.write_bytes(b"not a jpeg")
    config = tiny_config(tmp_path / "c.yaml", "mask_rcnn", broken, tmp_path / "run")
    with pytest.raises(DataError, match=rf"cannot read validation image {bad}: .*--skip-corrupt"):
        train(config)
    assert not (tmp_path / "run" / "last.pth").exists()


def test_skip_corrupt_skips_and_counts_an_image_deleted_since_its_file_listed_it(coco: Path, tmp_path: Path) -> None:
    # --skip-corrupt skipped images that did not decode; one missing stopped the run all the same
    broken = tmp_path / "broken"
    shutil.copytree(coco, broken)
    gone = CocoDetection(broken / "annotations" / "instances_train2017.json", broken / "train2017", train=True).records[0].path
    gone.unlink()
    config = tiny_config(tmp_path / "c.yaml", "retinanet", broken, tmp_path / "run")
    with pytest.raises(DataError, match=rf"not found at {gone}; restore it .*--skip-corrupt"):
        train(config)
    # and an unreadable validation image: named, left out of evaluation, and the done line says so
    bad = sorted((broken / "val2017").glob("*.jpg"))[0]
    bad.write_bytes(b"not a jpeg")
    train(replace(config, data=replace(config.data, skip_corrupt=True)))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count(f"skipping unreadable image {gone}: file not found") == 1
    assert log.count(f"skipping unreadable image {bad}:") == 1
    done = [line for line in log.splitlines() if " done in " in line][0]
    assert ", 1 skip of unreadable images (1 file), 1 unreadable validation file left out of evaluation" in done


def test_a_validation_image_of_another_size_than_its_file_says_stops_before_training(coco: Path, tmp_path: Path) -> None:
    # The header check read the image, not its EXIF orientation or the file's width / height:
    # the run trained an epoch, then its evaluation stopped on "its size ... differs".
    from PIL import Image

    turned = tmp_path / "turned"
    shutil.copytree(coco, turned)
    image_path = sorted((turned / "val2017").glob("*.jpg"))[0]
    with Image.open(image_path) as image:
        exif = image.getexif()
        exif[0x0112] = 6  # shown turned a quarter: the width and height swap
        image.save(image_path, exif=exif)
        width, height = image.size
    config = tiny_config(tmp_path / "c.yaml", "mask_rcnn", turned, tmp_path / "run")
    with pytest.raises(DataError, match=rf"cannot read validation image {image_path}: its size {height}x{width} "
                                        rf"\(width x height\) differs from the annotation file's {width}x{height} "
                                        rf"\(stored {width}x{height}, turned by its EXIF orientation"):
        train(config)
    assert not (tmp_path / "run" / "last.pth").exists()


def test_a_validation_mask_evaluation_would_refuse_stops_before_training(coco: Path, tmp_path: Path) -> None:
    # Found at the first evaluation, an epoch into the run.
    broken = tmp_path / "broken"
    shutil.copytree(coco, broken)
    ann = broken / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    del data["annotations"][0]["segmentation"]
    ann.write_text(json.dumps(data))
    config = tiny_config(tmp_path / "c.yaml", "mask_rcnn", broken, tmp_path / "run")
    with pytest.raises(DataError, match=rf"annotation {data['annotations'][0]['id']} of image .* has no 'segmentation'"):
        train(config)
    assert not (tmp_path / "run" / "last.pth").exists()


# resume and processes -----------------------------------------------------------------

_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from crossformer.engine.registry import resolve_config
from crossformer.detection.task import train
def kill(step):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
train(resolve_config({config!r}, {{"resume": {resume!r}}}).config, on_step_end=kill)
"""


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("eval_seconds")}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_unkilled_run(coco: Path, tmp_path: Path) -> None:
    # 4 updates per epoch, 2 epochs; a checkpoint every 3 updates; killed at update 5 (epoch 1, batch 1)
    settings = dict(epochs=2, save_every_steps=3, deterministic=True, eval_every=2)
    killed_config = write_tiny_config(tmp_path / "killed.yaml", "mask_rcnn", coco, tmp_path / "killed", **settings)
    clean_config = write_tiny_config(tmp_path / "clean.yaml", "mask_rcnn", coco, tmp_path / "clean", **settings)
    script = textwrap.dedent(_KILLED_RUN).format(tests=str(TESTS), config=str(killed_config), resume=None, kill_at=5)
    proc = run_process([sys.executable, "-c", script], timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = load_training_state(tmp_path / "killed" / "last.pth")
    assert (state["epoch"], state["batches_done"], state["global_step"]) == (0, 3, 3)

    torch.set_num_threads(1)
    resumed = train(resolve_config(str(killed_config), {"resume": "auto"}).config)
    unkilled = train(resolve_config(str(clean_config)).config)
    assert _without_timing(resumed) == _without_timing(unkilled)  # box and mask AP, every loss term, bit for bit
    a, b = load_training_state(tmp_path / "killed" / "last.pth"), load_training_state(tmp_path / "clean" / "last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    tail = [_without_timing(r) for r in _records(tmp_path / "clean") if r["step"] > 3]
    assert [_without_timing(r) for r in _records(tmp_path / "killed") if r["step"] > 3][-len(tail):] == tail


_DDP_RUN = """
import sys
from crossformer.engine.registry import resolve_config
from crossformer.detection.task import train
train(resolve_config({config!r}).config)
"""


@pytest.mark.slow
def test_torchrun_two_processes_over_gloo(coco: Path, tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path / "c.yaml", "mask_rcnn", coco, tmp_path / "ddp", batch_size=1)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_DDP_RUN).format(config=str(config)))
    proc = run_process([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    state = load_training_state(tmp_path / "ddp" / "last.pth")
    # 9 training images over 2 ranks (padded to 10) at 1 per batch: 5 updates
    assert state["world_size"] == 2 and state["global_step"] == 5 and len(state["rank_state"]) == 2
    # evaluation was split over the ranks and gathered: the same as one process on all 3 images
    torch.set_num_threads(1)
    task = DetectionTask(resolve_config(str(config)).config, DistContext())
    task.model.load_state_dict(state["model"])
    alone = task.evaluate(task.model)
    for key in ("bbox_mAP", "bbox_AR_100", "segm_mAP"):
        assert state["metrics"][f"val/{key}"] == pytest.approx(alone[key], abs=1e-9)


@pytest.mark.slow
def test_detection_demo_writes_the_default_set_trains_evaluates_and_draws(tmp_path, monkeypatch, capsys):
    from crossformer.cli import main
    from crossformer.detection import demo

    monkeypatch.setattr(demo, "DEMO_IMAGES", 24)  # the demo's recipe on a few images, for 4 updates
    output = tmp_path / "demo"
    assert main(["demo", "--task", "detection", "--output", str(output), "epochs=0", "iterations=4", "eval_every=4",
                 "checkpoint_every=0", "milestones=[3]", "tensorboard=false"]) == 0
    out = capsys.readouterr().out
    assert "data: 18 train / 6 held-out synthetic images" in out and "crowd regions" in out
    model = torch.load(output / "train" / "last.pth", map_location="cpu", weights_only=False)["config"]["model"]
    assert (model["rcnn_samples"], model["rpn_train_pre_nms"], model["rpn_train_proposals"]) == (128, 1000, 500)
    records = [json.loads(line) for line in open(output / "train" / "metrics.jsonl")]
    assert "val/segm_mAP" in records[-1]
    assert f"demo: held-out box AP {records[-1]['val/bbox_mAP']:.3f}, mask AP {records[-1]['val/segm_mAP']:.3f}" in out
    assert len(list((output / "predictions").glob("*.png"))) == 6


def test_training_proposal_counts_follow_the_config_or_the_authors():
    base = resolve_config("mask_rcnn_crossformer_small_1x", task="detection").config.model
    tiny = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
    authors = build_configured_detector(replace(base, backbone_kwargs=tiny), 3).train_proposals
    assert (authors.nms_pre, authors.max_per_img) == (2000, 1000)
    cascade = build_configured_detector(replace(base, kind="cascade_mask_rcnn", backbone_kwargs=tiny), 3).train_proposals
    assert (cascade.nms_pre, cascade.max_per_img) == (2000, 2000)
    chosen = build_configured_detector(replace(base, backbone_kwargs=tiny, rpn_train_pre_nms=300, rpn_train_proposals=70), 3)
    assert (chosen.train_proposals.nms_pre, chosen.train_proposals.max_per_img, chosen.train_proposals.iou) == (300, 70, 0.7)
    assert (chosen.test_proposals.nms_pre, chosen.test_proposals.max_per_img) == (1000, 1000)  # testing as the authors
    with pytest.raises(UserInputError, match="model.rpn_train_proposals must be at least 1"):
        replace(base, rpn_train_proposals=0).validate()


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_init_from_fine_tunes_a_whole_detector_of_other_classes(coco: Path, tmp_path: Path, kind: str) -> None:
    """mmdet's load_from: every weight of a 7-class detector in mmdet's layout (``state_dict``,
    ``backbone.`` keys) but the classifiers, which the data's 4 classes need fresh."""
    config = tiny_config(tmp_path / "c.yaml", kind, coco, tmp_path / "run")
    torch.manual_seed(1)
    source = build_configured_detector(replace(config.model, num_classes=7), 7, pretrained=False).state_dict()
    mmdet_keys = {k.replace("backbone.model.", "backbone.", 1): v for k, v in source.items()}
    whole = tmp_path / "coco_detector.pth"
    torch.save({"state_dict": mmdet_keys, "meta": {"CLASSES": [f"c{i}" for i in range(7)]}}, whole)

    task = DetectionTask(replace(config, model=replace(config.model, init_from=str(whole))), DistContext())
    mine = task.model.state_dict()
    fresh = {k for k in mine if mine[k].shape != source[k].shape}
    assert fresh and all(k.rsplit(".", 2)[-2] in ("fc_cls", "fc_reg", "conv_logits", "retina_cls") for k in fresh)
    assert all(torch.equal(mine[k], source[k]) for k in mine if k not in fresh)
    assert f"started from {whole} (its classifiers of another class count start afresh: " in task.describe()
    # the same class count: every weight, nothing afresh
    same = tmp_path / "same.pth"
    torch.save({"model": mine}, same)
    again = DetectionTask(replace(config, model=replace(config.model, init_from=str(same))), DistContext())
    assert all(torch.equal(v, mine[k]) for k, v in again.model.state_dict().items())
    m = config.model
    assert again.describe() == (f"{m.kind} on {m.backbone}: {sum(v.numel() for v in again.model.parameters()) / 1e6:.2f}M "
                                f"params, 4 classes, {len(again.train_set)} train / {len(again.val_set)} val images; "
                                f"started from {same}")
    # an ImageNet backbone belongs in model.pretrained, and the two do not go together
    backbone = tmp_path / "backbone.pth"
    torch.save({k[len("backbone.model."):]: v for k, v in source.items() if k.startswith("backbone.model.")}, backbone)
    with pytest.raises(UserInputError, match="holds no detection heads: give an ImageNet checkpoint as model.pretrained"):
        DetectionTask(replace(config, model=replace(config.model, init_from=str(backbone))), DistContext())
    with pytest.raises(UserInputError, match="model.pretrained and model.init_from are both set"):
        resolve_config(str(tmp_path / "c.yaml"), {"model.init_from": str(same), "model.pretrained": str(backbone)})


def test_init_from_a_detector_of_the_same_classes_in_another_order_labels_the_data_in_its_order(
        coco: Path, tmp_path: Path) -> None:
    # the file's categories were labelled in their own order: a checkpoint naming them in
    # another started every class from another's classifier rows (mAP 0.08 against 0.39)
    config = tiny_config(tmp_path / "c.yaml", "mask_rcnn", coco, tmp_path / "run")
    names = ["star", "triangle", "rectangle", "circle"]  # the file's, ids 1, 3, 6, 9, reversed
    whole = tmp_path / "reversed.pth"
    state = {"state_dict": build_configured_detector(config.model, 4, pretrained=False).state_dict(),
             "meta": {"CLASSES": names}}
    for legacy in (True, False):  # the authors' files of torch < 1.6 have no structure to peek at
        torch.save(state, whole, _use_new_zipfile_serialization=not legacy)
        task = DetectionTask(replace(config, model=replace(config.model, init_from=str(whole))), DistContext())
        assert task.train_set.class_names == task.val_set.class_names == task.class_names == names
        assert (task.train_set.cat_ids, task.val_set.cat_ids) == ([9, 6, 3, 1], [9, 6, 3, 1])
        assert (f"{task.train_set.ann_file} numbers the classes of {whole} in another order: labelled in the "
                f"checkpoint's order (star, triangle, rectangle, circle)") in task.notes
    # resumed (without the file it started from): labelled in its checkpoint's order again, not
    # refused as "trained on other categories"
    started = replace(config, model=replace(config.model, init_from=str(whole)),
                      run=replace(config.run, epochs=1))
    train(started)
    whole.unlink()
    assert train(replace(started, run=replace(started.run, epochs=2, resume="auto")))["epoch"] == 2
    assert load_training_state(tmp_path / "run" / "last.pth")["class_names"] == names
    # a checkpoint of more classes (the file some of them): the file's own order, the heads afresh
    torch.save({"state_dict": build_configured_detector(config.model, 5, pretrained=False).state_dict(),
                "meta": {"CLASSES": [*names, "moon"]}}, whole)
    task = DetectionTask(replace(config, model=replace(config.model, init_from=str(whole))), DistContext())
    assert task.train_set.class_names == ["circle", "rectangle", "triangle", "star"]
    assert not any("another order" in note for note in task.notes)


def test_resume_needs_no_init_from_file(coco: Path, tmp_path: Path, capsys) -> None:
    """Every weight of a resumed run comes from its checkpoint: the detector file the run
    started from may be gone (resuming used to stop on it as missing) and is not read."""
    config = tiny_config(tmp_path / "c.yaml", "retinanet", coco, tmp_path / "run")
    whole = tmp_path / "detector.pth"
    torch.save({"model": build_configured_detector(config.model, 4, pretrained=False).state_dict()}, whole)
    started = replace(config, model=replace(config.model, init_from=str(whole)))
    train(started)
    assert f"started from {whole}" in capsys.readouterr().out
    whole.unlink()
    resumed = train(replace(started, run=replace(config.run, epochs=2, resume="auto")))
    assert resumed["epoch"] == 2 and "started from" not in capsys.readouterr().out
