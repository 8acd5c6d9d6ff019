"""Segmentation metrics, whole / slide / multi-scale + flip inference, and predict's outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from crossformer.data import DataError
from crossformer.engine import DistContext
from crossformer.errors import UserInputError
from crossformer.segmentation.data import ade20k_dataset, reduce_zero_label
from crossformer.segmentation.evaluate import IoUAccumulator, evaluate_segmentor
from crossformer.segmentation import inference
from crossformer.segmentation.inference import InferenceConfig, prepare_image, scale_bounds, segment_probs, slide_logits
from crossformer.segmentation.predict import predict_images, write_label_map
from crossformer.segmentation.synthetic import make_ade_dataset


class TinySegmentor(nn.Module):
    """A stand-in following the segmentor interface: a 1x1 convolution at stride 4."""

    align_corners = False

    def __init__(self, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        torch.manual_seed(seed)
        self.classifier = nn.Conv2d(3, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.avg_pool2d(images, 4, ceil_mode=True))

    def predict_logits(self, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self(images), size=out_size, mode="bilinear", align_corners=False)


class ConstantSegmentor(TinySegmentor):
    """Predicts ``target`` everywhere."""

    def __init__(self, num_classes: int, target: int) -> None:
        super().__init__(num_classes)
        self.target = target

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(images.shape[0], self.num_classes, -(-images.shape[2] // 4), -(-images.shape[3] // 4))
        logits[:, self.target] = 1.0
        return logits + 0 * self.classifier.weight.sum()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("segeval")
    make_ade_dataset(root, images=10, seed=1, size=(48, 64))
    return root


# ---------------------------------------------------------------- metrics

def test_miou_hand_computed():
    acc = IoUAccumulator(4)
    label = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 3], [1, 2, 0, 0]])  # class 3 only where ignored: absent from both
    acc.update(pred, label)
    m = acc.compute(["a", "b", "c", "d"], images=1)
    # intersections 1, 2, 1, 0; unions 3, 3, 2, 0; label areas 2, 2, 2, 0
    assert m.iou[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2]) and math.isnan(m.iou[3])
    assert m.acc[:3] == pytest.approx([1 / 2, 1, 1 / 2]) and math.isnan(m.acc[3])
    assert m.miou == pytest.approx(0.5) and m.macc == pytest.approx(2 / 3) and m.aacc == pytest.approx(4 / 6)
    # A second image: class 3 predicted but never labelled -> IoU 0 (counted), Acc NaN.
    acc.update(torch.tensor([[3]]), torch.tensor([[0]]))
    m = acc.compute(["a", "b", "c", "d"], images=2)
    assert m.iou == pytest.approx([1 / 4, 2 / 3, 1 / 2, 0.0])
    assert m.miou == pytest.approx((1 / 4 + 2 / 3 + 1 / 2 + 0) / 4)  # accumulated areas, not a mean per image
    assert m.macc == pytest.approx((1 / 3 + 1 + 1 / 2) / 3) and math.isnan(m.acc[3])
    assert m.aacc == pytest.approx(4 / 7)
    as_json = json.loads(json.dumps(m.to_dict()))
    assert as_json["per_class"]["d"] == {"IoU": 0.0, "Acc": None} and as_json["mIoU"] == pytest.approx(m.miou)
    assert "nan" in m.table() and "mIoU 35.42" in m.table()
    # class d is in no label: its row is marked and the mark explained (a bare 0.00 / nan said nothing)
    rows = m.table().splitlines()
    assert [row.split()[0] for row in rows if row.endswith("  *")] == ["d"]
    assert "* in no label map: Acc reads nan, and IoU 0 where the model predicts the class (counted in mIoU)" in m.table()
    assert m.label_counts()[:5] == [3, 2, 2, 0, 0] and m.label_counts()[255] == 2  # evaluate's warning's counts


def test_miou_with_reduce_zero_label():
    raw = np.array([[0, 1, 2], [2, 255, 1]])  # ADE values: 0 = unlabelled
    label = torch.from_numpy(reduce_zero_label(raw))  # [[255, 0, 1], [1, 255, 0]]
    acc = IoUAccumulator(2)
    acc.update(torch.tensor([[1, 0, 1], [0, 1, 0]]), label)
    m = acc.compute()
    # valid pixels: (0,1) l0 p0, (0,2) l1 p1, (1,0) l1 p0, (1,2) l0 p0
    assert m.iou == pytest.approx([2 / 3, 1 / 2]) and m.acc == pytest.approx([1.0, 0.5]) and m.aacc == pytest.approx(3 / 4)


def test_all_reduce_sums_over_ranks():
    class TwoRanks(DistContext):  # as if another rank had counted the same pixels
        def all_reduce_sum(self, values):
            return [2 * v for v in values]

    acc = IoUAccumulator(2)
    acc.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    before = acc.compute()
    acc.all_reduce(TwoRanks())
    assert torch.equal(acc.areas[3], torch.tensor([4.0, 2.0], dtype=torch.float64))
    acc.update(torch.tensor([0]), torch.tensor([255]))
    acc.all_reduce(TwoRanks())
    assert acc.ignored == 2.0
    assert acc.compute().miou == pytest.approx(before.miou)


# ---------------------------------------------------------------- inference

def test_slide_against_direct_windows():
    model = TinySegmentor(3).eval()
    images = torch.randn(1, 3, 40, 50)
    got = slide_logits(model, images, crop_size=(24, 24), stride=(16, 16))
    # rows: (40 - 24 + 15) // 16 + 1 = 2 -> y 0:24, 16:40; cols: (50 - 24 + 15) // 16 + 1 = 3 -> x 0:24, 16:40, 26:50
    total, count = torch.zeros(1, 3, 40, 50), torch.zeros(40, 50)
    for y1, y2 in ((0, 24), (16, 40)):
        for x1, x2 in ((0, 24), (16, 40), (26, 50)):
            crop = images[:, :, y1:y2, x1:x2]
            total[:, :, y1:y2, x1:x2] += F.interpolate(model(crop), size=(24, 24 if x2 - x1 == 24 else x2 - x1),
                                                       mode="bilinear", align_corners=False)
            count[y1:y2, x1:x2] += 1
    assert count.min() == 1 and count.max() == 4
    torch.testing.assert_close(got, total / count, atol=1e-5, rtol=1e-5)
    # an image smaller than the window is one pass at its own size
    small = torch.randn(1, 3, 12, 16)
    torch.testing.assert_close(slide_logits(model, small, (24, 24), (16, 16)), model.predict_logits(small, (12, 16)))


def test_slide_windows_that_leave_gaps_or_are_too_small_are_refused():
    # A stride above the window left pixels of no window: 0 / 0, and every pixel came out class 0.
    with pytest.raises(UserInputError, match=r"slide stride \[40, 32\] \(test.slide_stride\) is larger than the window"):
        InferenceConfig(mode="slide", crop_size=(32, 32), stride=(40, 32))
    # A window under the backbone's 32x32 was a ValueError traceback from the backbone.
    with pytest.raises(UserInputError, match=r"slide windows \(test.slide_crop\) must be at least 32x32"):
        InferenceConfig(mode="slide", crop_size=(16, 48), stride=(16, 16))
    assert InferenceConfig(mode="slide", crop_size=(32, 32), stride=(32, 32)).stride == (32, 32)  # edge to edge


@pytest.mark.parametrize("band_rows", [None, 7])
def test_multi_scale_flip_against_direct_computation(monkeypatch, band_rows):
    if band_rows:  # the CPU resizes and softmaxes a band of rows at a time: 7 rows of 80 x 3 classes
        monkeypatch.setattr(inference, "BAND_ELEMENTS", band_rows * 80 * 3)
    model = TinySegmentor(3).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    config = InferenceConfig(scale=(128, 64), ratios=(0.5, 1.0), flip=True)
    # r=1: factor min(128/80, 64/60) = 1.0667 -> 85x64 -> multiples of 32: 96x64; r=0.5: 43x32 -> 64x32
    inputs = [prepare_image(image, (128, 64), config), prepare_image(image, (64, 32), config)]
    assert [tuple(x.shape) for x in inputs] == [(1, 3, 64, 96), (1, 3, 32, 64)]
    expected = torch.zeros(3, 60, 80)
    with torch.no_grad():
        for x in inputs:
            for flip in (False, True):
                logits = model(x.flip(-1) if flip else x)
                logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
                logits = F.interpolate(logits, size=(60, 80), mode="bilinear", align_corners=False)
                probs = logits.softmax(1)[0]
                expected += probs.flip(-1) if flip else probs
    got = segment_probs(model, image, config)
    torch.testing.assert_close(got, expected / 4, atol=1e-5, rtol=1e-5)
    # This model commutes with flipping (widths are multiples of 4), so flip-averaging changes nothing:
    # a wrong flip-back would mirror half of the passes.
    torch.testing.assert_close(got, segment_probs(model, image, InferenceConfig(scale=(128, 64), ratios=(0.5, 1.0))),
                               atol=1e-5, rtol=1e-5)
    # slide mode: window logits at the input size, then one resize to the image's
    slide = InferenceConfig(mode="slide", scale=(128, 64), ratios=(1.0,), flip=True, crop_size=(48, 48), stride=(32, 32))
    expected = torch.zeros(3, 60, 80)
    with torch.no_grad():
        for flip in (False, True):
            logits = slide_logits(model, inputs[0].flip(-1) if flip else inputs[0], (48, 48), (32, 32))
            probs = F.interpolate(logits, size=(60, 80), mode="bilinear", align_corners=False).softmax(1)[0]
            expected += probs.flip(-1) if flip else probs
    torch.testing.assert_close(segment_probs(model, image, slide), expected / 2, atol=1e-5, rtol=1e-5)
    assert InferenceConfig.build("slide", multi_scale=True, flip=True).ratios == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    # each scaled bound is truncated, as mmseg's int(scale * ratio)
    assert scale_bounds(InferenceConfig(scale=(1000, 333), ratios=(0.75, 1.5))) == [(750, 249), (1500, 499)]
    with pytest.raises(ValueError, match="inference mode must be one of whole, slide"):
        InferenceConfig(mode="tiles")


class CornerAlignedSegmentor(TinySegmentor):
    """A segmentor resizing with ``align_corners=True``: inference takes the full-size path (no bands)."""

    align_corners = True

    def predict_logits(self, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self(images), size=out_size, mode="bilinear", align_corners=True)


def test_the_full_size_path_flips_back_and_averages_softmaxes():
    """The path GPUs take (and align_corners models on the CPU): logits at the input size, resized to
    the image, softmaxed, flipped passes flipped back, averaged over passes."""
    model = CornerAlignedSegmentor(3).eval()
    image = np.random.default_rng(1).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    config = InferenceConfig(scale=(64, 32), ratios=(0.5, 1.0), flip=True)
    expected = torch.zeros(3, 30, 44)
    with torch.no_grad():
        for bound in ((32, 16), (64, 32)):
            x = prepare_image(image, bound, config)
            for flip in (False, True):
                logits = model.predict_logits(x.flip(-1) if flip else x, x.shape[-2:])
                probs = F.interpolate(logits, size=(30, 44), mode="bilinear", align_corners=True).softmax(1)[0]
                expected += probs.flip(-1) if flip else probs
    torch.testing.assert_close(segment_probs(model, image, config), expected / 4, atol=1e-5, rtol=1e-5)


def test_a_long_thin_image_keeps_a_side_of_one_pixel_at_every_scale():
    # 3000x6 at (64, 48) x 0.5: factor min(32/3000, 24/6) = 0.0107, height 6 x 0.0107 + 0.5 -> 0 by mmcv's
    # rounding, and the resize failed ("output sizes should be greater than 0"). Now 1, then 32 aligned.
    model = TinySegmentor(3).eval()
    image = np.full((6, 3000, 3), 120, dtype=np.uint8)
    config = InferenceConfig(scale=(64, 48), ratios=(0.5, 1.0), flip=True)
    assert tuple(prepare_image(image, (32, 24), config).shape) == (1, 3, 32, 32)
    assert segment_probs(model, image, config).shape == (3, 6, 3000)


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any tensor op produced while active."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.most = max(self.most, value.numel())
        return out


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_a_photo_is_labelled_a_band_at_a_time_without_every_class_at_its_size(monkeypatch, mode):
    """predict on a photo larger than the test scale held (C, H, W) probabilities: 150 classes of a
    12-megapixel photo are 7.2 GB. The label map is the same; no tensor comes near that size."""
    monkeypatch.setattr(inference, "BAND_ELEMENTS", 8 * 320 * 20)  # bands of 8 rows, as 1M elements are of a photo
    model = TinySegmentor(20).eval()
    image = np.random.default_rng(2).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    config = InferenceConfig(mode=mode, scale=(128, 64), ratios=(0.5, 1.0), flip=True, crop_size=(48, 48),
                             stride=(32, 32))
    expected = segment_probs(model, image, config).argmax(dim=0)
    with _LargestTensor() as largest:
        labels = inference.segment(model, image, config)
    assert torch.equal(labels, expected)
    assert largest.most < 20 * 240 * 320 / 4, largest.most
    # an image smaller than the test scale: in slide mode its passes' logits hold more values than its
    # probabilities, which are then added up as segment_probs adds them, to the same labels
    small = image[:48, :64]
    assert torch.equal(inference.segment(model, small, config), segment_probs(model, small, config).argmax(dim=0))


# ---------------------------------------------------------------- evaluation and prediction

@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluate_constant_model_against_labels(synthetic, mode):
    dataset = ade20k_dataset(synthetic, "val")
    config = InferenceConfig(mode=mode, scale=(128, 48), crop_size=(32, 32), stride=(21, 21))
    metrics = evaluate_segmentor(ConstantSegmentor(7, target=0), dataset, config)
    labels = np.concatenate([dataset.load(i)[1].ravel() for i in range(len(dataset))])
    labels = labels[labels != 255]
    counts = np.bincount(labels, minlength=7)
    assert metrics.images == len(dataset) == 2
    assert metrics.iou[0] == pytest.approx(counts[0] / labels.size)  # everything predicted sky
    for c in range(1, 7):
        assert (metrics.iou[c] == 0.0) if counts[c] else math.isnan(metrics.iou[c])
    assert metrics.aacc == pytest.approx(counts[0] / labels.size)
    assert metrics.settings["mode"] == mode



def _evaluate_on_this_rank(root: Path) -> tuple:
    from crossformer.engine.distributed import setup_distributed

    dataset = ade20k_dataset(root, "val")
    metrics = evaluate_segmentor(TinySegmentor(7, seed=1), dataset, InferenceConfig(scale=(128, 48)),
                                 ctx=setup_distributed("cpu"))
    return metrics.images, metrics.label_pixels, metrics.ignored_pixels, metrics.iou, metrics.aacc


@pytest.mark.slow
def test_two_processes_count_each_validation_image_once(tmp_path):
    # 3 images over 2 ranks: a rank's share padded (as for training) counts one image twice
    make_ade_dataset(tmp_path, images=15, seed=1, size=(48, 64))
    alone = _evaluate_on_this_rank(tmp_path)
    assert alone[0] == len(ade20k_dataset(tmp_path, "val")) == 3
    from two_ranks import on_two_ranks

    for rank in on_two_ranks(_evaluate_on_this_rank, tmp_path):
        assert rank[:3] == alone[:3]  # images and pixels summed over the ranks, each once
        np.testing.assert_allclose(rank[3], alone[3], rtol=1e-12)
        assert rank[4] == pytest.approx(alone[4], rel=1e-12)

def _skipping_on_this_rank(root: Path) -> tuple[int, int, list[str]]:
    from crossformer.engine.distributed import setup_distributed

    named: list[str] = []
    metrics = evaluate_segmentor(ConstantSegmentor(7, target=0), ade20k_dataset(root, "val"), InferenceConfig(scale=(128, 48)),
                                 ctx=setup_distributed("cpu"), skip_corrupt=True, on_skip=named.append)
    return metrics.images, metrics.skipped, named


@pytest.mark.slow
def test_two_processes_count_and_name_the_files_either_skipped(tmp_path):
    # each rank's on_skip (training's skip_validation_file) is given every rank's skipped files:
    # the done line, written by rank 0, counts one that rank 1 skipped
    make_ade_dataset(tmp_path, images=15, seed=1, size=(48, 64))
    bad = Path(ade20k_dataset(tmp_path, "val").samples[1][0])  # the second image: rank 1's share
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # its header reads, its pixels do not
    from two_ranks import on_two_ranks

    for images, skipped, named in on_two_ranks(_skipping_on_this_rank, tmp_path):
        assert (images, skipped) == (2, 1)
        assert len(named) == 1 and named[0].startswith(f"file {bad}: image file is truncated"), named


def test_evaluate_refuses_wrong_class_count(synthetic):
    with pytest.raises(DataError, match="has 7 classes but the segmentor predicts 3"):
        evaluate_segmentor(TinySegmentor(3), ade20k_dataset(synthetic, "val"))


def test_predict_writes_overlays_and_label_maps(synthetic, tmp_path):
    dataset = ade20k_dataset(synthetic, "val")
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.open(dataset.samples[0][0]).convert("L").save(inputs / "gray.png")
    Image.open(dataset.samples[1][0]).convert("RGBA").save(inputs / "rgba.png")
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    model = ConstantSegmentor(7, target=3)
    config = InferenceConfig(scale=(128, 48))
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        predict_images(model, [inputs], tmp_path / "out", dataset.classes, inference=config)
    logged = []
    model.train()
    results, skipped = predict_images(model, [inputs], tmp_path / "out", dataset.classes, dataset.palette, config,
                                      reduce_zero_label=True, skip_corrupt=True, log=logged.append)
    assert model.training  # run in eval mode, then left as it was
    assert [r.path.rsplit("/", 1)[1] for r in results] == ["gray.png", "rgba.png"] and len(skipped) == 1
    assert "broken.jpg" in logged[0]
    for result in results:
        size = Image.open(result.path).size
        overlay, labels = Image.open(result.overlay), Image.open(result.label_map)
        assert overlay.mode == "RGB" and labels.size == size and labels.mode == "L"
        assert (np.asarray(labels) == 4).all()  # class 3 (water) written as 3 + 1
        assert result.classes == ["water"]
        # the image is the 50% blend; its legend (over a quarter of this 60x41 image) is beside it
        assert overlay.size[0] > size[0] and overlay.size[1] == size[1]
        painted = np.asarray(overlay.crop((0, 0, *size))).astype(int)
        original = np.asarray(Image.open(result.path).convert("RGB")).astype(int)
        water = np.array(dataset.palette[3])
        expected = np.round(original * 0.5 + water * 0.5)
        assert np.abs(painted - expected).max() <= 1


def test_predict_mirrors_the_input_folders_and_replaces_no_input(synthetic, tmp_path):
    # photos/a/x.jpg and photos/b/x.jpg wrote x_overlay.png and x_2_overlay.png side by side:
    # which was which took the JSON to tell
    from crossformer.atomic import OutputError

    dataset = ade20k_dataset(synthetic, "val")
    for folder in ("a", "b"):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        Image.open(dataset.samples[0][0]).save(tmp_path / "photos" / folder / "x.jpg")
    model, config = ConstantSegmentor(7, target=3), InferenceConfig(scale=(128, 48))
    results, _ = predict_images(model, tmp_path / "photos", tmp_path / "out", dataset.classes, inference=config)
    assert [(Path(r.overlay).relative_to(tmp_path / "out").as_posix(), Path(r.label_map).relative_to(tmp_path / "out").as_posix())
            for r in results] == [("a/x_overlay.png", "a/x_labels.png"), ("b/x_overlay.png", "b/x_labels.png")]
    # an input that an output would replace (its overlay named as the output of another input) stops before any work
    Image.open(dataset.samples[0][0]).save(tmp_path / "photos" / "a" / "x_overlay.png")
    with pytest.raises(OutputError, match=r"photos/a/x_overlay\.png is an input in the output folder .*photos, where an "
                                          r"output would replace it; give --output another folder$"):
        predict_images(model, tmp_path / "photos", tmp_path / "photos", dataset.classes, inference=config)
    assert not (tmp_path / "photos" / "b" / "x_overlay.png").exists()


def test_predicting_again_into_a_folder_inside_the_inputs_reads_no_outputs(synthetic, tmp_path):
    # The second run segmented the first run's overlays and label maps as photos (and wrote x_overlay_overlay.png).
    dataset = ade20k_dataset(synthetic, "val")
    Image.open(dataset.samples[0][0]).save(tmp_path / "photo.png")
    model, config = ConstantSegmentor(7, target=3), InferenceConfig(scale=(128, 48))
    for _ in range(2):
        results, _ = predict_images(model, tmp_path, tmp_path / "out", dataset.classes, inference=config)
        assert [r.path for r in results] == [str(tmp_path / "photo.png")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo_labels.png", "photo_overlay.png"]
    # the output folder named as the input is read as asked
    results, _ = predict_images(model, tmp_path / "out", tmp_path / "out", dataset.classes, inference=config)
    assert len(results) == 2


def test_predict_reads_a_named_file_by_its_content(synthetic, tmp_path):
    # a PNG named with an unusual extension was refused ("is not an image file")
    dataset = ade20k_dataset(synthetic, "val")
    Image.open(dataset.samples[0][0]).save(tmp_path / "photo.img", format="PNG")
    results, skipped = predict_images(ConstantSegmentor(7, target=3), tmp_path / "photo.img", tmp_path / "out",
                                      dataset.classes, inference=InferenceConfig(scale=(128, 48)))
    assert [r.path for r in results] == [str(tmp_path / "photo.img")] and not skipped
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo_labels.png", "photo_overlay.png"]


def test_the_legend_of_a_small_image_goes_beside_it():
    # On a 48x64 image the legend of 7 classes (104 pixels high) covered the image's left and was
    # cut off at its bottom: 3 of the 7 names were lost. It goes beside the image now.
    from crossformer.data.draw import blend, palette
    from crossformer.segmentation.draw import colorize, overlay_segmentation

    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(64)[None] * 7 // 64, 48, axis=0)  # 7 vertical bands
    names, colours = [f"class {i}" for i in range(7)], palette(7)
    overlay = np.asarray(overlay_segmentation(image, labels, names, colours))
    assert overlay.shape[1] > 64 and overlay.shape[0] >= 7 * 14  # a panel holding every row
    assert np.array_equal(overlay[:48, :64], blend(image, colorize(labels, colours), labels != 255, 0.5))
    # a large image keeps the legend in its corner, at its own size
    large = np.asarray(overlay_segmentation(np.zeros((480, 640, 3), np.uint8), np.zeros((480, 640), int), names, colours))
    assert large.shape == (480, 640, 3) and large[:5, :5].any()


def test_a_label_map_holds_values_up_to_255_and_refuses_more(tmp_path: Path) -> None:
    # reduce-zero-label stores class c as c + 1: class 254 is 255, class 255 would wrap to 0 ("unlabelled")
    write_label_map(np.array([[0, 254]]), tmp_path / "top.png", reduce_zero_label=True)
    assert np.asarray(Image.open(tmp_path / "top.png")).tolist() == [[1, 255]]
    with pytest.raises(DataError, match="class values above 255 do not fit an 8-bit label map"):
        write_label_map(np.array([[0, 255]]), tmp_path / "over.png", reduce_zero_label=True)
    assert not (tmp_path / "over.png").exists()
