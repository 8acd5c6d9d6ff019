"""Segmentation data: ADE20K layout, reduce-zero-label, the mmseg training pipeline, bad data."""

from __future__ import annotations

import colorsys
import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

from crossformer.data import DataError
from crossformer.errors import UserInputError
from crossformer.segmentation.data import (
    SegmentationDataset, ade20k_dataset, check_batch, collate_segmentation, find_ade_root, load_class_list, read_label,
)
from crossformer.segmentation.synthetic import SYNTHETIC_CLASSES, make_ade_dataset
from crossformer.segmentation.transforms import (
    MMSEG_MEAN, MMSEG_STD, SegTrainTransform, TrainPipelineConfig, photometric_distortion, random_crop_box,
    hsv_to_rgb_u8, normalize, rescale_size, resize_image, resize_label, resize_to_multiple, rgb_to_hsv_u8,
    sample_train_scale,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    make_ade_dataset(root, images=10, seed=3, size=(64, 80))
    return root


def _save_pair(folder, name, image, label, mode="L"):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "ann").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "img" / f"{name}.jpg")
    Image.fromarray(label, mode=mode).save(folder / "ann" / f"{name}.png")


# ---------------------------------------------------------------- data sets

def test_synthetic_layout_and_reduce_zero_label(synthetic):
    ade = find_ade_root(synthetic)  # the parent is accepted
    assert ade.name == "ADEChallengeData2016" and find_ade_root(ade) == ade
    train, val = ade20k_dataset(synthetic, "train"), ade20k_dataset(synthetic, "validation")
    assert (len(train), len(val)) == (8, 2)
    assert train.classes == list(SYNTHETIC_CLASSES) and train.reduce_zero_label
    seen = set()
    for index in range(len(train)):
        raw = np.asarray(Image.open(train.samples[index][1]))
        _, label = train.load(index)
        assert (label[raw == 0] == 255).all()
        assert (label[raw > 0] == raw[raw > 0] - 1).all()
        seen |= set(np.unique(raw).tolist())
    assert 0 in seen and len(seen) >= 6  # unlabelled pixels and most classes occur


def test_default_ade_classes_and_folder_pair(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    _save_pair(tmp_path / "pair", "a", np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 2, np.uint8))
    for kind in ("images", "annotations"):
        (ade / kind).mkdir(parents=True)
        (tmp_path / "pair" / ("img" if kind == "images" else "ann")).rename(ade / kind / "validation")
    dataset = ade20k_dataset(ade, "val")
    assert dataset.num_classes == 150 and dataset.classes[2] == "sky" and dataset.palette[0] == (120, 120, 120)
    assert (dataset.load(0)[1] == 1).all()  # 2 -> class 1 (building)
    # The same files as a plain folder pair with a class list file: no reduction.
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    plain = SegmentationDataset(ade / "images" / "validation", ade / "annotations" / "validation", tmp_path / "names.txt")
    assert plain.classes == ["a", "b", "c"] and (plain.load(0)[1] == 2).all()


# ---------------------------------------------------------------- the training pipeline

def test_rescale_rounding_hand_computed():
    # factor = min(2048/500, 512/375) = 1.36533..; 500 * f = 682.67 -> 683, 375 * f = 512.0 -> 512
    assert rescale_size(500, 375, (2048, 512)) == (683, 512)
    # factor = min(1024/1000, 256/300) = 0.85333..; 300 * f = 256.0 -> 256, 1000 * f = 853.33 -> 853
    assert rescale_size(300, 1000, (1024, 256)) == (256, 853)
    # half rounds up as mmcv's int(x + 0.5) (Python's round would give 2): factor 0.5, 5 * 0.5 = 2.5 -> 3
    assert rescale_size(5, 2, (3, 1)) == (3, 1)
    ratio = 0.5 + 1.5 * float(torch.rand((), generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    assert sample_train_scale((2048, 512), (0.5, 2.0), torch.Generator().manual_seed(7)) == (int(2048 * ratio), int(512 * ratio))
    # the authors' AlignResize: the next multiples of 32 (a resize)
    assert resize_to_multiple(np.zeros((512, 683, 3), np.uint8), 32).shape == (512, 704, 3)
    # label maps: OpenCV's INTER_NEAREST reads source pixel floor(i * in / out)
    row = np.arange(4, dtype=np.uint8)[None]
    assert resize_label(row, (3, 1)).tolist() == [[0, 1, 2]] and resize_label(row, (6, 1)).tolist() == [[0, 0, 1, 2, 2, 3]]


def test_crop_class_ratio_rule():
    # Left 30 columns striped (classes 2/3), the rest class 1: 20x20 crops with x1 <= 24 pass.
    label = np.ones((100, 100), np.uint8)
    label[:, :30] = 2 + (np.arange(30) // 2) % 2

    def passes(box):
        values, counts = np.unique(label[box[0]:box[1], box[2]:box[3]], return_counts=True)
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    ruled = [passes(random_crop_box(label, (20, 20), 0.75, generator=torch.Generator().manual_seed(s))) for s in range(60)]
    free = [passes(random_crop_box(label, (20, 20), 1.0, generator=torch.Generator().manual_seed(s))) for s in range(60)]
    assert sum(ruled) >= 55 and sum(free) <= 30  # 25/81 of boxes pass by chance

    # Ignored pixels do not count as a class: no crop can pass, so exactly 1 + 10 boxes are drawn.
    half = np.full((100, 100), 255, np.uint8)
    half[:, 50:] = 1
    assert _drawn_eleven_times(half, (20, 20), positions=81)
    # A crop where one class covers exactly cat_max_ratio does not pass (mmseg: ratio < cat_max_ratio):
    # the only box (crop = label size) is drawn 1 + 10 times.
    three_quarters = np.ones((4, 4), np.uint8)
    three_quarters[0] = 2
    assert _drawn_eleven_times(three_quarters, (4, 4), positions=1)


def _drawn_eleven_times(label: np.ndarray, crop_size: tuple[int, int], positions: int) -> bool:
    """Whether ``random_crop_box`` (cat_max_ratio 0.75, seed 0) drew its box 1 + 10 times: two draws
    from ``positions`` offsets each, as a replay of the generator shows."""
    generator = torch.Generator().manual_seed(0)
    random_crop_box(label, crop_size, 0.75, generator=generator)
    replay = torch.Generator().manual_seed(0)
    for _ in range(11 * 2):
        torch.randint(0, positions, (), generator=replay)
    return torch.equal(generator.get_state(), replay.get_state())


def _colour_coded(height, width):
    """An image whose colour encodes position and class (so image/label alignment is checkable)."""
    label = ((np.arange(width)[None, :] // 7 + np.arange(height)[:, None] // 5) % 5).astype(np.uint8)
    image = np.stack([label * 50, np.tile(np.arange(width) * 3 % 256, (height, 1)),
                      np.repeat((np.arange(height) * 5 % 256)[:, None], width, 1)], -1).astype(np.uint8)
    return image, label


def _denormalize(tensor):
    return (tensor * torch.tensor(MMSEG_STD).view(3, 1, 1) + torch.tensor(MMSEG_MEAN).view(3, 1, 1)).round().byte()


def test_flip_moves_image_and_label_together():
    image, label = _colour_coded(40, 60)
    config = TrainPipelineConfig(scale=(60, 40), ratio_range=(1.0, 1.0), crop_size=(24, 32), cat_max_ratio=1.0, photometric=False)
    transform = SegTrainTransform(config)
    flips = set()
    for seed in range(8):
        out, target, meta = transform(image, label, torch.Generator().manual_seed(seed))
        assert meta["scale"] == (60, 40)  # ratio 1: no resize
        y1, y2, x1, x2 = meta["crop"]
        expected_img, expected_lab = image[y1:y2, x1:x2], label[y1:y2, x1:x2]
        if meta["flip"]:
            expected_img, expected_lab = expected_img[:, ::-1], expected_lab[:, ::-1]
        assert torch.equal(target, torch.from_numpy(expected_lab.copy()).long())
        assert torch.equal(_denormalize(out), torch.from_numpy(expected_img.copy()).permute(2, 0, 1))
        flips.add(meta["flip"])
    assert flips == {True, False}
    for prob in (0.0, 1.0):  # never / always
        transform = SegTrainTransform(dataclasses.replace(config, flip_prob=prob))
        assert {transform(image, label, torch.Generator().manual_seed(s))[2]["flip"] for s in range(4)} == {prob == 1.0}


def test_padding_values_and_batch(synthetic):
    image, label = _colour_coded(20, 30)
    config = TrainPipelineConfig(scale=(30, 20), ratio_range=(1.0, 1.0), crop_size=(32, 48), photometric=False)
    out, target, _ = SegTrainTransform(config)(image, label, torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 48) and target.shape == (32, 48)
    assert (out[:, 20:] == 0).all() and (out[:, :, 30:] == 0).all()  # 0 after normalisation
    assert (target[20:] == 255).all() and (target[:, 30:] == 255).all()
    assert (target[:20, :30] != 255).all()
    dataset = ade20k_dataset(synthetic, "train", SegTrainTransform(TrainPipelineConfig(scale=(160, 64), crop_size=(48, 48))))
    batch = collate_segmentation([dataset[i] for i in range(3)])
    assert batch.images.shape == (3, 3, 48, 48) and batch.images.dtype == torch.float32
    assert batch.labels.shape == (3, 48, 48) and batch.labels.dtype == torch.int64
    assert set(batch.labels.unique().tolist()) <= set(range(7)) | {255}
    assert [m["path"] for m in batch.metas] == [dataset.samples[i][0] for i in range(3)]


def test_photometric_distortion_hsv_and_ranges():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1, 50, 3), dtype=np.uint8)
    hsv = rgb_to_hsv_u8(pixels)
    for (r, g, b), (h, s, v) in zip(pixels[0] / 255.0, hsv[0]):
        ch, cs, cv = colorsys.rgb_to_hsv(r, g, b)
        assert abs(int(h) - round(ch * 180) % 180) <= 1 and abs(int(s) - cs * 255) <= 0.51 and v == round(cv * 255)
    back = hsv_to_rgb_u8(hsv)
    for (h, s, v), rgb in zip(hsv[0], back[0]):
        expected = [round(x * 255) for x in colorsys.hsv_to_rgb(h / 180, s / 255, v / 255)]
        assert np.abs(rgb.astype(int) - expected).max() <= 1
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    outs = [photometric_distortion(image, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, image) for o in outs)
    # The hue shift wraps modulo 180 (OpenCV's 8-bit hue): pure red (H 0) shifted by -1 is H 179, still
    # red (B 8 or 9), never a hue past 179 (H 255 would read as cyan). Only the hue step changes values here.
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    outs = [photometric_distortion(red, brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=1,
                                   generator=torch.Generator().manual_seed(s)) for s in range(16)]
    assert all((o[..., 0] == 255).all() and (o[..., 1] == 0).all() and (o[..., 2] <= 9).all() for o in outs)
    assert any(o[..., 2].any() for o in outs)  # some draws shifted the hue


# ---------------------------------------------------------------- bad data

def test_bad_data_one_line_errors(tmp_path):
    _save_pair(tmp_path, "ok", np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 3, np.uint8))
    names = ["a", "b", "c"]
    with pytest.raises(DataError, match=r"holds value 3, out of range for 3 classes") as err:
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", names).load(0)
    assert "ok.png" in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).endswith("255 = ignore); if 0 means unlabelled and classes count from 1, pass "
                                   "data.reduce_zero_label=true")  # value 3 of 3 classes: counted from 1
    # 3 is valid with reduce-zero-label (values 1..3), 255 too
    assert SegmentationDataset(tmp_path / "img", tmp_path / "ann", names, reduce_zero_label=True).load(0)[1].max() == 2

    _save_pair(tmp_path, "ok", np.zeros((8, 9, 3), np.uint8), np.full((8, 8), 1, np.uint8))
    with pytest.raises(DataError, match=r"ok\.png is 8x8 but its image .*ok\.jpg is 9x8"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", names).load(0)

    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "ann" / "ok.png")  # colour-coded
    with pytest.raises(DataError, match=r"ok\.png holds colours \(mode RGB\): to read colour-coded maps, list each "
                                        r"class's \[R, G, B\] in data.label_colours \(in class order\), or save class "
                                        r"indices as a single-channel PNG \(mode L or P\)$"):
        read_label(tmp_path / "ann" / "ok.png")
    # a two-class mask saved from a bool array is a 1-bit PNG (mode "1"): its values are 0 and 1
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    Image.fromarray(mask).save(tmp_path / "ann" / "ok.png")
    assert Image.open(tmp_path / "ann" / "ok.png").mode == "1"
    assert np.array_equal(read_label(tmp_path / "ann" / "ok.png"), mask.astype(np.int64))

    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "lonely.jpg")
    with pytest.raises(DataError, match=r"image .*lonely\.jpg has no annotation: expected .*lonely\.png"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", names)
    # the other way round it was silently left out: a lost image, or one of an extension not read
    (tmp_path / "img" / "lonely.jpg").rename(tmp_path / "lonely.jpg")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "ann" / "lonely.png")
    with pytest.raises(DataError, match=r"annotation .*lonely\.png has no image: expected .*img/lonely\.jpg \(or"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", names)
    # an image of a format this build cannot read is named, not "expected lonely.jpg" beside it
    (tmp_path / "lonely.jpg").rename(tmp_path / "img" / "lonely.heic")
    with pytest.raises(DataError, match=r"annotation .*lonely\.png has no image this build can read, only "
                                        r".*img/lonely\.heic: convert it to JPEG or PNG$"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", names)
    # two images of one stem were both scored against the one annotation
    (tmp_path / "img" / "lonely.heic").unlink()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "ok.png")
    with pytest.raises(DataError, match=r"images .*ok\.jpg and .*ok\.png share the annotation .*ann/ok\.png"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", names)
    # and images beside their label maps read each label map as an image too
    with pytest.raises(DataError, match=r"images and label maps share the folder .*ann: keep them in separate"):
        SegmentationDataset(tmp_path / "ann", tmp_path / "ann", names)


def test_unreadable_images_skipped_and_named(tmp_path):
    for name in ("a", "b"):
        _save_pair(tmp_path, name, np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8))
    (tmp_path / "img" / "b.jpg").write_bytes(b"not a jpeg")
    dataset = SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["x", "y"])
    batch = collate_segmentation([dataset[0], dataset[1]])
    assert batch.images.shape == (1, 3, 8, 8) and len(batch.unreadable) == 1
    with pytest.raises(DataError, match=r"cannot read image .*b\.jpg"):
        check_batch(batch, skip_corrupt=False)
    logged = []
    assert check_batch(batch, skip_corrupt=True, on_skip=logged.append) == 1
    assert "b.jpg" in logged[0]
    # Out-of-range labels are not skippable.
    Image.fromarray(np.full((8, 8), 9, np.uint8), mode="L").save(tmp_path / "ann" / "a.png")
    with pytest.raises(DataError, match="out of range"):
        check_batch(collate_segmentation([dataset[0]]), skip_corrupt=True)


def test_files_deleted_since_the_listing_are_skipped_as_unreadable(tmp_path):
    # a pair's file deleted since the pairs were listed stopped the run, --skip-corrupt or not,
    # with "image not found" and no word of the flag
    for name in ("a", "b"):
        _save_pair(tmp_path, name, np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8))
    dataset = SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["x", "y"])
    (tmp_path / "img" / "b.jpg").unlink()
    (tmp_path / "ann" / "a.png").unlink()
    batch = collate_segmentation([dataset[0], dataset[1]])
    assert len(batch.images) == 0 and not batch.invalid
    with pytest.raises(DataError, match=r"cannot read label map .*a\.png: file not found; .*--skip-corrupt"):
        check_batch(batch, skip_corrupt=False)
    logged = []
    assert check_batch(batch, skip_corrupt=True, on_skip=logged.append) == 2
    assert logged == [f"cannot read label map {tmp_path / 'ann' / 'a.png'}: file not found",
                      f"cannot read image {tmp_path / 'img' / 'b.jpg'}: file not found"]


def test_exif_orientation_and_palette_labels(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :5] = 255  # left quarter white in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(stored).save(tmp_path / "img" / "r.jpg", exif=exif, quality=100)
    label = Image.fromarray(np.ones((20, 10), np.uint8), mode="P")  # displayed size: 10 wide, 20 high
    label.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    label.save(tmp_path / "ann" / "r.png")
    image, lab = SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["a", "b"]).load(0)
    assert image.shape == (20, 10, 3) and (lab == 1).all()  # palette indices, not colours
    assert image[:5].mean() > 200 and image[6:].mean() < 50  # the white band is now on top
    # a label map drawn on the stored pixels: the message says why two files of one size differ
    Image.fromarray(np.ones((10, 20), np.uint8)).save(tmp_path / "ann" / "r.png")
    with pytest.raises(DataError, match=r"r\.png is 20x10 but its image .*r\.jpg is 10x20 \(width x height\) as its "
                                        r"EXIF orientation turns it \(stored 20x10: rotate the label map"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["a", "b"]).load(0)


def test_a_class_list_saved_with_a_byte_order_mark_and_crlf(tmp_path):
    # The mark stayed in the first name ("\ufeffwall"): another class than the checkpoint's "wall".
    path = tmp_path / "classes.txt"
    path.write_bytes("wall\r\nbuilding\r\n\r\n".encode("utf-8-sig"))
    assert load_class_list(path) == ["wall", "building"]
    # a blank line among the names was dropped: every class after it took the index before its own
    path.write_text("wall\n\nbuilding\n")
    with pytest.raises(DataError, match=rf"^line 2 of the class list {re.escape(str(path))} is blank: a line's place is "
                                        r"its class's index, so give every class a name \(e.g. 'unused'\) or remove the line$"):
        load_class_list(path)


def test_label_maps_of_upper_case_png_and_of_jpeg(tmp_path):
    # A .PNG label map was "no annotation: expected a.png" beside it (and on a case-sensitive
    # file system nothing could pair it); a JPEG one was the same line, not naming the file.
    image, label = np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8)
    _save_pair(tmp_path, "a", image, label)
    (tmp_path / "ann" / "a.png").rename(tmp_path / "ann" / "a.PNG")
    dataset = SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["x", "y"])
    assert dataset.samples == [(str(tmp_path / "img" / "a.jpg"), str(tmp_path / "ann" / "a.PNG"))]
    assert (dataset.load(0)[1] == 1).all()
    (tmp_path / "ann" / "a.PNG").unlink()
    Image.fromarray(label).save(tmp_path / "ann" / "a.jpg")
    with pytest.raises(DataError, match=r"a\.jpg has no annotation: expected .*ann/a\.png, found a\.jpg; label maps are "
                                        r"read from PNGs only \(JPEG's compression changes class values"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["x", "y"])


def test_a_class_list_of_one_class_is_refused(tmp_path):
    # One class trained to a loss of 0 and evaluated at 100 mIoU: every pixel's argmax is it.
    _save_pair(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"the class list names one class \('road'\); .* add 'background' \(label "
                                        r"value 0\) before 'road' \(value 1\)"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["road"])
    assert SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["background", "road"]).num_classes == 2


def test_a_folder_of_ones_own_given_as_the_ade20k_root_names_the_folder_settings(tmp_path):
    # `--data mydata` (images and labels of one's own) said only what ADE20K's layout is.
    _save_pair(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"is not an ADE20K folder: .*; image and label folders of your own go to "
                                        r"data.train_images, data.train_labels, data.val_images, data.val_labels, "
                                        r"with data.classes$"):
        find_ade_root(tmp_path)


def test_a_grey_label_map_saved_as_rgb_reads_as_its_values(tmp_path):
    # A grey map that a tool saved with three equal channels (or grey + opaque alpha) was refused
    # as "a RGB image ... not colours"; a colour-coded or see-through one still is.
    values = np.arange(12, dtype=np.uint8).reshape(3, 4) % 3
    Image.fromarray(np.repeat(values[..., None], 3, axis=2)).save(tmp_path / "grey.png")
    assert Image.open(tmp_path / "grey.png").mode == "RGB"
    assert np.array_equal(read_label(tmp_path / "grey.png"), values.astype(np.int64))
    for mode in ("RGBA", "LA"):  # opaque: GIMP's grey + alpha export
        Image.fromarray(values).convert(mode).save(tmp_path / f"{mode}.png")
        assert np.array_equal(read_label(tmp_path / f"{mode}.png"), values.astype(np.int64)), mode
    see_through = Image.fromarray(values).convert("LA")
    see_through.putalpha(0)
    see_through.save(tmp_path / "clear.png")
    with pytest.raises(DataError, match=r"clear\.png has transparent pixels \(mode LA\)"):
        read_label(tmp_path / "clear.png")
    colours = np.repeat(values[..., None], 3, axis=2)
    colours[0, 0] = (1, 0, 0)
    Image.fromarray(colours).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match=r"colour\.png holds colours \(mode RGB\)"):
        read_label(tmp_path / "colour.png")
    # each refusal says what is wrong with the file: not "a LA image ... not colours" for a grey
    # one with see-through pixels, nor "a CMYK image" for a mode that is no colour-coding
    Image.fromarray(colours).convert("RGBA").save(tmp_path / "colour_alpha.png")
    with pytest.raises(DataError, match=r"colour_alpha\.png holds colours \(mode RGBA\)"):
        read_label(tmp_path / "colour_alpha.png")
    Image.fromarray(values).convert("CMYK").save(tmp_path / "cmyk.tif")
    with pytest.raises(DataError, match=r"cmyk\.tif has mode CMYK; label maps must be single-channel PNGs"):
        read_label(tmp_path / "cmyk.tif")


def test_a_float_or_32_bit_label_map_of_whole_values_reads_as_them(tmp_path):
    # A 32-bit float TIFF of class indices (as some tools write label maps) was refused as "a F
    # image; label maps must be single-channel PNGs ... not colours": it is single-channel.
    values = np.arange(12).reshape(3, 4) % 3
    for mode, dtype in (("F", np.float32), ("I", np.int32)):
        Image.fromarray(values.astype(dtype), mode=mode).save(tmp_path / f"{mode}.tif")
        assert Image.open(tmp_path / f"{mode}.tif").mode == mode
        assert np.array_equal(read_label(tmp_path / f"{mode}.tif"), values), mode
    # values a resize interpolated are no class: one line that says how to write the map
    Image.fromarray(values.astype(np.float32) / 2, mode="F").save(tmp_path / "halves.tif")
    with pytest.raises(DataError, match=r"halves\.tif is a 32-bit float image holding 0\.5, not a class index: resize "
                                        r"label maps with nearest-neighbour and save the class indices as an 8-bit PNG "
                                        r"\(mode L\)$"):
        read_label(tmp_path / "halves.tif")
    # and as a data set's label maps (data.label_suffix=.tif)
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "F.tif").rename(tmp_path / "ann" / "a.tif")
    dataset = SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["x", "y", "z"], label_suffix=".tif")
    assert np.array_equal(dataset.load(0)[1], values)


def test_class_counts_whose_last_value_would_be_the_ignored_255(tmp_path):
    # With reduce_zero_label, 255 classes were taken: the last one, stored as 255, read as ignored.
    _save_pair(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 255, np.uint8))
    names = [f"c{i}" for i in range(255)]
    assert SegmentationDataset(tmp_path / "img", tmp_path / "ann", names).num_classes == 255  # values 0..254
    with pytest.raises(DataError, match=r"^255 classes: label maps, counted from 1 \(reduce_zero_label\), hold at most "
                                        r"254 classes \(255 = ignore\)$"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", names, reduce_zero_label=True)
    with pytest.raises(DataError, match=r"^256 classes: label maps hold at most 255 classes"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", [*names, "c255"])


def test_a_jpeg_label_map_named_png_is_refused(tmp_path):
    # A JPEG renamed .png read as its decoded values: classes changed along every border.
    values = np.zeros((16, 16), np.uint8)
    values[4:12, 4:12] = 2
    Image.fromarray(values).save(tmp_path / "a.png", format="JPEG", quality=75)
    with pytest.raises(DataError, match=r"^label map .*a\.png is a JPEG file \(JPEG's compression changes class values "
                                        r"along every border\); save the class indices as PNG$"):
        read_label(tmp_path / "a.png")


@pytest.mark.parametrize("labels_under_images", [True, False])
def test_label_maps_in_a_subfolder_of_the_images_or_the_other_way_round(tmp_path, labels_under_images):
    # data/a.jpg with data/labels/a.png read each label map as an image too: "image
    # data/labels/a.png has no annotation: expected data/labels/labels/a.png".
    # (and images/a.png under labels/ were annotations without an image)
    _save_pair(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8))
    (tmp_path / "img" / "a.jpg").rename(tmp_path / "img" / "a.png")
    outer, inner = (tmp_path / "img", "ann") if labels_under_images else (tmp_path / "ann", "img")
    (tmp_path / inner).rename(outer / inner)
    images, labels = (outer, outer / inner) if labels_under_images else (outer / inner, outer)
    dataset = SegmentationDataset(images, labels, ["x", "y"])
    assert dataset.samples == [(str(images / "a.png"), str(labels / "a.png"))]


def test_label_maps_named_with_a_suffix(tmp_path):
    # a.jpg with a_mask.png (mmseg's seg_map_suffix) could not be paired: "expected a.png".
    from crossformer.engine.config import build_config
    from crossformer.segmentation.config import SegmentationConfig
    from crossformer.segmentation.task import build_datasets

    _save_pair(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8))
    (tmp_path / "ann" / "a.png").rename(tmp_path / "ann" / "a_mask.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "ann" / "a1.png")  # another image's: not the hint
    with pytest.raises(DataError, match=r"a\.jpg has no annotation: expected .*ann/a\.png, found a_mask\.png: where label "
                                        r"maps are named so, pass data.label_suffix=_mask\.png$"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["x", "y"])
    (tmp_path / "ann" / "a1.png").unlink()
    data = {"val_images": str(tmp_path / "img"), "val_labels": str(tmp_path / "ann"), "classes": ["x", "y"],
            "label_suffix": "_mask.png"}
    config = build_config(SegmentationConfig, ({"data": data}, "test"))
    val = build_datasets(config.data, training=False)[1]
    assert val.samples == [(str(tmp_path / "img" / "a.jpg"), str(tmp_path / "ann" / "a_mask.png"))]
    with pytest.raises(UserInputError, match=r"data.label_suffix must end in .png \(label maps are PNGs\), got '_mask.jpg'"):
        build_config(SegmentationConfig, ({"data": {**data, "label_suffix": "_mask.jpg"}}, "test"))


def test_a_palette_of_other_colours_than_one_rgb_per_class_is_one_line(tmp_path):
    # A short palette or a value of 300 failed deep in the overlay (IndexError, OverflowError).
    _save_pair(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"^data.palette holds \[0, 0, 300\]: each colour is \[R, G, B\], three values 0-255$"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["x", "y"], palette=[[0, 0, 300], [1, 1, 1]])
    with pytest.raises(DataError, match=r"^data.palette has 1 colours for 2 classes"):
        SegmentationDataset(tmp_path / "img", tmp_path / "ann", ["x", "y"], palette=[[0, 0, 0]])


def test_a_label_map_is_opened_as_every_input_image_is(tmp_path) -> None:
    """The shared opener's reasons (an empty file says so, rather than Pillow's "cannot identify")."""
    empty = tmp_path / "a.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot read label map .*a\.png: the file is empty \(0 bytes\); fix or delete it"):
        read_label(empty)


def test_a_read_only_array_is_taken_without_a_warning() -> None:
    # np.asarray(PIL image) is read-only: torch.from_numpy warned "The given NumPy array is not
    # writable" from the Python API's segment / segment_probs
    import warnings

    image = np.asarray(Image.new("RGB", (12, 8), (10, 20, 30)))
    assert not image.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resized = resize_image(image, (6, 4))
        tensor = normalize(image, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert resized.shape == (4, 6, 3) and (resized == (10, 20, 30)).all()
    assert tensor.shape == (3, 8, 12) and tensor[:, 0, 0].tolist() == [10.0, 20.0, 30.0]
