"""Users' image files as phones and other tools write them, through the one image reader that
classification, detection and segmentation share (``crossformer.data.folder``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from classification_fixtures import TINY_MODEL, make_image_folder
from crossformer.cli import main
from crossformer.data import DataError, ImageFolderDataset, read_rgb
from crossformer.data.loader import find_unreadable

EXIF_ORIENTATION = 0x0112


def _save_turned(path: Path, pixels: np.ndarray, orientation: int = 6) -> None:
    """A JPEG stored as ``pixels`` whose EXIF orientation says how to turn it upright."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=100)


@pytest.fixture
def bare_checkpoint(tmp_path: Path) -> list[str]:
    """predict's arguments for an untrained 3-class tiny CrossFormer (no training needed)."""
    from crossformer.models import CrossFormer

    torch.save({"model": CrossFormer(**TINY_MODEL, num_classes=3).state_dict()}, tmp_path / "bare.pth")
    return ["--checkpoint", str(tmp_path / "bare.pth"), "--device", "cpu", "--img-size", "32", "--model",
            "crossformer_tiny", "--json", *(f"model.kwargs.{k}={v}".replace(" ", "") for k, v in TINY_MODEL.items())]


def test_classification_trains_on_the_photo_upright_as_predict_sees_it(tmp_path: Path) -> None:
    """A model trained on one's own phone photos must see them as predict will: upright. (timm's
    ImageFolder reads the stored grid: a folder of sideways-stored photos would train a model
    that predict's upright photos contradict.)"""
    make_image_folder(tmp_path, {"val": 1})
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (250, 0, 0)  # red left half as stored; orientation 6 puts it on top
    turned = tmp_path / "val" / "cat" / "turned.jpg"
    _save_turned(turned, stored)
    dataset = ImageFolderDataset(tmp_path, "val")
    image = dataset[[Path(p).name for p, _ in dataset.samples].index("turned.jpg")][0]
    upright = read_rgb(turned)  # what every predict reads
    assert upright.size == (20, 40) and np.asarray(upright)[5, 10, 0] > 200 and np.asarray(upright)[35, 10, 0] < 50
    assert np.asarray(image).tolist() == np.asarray(upright).tolist()


def test_an_empty_file_and_a_file_of_no_image_format_say_what_they_are(tmp_path: Path, bare_checkpoint: list[str],
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Pillow's "cannot identify image file 'x.jpg'" named the file twice and not the cause."""
    empty, text = tmp_path / "empty.jpg", tmp_path / "notes.jpg"
    empty.write_bytes(b"")
    text.write_text("a note saved with an image's name")
    for path, reason in ((empty, "the file is empty (0 bytes)"), (text, "its content is no image format Pillow reads")):
        assert main(["predict", str(path), *bare_checkpoint]) == 2
        err = capsys.readouterr().err
        assert err == f"crossformer predict: error: cannot read image {path}: {reason}; fix or delete it, or pass " \
                      "--skip-corrupt to skip such files\n", err
    # training's check of the validation images gives the same reasons
    assert find_unreadable([str(empty), str(text)]) == [f"{empty}: the file is empty (0 bytes)",
                                                       f"{text}: its content is no image format Pillow reads"]


def test_a_large_photo_reads_without_a_warning_and_a_decompression_bomb_is_one_clear_line(
        tmp_path: Path, bare_checkpoint: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow warns above MAX_IMAGE_PIXELS (89M: a 108-megapixel phone photo) and refuses above
    twice that, calling it a "DOS attack"; scaled down here to 1100 pixels (over predict's 32x32 crop,
    which Pillow checks too)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1100)
    large, bomb = tmp_path / "large.png", tmp_path / "bomb.png"
    Image.new("RGB", (40, 40), (10, 200, 10)).save(large)  # 1600 pixels: over the limit, not twice it
    Image.new("RGB", (50, 50)).save(bomb)  # 2500: over twice the limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning printed a Python warning per photo
        assert read_rgb(large).size == (40, 40)
        assert find_unreadable([str(large)]) == []
        assert main(["predict", str(large), *bare_checkpoint]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(large)
    assert main(["predict", str(bomb), *bare_checkpoint]) == 2
    err = capsys.readouterr().err
    assert err == (f"crossformer predict: error: cannot read image {bomb}: more than the 2,200 pixels Pillow decodes "
                   "(its guard against decompression bombs): downscale it; fix or delete it, or pass --skip-corrupt "
                   "to skip such files\n"), err


def test_a_photo_with_corrupt_exif_data_reads_without_a_warning(tmp_path: Path, bare_checkpoint: list[str],
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Camera maker notes Pillow cannot parse: the pixels read, but Pillow printed a Python
    "UserWarning: Corrupt EXIF data" (with its own source line) per file."""
    photo = tmp_path / "camera.jpg"
    cut_ifd = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12"  # 5 entries announced, a part of one there
    Image.new("RGB", (40, 20), (200, 30, 30)).save(photo, exif=cut_ifd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_rgb(photo).size == (40, 20)
        assert find_unreadable([str(photo)]) == []
        assert main(["predict", str(photo), *bare_checkpoint]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(photo)


def test_a_float_tiff_on_0_to_1_is_scaled_not_clipped_to_black(tmp_path: Path, bare_checkpoint: list[str],
                                                              capsys: pytest.CaptureFixture) -> None:
    """Pillow's RGB conversion of a 32-bit float image clips to 0..255: a 0..1 image (as
    scikit-image and tifffile save them) read as black, without a word."""
    unit = tmp_path / "unit.tiff"
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)).save(unit)
    assert Image.open(unit).mode == "F"
    assert np.asarray(read_rgb(unit))[..., 1].flatten().tolist() == list(range(256))
    byte_range = tmp_path / "bytes.tiff"  # 0..255 as floats: kept as they are
    Image.fromarray(np.arange(256, dtype=np.float32).reshape(16, 16)).save(byte_range)
    assert np.asarray(read_rgb(byte_range))[..., 2].flatten().tolist() == list(range(256))
    other = tmp_path / "kelvin.tiff"  # neither range: no guess, one line
    Image.fromarray(np.full((40, 40), 300.5, np.float32)).save(other)
    assert main(["predict", str(other), *bare_checkpoint]) == 2
    assert capsys.readouterr().err == (
        f"crossformer predict: error: cannot read image {other}: a 32-bit float image with values from 300.5 to 300.5, "
        "on neither 0..1 nor 0..255: save it as an 8-bit image; fix or delete it, or pass --skip-corrupt to skip such files\n")


# ---------------------------------------------------------------- formats this build cannot read: named, not left out unsaid

LEFT_OUT_END = "(convert them to JPEG or PNG)"


def _photos_with_unread_formats(folder: Path) -> tuple[list[Path], list[Path]]:
    """``folder`` with images read here (an upper-case extension; an AVIF and a JPEG 2000 where
    Pillow reads them) and two of formats this build cannot read (a phone's HEIC, a JPEG XL), a
    text file among them; returns ``(read, left out)``, each sorted as found."""
    (folder / "sub").mkdir(parents=True)
    read = [folder / "a.JPG"]
    for name, readable in (("aa.jp2", features.check_codec("jpg_2000")), ("sub/b.avif", features.check_module("avif"))):
        if readable:
            read.append(folder / name)
    for path in read:
        Image.new("RGB", (40, 40), (200, 10, 10)).save(path, format="JPEG" if path.suffix == ".JPG" else None)
    left_out = [folder / "c.heic", folder / "sub" / "d.JXL"]
    for path in left_out:
        path.write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "notes.txt").write_text("not an image")
    return read, left_out


def test_predict_names_the_files_of_formats_it_cannot_read(tmp_path: Path, bare_checkpoint: list[str],
                                                           capsys: pytest.CaptureFixture) -> None:
    """A folder's .heic and .jxl files were left out without a word (and .avif ones, which Pillow reads)."""
    read, left_out = _photos_with_unread_formats(tmp_path / "photos")
    assert main(["predict", str(tmp_path / "photos"), *bare_checkpoint]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["path"] for line in captured.out.splitlines()] == [str(p) for p in read]
    assert captured.err == (f"crossformer predict: left out 2 files this build cannot read: {left_out[0]}, "
                            f"{left_out[1]} {LEFT_OUT_END}\n"), captured.err


def test_a_named_file_of_a_format_it_cannot_read_says_its_codec_is_missing(tmp_path: Path, bare_checkpoint: list[str],
                                                                           capsys: pytest.CaptureFixture) -> None:
    """A phone's .heic named on the command line was "its content is no image format Pillow reads"."""
    for name, suffix in (("IMG_0001.HEIC", ".heic"), ("photo.jxl", ".jxl")):
        path = tmp_path / name
        path.write_bytes(b"\x00\x00\x00\x18ftypheic")
        reason = f"its format ({suffix}) needs a codec this build lacks: convert it to JPEG or PNG"
        assert main(["predict", str(path), *bare_checkpoint]) == 2
        err = capsys.readouterr().err
        assert err == f"crossformer predict: error: cannot read image {path}: {reason}; fix or delete it, or pass " \
                      "--skip-corrupt to skip such files\n", err
        assert find_unreadable([str(path)]) == [f"{path}: {reason}"]  # training's check of validation images


def test_predict_on_a_folder_of_only_formats_it_cannot_read_is_one_line(tmp_path: Path, bare_checkpoint: list[str],
                                                                       capsys: pytest.CaptureFixture) -> None:
    only = tmp_path / "phone"
    only.mkdir()
    (only / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    assert main(["predict", str(only), *bare_checkpoint]) == 2
    assert capsys.readouterr().err == (
        f"crossformer predict: error: no images in folder {only}: it holds only 1 file this build cannot read: "
        f"{only / 'IMG_0001.HEIC'} {LEFT_OUT_END}\n")


def test_detection_and_segmentation_predict_name_them_alike(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The three tasks' predict find a folder's images through one helper, and say the same line."""
    from crossformer.detection.predict import predict_detections
    from crossformer.segmentation.inference import InferenceConfig
    from crossformer.segmentation.predict import predict_images
    from test_robust_outputs import _NoDetections
    from test_segmentation_eval import ConstantSegmentor

    read, left_out = _photos_with_unread_formats(tmp_path / "photos")
    line = f"left out 2 files this build cannot read: {left_out[0]}, {left_out[1]} {LEFT_OUT_END}"

    said: list[str] = []
    predicted = predict_detections(_NoDetections(), tmp_path / "photos", tmp_path / "det", ["a"], log=said.append)
    assert len(predicted.images) == len(read) and said == [line]
    said.clear()
    results, _ = predict_images(ConstantSegmentor(3, target=1), tmp_path / "photos", tmp_path / "seg", ["a", "b", "c"],
                                inference=InferenceConfig(scale=(64, 48)), log=said.append)
    assert [r.path for r in results] == [str(p) for p in read] and said == [line]
    for path in read:
        path.unlink()
    with pytest.raises(DataError, match=f"^no images in folder {tmp_path / 'photos'}: it holds only 2 files this build"):
        predict_images(ConstantSegmentor(3, target=1), tmp_path / "photos", tmp_path / "seg", ["a", "b", "c"])


def test_training_names_the_files_of_formats_it_cannot_read(tmp_path: Path) -> None:
    """Training learned without a class folder's .heic photos, unsaid; a class folder of only such
    photos said "holds no images (.jpg, ...)", which they seemed to be."""
    from crossformer.classification import task as train_module
    from crossformer.engine import DistContext

    from classification_fixtures import tiny_config

    data = make_image_folder(tmp_path / "data", {"train": 2, "val": 1})
    heic = data / "train" / "cat" / "IMG_0002.heic"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic")
    task = train_module.ClassificationTask(tiny_config(data, tmp_path / "run"), DistContext())
    assert task.notes == [f"left out 1 file this build cannot read: {heic} {LEFT_OUT_END}"]
    only = data / "val" / "cat"
    for path in only.iterdir():
        path.unlink()
    (only / "IMG_0003.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(DataError, match=f"class folder {only} holds no images .*: it holds only 1 file this build cannot "
                                        f"read: {only / 'IMG_0003.HEIC'} "):
        ImageFolderDataset(data, "val")


def test_evaluate_names_them_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from crossformer.classification import evaluate
    from crossformer.models import CrossFormer

    torch.save({"model": CrossFormer(**TINY_MODEL, num_classes=3).state_dict()}, tmp_path / "bare.pth")
    data = make_image_folder(tmp_path / "data", {"val": 1})
    heic = data / "val" / "dog" / "IMG_0005.heic"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic")
    metrics = evaluate(tmp_path / "bare.pth", data, model="crossformer_tiny", img_size=32, num_workers=0, device="cpu",
                       model_kwargs=TINY_MODEL)
    assert metrics["images"] == 3
    assert capsys.readouterr().err == f"left out 1 file this build cannot read: {heic} {LEFT_OUT_END}\n"


def test_segmentation_training_names_them_too(tmp_path: Path) -> None:
    from crossformer.engine import DistContext
    from crossformer.engine.config import build_config
    from crossformer.segmentation.config import SegmentationConfig
    from crossformer.segmentation.task import SegmentationTask

    from segmentation_fixtures import make_tiny_ade, tiny_config

    root = make_tiny_ade(tmp_path / "data", images=6)
    heic = root / "ADEChallengeData2016" / "images" / "training" / "IMG_0004.heic"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic")
    layers = tiny_config(data={"root": str(root)}, run={"output": str(tmp_path / "run")})
    task = SegmentationTask(build_config(SegmentationConfig, (layers, "tiny")), DistContext())
    assert task.notes == [f"left out 1 file this build cannot read: {heic} {LEFT_OUT_END}"]


def test_the_detection_graphs_input_sees_the_picture_as_predict_does(tmp_path: Path) -> None:
    """docs/export.md runs the ONNX detector on ``graph_input(Image.open(path))``, which took
    the stored grid of a sideways-stored photo (boxes on the sideways image) and clipped a
    16-bit PNG to near white, where predict reads both upright and scaled."""
    from crossformer.detection.export import graph_input

    rng = np.random.default_rng(0)
    _save_turned(tmp_path / "sideways.jpg", rng.integers(0, 255, (40, 70, 3), dtype=np.uint8), 6)
    Image.fromarray(rng.integers(0, 65535, (40, 70), dtype=np.uint16)).save(tmp_path / "deep.png")
    for name in ("sideways.jpg", "deep.png"):
        with Image.open(tmp_path / name) as opened:
            images, factors = graph_input(opened, max_size=128, min_size=64)
        expected, expected_factors = graph_input(read_rgb(tmp_path / name), max_size=128, min_size=64)
        assert torch.equal(images, expected) and factors == expected_factors, name
    assert images.shape[-2:] == (64, 112) and expected.shape[-2:] == (64, 112)
