"""The segmentation command line on a tiny config: train, evaluate (table, JSON, multi-scale +
flip, slide), predict, flops, benchmark, make-data, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossformer.cli import main
from crossformer.data import find_unreadable
from crossformer.engine import load_training_state
from cli_errors import one_torchrun_error_line
from detection_train_fixtures import make_tiny_coco
from segmentation_fixtures import TINY_BACKBONE, make_tiny_ade, write_config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny UPerNet trained for 2 iterations on a tiny synthetic set."""
    root = tmp_path_factory.mktemp("segcli")
    ade = make_tiny_ade(root / "data")
    config = write_config(root / "tiny.yaml")
    assert main(["train", "--config", str(config), "--data", str(ade), "--output", str(root / "run")]) == 0
    return {"root": root, "data": ade, "config": config, "checkpoint": root / "run" / "last.pth"}


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str], *expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(text in err for text in expected), err


def test_evaluate_prints_the_table_and_writes_json(run: dict[str, Path], capsys) -> None:
    state = load_training_state(run["checkpoint"])
    capsys.readouterr()
    base = ["evaluate", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]), "--data", str(run["data"])]
    assert main([*base, "--output", str(run["root"] / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["Class", "IoU", "Acc"] and "mIoU" in out and "(whole, single scale)" in out
    result = json.loads((run["root"] / "eval.json").read_text())
    assert sorted(result["per_class"]) == sorted(["sky", "grass", "wall", "water", "building", "person", "car"])
    assert result["images"] == 2 and result["mIoU"] == pytest.approx(state["metrics"]["val/mIoU"], abs=1e-12)

    assert main([*base, "test.flip=true", "--multi-scale", "--json", "run.device=cpu"]) == 0  # settings among the flags
    flipped = json.loads(capsys.readouterr().out)
    assert flipped["settings"]["ratios"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and flipped["settings"]["flip"] is True
    assert main([*base, "--mode", "slide", "--slide-crop", "32", "32", "--slide-stride", "16", "16", "--json"]) == 0
    slide = json.loads(capsys.readouterr().out)
    assert slide["settings"]["mode"] == "slide" and slide["settings"]["crop_size"] == [32, 32]
    for other in (flipped, slide):  # other inference, other numbers, same images
        assert other["images"] == 2 and 0 <= other["mIoU"] <= 1 and other["mIoU"] != result["mIoU"]


def test_evaluate_output_on_a_full_disk_keeps_the_previous_file(run: dict[str, Path], tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    from test_robust_outputs import PREVIOUS, _disk_full

    target = tmp_path / "eval.json"
    target.write_bytes(PREVIOUS)
    _disk_full(monkeypatch)
    assert main(["evaluate", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]), "--data",
                 str(run["data"]), "--output", str(target)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the warning of the classes no label map holds
    assert last.endswith(f"cannot write {target}: no space left on the device; the previous file was kept"), last
    assert target.read_bytes() == PREVIOUS and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_evaluate_warns_of_the_classes_no_label_map_holds_and_marks_them(run: dict[str, Path], capsys) -> None:
    # Training warned that no validation label map holds 'grass' or 'building'; evaluate printed
    # their rows (IoU 0.00 where predicted, else nan; Acc nan) without a word.
    capsys.readouterr()
    assert main(["evaluate", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]), "--data",
                 str(run["data"])]) == 0
    out, err = capsys.readouterr()
    labels = run["data"] / "ADEChallengeData2016" / "annotations" / "validation"
    assert err.startswith(f"warning: no label map in {labels} holds classes 'grass' (value 2), 'building' (value 5): "
                          "Acc reads nan, and IoU 0 where the model predicts the class")
    assert err.strip() in (run["root"] / "run" / "log.txt").read_text()  # training's check said the same
    assert [row.split()[0] for row in out.splitlines() if row.endswith("  *")] == ["grass", "building"]
    assert "\n* in no label map: Acc reads nan" in out


def test_safetensors_weights_evaluate_as_the_checkpoint(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    """Converted, the file keeps the segmentor's settings and classes; bare weights (no
    description, a config without num_classes) take their class count from the decode head."""
    from safetensors.torch import save_file

    from crossformer.models import convert_to_safetensors

    state = load_training_state(run["checkpoint"])
    converted = convert_to_safetensors(run["checkpoint"], tmp_path / "seg.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in state["model"].items()}, str(bare))
    capsys.readouterr()
    for path in (converted, bare):
        assert main(["evaluate", "--config", str(run["config"]), "--checkpoint", str(path), "--data", str(run["data"]),
                     "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["mIoU"] == pytest.approx(state["metrics"]["val/mIoU"], abs=1e-12), path
    # without --config, our checkpoint's own training config applies (--data still wins), also converted
    for path in (run["checkpoint"], converted):
        assert main(["evaluate", "--checkpoint", str(path), "--data", str(run["data"]), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(state["metrics"]["val/mIoU"], abs=1e-12)
    # the converted file names its classes; the bare one does not
    named = {"sky", "grass", "wall", "water", "building", "person", "car"}
    for path, names in ((converted, named), (bare, {f"class {i}" for i in range(7)})):
        assert main(["predict", str(run["data"] / "ADEChallengeData2016" / "images" / "validation"), "--config",
                     str(run["config"]), "--checkpoint", str(path), "--output", str(tmp_path / "pred"), "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(lines) == 2 and all(line["classes"] and set(line["classes"]) <= names for line in lines), lines


def test_export_without_output_names_the_file_after_the_segmentor(run: dict[str, Path], tmp_path: Path, capsys,
                                                                   monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", str(run["checkpoint"]), "--format", "safetensors"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["upernet_crossformer_small.safetensors"]


def test_export_writes_the_segmentor_for_many_sizes(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    """ONNX (symbolic sizes) and TorchScript (one size) from normalised images to full-size
    logits, checked against PyTorch; the config comes from the checkpoint when not given."""
    import onnx
    import onnxruntime as ort

    from crossformer.segmentation.checkpoint import load_segmentor
    from crossformer.engine.registry import resolve_config

    onnx_file = tmp_path / "seg.onnx"
    assert main(["export", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]), "--format", "onnx",
                 "--img-size", "64", "96", "-o", str(onnx_file)]) == 0
    out = capsys.readouterr().out
    assert "valid input sizes: height >= 64, width >= 64" in out and "max |onnxruntime - pytorch| (relative to outputs above 1): " in out
    meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(meta["crossformer.classes"]) == ["sky", "grass", "wall", "water", "building", "person", "car"]
    segmentor, _ = load_segmentor(resolve_config(str(run["config"])).config, run["checkpoint"])
    session = ort.InferenceSession(str(onnx_file))
    for size in ((64, 96), (131, 70)):  # the example's size and another; UPerNet's pooling bins follow
        images = torch.randn(3, 3, *size)
        [logits] = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            expected = segmentor.eval().predict_logits(images, size)
        assert logits.shape == (3, 7, *size) and np.abs(logits - expected.numpy()).max() < 1e-4
    # --static: one size, any batch (a size test on the traced maps made torch.export fail)
    static = tmp_path / "static.onnx"
    assert main(["export", "--checkpoint", str(run["checkpoint"]), "--format", "onnx", "--static", "--img-size", "64",
                 "-o", str(static)]) == 0
    assert "valid input sizes: height 64..64, width 64..64" in capsys.readouterr().out
    images = torch.randn(5, 3, 64, 64)
    [logits] = ort.InferenceSession(str(static)).run(None, {"images": images.numpy()})
    with torch.no_grad():
        assert np.abs(logits - segmentor.predict_logits(images, (64, 64)).numpy()).max() < 1e-4
    # TorchScript, with the config the checkpoint records; a segmentor takes no classifier options
    script = tmp_path / "seg.pt"
    assert main(["export", "--checkpoint", str(run["checkpoint"]), "--format", "torchscript", "--img-size", "48", "64",
                 "-o", str(script)]) == 0
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(script))(images), segmentor(images).new_tensor(0) +
                              segmentor.predict_logits(images, (48, 64)), atol=1e-5)
    _one_line_error(capsys, ["export", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]),
                             "--format", "onnx", "--features"], "--features is for classifiers and backbones")
    _one_line_error(capsys, ["export", "--config", str(run["config"]), "--format", "onnx"], "--checkpoint is needed")
    _one_line_error(capsys, ["export", "--checkpoint", str(run["checkpoint"]), "--format", "onnx", "--img-size", "48",
                             "-o", str(onnx_file)], "a 48x48 example is too small for this model's export: use at least 64x64")


def test_predict_writes_an_overlay_and_a_label_map(run: dict[str, Path], capsys) -> None:
    images = run["data"] / "ADEChallengeData2016" / "images" / "validation"
    output = run["root"] / "pred"
    assert main(["predict", str(images), "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]),
                 "--output", str(output), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    for line in lines:
        image = Image.open(line["path"])
        labels = np.asarray(Image.open(line["label_map"]))
        assert Image.open(line["overlay"]).size[1] >= image.size[1] and labels.shape == image.size[::-1]
        # ADE20K's convention (reduce-zero-label data): class i is written as i + 1
        assert 1 <= labels.min() and labels.max() <= 7


def test_predict_says_each_image_as_it_is_written(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    # The lines came only once every image was done: a long folder showed nothing meanwhile, and
    # an unreadable file at the end stopped the command with the earlier images' files written
    # but never said.
    folder = tmp_path / "photos"
    shutil.copytree(run["data"] / "ADEChallengeData2016" / "images" / "validation", folder)
    (folder / "zz_empty.jpg").write_bytes(b"")
    output = tmp_path / "pred"
    argv = ["predict", str(folder), "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]),
            "--output", str(output), "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    said = [json.loads(line) for line in captured.out.splitlines()]
    assert [Path(line["path"]).name for line in said] == sorted(p.name for p in folder.glob("*.jpg") if p.stat().st_size)
    assert all(Path(line["overlay"]).is_file() and Path(line["label_map"]).is_file() for line in said)
    assert captured.err.count("\n") == 1 and "zz_empty.jpg: the file is empty" in captured.err, captured.err

    from crossformer.engine.registry import resolve_config
    from crossformer.segmentation.checkpoint import load_segmentor
    from crossformer.segmentation.predict import predict_images

    heard, logged = [], []
    segmentor, _ = load_segmentor(resolve_config(str(run["config"])).config, run["checkpoint"])
    results, skipped = predict_images(segmentor, folder, tmp_path / "api", [f"c{i}" for i in range(7)],
                                      skip_corrupt=True, on_result=heard.append, log=logged.append)
    assert heard == results and len(results) == len(said) and skipped == [str(folder / "zz_empty.jpg")]
    # with its reason, as detection's and classification's predict say it (the path alone was said)
    assert f"skipped unreadable image {folder / 'zz_empty.jpg'}: the file is empty (0 bytes)" in logged, logged


def test_an_exports_default_example_is_what_predict_feeds_the_network() -> None:
    # the training crop was the default: the demo's 64x64 gave a graph for 64..79 pixels, NaN at the
    # 352x256 test scale its predict resizes to
    from crossformer.engine.registry import resolve_config
    from crossformer.segmentation.commands import export_example

    assert export_example(resolve_config("upernet_demo").config.test) == (256, 256)
    assert export_example(resolve_config("upernet_crossformer_small").config.test) == (512, 512)
    slide = resolve_config("upernet_demo", {"test.mode": "slide", "test.slide_crop": [96, 128]}).config.test
    assert export_example(slide) == (96, 128)


def test_predict_and_training_take_ones_own_class_colours(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    # The overlays' colours could not be chosen: no setting took a palette ("unknown setting
    # 'data.palette'"), only generated colours (or ADE20K's).
    from crossformer.engine.config import build_config
    from crossformer.segmentation.config import SegmentationConfig
    from crossformer.segmentation.task import build_datasets

    colours = [[40 * i, 255 - 30 * i, 7] for i in range(7)]
    image = sorted((run["data"] / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))[0]
    argv = ["predict", str(image), "--checkpoint", str(run["checkpoint"]), "--output", str(tmp_path), "--opacity", "1"]
    assert main([*argv, f"data.palette={json.dumps(colours)}", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    labels = np.asarray(Image.open(line["label_map"])).astype(int) - 1  # ADE20K's convention: class + 1
    overlay = np.asarray(Image.open(line["overlay"]).convert("RGB"))[: labels.shape[0], : labels.shape[1]]
    painted = (overlay == np.asarray(colours)[labels]).all(-1)
    assert painted.all()  # this small image's legend is beside it
    _one_line_error(capsys, [*argv, "data.palette=[[1,2,3],[4,5,6]]"], "data.palette has 2 colours for 7 classes: give one "
                    "[R, G, B] per class")
    # a flag's words cannot spell a list of lists: no --palette (it said "must be a list, got '[1,2,3]'")
    with pytest.raises(SystemExit):
        main([*argv, "--palette", "[1,2,3]"])
    assert "error: unrecognized arguments: --palette" in capsys.readouterr().err
    config = build_config(SegmentationConfig, ({"data": {"root": str(run["data"]), "palette": colours}}, "test"))
    assert build_datasets(config.data, training=False)[1].palette == [tuple(c) for c in colours]


def test_predict_takes_class_names_from_data_classes(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    # data.classes was refused with "the folder layout needs data.val_images, data.val_labels and
    # data.classes": the names of an mmseg file (it records none) could not be given
    image = sorted((run["data"] / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))[0]
    argv = ["predict", str(image), "--checkpoint", str(run["checkpoint"]), "--output", str(tmp_path), "--json"]
    assert main([*argv]) == 0
    recorded = json.loads(capsys.readouterr().out)["classes"]
    names = tmp_path / "names.txt"
    names.write_text("".join(f"Class {i}\n" for i in range(7)))
    assert main([*argv, f"data.classes={names}"]) == 0
    line = json.loads(capsys.readouterr().out)
    from crossformer.segmentation.checkpoint import load_segmentor
    from crossformer.engine.registry import resolve_config

    _, checkpoint = load_segmentor(resolve_config(str(run["config"])).config, run["checkpoint"])
    order = checkpoint["meta"]["classes"]
    assert line["classes"] == [f"Class {order.index(name)}" for name in recorded]
    _one_line_error(capsys, [*argv, "data.classes=[a,b]"], "data.classes names 2 classes but", "predicts 7")
    # evaluate needs images too: said so, not only "pass --data ADE_ROOT"
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(run["checkpoint"]), f"data.classes={names}", "data.root=null"],
                    "no data given", "data.classes names the classes only: give data.val_images and data.val_labels")


def test_flops_and_benchmark_take_the_config(run: dict[str, Path], capsys) -> None:
    capsys.readouterr()
    assert main(["flops", "--config", "upernet_crossformer_small", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["img_size"] == [512, 2048] and row["params"] == 62_308_022 and row["authors_params_m"] == 62.3
    assert abs(row["macs"] / 1e9 - row["authors_gflops"]) / row["authors_gflops"] < 0.05
    assert main(["flops", "--config", str(run["config"]), "--img-size", "64", "96", "--json"]) == 0
    tiny = json.loads(capsys.readouterr().out)
    assert tiny["img_size"] == [64, 96] and "authors_params_m" not in tiny and tiny["macs"] > 0
    # the settings the text shows, under the keys detection's JSON uses ("kind" alone and no settings before)
    assert (tiny["model"], tiny["backbone_kwargs"]["embed_dim"]) == (f"{tiny['kind']}_{tiny['backbone']}", 16)

    assert main(["benchmark", "--config", str(run["config"]), "--img-size", "64", "64", "--rounds", "1", "--warmup", "0",
                 "--no-memory", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["compare"] == "smp_upernet_swin_tiny_patch4_window7_224"
    (size,) = bench["sizes"]
    assert size["config"]["img_size"] == [64, 64] and set(size["models"]) == {bench["model"], bench["compare"]}
    assert size["infer_images_per_s"] > 0 and size["infer_ratio"] > 0


def test_make_data_writes_the_ade_layout(tmp_path: Path, capsys) -> None:
    from crossformer.segmentation.data import ade20k_dataset

    assert main(["make-data", "ade", str(tmp_path), "--images", "6"]) == 0
    assert "5 training / 1 validation images" in capsys.readouterr().out
    train = ade20k_dataset(tmp_path, "training")
    assert train.classes == ["sky", "grass", "wall", "water", "building", "person", "car"] and len(train) == 5
    image, label = train.load(0)
    assert image.shape[:2] == label.shape and 255 in label and label[label != 255].max() < 7  # unlabelled -> 255


def test_make_data_help_gives_the_held_out_share_it_writes(tmp_path: Path, capsys) -> None:
    """``make-data --help`` said a quarter of the images are held out for every kind; ade holds out a fifth."""
    with pytest.raises(SystemExit):
        main(["make-data", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(coco 25%, ade 20%)" in help_text, help_text
    assert main(["make-data", "ade", str(tmp_path), "--images", "10"]) == 0
    assert "8 training / 2 validation images" in capsys.readouterr().out


def test_bad_input_is_one_line_naming_the_file(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(run["data"], broken)
    val = broken / "ADEChallengeData2016"
    labels = sorted((val / "annotations" / "validation").glob("*.png"))
    base = ["evaluate", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]), "--data", str(broken)]

    values = np.asarray(Image.open(labels[0])).copy()
    values[0, 0] = 9  # 7 classes: stored values 0..7 and 255
    Image.fromarray(values).save(labels[0])
    _one_line_error(capsys, base, f"label map {labels[0]} holds value 9, out of range for 7 classes")

    Image.fromarray(values[:-4]).save(labels[0])  # four rows short
    _one_line_error(capsys, base, f"label map {labels[0]} is", "they must match")

    labels[0].unlink()
    _one_line_error(capsys, base, "has no annotation: expected", str(labels[0]))

    # a checkpoint of another segmentor: ours, and one whose weights do not fit the config
    fpn = write_config(tmp_path / "fpn.yaml", "fpn")
    _one_line_error(capsys, ["evaluate", "--config", str(fpn), "--checkpoint", str(run["checkpoint"]), "--data",
                             str(run["data"])], str(run["checkpoint"]), "holds a upernet crossformer_small")
    # only the head's width differs: the two descriptions read alike, and nothing named it
    _one_line_error(capsys, ["evaluate", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]),
                             "--data", str(run["data"]), "model.channels=32"],
                    "with channels=16, aux_channels=8 segmentor but the config describes",
                    "with channels=32, aux_channels=8: pass the config it was trained with (or model.channels=16)")
    foreign = tmp_path / "foreign.pth"
    state = load_training_state(run["checkpoint"])
    torch.save({"state_dict": {k.replace("backbone.model.", "backbone."): v for k, v in state["model"].items()
                               if not k.startswith("auxiliary_head.")}}, foreign)  # an mmseg-layout file
    wider = write_config(tmp_path / "wider.yaml", model={"backbone_kwargs": {**TINY_BACKBONE, "embed_dim": 24}})
    _one_line_error(capsys, ["evaluate", "--config", str(wider), "--checkpoint", str(foreign), "--data", str(run["data"])],
                    str(foreign), "another segmentor than the config's upernet crossformer_small")
    _one_line_error(capsys, ["evaluate", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]),
                             "data.root=null"], "no data given: pass --data")
    for opacity in ("1.5", "-0.1"):
        _one_line_error(capsys, ["predict", str(tmp_path), "--config", str(run["config"]), "--checkpoint",
                                 str(run["checkpoint"]), "--opacity", opacity], f"--opacity must be in [0, 1], got {float(opacity)}")


def test_flops_gives_the_authors_figures_only_for_the_row_they_measured(capsys) -> None:
    def counted(*argv: str) -> dict:
        assert main(["flops", "--config", "upernet_crossformer_small", "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    assert counted()["authors_gflops"] == 979.5
    assert "authors_gflops" not in counted("--img-size", "512", "512")  # theirs are at 512x2048
    assert "authors_params_m" not in counted("model.backbone_kwargs.embed_dim=48")  # another backbone than theirs


@pytest.mark.slow
def test_bad_data_in_one_ranks_share_stops_torchrun_with_one_line(run: dict[str, Path], tmp_path: Path) -> None:
    # Rank 1 raised alone; rank 0 waited in the reduction of the areas until gloo's connection
    # broke, and the job ended with rank 0's traceback and no word of the file (rank 1 does not print).
    broken = tmp_path / "broken"
    shutil.copytree(run["data"], broken)
    label = sorted((broken / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))[1]  # rank 1's
    values = np.asarray(Image.open(label)).copy()
    values[0, 0] = 9  # 7 classes
    Image.fromarray(values).save(label)
    line = one_torchrun_error_line(["evaluate", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]),
                                    "--data", str(broken)])
    assert f"label map {label} holds value 9" in line


def test_evaluate_refuses_a_data_set_of_other_classes(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    # The same count of other classes was scored as if they were the model's.
    other = tmp_path / "other"
    shutil.copytree(run["data"], other)
    class_file = other / "ADEChallengeData2016" / "classes.txt"
    names = class_file.read_text().split()
    class_file.write_text("\n".join([*names[:-1], "auto"]) + "\n")
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(run["checkpoint"]), "--data", str(other)],
                    f"names other classes than {run['checkpoint']} was trained on (label 6 is 'auto' in the data, "
                    f"'{names[-1]}' in the checkpoint)")
    class_file.write_text("\n".join(names) + "\n")  # the same names: evaluates
    assert main(["evaluate", "--checkpoint", str(run["checkpoint"]), "--data", str(other), "--json"]) == 0


def test_an_output_path_under_a_file_is_one_line_before_any_work(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    checkpoint = str(run["checkpoint"])
    images = str(run["data"] / "ADEChallengeData2016" / "images" / "validation")
    _one_line_error(capsys, ["predict", images, "--checkpoint", checkpoint, "--output", str(a_file / "out")],
                    f"cannot write {a_file / 'out'}: {a_file} is a file, not a folder")
    _one_line_error(capsys, ["evaluate", "--checkpoint", checkpoint, "--data", str(run["data"]), "--output",
                             str(a_file / "m.json")], f"cannot write {a_file / 'm.json'}: {a_file} is a file, not a folder")
    assert not any(tmp_path.glob("*.png"))


def test_an_mmseg_file_without_config_asks_for_one(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    # The classification loader said "fits no registered variant: pass --model NAME".
    state = load_training_state(run["checkpoint"])
    mmseg = tmp_path / "mmseg.pth"
    torch.save({"state_dict": {k.replace("backbone.model.", "backbone."): v for k, v in state["model"].items()}}, mmseg)
    _one_line_error(capsys, ["predict", str(tmp_path), "--checkpoint", str(mmseg)],
                    f"{mmseg} holds a segmentation model (its heads' weights say so): pass its segmentation config")


def test_a_checkpoint_of_another_class_count_or_without_heads_is_said_as_the_command_line_sets_it(
        run: dict[str, Path], tmp_path: Path, capsys) -> None:
    # was "predicts 7 classes, this model 5: build it with num_classes=7" (the Python API's words)
    base = ["evaluate", "--checkpoint", str(run["checkpoint"]), "--data", str(run["data"])]
    _one_line_error(capsys, [*base, "model.num_classes=5"],
                    f"{run['checkpoint']} is a segmentor of 7 classes but the config says model.num_classes=5: "
                    "pass model.num_classes=7 (or null)")
    backbone = tmp_path / "backbone.pth"  # an ImageNet-style file: the backbone's weights alone
    state = load_training_state(run["checkpoint"])["model"]
    torch.save({k[len("backbone.model."):]: v for k, v in state.items() if k.startswith("backbone.model.")}, backbone)
    _one_line_error(capsys, ["evaluate", "--config", str(run["config"]), "--checkpoint", str(backbone), "--data",
                             str(run["data"]), "model.num_classes=7"],
                    f"{backbone} holds no segmentation heads", "`crossformer train --pretrained`")
    # an mmdet file was taken for an ImageNet one ("goes to `crossformer train --pretrained`")
    detector = tmp_path / "mmdet.pth"
    torch.save({"state_dict": {"backbone.patch_embed.projs.0.weight": torch.zeros(1), "rpn_head.rpn_conv.weight":
                               torch.zeros(1), "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 4)}}, detector)
    _one_line_error(capsys, ["evaluate", "--config", str(run["config"]), "--checkpoint", str(detector), "--data",
                             str(run["data"])], f"{detector} holds a detection model (its heads' weights say so), not a segmentor")


def test_evaluate_on_own_folders_needs_only_the_validation_ones(run: dict[str, Path], capsys) -> None:
    # evaluate took data.val_images / val_labels / classes but refused them without the training folders
    ade = run["data"] / "ADEChallengeData2016"
    folders = [f"data.val_images={ade / 'images' / 'validation'}", f"data.val_labels={ade / 'annotations' / 'validation'}",
               f"data.classes={ade / 'classes.txt'}", "data.reduce_zero_label=true"]
    base = ["evaluate", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]), "--json"]
    capsys.readouterr()
    assert main([*base, "--data", str(run["data"])]) == 0
    by_root = json.loads(capsys.readouterr().out)
    assert main([*base, *folders]) == 0
    by_folders = json.loads(capsys.readouterr().out)
    assert by_folders["images"] == 2 and by_folders["per_class"] == by_root["per_class"]
    _one_line_error(capsys, ["train", "--config", str(run["config"]), *folders],
                    "training on the folder layout needs data.train_images and data.train_labels")


def test_evaluate_names_the_unreadable_files_it_skips_on_stderr(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    # Named only when stderr was a terminal (and then on stdout, amid the JSON): a log file got the count alone.
    # Then as "skipped: cannot read label map PATH": now as training names a validation file it skips.
    broken = tmp_path / "broken"
    shutil.copytree(run["data"], broken)
    label = sorted((broken / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))[0]
    label.write_bytes(label.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert main(["evaluate", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]), "--data", str(broken),
                 "--skip-corrupt", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped"] == 1
    assert captured.err.startswith(f"skipping unreadable file {label}: "), captured.err
    assert captured.err.count("skipping unreadable") == 1, captured.err


def test_a_validation_image_that_does_not_decode_is_counted_as_the_data_check_counts_one(
        run: dict[str, Path], tmp_path: Path, capsys) -> None:
    # --skip-corrupt: each evaluation left it out without a word, and the done line did not count it
    broken = tmp_path / "cut"
    shutil.copytree(run["data"], broken)
    bad = sorted((broken / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    assert not find_unreadable([str(bad)])  # the header reads: the data check's first pass finds nothing
    truncated = f"cannot read image {bad}: image file is truncated"
    argv = ["train", "--config", str(run["config"]), "--data", str(broken), "run.iterations=4", "run.eval_every=2"]
    _one_line_error(capsys, [*argv, "--output", str(tmp_path / "stopped")], truncated, "--skip-corrupt")
    assert main([*argv, "--output", str(tmp_path / "run"), "--skip-corrupt"]) == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count(f"skipping unreadable file {bad}: image file is truncated") == 1, log  # 2 evaluations, once a run
    assert ", 1 unreadable validation file left out of evaluation (checkpoints in" in log.splitlines()[-1], log
    # evaluate: the same line, or the same name on stderr
    argv = ["evaluate", "--config", str(run["config"]), "--checkpoint", str(run["checkpoint"]), "--data", str(broken)]
    _one_line_error(capsys, argv, truncated, "--skip-corrupt")
    assert main([*argv, "--skip-corrupt", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped"] == 1
    assert captured.err.startswith(f"skipping unreadable file {bad}: image file is truncated"), captured.err
    assert captured.err.count("skipping unreadable") == 1, captured.err


def test_a_checkpoint_finds_its_data_from_any_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    # trained with --data data from its folder, evaluate run elsewhere said "data folder not
    # found: data" (the relative path the checkpoint recorded) unless --data was given again
    make_tiny_ade(tmp_path / "data", images=6)
    write_config(tmp_path / "tiny.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "tiny.yaml", "--data", "data", "--output", "run"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    checkpoint = str(tmp_path / "run" / "last.pth")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", checkpoint, "--json"]) == 0
    assert "mIoU" in json.loads(capsys.readouterr().out)
    # data moved away: the error says where the path came from and which flag gives another
    shutil.move(tmp_path / "data", tmp_path / "moved")
    _one_line_error(capsys, ["evaluate", "--checkpoint", checkpoint], f"data.root {tmp_path / 'data'} is not on",
                    f"came from {checkpoint}", "pass --data PATH")
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", str(tmp_path / "moved"), "--json"]) == 0


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_model_with_a_dense_checkpoint_says_the_task_came_from_it(run: dict[str, Path], verb: str, capsys) -> None:
    # said "a segmentation config's model is set by --kind and --backbone", though no config was named
    checkpoint = str(run["checkpoint"])
    images = ["a.png"] if verb == "predict" else []
    _one_line_error(capsys, [verb, "--model", "crossformer_tiny", "--checkpoint", checkpoint, *images],
                    f"{checkpoint} holds a segmentation model (the task comes from the checkpoint): leave out --model")


def test_a_whole_model_as_another_start_is_one_line_naming_the_right_option(run: dict[str, Path], tmp_path: Path,
                                                                            capsys) -> None:
    # --pretrained given our segmentor (for classification or for segmentation itself) listed
    # hundreds of missing and unexpected keys; a detection run read its data first
    segmentor, data = str(run["checkpoint"]), str(run["data"])
    starts = [
        (["--config", "digits", "epochs=1", "--pretrained", segmentor],
         "model.pretrained: ", "is a whole segmentation model, not ImageNet weights: give --pretrained an ImageNet"),
        (["--config", str(run["config"]), "--data", data, "--pretrained", segmentor],
         "is a whole segmentation model, not ImageNet weights: start every weight from it with --init-from"),
        (["--config", "mask_rcnn_shapes_demo", "--data", data, "--init-from", segmentor],
         "model.init_from: ", "is a whole segmentation model, not a detection one: give --init-from a detection model"),
    ]
    for number, (argv, *expected) in enumerate(starts):
        _one_line_error(capsys, ["train", *argv, "--output", str(tmp_path / str(number))], *expected)


def test_the_authors_whole_model_as_a_start_is_one_line(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    # An mmseg file records no task: as --pretrained it listed every key of the model as missing
    # or unexpected (hundreds of lines for a full-size model).
    state = load_training_state(run["checkpoint"])
    authors = tmp_path / "upernet_authors.pth"
    torch.save({"state_dict": state["model"], "meta": {}}, authors)
    data = str(run["data"])
    expected = f"{authors} holds a whole segmentation model (its heads' weights say so)"
    for number, argv in enumerate([["--config", "digits", "epochs=1"], ["--config", str(run["config"]), "--data", data]]):
        _one_line_error(capsys, ["train", *argv, "--pretrained", str(authors), "--output", str(tmp_path / str(number))],
                        expected, "--init-from")
    # and as a detector's start, it was taken for an ImageNet file ("give it as model.pretrained")
    coco = make_tiny_coco(tmp_path / "coco")
    _one_line_error(capsys, ["train", "--config", "mask_rcnn_shapes_demo", "--data", str(coco), "--init-from", str(authors),
                             "--output", str(tmp_path / "detection")],
                    f"{authors} holds a segmentation model (its heads' weights say so), not a detector")


@pytest.mark.parametrize("mode", ["train", "both"])
def test_benchmark_of_a_segmentor_refuses_to_time_training(capsys: pytest.CaptureFixture, mode: str) -> None:
    # --mode both printed inference figures alone, as if that were all it was asked
    _one_line_error(capsys, ["benchmark", "--config", "upernet_demo", "--mode", mode, "--img-size", "64"],
                    "measures inference; training speed is in `crossformer train`'s log")
