"""Colour-coded label maps (``data.label_colours``): read as the index maps they encode in
training, its data check, evaluation and the absent-class note; predictions drawn and saved in
the same colours; the setting checked when the config loads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossformer.cli import main
from crossformer.data import DataError
from crossformer.engine import load_training_state
from crossformer.engine.config import build_config
from crossformer.errors import UserInputError
from crossformer.segmentation.colours import LabelColours
from crossformer.segmentation.config import SegmentationConfig
from crossformer.segmentation.data import SegmentationDataset, absent_classes_note, read_label
from crossformer.segmentation.predict import write_label_map
from crossformer.segmentation.task import train
from segmentation_fixtures import make_tiny_ade, tiny_config

# Cityscapes' colours of road, sidewalk, building, wall, fence, pole, car: building and pole are
# grey, which a grey RGB index map would store as values 70 and 153
COLOURS = [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153], [0, 0, 142]]
IGNORE = [[0, 0, 0], [255, 255, 255]]


def _colour_map(values: np.ndarray, offset: int = 1) -> np.ndarray:
    """``(H, W, 3)`` uint8: stored value ``k + offset`` in ``COLOURS[k]``, any other (0, 255) in ``IGNORE[0]``."""
    table = np.tile(np.asarray(IGNORE[0], np.uint8), (256, 1))
    table[offset: offset + len(COLOURS)] = COLOURS
    return table[values]


def _save_pair(root: Path, name: str, values: np.ndarray, colours: np.ndarray | None = None, mode: str = "RGB") -> None:
    """An image and its label map: ``values`` as mode L, or ``colours`` as ``mode`` (RGB, RGBA)."""
    for folder in ("img", "ann"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", values.shape[::-1], (9, 9, 9)).save(root / "img" / f"{name}.jpg")
    label = Image.fromarray(values.astype(np.uint8), "L") if colours is None else Image.fromarray(colours).convert(mode)
    label.save(root / "ann" / f"{name}.png")


def _dataset(root: Path, **kwargs) -> SegmentationDataset:
    classes = [f"c{k}" for k in range(len(COLOURS))]
    return SegmentationDataset(root / "img", root / "ann", classes, label_colours=COLOURS, ignore_colours=IGNORE, **kwargs)


def test_colour_coded_label_maps_read_as_the_index_maps_they_encode(tmp_path: Path) -> None:
    values = (np.arange(6 * 9).reshape(6, 9) // 4 % 8).astype(np.uint8)  # 0: unlabelled, 1..7: classes 0..6
    _save_pair(tmp_path, "rgb", values, _colour_map(values))
    _save_pair(tmp_path, "rgba", values, _colour_map(values), mode="RGBA")  # Cityscapes' *_color.png: opaque RGBA
    white = _colour_map(values)
    white[0, :2] = IGNORE[1]  # the second ignore colour
    _save_pair(tmp_path, "white", values, white)
    expected = np.where(values == 0, 255, values.astype(np.int64) - 1)
    expected_white = expected.copy()
    expected_white[0, :2] = 255
    dataset = _dataset(tmp_path)
    assert [Path(p).stem for p, _ in dataset.samples] == ["rgb", "rgba", "white"]
    for index, want in enumerate((expected, expected, expected_white)):
        assert np.array_equal(dataset.load(index)[1], want), dataset.samples[index]
    # counted from 1 (reduce_zero_label), colour k is still class k: stored as k + 1, reduced to k
    assert np.array_equal(_dataset(tmp_path, reduce_zero_label=True).load(0)[1], expected)
    # the colours are the overlays' too, unless a palette gives others (the config allows one of them)
    assert dataset.palette == [tuple(c) for c in COLOURS]
    assert _dataset(tmp_path, palette=[[1, 2, 3]] * len(COLOURS)).palette[0] == (1, 2, 3)
    # a map of grey colours alone (building, pole, ignored) is colours too, not grey values 70 and 153
    grey = np.array([[3, 6, 0]], np.uint8)
    _save_pair(tmp_path / "grey", "a", grey, _colour_map(grey))
    assert np.array_equal(_dataset(tmp_path / "grey").load(0)[1], [[2, 5, 255]])


def _palette_map(root: Path, name: str, indices: np.ndarray, palette: np.ndarray) -> None:
    """A palette (mode P) label map of ``indices`` coloured by ``palette`` ``(N, 3)``, and its image."""
    label = Image.fromarray(indices, "L")
    label.putpalette(np.asarray(palette, np.uint8).tobytes())
    assert label.mode == "P"
    label.save(root / "ann" / f"{name}.png")
    Image.new("RGB", indices.shape[::-1]).save(root / "img" / f"{name}.jpg")


def test_index_maps_still_read_as_indices_with_label_colours(tmp_path: Path) -> None:
    # The rule: RGB and RGBA files are colour-coded; single-channel ones (L, 16-bit) hold indices
    # as before, so one data set may mix both, and so do palette ones (Pascal VOC's) unless their
    # palette shows every index they use in a listed colour.
    values = np.array([[0, 1, 2], [6, 255, 3]], np.uint8)
    _save_pair(tmp_path, "a", values)
    _palette_map(tmp_path, "b_grey", values, np.tile(np.arange(256)[:, None], (1, 3)))  # no listed colour
    voc = np.zeros((256, 3), np.uint8)
    voc[: len(COLOURS)], voc[255] = COLOURS, (224, 224, 192)  # VOC's border colour: not listed
    _palette_map(tmp_path, "c_voc", values, voc)
    # an editor's indexed save: the listed colours under indices of its own (0: class 3, 1: class 0, 2: ignored)
    _palette_map(tmp_path, "d_editor", np.array([[1, 0, 2], [0, 0, 1]], np.uint8), [COLOURS[3], COLOURS[0], IGNORE[1]])
    dataset = _dataset(tmp_path)
    assert [Path(p).stem for p, _ in dataset.samples] == ["a", "b_grey", "c_voc", "d_editor"]
    for index in range(3):
        assert np.array_equal(dataset.load(index)[1], values), dataset.samples[index]
    assert dataset.load(3)[1].tolist() == [[0, 3, 255], [3, 3, 0]]


def test_an_unlisted_colour_is_one_line_naming_the_file_the_colour_and_its_first_pixel(tmp_path: Path) -> None:
    values = np.ones((4, 6), np.uint8)
    colours = _colour_map(values)
    colours[2, 4] = colours[3, 1] = (7, 8, 9)  # an anti-aliased border pixel, say
    _save_pair(tmp_path, "a", values, colours)
    sample = _dataset(tmp_path)[0]
    assert sample.fatal and sample.error == (
        f"label map {tmp_path / 'ann' / 'a.png'} holds colour #070809 (first at x=4, y=2), which data.label_colours does "
        "not list: add it there, or to data.ignore_colours where it means unlabelled")
    # a see-through pixel has no class, whatever its colour
    Image.fromarray(_colour_map(values)).convert("RGBA").save(tmp_path / "ann" / "a.png")
    clear = Image.open(tmp_path / "ann" / "a.png").copy()
    clear.putpixel((0, 0), (128, 64, 128, 0))
    clear.save(tmp_path / "ann" / "a.png")
    with pytest.raises(DataError, match=r"a\.png has transparent pixels \(mode RGBA\), which a class index cannot hold$"):
        _dataset(tmp_path).load(0)


def test_the_absent_class_note_names_the_colour(tmp_path: Path) -> None:
    values = np.ones((2, 2), np.uint8)
    _save_pair(tmp_path, "a", values, _colour_map(values))
    counts = [4] + [0] * 255
    note = absent_classes_note(counts, _dataset(tmp_path))
    assert note.startswith(f"no label map in {tmp_path / 'ann'} holds classes 'c1' (value 1, colour #f423e8), "
                           "'c2' (value 2, colour #464646), 'c3' (value 3, colour #66669c) and 3 more: ")


@pytest.mark.parametrize("data, message", [
    ({"label_colours": COLOURS[:3]}, "data.label_colours has 3 colours for 7 classes: give one [R, G, B] per class"),
    ({"label_colours": [[0, 0, 256], *COLOURS[1:]]},
     "data.label_colours holds [0, 0, 256]: each colour is [R, G, B], three values 0-255"),
    ({"label_colours": [*COLOURS[:6], COLOURS[2]]},
     "data.label_colours gives classes 2 and 6 one colour, #464646: give each class its own colour"),
    ({"label_colours": COLOURS, "ignore_colours": [[0, 0, 142]]},
     "colour #00008e is listed as class 6's colour in data.label_colours and in data.ignore_colours: list each colour once"),
    ({"ignore_colours": IGNORE}, "data.ignore_colours goes with data.label_colours (colour-coded label maps): give each "
                                 "class's [R, G, B] there too, or drop data.ignore_colours"),
    ({"label_colours": COLOURS, "palette": COLOURS}, "data.palette and data.label_colours both give the classes' colours: "
                                                      "data.label_colours colours the overlays too; drop data.palette"),
])
def test_label_colours_are_checked_when_the_config_loads(data: dict, message: str) -> None:
    classes = {"classes": [f"c{k}" for k in range(len(COLOURS))], "val_images": "v", "val_labels": "l"}
    with pytest.raises(UserInputError) as err:
        build_config(SegmentationConfig, ({"data": {**classes, **data}}, "test"))
    assert str(err.value) == message


def test_without_the_data_model_num_classes_counts_the_colours() -> None:
    # where the data's classes are not known yet (a folder not on this machine), the model's count is
    with pytest.raises(UserInputError, match=r"^data.label_colours has 7 colours for 150 classes"):
        build_config(SegmentationConfig, ({"data": {"root": "absent", "label_colours": COLOURS}}, "test"))
    settings = {"data": {"root": "absent", "label_colours": COLOURS}, "model": {"num_classes": None}}
    assert build_config(SegmentationConfig, (settings, "test")).data.label_colours == tuple(map(tuple, COLOURS))


# ---------------------------------------------------------------- training, evaluation, prediction


def _recoloured(annotations: Path, output: Path) -> Path:
    """The ADE20K-layout label maps of ``annotations`` (0 = unlabelled) saved colour-coded in ``output``."""
    output.mkdir(parents=True)
    for path in sorted(annotations.glob("*.png")):
        Image.fromarray(_colour_map(np.asarray(Image.open(path)))).save(output / path.name)
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two runs of one seed on one tiny set: its label maps as indices (counted from 1), and
    colour-coded (0 as the ignore colour)."""
    root = tmp_path_factory.mktemp("colours")
    ade = make_tiny_ade(root / "data") / "ADEChallengeData2016"
    folders = {"train_images": str(ade / "images/training"), "val_images": str(ade / "images/validation"),
               "classes": str(ade / "classes.txt")}
    indices = {**folders, "train_labels": str(ade / "annotations/training"),
               "val_labels": str(ade / "annotations/validation"), "reduce_zero_label": True}
    colours = {**folders, "train_labels": str(_recoloured(ade / "annotations/training", root / "colour_labels/training")),
               "val_labels": str(_recoloured(ade / "annotations/validation", root / "colour_labels/validation")),
               "label_colours": COLOURS, "ignore_colours": IGNORE[:1]}
    out = {"root": root, "ade": ade}
    for name, data in (("indices", indices), ("colours", colours)):
        layers = tiny_config(data=data, run={"output": str(root / name), "iterations": 2, "eval_every": 2})
        out[f"{name}_metrics"] = train(build_config(SegmentationConfig, (layers, "tiny")))
        out[name], out[f"{name}_data"] = root / name / "last.pth", data
    return out


def test_training_on_colour_coded_maps_equals_training_on_the_index_maps(runs: dict, capsys) -> None:
    assert runs["colours_metrics"] == runs["indices_metrics"] and "val/mIoU" in runs["colours_metrics"]
    indices, colours = (load_training_state(runs[name])["model"] for name in ("indices", "colours"))
    assert all(torch.equal(indices[key], colours[key]) for key in indices)
    # evaluate reads the validation maps as colours (the recorded config's setting): the same metrics
    results = []
    for name in ("indices", "colours"):
        assert main(["evaluate", "--checkpoint", str(runs[name]), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert {**results[1], "checkpoint": None} == {**results[0], "checkpoint": None}
    assert results[0]["mIoU"] == runs["indices_metrics"]["val/mIoU"]


def _resume(runs: dict, name: str, output: Path, **data) -> dict[str, float]:
    """Run ``name`` of ``runs`` (copied to ``output``) resumed for one more update, its data settings updated by ``data``."""
    shutil.copytree(runs[name].parent, output)
    layers = tiny_config(data={**runs[f"{name}_data"], **data},
                         run={"output": str(output), "iterations": 3, "eval_every": 3, "resume": "auto"})
    return train(build_config(SegmentationConfig, (layers, "tiny")))


def test_resume_refuses_other_label_colours(runs: dict, tmp_path: Path) -> None:
    # Other colours for the same classes resumed silently (listed among the changed settings
    # only): each pixel then trained the class its colour now stands for.
    swapped = [COLOURS[1], COLOURS[0], *COLOURS[2:]]
    last = re.escape(str(tmp_path / "swapped" / "last.pth"))
    with pytest.raises(UserInputError, match=rf"^{last} was trained with class 0 \(\w+\) coloured #804080 in "
                                             r"data.label_colours, not #f423e8; resume with the same colours$"):
        _resume(runs, "colours", tmp_path / "swapped", label_colours=swapped)
    last = re.escape(str(tmp_path / "indices" / "last.pth"))
    with pytest.raises(UserInputError, match=rf"^{last} was trained on colour-coded label maps \(data.label_colours\); "
                                             r"resume with its data.label_colours$"):
        _resume(runs, "colours", tmp_path / "indices", **runs["indices_data"], label_colours=None, ignore_colours=[])
    # the same colours resume, another ignore colour too (no pixel changes class)
    assert _resume(runs, "colours", tmp_path / "same", ignore_colours=IGNORE)["global_step"] == 3


def test_the_safetensors_conversion_keeps_the_recorded_label_colours(runs: dict, tmp_path: Path) -> None:
    # its description kept meta's classes, palette and reduce_zero_label but dropped label_colours
    from crossformer.models import read_checkpoint

    converted = tmp_path / "colours.safetensors"
    assert main(["convert", str(runs["colours"]), str(converted)]) == 0
    meta = read_checkpoint(converted)["meta"]
    assert meta["label_colours"] == COLOURS and meta == load_training_state(runs["colours"])["meta"]


def test_a_checkpoint_without_recorded_colours_resumes_on_index_maps(runs: dict, tmp_path: Path) -> None:
    # checkpoints written before data.label_colours was recorded in them
    shutil.copytree(runs["indices"].parent, tmp_path / "old")
    state = torch.load(tmp_path / "old" / "last.pth", weights_only=True)
    del state["meta"]["label_colours"]
    torch.save(state, tmp_path / "old" / "last.pth")
    runs = {**runs, "old": tmp_path / "old" / "last.pth", "old_data": runs["indices_data"]}
    assert _resume(runs, "old", tmp_path / "resumed")["global_step"] == 3
    with pytest.raises(UserInputError, match=r"was trained on index label maps \(no data.label_colours\); resume "
                                             r"without data.label_colours$"):  # as one that recorded none
        _resume(runs, "indices", tmp_path / "coloured", **runs["colours_data"])


def test_the_data_check_before_training_names_an_unlisted_colour(runs: dict, tmp_path: Path) -> None:
    ade = runs["ade"]
    labels = _recoloured(ade / "annotations/validation", tmp_path / "validation")
    first = sorted(labels.glob("*.png"))[0]
    pixels = np.asarray(Image.open(first)).copy()
    pixels[1, 2] = (1, 1, 1)
    Image.fromarray(pixels).save(first)
    data = {"train_images": str(ade / "images/training"), "train_labels": str(runs["root"] / "colour_labels/training"),
            "val_images": str(ade / "images/validation"), "val_labels": str(labels), "classes": str(ade / "classes.txt"),
            "label_colours": COLOURS, "ignore_colours": IGNORE[:1]}
    layers = tiny_config(data=data, run={"output": str(tmp_path / "run"), "iterations": 1})
    with pytest.raises(DataError, match=rf"^label map {first} holds colour #010101 \(first at x=2, y=1\)"):
        train(build_config(SegmentationConfig, (layers, "tiny")))
    assert not (tmp_path / "run").exists()  # stopped before the first update, taking back its log


def test_predict_draws_and_saves_the_label_colours(runs: dict, tmp_path: Path, capsys) -> None:
    image = sorted((runs["ade"] / "images/validation").glob("*.jpg"))[0]
    argv = ["predict", str(image), "--checkpoint", str(runs["colours"]), "--opacity", "1", "--json"]
    assert main([*argv, "--output", str(tmp_path / "colours")]) == 0
    line = json.loads(capsys.readouterr().out)
    saved = Image.open(line["label_map"])
    labels = np.asarray(saved)
    overlay = np.asarray(Image.open(line["overlay"]).convert("RGB"))[: labels.shape[0], : labels.shape[1]]
    assert (overlay == np.asarray(COLOURS)[labels]).all()  # painted in the classes' colours (legend beside it)
    # the label map holds the class indices, shown in the same colours; read back as indices
    assert saved.mode == "P" and (np.asarray(saved.convert("RGB")) == np.asarray(COLOURS)[labels]).all()
    assert np.array_equal(read_label(line["label_map"]), labels)
    assert np.array_equal(read_label(line["label_map"], LabelColours(COLOURS, IGNORE)), labels)  # by its colours: alike
    # counted from 1 (reduce-zero-label data), class k is written as k + 1 and shown in its colour
    write_label_map(np.array([[0, 1]]), tmp_path / "reduced.png", reduce_zero_label=True, colours=COLOURS)
    reduced = Image.open(tmp_path / "reduced.png")
    assert np.asarray(reduced).tolist() == [[1, 2]] and np.asarray(reduced.convert("RGB")).tolist() == [COLOURS[:2]]
    # without colour-coded data: 8-bit grey values as before
    assert main([*argv, "--output", str(tmp_path / "grey"), "data.label_colours=null", "data.ignore_colours=[]"]) == 0
    assert Image.open(json.loads(capsys.readouterr().out)["label_map"]).mode == "L"
