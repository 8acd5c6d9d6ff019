"""The detection command line: make-data, train, evaluate, predict, flops, benchmark and the
one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from crossformer.cli import main
from crossformer.data import find_unreadable
from crossformer.detection.data import CocoDetection, coco_paths
from crossformer.detection.evaluate import COCO_METRICS
from crossformer.detection.task import build_configured_detector
from crossformer.engine import load_training_state
from crossformer.engine.registry import resolve_config
from crossformer.models import convert_to_safetensors, count_params
from cli_errors import one_error_line, one_torchrun_error_line
from detection_train_fixtures import agree, make_tiny_coco, resized_images, tiny_settings, write_tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny Mask R-CNN trained one epoch through ``crossformer train``."""
    root = tmp_path_factory.mktemp("cli")
    coco = make_tiny_coco(root / "coco")
    config = write_tiny_config(root / "tiny.yaml", "mask_rcnn", coco, root / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", str(config), "--epochs", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "coco": coco, "config": config, "checkpoint": root / "run" / "last.pth"}


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_make_data_writes_a_coco_set_a_user_could_have(tmp_path: Path, capsys) -> None:
    assert main(["make-data", "coco", str(tmp_path / "set"), "--images", "8", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 train / 2 val images" in out
    train = CocoDetection(*coco_paths(tmp_path / "set", "train"))
    assert len(train) == 6 and train.class_names == ["circle", "rectangle", "triangle", "star"]
    assert main(["make-data", "coco", str(tmp_path / "x"), "--images", "1"]) == 2
    assert "--images must be at least 2" in _error(capsys)



def test_make_data_writes_the_set_its_seed_names(tmp_path: Path) -> None:
    def annotations(seed: int, folder: str) -> bytes:
        assert main(["make-data", "coco", str(tmp_path / folder), "--images", "2", "--seed", str(seed)]) == 0
        return (tmp_path / folder / "annotations" / "instances_train2017.json").read_bytes()

    assert annotations(3, "a") == annotations(3, "b") != annotations(4, "c")


@pytest.mark.slow
def test_evaluate_prints_box_and_mask_ap_and_writes_results(trained, tmp_path: Path, capsys) -> None:
    results = tmp_path / "results.json"
    args = ["evaluate", "--config", str(trained["config"]), "--checkpoint", str(trained["checkpoint"]),
            "--data", str(trained["coco"]), "--results", str(results)]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split() and line.split()[0] in COCO_METRICS}
    assert list(rows) == list(COCO_METRICS) and all(len(v) == 2 for v in rows.values())  # bbox and segm columns
    assert "3 images; results written to" in out
    records = json.loads(results.read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r) for r in records)
    assert {r["category_id"] for r in records} <= {1, 3, 6, 9}  # the file's own category ids
    # --json: the same numbers as the checkpoint's own evaluation at the end of training
    assert main([*args, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    state = load_training_state(trained["checkpoint"])
    for key in ("bbox_mAP", "bbox_AR_100", "segm_mAP", "segm_mAP_50"):
        assert metrics[key] == pytest.approx(state["metrics"][f"val/{key}"], abs=1e-9)
    # converted to safetensors, the weights keep the detector's settings, classes and category ids
    weights = convert_to_safetensors(trained["checkpoint"], tmp_path / "det.safetensors")
    again = tmp_path / "again.json"
    assert main(["evaluate", "--config", str(trained["config"]), "--checkpoint", str(weights), "--data",
                 str(trained["coco"]), "--results", str(again), "--json"]) == 0
    converted = json.loads(capsys.readouterr().out)
    same = [k for k in metrics if k not in ("eval_seconds", "results_file")]
    assert [converted[k] for k in same] == [metrics[k] for k in same]
    assert json.loads(again.read_text()) == records
    # without --config, the training config our checkpoint records applies, and its conversion keeps it
    for checkpoint in (trained["checkpoint"], weights):
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--results", str(again), "--json"]) == 0
        recorded = json.loads(capsys.readouterr().out)
        assert [recorded[k] for k in same] == [metrics[k] for k in same], checkpoint
    # weights that describe a detector but not its config (written elsewhere): one line asking for it
    from crossformer.models import read_checkpoint, save_safetensors

    described = read_checkpoint(weights)
    bare = save_safetensors(described.pop("model"), tmp_path / "no_config.safetensors",
                            {k: v for k, v in described.items() if k != "config"})
    assert main(["evaluate", "--checkpoint", str(bare)]) == 2
    assert f"{bare} holds a detection model but not the config it was trained with: pass that config with " \
           "--config NAME_OR_FILE" in _error(capsys)


def test_evaluate_scores_the_detections_predict_gives(trained, tmp_path: Path, capsys) -> None:
    # record for record (file, class, box, score), at mmdet's test batch of 1: the demo's config
    # evaluated 8 at a time, padded to the batch's largest image, and 24 of its 95 held-out
    # images scored other detections than predict drew (this set's images are of one size)
    results = tmp_path / "results.json"
    assert main(["evaluate", "--config", str(trained["config"]), "--checkpoint", str(trained["checkpoint"]),
                 "--data", str(trained["coco"]), "--results", str(results), "test.eval_batch_size=1", "--json"]) == 0
    capsys.readouterr()
    files = {i["id"]: i["file_name"] for i in json.loads((trained["coco"] / "annotations" /
                                                            "instances_val2017.json").read_text())["images"]}

    def by_file(records, name_of) -> dict[str, list]:
        found: dict[str, list] = {}
        for r in records:
            found.setdefault(Path(name_of(r)).name, []).append((r["category_id"], [round(v, 2) for v in r["bbox"]],
                                                                 round(r["score"], 4)))
        return {k: sorted(v) for k, v in found.items()}

    val = trained["coco"] / "val2017"
    assert main(["predict", str(val), "--checkpoint", str(trained["checkpoint"]), "--output", str(tmp_path / "pred"),
                 "test.score_threshold=0"]) == 0
    predicted = json.loads((tmp_path / "pred" / "detections.json").read_text())
    evaluated = by_file(json.loads(results.read_text()), lambda r: files[r["image_id"]])
    assert evaluated and evaluated == by_file(predicted, lambda r: r["file_name"])


def test_predict_writes_a_png_per_image_and_one_json(trained, tmp_path: Path, capsys) -> None:
    val = trained["coco"] / "val2017"
    photo = tmp_path / "gray.png"  # grayscale, another size: converted and resized
    Image.new("L", (90, 70), 128).save(photo)
    out = tmp_path / "pred"
    # images and KEY=VALUE settings may stand anywhere among the flags
    assert main(["predict", str(val), "--config", str(trained["config"]), "test.score_threshold=0", "--checkpoint",
                 str(trained["checkpoint"]), str(photo), "--output", str(out), "run.device=cpu"]) == 0
    assert "wrote 4 image(s)" in capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 4 and "gray.png" in pngs
    assert Image.open(out / "gray.png").size == (90, 70)
    records = json.loads((out / "detections.json").read_text())
    assert {r["file_name"] for r in records} <= {str(p) for p in [*val.glob("*.jpg"), photo]}
    assert all(len(r["bbox"]) == 4 and "segmentation" in r for r in records)
    # each record names its class (the ids alone needed the training file to read)
    names = dict(zip((1, 3, 6, 9), ("circle", "rectangle", "triangle", "star")))
    assert records and all(r["category_name"] == names[r["category_id"]] for r in records)
    # without --config: the config the checkpoint was trained with, settings still on top
    again = tmp_path / "again"
    assert main(["predict", str(photo), "--checkpoint", str(trained["checkpoint"]), "test.score_threshold=0",
                 "--output", str(again)]) == 0
    assert "wrote 1 image(s)" in capsys.readouterr().out
    def without_id(rows: list[dict]) -> list[dict]:  # image ids number the images of one run
        return [{k: v for k, v in r.items() if k != "image_id"} for r in rows if r["file_name"] == str(photo)]

    assert without_id(json.loads((again / "detections.json").read_text())) == without_id(records)


def test_predict_says_each_image_as_it_is_drawn_and_an_error_keeps_their_records(trained, tmp_path: Path,
                                                                                 capsys) -> None:
    # Only a progress bar ran while the images were drawn, and an unreadable file that stopped
    # the command left the earlier images' PNGs written but detections.json never written.
    folder = tmp_path / "photos"
    shutil.copytree(trained["coco"] / "val2017", folder)
    (folder / "zz_empty.jpg").write_bytes(b"")
    out = tmp_path / "pred"
    argv = ["predict", str(folder), "--checkpoint", str(trained["checkpoint"]), "test.score_threshold=0.01",
            "--output", str(out), "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    said = [json.loads(line) for line in captured.out.splitlines()]
    readable = sorted(p.name for p in folder.glob("*.jpg") if p.stat().st_size)
    assert [Path(line["path"]).name for line in said] == readable
    assert captured.err.count("\n") == 1 and "zz_empty.jpg: the file is empty" in captured.err, captured.err
    records = json.loads((out / "detections.json").read_text())
    assert sorted(p.name for p in out.glob("*.png")) == [Path(name).stem + ".png" for name in readable]
    for line in said:
        assert Path(line["image"]).is_file()
        mine = [r for r in records if r["file_name"] == line["path"]]
        assert line["detections"] == len(mine)
        drawn = sorted((r for r in mine if r["score"] >= 0.01), key=lambda r: -r["score"])
        assert line["shown"] == [{k: r[k] for k in ("category_id", "category_name", "score", "bbox")} for r in drawn]
    assert any(line["shown"] for line in said)
    # a line per image without --json, the summary after them; skipped files on stderr
    argv = [a for a in argv if a != "--json"] + ["data.skip_corrupt=true"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == len(readable) + 1 and lines[-1].startswith(f"wrote {len(readable)} image(s)")
    for line, name in zip(lines, readable):
        assert line.startswith(f"{folder / name}: {out / (Path(name).stem + '.png')} (score >= 0.01, ")
        assert line.endswith(" in all)")
    assert "skipped unreadable image" in captured.err


def test_evaluate_refuses_a_file_mask_ap_cannot_use_before_running_the_images(trained, tmp_path: Path, capsys,
                                                                              monkeypatch) -> None:
    # A validation file with an object without "segmentation" for a Mask R-CNN was refused only
    # after the detector had run on every image (hours on COCO).
    import crossformer.detection.evaluate as evaluate

    val = json.loads((trained["coco"] / "annotations" / "instances_val2017.json").read_text())
    del val["annotations"][0]["segmentation"]
    partly = tmp_path / "partly.json"
    partly.write_text(json.dumps(val))
    for annotation in val["annotations"]:
        annotation.pop("segmentation", None)
    boxes_only = tmp_path / "boxes_only.json"
    boxes_only.write_text(json.dumps(val))
    images = f"data.val_images={trained['coco'] / 'val2017'}"
    run_images = evaluate.build_loader

    def refuse_images(*args, **kwargs):
        raise AssertionError("the images were run before the annotation file was checked")

    monkeypatch.setattr(evaluate, "build_loader", refuse_images)
    assert main(["evaluate", "--checkpoint", str(trained["checkpoint"]), f"data.val_ann={partly}", images,
                 "--results", str(tmp_path / "r.json")]) == 2
    assert f"{partly}: annotation {val['annotations'][0]['id']} of image" in _error(capsys)
    # none has one (box-only data): box AP alone, as mmdet's --eval bbox (it was refused, its hint a box detector)
    monkeypatch.setattr(evaluate, "build_loader", run_images)
    assert main(["evaluate", "--checkpoint", str(trained["checkpoint"]), f"data.val_ann={boxes_only}", images,
                 "--results", str(tmp_path / "r.json"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == f"warning: {boxes_only} has no object masks: box AP only\n"
    metrics = json.loads(out)
    assert "bbox_mAP" in metrics and not [key for key in metrics if key.startswith("segm_")]


def test_evaluate_reads_data_paths_under_the_home_folder_as_training_does(trained, tmp_path: Path, capsys,
                                                                          monkeypatch) -> None:
    # No shell expands ~ in data.val_ann=~/...: training read it as the home folder, evaluate
    # said "image folder not found: ~/coco/val2017".
    monkeypatch.setenv("HOME", str(trained["root"]))
    assert main(["evaluate", "--checkpoint", str(trained["checkpoint"]), "--json", "--results", str(tmp_path / "r.json"),
                 "data.val_ann=~/coco/annotations/instances_val2017.json", "data.val_images=~/coco/val2017/"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3
    # the outputs too: "--output=~/p" (no shell expands it after "=") made a folder named "~" here
    image = next((trained["coco"] / "val2017").glob("*.jpg"))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", f"~/coco/val2017/{image.name}", "--checkpoint", str(trained["checkpoint"]),
                 "--output=~/predicted"]) == 0
    assert (trained["root"] / "predicted" / "detections.json").is_file() and not Path("~").exists()


def test_evaluate_on_other_categories_names_the_first_that_differs(trained, tmp_path: Path, capsys) -> None:
    # "has 5 categories; ... detects 4 classes" named none of them, and a renamed category past
    # the fifth showed two equal lists of the first five names.
    val = json.loads((trained["coco"] / "annotations" / "instances_val2017.json").read_text())
    evaluate = ["evaluate", "--checkpoint", str(trained["checkpoint"]), f"data.val_images={trained['coco'] / 'val2017'}"]
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({**val, "categories": [*val["categories"], {"id": 50, "name": "hexagon"}]}))
    assert main([*evaluate, f"data.val_ann={extra}"]) == 2
    assert _error(capsys).endswith(f"{extra} has 5 categories; {trained['checkpoint']} detects 4 classes (label 4 is "
                                   f"'hexagon' in the file, none in the checkpoint): evaluate on the categories it was "
                                   f"trained on")
    renamed = tmp_path / "renamed.json"
    categories = [{**c, "name": "étoile ★"} if c["name"] == "star" else c for c in val["categories"]]
    renamed.write_text(json.dumps({**val, "categories": categories}))
    assert main([*evaluate, f"data.val_ann={renamed}"]) == 2
    assert "(label 3 is 'étoile ★' in the file, 'star' in the checkpoint)" in _error(capsys)
    # the same categories numbered otherwise (circle 1 <-> star 9): matched by name, the same AP,
    # each result under the file's own id (it was refused as other categories)
    swap = {1: 9, 9: 1}
    renumbered = tmp_path / "renumbered.json"
    renumbered.write_text(json.dumps({
        **val, "categories": [{**c, "id": swap.get(c["id"], c["id"])} for c in val["categories"]],
        "annotations": [{**a, "category_id": swap.get(a["category_id"], a["category_id"])} for a in val["annotations"]]}))
    runs = {}
    for name, ann in (("original", trained["coco"] / "annotations" / "instances_val2017.json"), ("renumbered", renumbered)):
        # (the results went to renumbered.json, over the annotation file read: refused now)
        assert main([*evaluate, f"data.val_ann={ann}", "--json", "--results", str(tmp_path / f"{name}.results.json")]) == 0
        runs[name] = json.loads(capsys.readouterr().out)
        runs[name]["records"] = json.loads((tmp_path / f"{name}.results.json").read_text())
    assert runs["renumbered"]["bbox_mAP"] == runs["original"]["bbox_mAP"]
    assert [swap.get(r["category_id"], r["category_id"]) for r in runs["renumbered"]["records"]] == \
        [r["category_id"] for r in runs["original"]["records"]]


def test_data_root_on_the_command_line_replaces_a_configs_explicit_files(trained, tmp_path: Path, capsys) -> None:
    # The file's data.val_ann / data.val_images won over --data ROOT given on top of it (as over a
    # checkpoint's recorded config trained on explicit files): evaluate ran on the other set.
    import yaml

    val = json.loads((trained["coco"] / "annotations" / "instances_val2017.json").read_text())
    one = tmp_path / "one.json"
    one.write_text(json.dumps({**val, "images": val["images"][:1],
                               "annotations": [a for a in val["annotations"] if a["image_id"] == val["images"][0]["id"]]}))
    settings = tiny_settings("mask_rcnn", trained["coco"], tmp_path / "run")
    settings["data"] = {**settings["data"], "root": None, "val_ann": str(one), "val_images": str(trained["coco"] / "val2017")}
    config = tmp_path / "explicit.yaml"
    config.write_text(yaml.safe_dump(settings))
    evaluate = ["evaluate", "--config", str(config), "--checkpoint", str(trained["checkpoint"]), "--json",
                "--results", str(tmp_path / "r.json")]
    assert main(evaluate) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
    assert main([*evaluate, "--data", str(trained["coco"])]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3
    # both in one layer: the explicit file refines the root, as before
    assert main([*evaluate, "--data", str(trained["coco"]), f"data.val_ann={one}"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1


def test_evaluate_on_a_file_without_objects_says_so(trained, tmp_path: Path, capsys) -> None:
    # It printed a table of -1 (COCOeval's "nothing to find") for every number, without a word.
    val = json.loads((trained["coco"] / "annotations" / "instances_val2017.json").read_text())
    crowds = tmp_path / "crowds.json"
    crowds.write_text(json.dumps({**val, "annotations": [{**a, "iscrowd": 1} for a in val["annotations"]]}))
    assert main(["evaluate", "--checkpoint", str(trained["checkpoint"]), f"data.val_ann={crowds}",
                 f"data.val_images={trained['coco'] / 'val2017'}", "--results", str(tmp_path / "r.json")]) == 2
    assert _error(capsys).endswith(f"{crowds} has no object to evaluate on (crowd regions and boxes with no area are not "
                                   f"counted): its AP would be -1; give a file with annotated objects")


def _cut_validation_image(coco: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``coco`` and its first validation image, cut in half: the header reads (training's
    check of the validation images passes it), the pixels do not."""
    broken = tmp_path / "cut"
    shutil.copytree(coco, broken)
    bad = sorted((broken / "val2017").glob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    assert not find_unreadable([str(bad)])
    return broken, bad


def test_a_validation_image_that_does_not_decode_is_counted_as_the_data_check_counts_one(trained, tmp_path: Path,
                                                                                        capsys) -> None:
    # --skip-corrupt: each evaluation left it out without a word, and the done line did not count it
    broken, bad = _cut_validation_image(trained["coco"], tmp_path)
    argv = ["train", "--config", str(trained["config"]), "--data", str(broken), "--epochs", "2"]
    line = one_error_line(capsys, [*argv, "--output", str(tmp_path / "stopped")])
    assert f"cannot read image {bad}: image file is truncated" in line and "--skip-corrupt" in line
    assert main([*argv, "--output", str(tmp_path / "run"), "--skip-corrupt"]) == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count(f"skipping unreadable image {bad}: image file is truncated") == 1, log  # 2 evaluations, once a run
    assert ", 1 unreadable validation file left out of evaluation (checkpoints in" in log.splitlines()[-1], log


def test_evaluate_names_an_image_that_does_not_decode_on_stderr(trained, tmp_path: Path, capsys) -> None:
    # --skip-corrupt --json named it nowhere (its names went to the log lines --json turns off)
    broken, bad = _cut_validation_image(trained["coco"], tmp_path)
    argv = ["evaluate", "--config", str(trained["config"]), "--checkpoint", str(trained["checkpoint"]),
            "--data", str(broken), "--results", str(tmp_path / "r.json")]
    line = one_error_line(capsys, argv)
    assert f"cannot read image {bad}: image file is truncated" in line and "--skip-corrupt" in line
    assert main([*argv, "--skip-corrupt", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped"] == 1
    assert captured.err.startswith(f"skipping unreadable image {bad}: image file is truncated"), captured.err
    assert captured.err.count("\n") == 1, captured.err  # named once, and nothing else said


def test_a_checkpoint_whose_pretrained_backbone_file_is_gone_still_serves(trained, tmp_path: Path, capsys) -> None:
    # a detector trained from an ImageNet backbone records that file's path; inference needs none of it
    state = torch.load(trained["checkpoint"], weights_only=True)
    state["config"]["model"]["pretrained"] = str(tmp_path / "gone.pth")
    moved = tmp_path / "moved.pth"
    torch.save(state, moved)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (80, 64), (90, 140, 200)).save(photo)
    assert main(["predict", str(photo), "--checkpoint", str(moved), "--output", str(tmp_path / "pred")]) == 0
    assert main(["evaluate", "--checkpoint", str(moved), "--data", str(trained["coco"]), "--json"]) == 0
    assert main(["export", "--checkpoint", str(moved), "--format", "safetensors", "-o", str(tmp_path / "w.safetensors")]) == 0
    capsys.readouterr()


def test_predict_runs_under_amp_as_evaluate_does(trained, tmp_path: Path, capsys) -> None:
    photo = tmp_path / "photo.png"
    Image.new("RGB", (90, 70), (120, 60, 30)).save(photo)
    runs = {}
    for amp in ("none", "bf16"):
        out = tmp_path / amp
        assert main(["predict", str(photo), "--checkpoint", str(trained["checkpoint"]), "--amp", amp,
                     "test.score_threshold=0", "--output", str(out)]) == 0, _error(capsys)
        runs[amp] = json.loads((out / "detections.json").read_text())
        assert (out / "photo.png").is_file()
    assert runs["bf16"] and all(len(r["bbox"]) == 4 and all(map(math.isfinite, r["bbox"])) for r in runs["bf16"])
    best = {amp: max(rows, key=lambda r: r["score"]) for amp, rows in runs.items()}
    assert best["bf16"]["score"] == pytest.approx(best["none"]["score"], abs=0.05)  # bf16 rounding, same model


def test_a_backbone_checkpoint_is_refused_where_a_detector_is_needed(trained, tmp_path: Path, capsys) -> None:
    # An ImageNet checkpoint of the same backbone fills the backbone alone (as load_checkpoint does for
    # training); evaluate / predict then ran with random heads and reported their detections as results.
    import timm

    from crossformer.detection.checkpoint import load_detector

    config = resolve_config(str(trained["config"])).config
    backbone = timm.create_model(config.model.backbone, num_classes=10, **config.model.backbone_kwargs)
    classifier = tmp_path / "imagenet.pth"
    torch.save({"model": backbone.state_dict()}, classifier)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (70, 60), 128).save(photo)
    assert main(["predict", str(photo), "--config", str(trained["config"]), "--checkpoint", str(classifier),
                 "--output", str(tmp_path / "p"), "model.num_classes=4"]) == 2
    assert f"{classifier} holds no detection heads (an ImageNet or backbone checkpoint): pass it to " \
           "`crossformer train --pretrained`" in _error(capsys)
    assert not (tmp_path / "p").exists()
    assert load_detector(config, trained["checkpoint"], torch.device("cpu")).detector.num_classes == 4


def test_ema_of_a_checkpoint_without_it_names_the_file(trained, capsys) -> None:
    checkpoint = str(trained["checkpoint"])
    line = one_error_line(capsys, ["evaluate", "--checkpoint", checkpoint, "--ema", "--data", str(trained["coco"])])
    assert f"{checkpoint} holds no EMA weights (no 'model_ema' entry" in line  # was "checkpoint holds ..."


def test_an_output_path_under_a_file_is_one_line_before_any_work(trained, tmp_path: Path, capsys) -> None:
    # FileExistsError from mkdir: a traceback, for evaluate only after the whole evaluation
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    checkpoint, photo = str(trained["checkpoint"]), str(trained["coco"] / "val2017")
    line = one_error_line(capsys, ["predict", photo, "--checkpoint", checkpoint, "--output", str(a_file)])
    assert line.endswith(f"cannot write {a_file}: {a_file} is a file, not a folder")
    line = one_error_line(capsys, ["evaluate", "--checkpoint", checkpoint, "--results", str(a_file / "r.json")])
    assert line.endswith(f"cannot write {a_file / 'r.json'}: {a_file} is a file, not a folder")


def test_an_authors_coco_file_predicts_cocos_category_ids(trained, tmp_path: Path, capsys) -> None:
    # mmdet files name their classes but not their ids: predict wrote 1..80, while 69 of COCO's 80
    # categories have other ids (stop sign 13, ..., toothbrush 90).
    from crossformer.detection.classes import COCO_CATEGORY_IDS, COCO_CLASSES
    from crossformer.detection.checkpoint import load_detector

    config = resolve_config(str(trained["config"])).config
    detector = build_configured_detector(config.model, 80, pretrained=False)
    state = {k.replace("backbone.model.", "backbone."): v for k, v in detector.state_dict().items()}
    mmdet = tmp_path / "mmdet_coco.pth"
    torch.save({"state_dict": state, "meta": {"CLASSES": COCO_CLASSES, "mmdet_version": "2.26.0"}}, mmdet)
    loaded = load_detector(config, mmdet, torch.device("cpu"))
    assert loaded.class_names == list(COCO_CLASSES) and loaded.cat_ids == list(COCO_CATEGORY_IDS)
    ids = dict(zip(loaded.class_names, loaded.cat_ids))
    assert (ids["stop sign"], ids["dining table"], ids["toothbrush"]) == (13, 67, 90)
    # without --config: the file records no task, and its heads are not a classifier's
    line = one_error_line(capsys, ["evaluate", "--checkpoint", str(mmdet), "--data", str(trained["coco"])])
    assert line.endswith(f"{mmdet} holds a detection model (its heads' weights say so): pass its detection config "
                         "with --config NAME_OR_FILE")  # was: "fits no registered variant: pass --model NAME"
    # another class list keeps no ids (1..C in predict's records)
    torch.save({"state_dict": state, "meta": {"CLASSES": [f"c{i}" for i in range(80)]}}, mmdet)
    assert load_detector(config, mmdet, torch.device("cpu")).cat_ids is None


def test_a_checkpoint_of_another_task_than_the_config_is_named_as_such(trained, tmp_path: Path, capsys) -> None:
    # The task's own loader used to read it and blame missing heads ("a backbone-only file cannot
    # classify", "holds no decode_head.conv_seg weights").
    from segmentation_fixtures import write_config

    checkpoint = str(trained["checkpoint"])
    segmentation = write_config(tmp_path / "seg.yaml")
    for config, task in (("digits", "classification"), (str(segmentation), "segmentation")):
        for verb in (["evaluate"], ["predict", str(tmp_path / "x.png")]):
            line = one_error_line(capsys, [*verb, "--config", config, "--checkpoint", checkpoint])
            assert line.endswith(f"{checkpoint} holds a detection model, but {config} is a {task} config: pass a {task} "
                                 "checkpoint, or leave out --config (our checkpoints record the config they were trained with)")


@pytest.mark.slow
def test_flops_json_counts_the_assembled_detector(capsys) -> None:
    assert main(["flops", "--config", "retinanet_crossformer_small_1x", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["img_size"] == [800, 1280] and result["detector"] == "retinanet"
    assert result["backbone_kwargs"] == {"group_size": 7, "interval": [8, 4, 2, 1]}  # as the text shows them
    with torch.device("meta"):
        detector = build_configured_detector(resolve_config("retinanet_crossformer_small_1x").config.model, 80, False)
    assert result["params"] == count_params(detector)
    assert 0.89 * 282e9 <= result["macs"] <= 1.11 * 282e9  # the authors' 282G
    assert main(["flops", "--config", "retinanet_crossformer_small_1x", "--img-size", "640", "640", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] < result["macs"]
    for size in (["100", "640"], ["640", "100"]):
        assert main(["flops", "--config", "retinanet_crossformer_small_1x", "--img-size", *size]) == 2
        assert "multiples of 32" in _error(capsys)


@pytest.mark.parametrize("argv", [["flops"], ["benchmark", "--device", "cpu"]], ids=["flops", "benchmark"])
def test_flops_and_benchmark_take_the_sizes_as_every_command_does(argv: list[str], monkeypatch, capsys) -> None:
    # their own copy of the size check hard-coded 32; the model's smallest input is what counts
    import crossformer.pixels as pixels

    monkeypatch.setattr(pixels, "MIN_INPUT_SIZE", 64)
    line = one_error_line(capsys, [*argv, "--config", "mask_rcnn_shapes_demo", "model.num_classes=4", "--img-size", "32"])
    assert line.endswith("error: --img-size must be at least 64, got 32x32"), line
    line = one_error_line(capsys, [*argv, "--config", "mask_rcnn_shapes_demo", "--img-size", "64", "64", "64"])
    assert line.endswith("error: --img-size takes N or H W, got 64 64 64"), line


@pytest.mark.parametrize("verb", ["train", "evaluate", "predict"])
def test_the_detector_is_kind_as_the_segmentor_is(verb: str) -> None:
    """Detection's detector flag was --model, where every other command's --model is a
    classification model's name and segmentation's segmentor flag is --kind."""
    from crossformer.cli import parse_command_line

    for config, kind in (("mask_rcnn_shapes_demo", "retinanet"), ("upernet_demo", "fpn")):
        needed = {"train": [], "evaluate": ["--checkpoint", "x.pth"], "predict": ["--checkpoint", "x.pth", "a.jpg"]}[verb]
        args = parse_command_line([verb, "--config", config, "--kind", kind, "--backbone", "crossformer_base",
                                   *needed])
        assert getattr(args, "config:model.kind") == kind
        assert getattr(args, "config:model.backbone") == "crossformer_base"


@pytest.mark.parametrize("config, task", [("mask_rcnn_shapes_demo", "detection"), ("upernet_demo", "segmentation")])
@pytest.mark.parametrize("verb", ["train", "evaluate"])
def test_model_in_a_dense_config_says_which_flags_set_its_model(capsys, config: str, task: str, verb: str) -> None:
    line = one_error_line(capsys, [verb, "--config", config, "--model", "retinanet"])
    assert line.endswith(f"--model names a classification model, but {config} is a {task} config: its model is set "
                         f"by --kind and --backbone (see --help)"), line


def test_flops_and_benchmark_take_settings_with_their_config(capsys) -> None:
    # a KEY=VALUE setting changes the config named, before or after the flags
    assert main(["flops", "model.backbone=crossformer_tiny", "--config", "retinanet_crossformer_small_1x", "--json"]) == 0
    tiny = json.loads(capsys.readouterr().out)
    assert tiny["backbone"] == "crossformer_tiny"
    with torch.device("meta"):
        config = resolve_config("retinanet_crossformer_small_1x", {"model.backbone": "crossformer_tiny"}).config
        assert tiny["params"] == count_params(build_configured_detector(config.model, 80, False))
    assert main(["flops", "--config", "retinanet_crossformer_small_1x", "--json", "model.bogus=1"]) == 2
    assert "unknown setting 'model.bogus'" in _error(capsys)
    # without a config there is nothing for a setting to change
    for verb in ("flops", "benchmark"):
        assert main([verb, "--model", "crossformer_tiny", "model.backbone=crossformer_base"]) == 2
        assert "KEY=VALUE settings change a config: name one with --config" in _error(capsys)


def test_benchmark_times_the_detector(trained, capsys) -> None:
    args = ["benchmark", "--config", str(trained["config"]), "--img-size", "64", "96", "--rounds", "1", "--warmup", "0",
            "--no-memory", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["infer_images_per_s"] > 0 and summary["config"]["img_size"] == [64, 96]
    assert main([*args[:-1], "--compare", "swin_tiny_patch4_window7_224"]) == 2
    assert "maskrcnn_resnet50_fpn only" in _error(capsys)


def test_the_torchvision_peer_runs_at_the_benchmark_size(trained, capsys, monkeypatch) -> None:
    # its transform resized every input to a shorter side of 800: "input 64x96" compared ours at
    # 64x96 with torchvision at 800x1200
    from crossformer.detection.bench import TorchvisionImages

    seen = []
    real = TorchvisionImages.forward

    def recorded(self, images):
        seen.append(self.detector.transform(list(images))[0].image_sizes)
        return real(self, images)

    monkeypatch.setattr(TorchvisionImages, "forward", recorded)
    assert main(["benchmark", "--config", str(trained["config"]), "--img-size", "64", "96", "--rounds", "1",
                 "--warmup", "0", "--no-memory", "--json", "--compare"]) == 0
    assert json.loads(capsys.readouterr().out)["compare"] == "maskrcnn_resnet50_fpn"
    assert seen and all(sizes == [(64, 96)] for sizes in seen)


@pytest.mark.slow
def test_bad_input_gets_one_line_errors(trained, tmp_path: Path, capsys) -> None:
    config, checkpoint = str(trained["config"]), str(trained["checkpoint"])
    predict = ["predict", "--config", config, "--checkpoint", checkpoint, "--output", str(tmp_path / "p")]
    assert main([*predict[:1], str(tmp_path / "missing.jpg"), *predict[1:]]) == 2
    assert "no such image or folder" in _error(capsys)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture")
    assert main([*predict[:1], str(broken), *predict[1:]]) == 2
    err = _error(capsys)
    assert "cannot read image" in err and "--skip-corrupt" in err

    not_coco = tmp_path / "list.json"
    not_coco.write_text(json.dumps([1, 2, 3]))
    evaluate = ["evaluate", "--config", config, "--checkpoint", checkpoint]
    assert main([*evaluate, f"data.val_ann={not_coco}", f"data.val_images={trained['coco'] / 'val2017'}"]) == 2
    assert "is not a COCO instances file" in _error(capsys)

    retina = write_tiny_config(tmp_path / "retina.yaml", "retinanet", trained["coco"], tmp_path / "r")
    assert main(["evaluate", "--config", str(retina), "--checkpoint", checkpoint, "--data", str(trained["coco"])]) == 2
    assert "holds a mask_rcnn on crossformer_tiny, but the config describes a retinanet" in _error(capsys)
    assert main([*evaluate, "--data", str(trained["coco"]), "model.num_classes=5"]) == 2
    assert "is a detector of 4 classes but the config says model.num_classes=5" in _error(capsys)
    # an mmdet-style file (no recorded classes) of another class count: the loader's list, on one line
    state = load_training_state(checkpoint)
    mmdet = {"state_dict": state["model"], "meta": {"CLASSES": ["a", "b", "c", "d", "e"]}}
    torch.save(mmdet, tmp_path / "mmdet.pth")
    assert main([*evaluate[:3], "--checkpoint", str(tmp_path / "mmdet.pth"), "--data", str(trained["coco"])]) == 2
    assert "does not fit this mask_rcnn" in _error(capsys)
    assert main([*evaluate[:3], "--checkpoint", str(tmp_path / "nothing.pth"), "--data", str(trained["coco"])]) == 2
    assert "checkpoint not found" in _error(capsys)


@pytest.mark.slow
def test_an_unreadable_image_in_one_ranks_share_stops_torchrun_with_one_line(trained, tmp_path: Path) -> None:
    # Rank 1 raised alone; rank 0 waited in the gather of results until gloo's connection broke,
    # and the job ended with rank 0's traceback and no word of the file (rank 1 does not print).
    broken = tmp_path / "broken"
    shutil.copytree(trained["coco"], broken)
    val = CocoDetection(*coco_paths(broken, "val"))
    bad = val.image_dir / val.records[1].file_name  # the second image: rank 1's share
    bad.write_bytes(b"not a picture")
    line = one_torchrun_error_line(["evaluate", "--config", str(trained["config"]), "--checkpoint",
                                    str(trained["checkpoint"]), "--data", str(broken), "--results", str(tmp_path / "r.json")])
    assert f"cannot read image {bad}" in line and "--skip-corrupt" in line


@pytest.mark.slow
def test_exported_mask_rcnn_finds_what_predict_finds(trained, tmp_path: Path, capsys) -> None:
    """The ONNX file's detections (onnxruntime) equal the graph's in PyTorch, which equal
    what predict computes in the resized image's frame."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from crossformer.detection.export import DetectionGraph

    path = tmp_path / "tiny.onnx"
    assert main(["export", "--checkpoint", str(trained["checkpoint"]), "--format", "onnx", "--img-size", "128", "160",
                 "-o", str(path)]) == 2
    assert "use --img-size 225 225 or larger (the graph then serves every size from there up), or --static" in (
        capsys.readouterr().err)
    assert main(["export", "--checkpoint", str(trained["checkpoint"]), "--format", "onnx", "--img-size", "128", "160",
                 "--static", "-o", str(tmp_path / "static.onnx")]) == 0
    assert "valid input sizes: height 128..128, width 160..160" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(trained["checkpoint"]), "--format", "onnx", "--img-size", "256", "320",
                 "-o", str(path)]) == 0  # our checkpoint brings its config; the export checks itself
    out = capsys.readouterr().out
    assert "valid input sizes: height >= 225, width >= 225" in out and "detections compared on random images" in out
    from crossformer.detection.checkpoint import load_detector
    from crossformer.engine.registry import resolve_config
    from crossformer.models import peek_checkpoint

    config = resolve_config(peek_checkpoint(trained["checkpoint"])["config"]).config
    detector = load_detector(config, trained["checkpoint"], torch.device("cpu")).detector
    graph = DetectionGraph(detector).eval()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    found = 0
    for size in ((256, 320), (240, 400)):  # the example's scale and another shape in the range
        for batch, image in resized_images(trained["coco"], size):
            with torch.no_grad():
                expected = graph(image)
                predicted = detector(batch.images, batch.metas)[0]  # what predict computes
            w_scale, h_scale = batch.metas[0]["scale_factor"]
            assert torch.allclose(expected[0] / torch.tensor([w_scale, h_scale, w_scale, h_scale]), predicted["boxes"],
                                  atol=1e-4)
            assert torch.equal(expected[1], predicted["scores"]) and torch.equal(expected[2], predicted["labels"])
            agree(session.run(None, {"images": image.numpy()}), expected)
            found += expected[0].shape[0]
    assert found > 20  # the comparison compared detections
    # graph_input prepares a picture as the loader does (docs/export.md's example)
    from crossformer.data import read_rgb
    from crossformer.detection.export import graph_input

    batch, image = next(resized_images(trained["coco"], (256, 320)))
    picture = read_rgb(coco_paths(trained["coco"], "val")[1] / batch.metas[0]["file_name"])
    images, factors = graph_input(picture, max_size=320, min_size=256)
    assert torch.equal(images, image) and factors == tuple(batch.metas[0]["scale_factor"])


def test_export_safetensors_keeps_the_detector_and_its_config(trained, tmp_path: Path) -> None:
    from crossformer.detection.checkpoint import load_detector
    from crossformer.models import peek_checkpoint

    weights = tmp_path / "tiny.safetensors"
    assert main(["export", "--checkpoint", str(trained["checkpoint"]), "--format", "safetensors", "-o", str(weights)]) == 0
    recorded = peek_checkpoint(weights)
    assert recorded["detector"] == "mask_rcnn" and recorded["class_names"] == ["circle", "rectangle", "triangle", "star"]
    config = resolve_config(recorded["config"]).config
    a = load_detector(config, trained["checkpoint"], torch.device("cpu")).detector.state_dict()
    b = load_detector(config, weights, torch.device("cpu")).detector.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flops_counts_a_coco_configs_classes_from_its_training_file(tmp_path: Path, monkeypatch, capsys) -> None:
    # model.num_classes: null was counted from the validation file (a fraction of the training
    # file to read), which may list some of the training file's categories only: the heads have
    # the training file's count. The validation file's stands in where no training file is here.
    import crossformer.detection.data as detection_data
    from detection_fixtures import make_small_coco

    coco = make_small_coco(tmp_path / "coco", images=2)
    read: list[str] = []
    load = detection_data.load_coco_json
    monkeypatch.setattr(detection_data, "load_coco_json", lambda path: read.append(Path(path).name) or load(path))

    def flops(*settings: str) -> int:
        read.clear()
        assert main(["flops", "--json", "--img-size", "64", "64", "--config", "mask_rcnn_shapes_demo", *settings]) == 0
        return json.loads(capsys.readouterr().out)["num_classes"]

    assert (flops(f"data.root={coco}"), read) == (4, ["instances_train2017.json"])
    val_only = (f"data.val_ann={coco}/annotations/instances_val2017.json", f"data.val_images={coco}/val2017")
    gone = (f"data.train_ann={tmp_path}/gone.json", f"data.train_images={coco}/train2017")
    assert (flops(*gone, *val_only), read) == (4, ["gone.json", "instances_val2017.json"])


def test_flops_and_benchmark_of_a_dense_config_count_the_heads_for_the_datas_classes(tmp_path: Path, capsys) -> None:
    # model.num_classes: null (the data's count) was counted as COCO's 80 / ADE20K's 150 without a
    # word: the params and MACs of another model than training builds. Now the data's count where
    # it is known without opening an image, else the assumed one, said on stderr.
    from detection_fixtures import make_small_coco
    from segmentation_fixtures import make_tiny_ade

    coco, ade = make_small_coco(tmp_path / "coco", images=2), make_tiny_ade(tmp_path / "ade", images=2)
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")

    def flops(*argv: str) -> tuple[int, str]:
        assert main(["flops", "--json", "--img-size", "64", "64", *argv]) == 0
        captured = capsys.readouterr()
        return json.loads(captured.out)["num_classes"], captured.err

    assert flops("--config", "mask_rcnn_shapes_demo", f"data.root={coco}") == (4, "")
    assert flops("--config", "mask_rcnn_shapes_demo", f"data.train_ann={coco}/annotations/instances_train2017.json",
                 f"data.train_images={coco}/train2017") == (4, "")
    assert flops("--config", "upernet_demo", f"data.root={ade}") == (7, "")  # its classes.txt
    assert flops("--config", "upernet_demo", f"data.classes={tmp_path / 'classes.txt'}", "data.val_images=v",
                 "data.val_labels=l") == (3, "")
    assert flops("--config", "upernet_demo", "model.num_classes=5", f"data.root={ade}") == (5, "")  # the setting wins
    for config, assumed, whose in (("mask_rcnn_shapes_demo", 80, "COCO's"), ("upernet_demo", 150, "ADE20K's")):
        count, said = flops("--config", config)  # names no data
        assert count == assumed and said.strip() == (
            f"crossformer flops: model.num_classes is null (the data's class count) and the config names no data "
            f"found on this machine, so the heads are counted for {assumed} classes ({whose}); pass model.num_classes=N")
        assert flops("--config", config, f"data.root={tmp_path / 'elsewhere'}") == (assumed, said)
    assert main(["benchmark", "--config", "mask_rcnn_shapes_demo", "--img-size", "64", "64", "--rounds", "1",
                 "--warmup", "0", "--steps", "1", "--no-memory", "--json"]) == 0
    assert "crossformer benchmark: model.num_classes is null" in capsys.readouterr().err
