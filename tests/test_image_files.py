"""Users' image files as phones and other tools write them, through the one image reader that
classification, detection and segmentation share (``crossformer.data.folder``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classification_fixtures import TINY_MODEL, make_image_folder
from crossformer.cli import main
from crossformer.data import ImageFolderDataset, read_rgb
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
