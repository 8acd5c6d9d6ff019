"""COCO-format detection data: parsing, the mmdet pipeline, collate, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from crossformer.classification.evaluate import raise_or_count_unreadable
from crossformer.data import DataError
from crossformer.data import read_rgb as read_image
from crossformer.detection.data import CocoDetection, DetectionSample, coco_paths, collate_detection, decode_segmentation
from crossformer.detection.evaluate import load_ground_truth
from crossformer.detection.synthetic import SHAPE_CATEGORIES
from crossformer.detection.transforms import (
    IMAGENET_MEAN, Normalize, RandomCrop, RandomFlip, Resize, build_test_transform, build_train_transform,
    rescale_size,
)
from detection_fixtures import make_small_coco


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_small_coco(tmp_path_factory.mktemp("coco"))


def _json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def _bbox_of(mask: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_synthetic_set_is_coco_with_crowds_empties_and_occlusion(coco_root):
    for split in ("train", "val"):
        data = _json(coco_root, split)
        assert [c["id"] for c in data["categories"]] == [1, 3, 6, 9]
        ids_with_ann = {a["image_id"] for a in data["annotations"]}
        assert any(img["id"] not in ids_with_ann for img in data["images"])  # an empty image per split
        assert any(a["iscrowd"] for a in data["annotations"])
        assert all(isinstance(a["segmentation"], dict) for a in data["annotations"] if a["iscrowd"])
    anns = _json(coco_root, "train")["annotations"] + _json(coco_root, "val")["annotations"]
    polygons = [a for a in anns if isinstance(a["segmentation"], list)]
    occluded = [a for a in anns if not a["iscrowd"] and isinstance(a["segmentation"], dict)]
    assert polygons and occluded  # unoccluded objects are polygons, partly hidden ones RLE of the visible part


def test_category_mapping_round_trip_and_labels(coco_root):
    ds = CocoDetection(*coco_paths(coco_root, "val"))
    assert ds.cat_ids == [1, 3, 6, 9] and ds.class_names == [c["name"] for c in SHAPE_CATEGORIES]
    assert ds.label_to_cat_id(range(4)) == [1, 3, 6, 9]
    assert [ds.cat_id_to_label[c] for c in ds.label_to_cat_id([3, 0, 2])] == [3, 0, 2]
    data = _json(coco_root, "val")
    for i, image_id in enumerate(ds.image_ids):
        anns = [a for a in data["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        sample = ds[i]
        # crowd regions are not targets: exactly the non-crowd annotations, in file order
        assert ds.label_to_cat_id(sample.labels) == [a["category_id"] for a in anns]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        assert torch.allclose(sample.boxes, expected)
        assert sample.masks.shape == (len(anns), *sample.ori_shape) and sample.masks.dtype == torch.uint8
        for mask, ann in zip(sample.masks, anns):
            assert int(mask.sum()) == ann["area"]  # the visible area the file records


def test_empty_images_kept_for_evaluation_and_skipped_in_training(coco_root):
    data = _json(coco_root, "train")
    with_ann = {a["image_id"] for a in data["annotations"]}
    evaluation = CocoDetection(*coco_paths(coco_root, "train"), with_masks=False)
    training = CocoDetection(*coco_paths(coco_root, "train"), train=True)
    assert len(evaluation) == len(data["images"])
    assert set(training.image_ids) == with_ann and len(training) < len(evaluation)
    empty = evaluation[evaluation.image_ids.index(next(i["id"] for i in data["images"] if i["id"] not in with_ann))]
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,) and empty.masks is None


@pytest.mark.parametrize("size, scale, expected", [
    # factor = min(1333 / long, 800 / short); each side int(side * factor + 0.5), as mmcv
    ((640, 480), (1333, 800), (1067, 800)),  # 800/480 = 1.6667: 640 * 1.6667 = 1066.67 -> 1067
    ((1280, 720), (1333, 800), (1333, 750)),  # 1333/1280 = 1.04141: 720 * 1.04141 = 749.81 -> 750
    ((427, 640), (1333, 800), (800, 1199)),  # 800/427 = 1.87354: 640 * 1.87354 = 1199.06 -> 1199
    ((2000, 100), (1333, 800), (1333, 67)),  # 1333/2000 = 0.6665: 100 * 0.6665 = 66.65 -> 67
    ((300, 200), (512, 320), (480, 320)),  # 320/200 = 1.6: 300 * 1.6 = 480
])
def test_rescale_size_matches_mmcv(size, scale, expected):
    assert rescale_size(*size, scale) == expected


def test_a_long_thin_image_resizes_to_a_side_of_one_pixel_not_zero():
    # mmcv's rounding gives 5000 x 6 at (64, 64) a height of int(6 x 0.0128 + 0.5) = 0, which no resize takes
    assert rescale_size(5000, 6, (64, 64)) == (64, 1)
    sample = build_test_transform(64, 64)(_sample(6, 5000, [[0, 0, 4000, 6]]))
    assert sample.img_shape == (1, 64) and sample.boxes.shape == (1, 4)


def _sample(h: int, w: int, boxes: list[list[float]]) -> DetectionSample:
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, boxes):
        m[int(y1) : int(y2), int(x1) : int(x2)] = 1
    image = torch.arange(3 * h * w, dtype=torch.float32).reshape(3, h, w) % 256
    return DetectionSample(image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.arange(len(boxes)), masks, 7, "x.jpg", (h, w))


def test_resize_scale_factor_boxes_and_masks():
    sample = Resize([(1333, 800)])(_sample(480, 640, [[64, 48, 320, 240], [600, 0, 700, 480]]))
    assert sample.img_shape == (800, 1067) and sample.masks.shape == (2, 800, 1067)
    assert sample.scale_factor == pytest.approx((1067 / 640, 800 / 480))
    fx, fy = 1067 / 640, 800 / 480
    # scaled by (w/W0, h/H0), then clipped to the new image (the second box sticks out at x=700)
    assert torch.allclose(sample.boxes, torch.tensor([[64 * fx, 48 * fy, 320 * fx, 240 * fy], [600 * fx, 0, 1067, 800]]))
    assert _bbox_of(sample.masks[0]) == (107, 80, 534, 400)  # nearest: ceil(64*fx)=107 ... ceil(320*fx)=534


def test_flip_mirrors_image_boxes_and_masks():
    torch.manual_seed(0)
    before = _sample(40, 60, [[5, 10, 20, 30]])
    image, masks = before.image.clone(), before.masks.clone()
    after = RandomFlip(1.0)(before)
    assert after.flip and torch.equal(after.image, image.flip(-1)) and torch.equal(after.masks, masks.flip(-1))
    assert after.boxes.tolist() == [[40.0, 10.0, 55.0, 30.0]]  # x1' = 60 - 20, x2' = 60 - 5
    assert _bbox_of(after.masks[0]) == (40, 10, 55, 30)
    assert RandomFlip(0.0)(_sample(40, 60, [[5, 10, 20, 30]])).boxes.tolist() == [[5.0, 10.0, 20.0, 30.0]]


def test_flip_on_the_real_pipeline_keeps_masks_inside_boxes(coco_root):
    torch.manual_seed(3)
    ds = CocoDetection(*coco_paths(coco_root, "train"), train=True,
                       transform=build_train_transform("3x", 256, 160, (128, 160), (96, 128), (64, 128)))
    flips = 0
    for i in range(len(ds)):
        s = ds[i]
        flips += s.flip
        h, w = s.img_shape
        assert max(h, w) <= 256 and s.masks.shape[1:] == (h, w) and len(s.boxes) == len(s.labels) == len(s.masks)
        for box, mask in zip(s.boxes, s.masks):
            if mask.any():  # mask pixels lie inside their (clipped) box, up to nearest-neighbour rounding:
                # < 1 px per resize, the first one's scaled by the second's factor (<= 1.7 here)
                x1, y1, x2, y2 = _bbox_of(mask)
                assert x1 >= box[0] - 3 and y1 >= box[1] - 3 and x2 <= box[2] + 3 and y2 <= box[3] + 3
    assert 0 < flips < len(ds)


def test_random_crop_shifts_clips_and_drops():
    torch.manual_seed(0)
    s = _sample(40, 40, [[0, 0, 10, 10], [5, 5, 35, 35], [30, 30, 40, 40]])
    s.image[0] = torch.arange(1600.0).view(40, 40)  # pixel value = 40 * y + x: the crop's offset shows
    s = RandomCrop((20, 20))(s)
    assert s.img_shape == (20, 20)
    # an independent check: shift every box by the crop's offset, clip, keep the non-empty ones
    top, left = divmod(int(s.image[0, 0, 0]), 40)
    shifted = torch.tensor([[0, 0, 10, 10], [5, 5, 35, 35], [30, 30, 40, 40]], dtype=torch.float32)
    shifted = shifted - torch.tensor([left, top, left, top])
    shifted = shifted.clamp(min=0, max=20)
    keep = (shifted[:, 2] > shifted[:, 0]) & (shifted[:, 3] > shifted[:, 1])
    assert torch.equal(s.boxes, shifted[keep]) and s.masks.shape == (int(keep.sum()), 20, 20)
    assert torch.equal(s.labels, torch.arange(3)[keep])


def test_normalise_and_collate_padding():
    mean = torch.tensor(IMAGENET_MEAN)
    a, b = _sample(50, 70, [[1, 2, 30, 40]]), _sample(65, 33, [])
    a.image[:] = mean.view(3, 1, 1)
    a, b = Normalize()(a), Normalize()(b)
    assert a.image.abs().max() < 1e-5
    batch = collate_detection([a, b])
    assert batch.images.shape == (2, 3, 96, 96)  # max(50, 65) -> 96, max(70, 33) -> 96
    assert collate_detection([_sample(64, 96, [])]).images.shape == (1, 3, 64, 96)  # multiples stay
    assert torch.equal(batch.images[1, :, :65, :33], b.image)
    assert batch.images[1, :, 65:].abs().sum() == 0 and batch.images[1, :, :, 33:].abs().sum() == 0
    assert [m["img_shape"] for m in batch.metas] == [(50, 70), (65, 33)]
    assert batch.targets[0]["masks"].shape == (1, 96, 96) and batch.targets[0]["masks"][:, 50:].sum() == 0
    assert batch.targets[1]["boxes"].shape == (0, 4) and batch.targets[1]["labels"].dtype == torch.int64
    assert set(batch.metas[0]) == {"img_shape", "ori_shape", "scale_factor", "image_id", "file_name", "flip"}


def test_test_transform_sizes(coco_root):
    ds = CocoDetection(*coco_paths(coco_root, "val"), with_masks=False, transform=build_test_transform())
    s = ds[0]
    h0, w0 = s.ori_shape
    assert s.img_shape == rescale_size(w0, h0, (1333, 800))[::-1] and not s.flip
    assert s.scale_factor == pytest.approx((s.img_shape[1] / w0, s.img_shape[0] / h0))


# ---- bad data -----------------------------------------------------------------------------------

def _write_coco(root: Path, annotations: list[dict], images: list[dict] | None = None, size=(40, 30)) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(root / "img" / "a.jpg")
    images = images or [{"id": 1, "file_name": "a.jpg", "width": size[0], "height": size[1]}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 5, "name": "thing"}]}))
    return path


def _ann(ann_id: int, bbox, category_id: int = 5, **extra) -> dict:
    return {"id": ann_id, "image_id": 1, "category_id": category_id, "bbox": bbox, "area": 1.0,
            "segmentation": [[0, 0, 4, 0, 4, 4]], "iscrowd": 0, **extra}


def test_not_coco_json_errors(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json is not JSON"):
        CocoDetection(tmp_path / "bad.json", tmp_path / "img")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not a COCO instances file"):
        CocoDetection(tmp_path / "list.json", tmp_path / "img")
    # a set of other file names learnt of the COCO layout alone, not of the settings that name its files
    with pytest.raises(DataError, match=r"has no annotations/instances_val2017\.json; expected the COCO layout .*, or "
                                        r"name the files: data\.val_ann=FILE data\.val_images=FOLDER$"):
        coco_paths(tmp_path, "val")


def test_an_annotation_file_without_its_image_folder_names_the_missing_setting():
    # "no val data given: pass --data COCO_ROOT, or data.val_ann and data.val_images" to a user
    # who had given data.val_ann.
    from crossformer.detection.config import DetectionDataConfig, data_paths

    with pytest.raises(DataError, match=r"^data\.val_ann is set but data\.val_images is not: give both"):
        data_paths(DetectionDataConfig(val_ann="val.json"), "val")
    with pytest.raises(DataError, match=r"^data\.train_images is set but data\.train_ann is not: give both"):
        data_paths(DetectionDataConfig(train_images="img"), "train")


def test_a_byte_order_mark_is_no_part_of_the_json(tmp_path):
    # A file a Windows tool wrote with one was "not JSON (Unexpected UTF-8 BOM ...)".
    (tmp_path / "img").mkdir()
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": [], "annotations": [], "categories": [
        {"id": 3, "name": "caf\u00e9"}]}, ensure_ascii=False).encode())
    assert CocoDetection(tmp_path / "bom.json", tmp_path / "img").class_names == ["caf\u00e9"]


def test_a_repeated_id_is_one_line(tmp_path):
    # pycocotools (and the data set) index images, annotations and categories by id: a repeated
    # one dropped an image, a ground-truth object or a class without a word.
    path = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(1, [10, 10, 5, 5])])
    with pytest.raises(DataError, match=r"ann\.json: id 1 appears twice in 'annotations'; ids must be unique"):
        CocoDetection(path, tmp_path / "img")
    image = {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}
    path = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5])], images=[image, image])
    with pytest.raises(DataError, match="id 1 appears twice in 'images'"):
        CocoDetection(path, tmp_path / "img")


def test_two_categories_of_one_name_are_one_line(tmp_path):
    # Trained without a word into a checkpoint of classes ['circle', 'circle', ...], which only
    # evaluation refused, since classes are matched by name.
    path = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5])])
    data = json.loads(path.read_text())
    data["categories"] = [{"id": 5, "name": "thing"}, {"id": 7, "name": "other"}, {"id": 9, "name": "thing"}]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"ann\.json: categories 5 and 9 are both named 'thing'; give each category "
                                        r"its own name$"):
        CocoDetection(path, tmp_path / "img")


def test_an_image_listed_twice_is_one_line(tmp_path):
    # Under two ids one file's objects were split between two samples (training taught each copy
    # that the other's objects are background) or, in evaluation, every detection on the copy
    # without ground truth counted as a false positive: AP fell without a word.
    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
              {"id": 2, "file_name": "a.jpg", "width": 40, "height": 30}]
    path = _write_coco(tmp_path, [_ann(1, [1, 1, 5, 5]), {**_ann(2, [10, 10, 5, 5]), "image_id": 2}], images=images)
    with pytest.raises(DataError, match=r"ann\.json: image a\.jpg is listed twice in 'images' \(ids 1 and 2\)"):
        CocoDetection(path, tmp_path / "img")


def test_unknown_category_and_missing_image_name_the_file(tmp_path):
    path = _write_coco(tmp_path, [_ann(17, [1, 1, 5, 5], category_id=3)])
    with pytest.raises(DataError, match=r"annotation 17 of image a\.jpg has category id 3, which is not in 'categories'"):
        CocoDetection(path, tmp_path / "img")
    path = _write_coco(tmp_path, [], images=[{"id": 4, "file_name": "gone.jpg", "width": 40, "height": 30}])
    with pytest.raises(DataError, match=r"image gone\.jpg \(id 4\) .* not found"):
        CocoDetection(path, tmp_path / "img")


def test_missing_images_are_counted_and_a_windows_path_is_named(tmp_path):
    # Only the first missing image was named: a file of 300 missing images took 300 runs to learn
    # it, the wrong image folder looked like one lost image, and "sub\\a.jpg" (a file written on
    # Windows) was not found with no word of the backslash.
    (tmp_path / "img" / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "img" / "sub" / "a.jpg")
    def images(*names: str) -> list[dict]:
        return [{"id": i, "file_name": name, "width": 40, "height": 30} for i, name in enumerate(names, start=1)]

    path = _write_coco(tmp_path, [], images=images("a.jpg", "gone.jpg", "lost.jpg", "away.jpg"))
    with pytest.raises(DataError, match=r"image gone\.jpg \(id 2\) of ann\.json not found at .*gone\.jpg "
                                        r"\(2 more images of it are missing\); restore it or drop it from the file, or "
                                        r"pass --skip-corrupt to skip missing images$"):
        CocoDetection(path, tmp_path / "img")
    # --skip-corrupt skipped images that did not decode but stopped on those deleted since the file listed them
    kept = CocoDetection(path, tmp_path / "img", skip_missing=True)
    assert [sample.failure for sample in kept][1:] == [f"{tmp_path / 'img' / name}: file not found"
                                                       for name in ("gone.jpg", "lost.jpg", "away.jpg")]
    assert kept[0].failure is None
    with pytest.raises(DataError, match=r"image a\.jpg \(id 1\) of ann\.json not found at .* \(3 more images of it are "
                                        r"missing\); none of its images is in .*: give the folder its file names are "
                                        r"relative to$"):
        CocoDetection(path, tmp_path, skip_missing=True)  # the wrong folder: no image to skip to
    path = _write_coco(tmp_path, [], images=images("/data/upload/1/a.jpg"))  # as Label Studio exports
    with pytest.raises(DataError, match=r"not found at /data/upload/1/a\.jpg; its file names are absolute paths, which "
                                        r"leave out .*img: make them relative to it$"):
        CocoDetection(path, tmp_path / "img")
    path = _write_coco(tmp_path, [], images=images("a.jpg", "sub\\a.jpg"))
    with pytest.raises(DataError, match=r"image sub\\a\.jpg \(id 2\) .* not found at .*; its file names separate "
                                        r"folders with '\\': COCO files use '/'$"):
        CocoDetection(path, tmp_path / "img")


def test_boxes_without_area_dropped_and_outside_clipped_with_a_count(tmp_path):
    path = _write_coco(tmp_path, [_ann(1, [2, 3, 10, 8]), _ann(2, [5, 5, 0, 9]), _ann(3, [50, 5, 10, 10]),
                                  _ann(4, [30, 20, 20, 20]), _ann(5, [1, 1, 5, 5], area=0),
                                  _ann(6, [20, 2, 0.5, 9]),  # under a pixel wide: mmdet drops w < 1 or h < 1
                                  # outside on both axes (a positive product of two negative sides): they were
                                  # kept as boxes with x1 > x2, clipped, and trained on
                                  _ann(7, [500, 500, 10, 10]), _ann(8, [-500, -500, 10, 10])])
    lines: list[str] = []
    ds = CocoDetection(path, tmp_path / "img", log=lines.append)
    assert (ds.dropped_boxes, ds.clipped_boxes) == (6, 1)
    assert lines == ["ann.json: dropped 6 boxes with no area or outside their image, clipped 1 boxes to their image "
                     "(as mmdetection)"]
    assert ds[0].boxes.tolist() == [[2, 3, 12, 11], [30, 20, 40, 30]]


def test_images_training_leaves_out_are_counted(tmp_path):
    # "8 train / 11 val images", and no word of the three the training set left out
    images = [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": h}
              for i, (w, h) in enumerate([(40, 40), (40, 40), (20, 20), (31, 40)], start=1)]
    (tmp_path / "img").mkdir()
    for image in images:
        Image.new("RGB", (image["width"], image["height"])).save(tmp_path / "img" / image["file_name"])
    annotations = [_ann(1, [2, 3, 10, 8]), {**_ann(2, [2, 3, 5, 5]), "image_id": 3}, {**_ann(3, [2, 3, 5, 5]), "image_id": 4}]
    path = _write_coco(tmp_path, annotations, images=images)
    lines: list[str] = []
    assert len(CocoDetection(path, tmp_path / "img", train=True, log=lines.append)) == 1
    assert lines == ["ann.json: training leaves out 1 without annotations and 2 under 32 px a side (as mmdetection)"]
    lines.clear()
    assert len(CocoDetection(path, tmp_path / "img", log=lines.append)) == 4 and lines == []  # evaluation keeps all


def test_unreadable_image_is_a_failure_the_main_process_raises_or_counts(tmp_path):
    path = _write_coco(tmp_path, [_ann(1, [2, 3, 10, 8])])
    (tmp_path / "img" / "a.jpg").write_bytes(b"not an image")
    sample = CocoDetection(path, tmp_path / "img")[0]
    assert sample.image is None and "a.jpg" in sample.failure
    batch = collate_detection([sample])
    assert len(batch) == 0 and batch.failures == [sample.failure]
    with pytest.raises(DataError, match=r"cannot read image .*a\.jpg"):
        raise_or_count_unreadable(batch.failures, skip_corrupt=False)
    assert raise_or_count_unreadable(batch.failures, skip_corrupt=True) == 1


def test_exif_orientation_grayscale_and_rgba(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif.tobytes())
    upright = read_image(tmp_path / "r.jpg")
    assert upright.size == (20, 40) and np.asarray(upright)[:10].mean() > 200 and np.asarray(upright)[-10:].mean() < 50
    Image.new("L", (8, 6), 77).save(tmp_path / "g.png")
    Image.new("RGBA", (8, 6), (10, 20, 30, 0)).save(tmp_path / "a.png")
    assert np.asarray(read_image(tmp_path / "g.png")).shape == (6, 8, 3)
    assert np.asarray(read_image(tmp_path / "a.png"))[0, 0].tolist() == [10, 20, 30]
    # the annotation file describes the upright image: 20 wide, 40 high
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "r.jpg", "width": 20, "height": 40}],
                                "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    assert CocoDetection(path, tmp_path)[0].image.shape == (3, 40, 20)
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "r.jpg", "width": 40, "height": 20}],
                                "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    # with what the file stores, which a tool that ignores the tag shows (and annotates)
    assert CocoDetection(path, tmp_path)[0].failure.endswith(
        "differs from the annotation file's 40x20 (stored 40x20, turned by its EXIF orientation: if the annotations "
        "are of the stored image, drop the tag)")
    # an image without the tag: its orientation is not named (it sent users looking for a tag)
    Image.new("RGB", (24, 40)).save(tmp_path / "plain.png")
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "plain.png", "width": 28, "height": 40}],
                                "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    assert CocoDetection(path, tmp_path)[0].failure == (f"{tmp_path / 'plain.png'}: its size 24x40 (width x height) differs from the "
                                                        f"annotation file's 28x40")


def _object_hues(root: Path, split: str = "train") -> list[tuple[int, float]]:
    """(category id, hue of the median colour of its visible pixels) for every non-crowd object."""
    import colorsys

    data, hues = _json(root, split), []
    for entry in data["images"]:
        pixels = np.asarray(Image.open(root / f"{split}2017" / entry["file_name"]), dtype=np.float64)
        for a in data["annotations"]:
            if a["image_id"] != entry["id"] or a["iscrowd"] or a["area"] < 30:
                continue
            segmentation = a["segmentation"]
            if isinstance(segmentation, list):
                segmentation = mask_utils.merge(mask_utils.frPyObjects(segmentation, entry["height"], entry["width"]))
            elif isinstance(segmentation["counts"], str):
                segmentation = dict(segmentation, counts=segmentation["counts"].encode())
            mask = mask_utils.decode(segmentation).astype(bool)
            r, g, b = np.median(pixels[mask], axis=0) / 255
            hues.append((a["category_id"], colorsys.rgb_to_hsv(r, g, b)[0]))
    return hues


def test_colours_follow_the_category_by_default_or_are_random(tmp_path):
    from crossformer.detection.synthetic import CATEGORY_HUES, HUE_SPREAD, make_coco_dataset

    make_coco_dataset(tmp_path / "by_category", images=16, seed=2)
    hue_of = {c["id"]: CATEGORY_HUES[i] for i, c in enumerate(SHAPE_CATEGORIES)}
    hues = _object_hues(tmp_path / "by_category")
    assert len({c for c, _ in hues}) == 4
    for category, hue in hues:  # around the category's hue (JPEG and pixel noise: a loose bound)
        assert min(abs(hue - hue_of[category]), 1 - abs(hue - hue_of[category])) < HUE_SPREAD + 0.04

    make_coco_dataset(tmp_path / "random", images=16, seed=2, colours="random")
    far = [min(abs(h - hue_of[c]), 1 - abs(h - hue_of[c])) > HUE_SPREAD + 0.04 for c, h in _object_hues(tmp_path / "random")]
    assert sum(far) > len(far) / 3
    with pytest.raises(ValueError, match="colours must be"):
        make_coco_dataset(tmp_path / "bad", images=4, colours="by_class")


def test_separate_shapes_never_share_a_pixel(tmp_path):
    from pycocotools import mask as mask_utils

    from crossformer.detection.synthetic import make_coco_dataset

    made = make_coco_dataset(tmp_path, images=12, seed=1, shapes_per_image=(2, 3), separate=True, crowds=False)
    assert made.crowds == 0 and made.objects > 0
    data = _json(tmp_path, "train")
    for entry in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == entry["id"]]
        assert all(a["iscrowd"] == 0 and isinstance(a["segmentation"], list) for a in anns)  # nothing covered
        masks = [mask_utils.decode(mask_utils.frPyObjects(a["segmentation"], entry["height"], entry["width"]))[..., 0]
                 for a in anns]
        assert sum(m.astype(int) for m in masks).max(initial=0) <= 1


def test_polygons_under_three_points_are_left_out_not_read_as_boxes(tmp_path):
    square = [[2, 2, 12, 2, 12, 12, 2, 12]]
    path = _write_coco(tmp_path, [_ann(1, [2, 2, 10, 10], segmentation=square + [[20, 20, 30, 25]]),  # + a 2-point part
                                  _ann(2, [20, 5, 10, 10], segmentation=[[20, 5, 30, 15]]),  # 2 points only
                                  _ann(3, [5, 5, 10, 10], segmentation=[[5, 5]]),  # 1 point
                                  _ann(4, [5, 5, 10, 10], segmentation=[])])
    lines: list[str] = []
    ds = CocoDetection(path, tmp_path / "img", log=lines.append)
    sample = ds[0]
    assert ds.shapeless_masks == 3 and sample.boxes.tolist() == [[2, 2, 12, 12]]
    assert sample.masks.shape == (1, 30, 40) and int(sample.masks.sum()) == int(decode_segmentation(square, 30, 40).sum())
    assert sample.masks[0, 20:, 20:].sum() == 0  # the 2-point part is not a box
    assert lines == ["ann.json: left out 3 objects whose segmentation has no polygon of 3 points or more (as mmdetection)"]
    # without masks the boxes stay
    assert len(CocoDetection(path, tmp_path / "img", with_masks=False)[0].boxes) == 4


def test_rle_of_another_size_or_an_unknown_segmentation_is_one_line(tmp_path):
    rle = {"size": [10, 12], "counts": [0, 120]}
    path = _write_coco(tmp_path, [_ann(7, [0, 0, 10, 10], segmentation=rle)])
    with pytest.raises(DataError, match=r"annotation 7 of image a\.jpg has an RLE segmentation of size \[10, 12\], "
                                        r"but the image is 30x40"):
        CocoDetection(path, tmp_path / "img")
    path = _write_coco(tmp_path, [_ann(8, [0, 0, 10, 10], segmentation="oops")])
    with pytest.raises(DataError, match="annotation 8 of image a.jpg has a segmentation that is neither"):
        CocoDetection(path, tmp_path / "img")
    rle = {"size": [30, 40], "counts": [0, 40 * 30]}  # uncompressed RLE of the image's size (all ones): fine
    path = _write_coco(tmp_path, [_ann(9, [0, 0, 10, 10], segmentation=rle)])
    assert int(CocoDetection(path, tmp_path / "img")[0].masks.sum()) == 40 * 30


@pytest.mark.parametrize("where, value, message", [
    ("bbox", [1, 2, 3], r"'annotations' \(id 1\) has bbox \[1, 2, 3\]; it must be \[x, y, width, height\], 4 numbers"),
    ("bbox", ["a", 1, 2, 3], r"has bbox \['a', 1, 2, 3\]; it must be \[x, y, width, height\]"),
    ("bbox", None, "has bbox None; it must be"),
    ("image_id", "1", r"has image_id '1'; it must be an integer"),
    ("width", "abc", r"'images' \(id 1\) has width 'abc'; it must be a whole number of pixels"),
    ("id", "1", r"'images' \(id 1\) has id '1'; it must be an integer"),
    ("area", "12", r"'annotations' \(id 1\) has area '12'; it must be a number"),
    ("iscrowd", 2, r"'annotations' \(id 1\) has iscrowd 2; it must be 0 or 1"),
])
def test_a_field_of_the_wrong_type_is_one_line(tmp_path, where, value, message):
    # these were tracebacks while parsing (a bbox of 3 numbers, a width that is not a number), or
    # a string image id read as a number that COCOeval's results then failed to match (an assertion)
    annotation, image = _ann(1, [1, 1, 5, 5]), {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}
    if where == "id":
        annotation["image_id"] = image["id"] = value
    else:
        (annotation if where in annotation else image)[where] = value
    path = _write_coco(tmp_path, [annotation], images=[image])
    with pytest.raises(DataError, match=message):
        CocoDetection(path, tmp_path / "img")
    image = {"id": 1, "file_name": "a.jpg", "width": 40.0, "height": 30}  # a whole number written as a float is a size
    assert len(CocoDetection(_write_coco(tmp_path, [_ann(1, [1, 1, 5, 5])], images=[image]), tmp_path / "img")) == 1


def test_a_polygon_without_its_outer_list_is_one_line_not_a_left_out_object(tmp_path):
    # [x0, y0, x1, y1, ...] for [[x0, y0, ...]]: the object was dropped and counted as one "with no
    # polygon of 3 points or more", and evaluation scored it as an empty mask (pycocotools and
    # mmdetection stop on it with a TypeError).
    path = _write_coco(tmp_path, [_ann(3, [2, 2, 10, 10], segmentation=[2, 2, 12, 2, 12, 12, 2, 12])])
    with pytest.raises(DataError, match=r"annotation 3 of image a\.jpg has a polygon segmentation that is not a list "
                                        r"of polygons \(\[2, 2, 12, 2, 12, 12, 2, 12\]\); COCO format is \[\[x0, y0"):
        CocoDetection(path, tmp_path / "img")


_WHOLE_IMAGE_RLE = mask_utils.encode(np.ones((30, 40), dtype=np.uint8, order="F"))["counts"].decode()


@pytest.mark.parametrize("segmentation, message", [
    ([[0, 0, "a", 0, 4, 4]], r"has a polygon holding a value that is not a finite number \(\[0, 0, 'a', 0, 4, 4\]\)"),
    ([[0, 0, None, 0, 4, 4]], r"has a polygon holding a value that is not a finite number \(\[0, 0, None"),
    ([[0, 0, float("nan"), 0, 4, 4]], "has a polygon holding a value that is not a finite number"),
    ({"size": [30, 40], "counts": "!!!!garbage"}, r"has an RLE segmentation whose counts \(!!!!garbage\) are not run "
                                                   r"lengths \(whole numbers, none negative\) summing to its 30x40 pixels"),
    ({"size": [30, 40], "counts": _WHOLE_IMAGE_RLE[:-1]}, "has an RLE segmentation whose counts"),  # cut short
    ({"size": [30, 40], "counts": [-5, 1205]}, r"has an RLE segmentation whose counts \(\[-5, 1205\]\) are not run lengths"),
    # 10 of its 1200 pixels: the rest of the mask was whatever memory was there
    ({"size": [30, 40], "counts": [0, 10]}, r"has an RLE segmentation whose counts \(\[0, 10\]\) are not run lengths"),
    ({"size": [30, 40], "counts": [0, 2000]}, "has an RLE segmentation whose counts"),
    ({"size": [30, 40], "counts": ["a", 1200]}, "has an RLE segmentation whose counts"),
    ({"size": ["a", 40], "counts": [0, 1200]}, r"has an RLE segmentation whose 'size' is \[\"a\", 40\], not \[height, "
                                               r"width\]; write \[30, 40\], its image's"),
    # it said "of size 30x40, but the image is 30x40"
    ({"size": "30x40", "counts": [0, 1200]}, r"has an RLE segmentation whose 'size' is \"30x40\", not \[height, width\]"),
    ({"size": [30, 40, 3], "counts": [0, 1200]}, r"has an RLE segmentation whose 'size' is \[30, 40, 3\], not \[height, width\]"),
])
def test_a_segmentation_pycocotools_cannot_read_is_one_line_in_training_and_evaluation(tmp_path, segmentation, message):
    # these reached pycocotools: a traceback (ValueError, OverflowError) when a sample or the
    # ground truth was decoded, or, for counts short of the image or a null/NaN coordinate, a
    # mask of whatever memory was there, trained on and scored without a word
    path = _write_coco(tmp_path, [_ann(4, [0, 0, 10, 10], segmentation=segmentation)])
    where = r"ann\.json: annotation 4 of image a\.jpg "
    with pytest.raises(DataError, match=where + message):
        CocoDetection(path, tmp_path / "img")
    with pytest.raises(DataError, match=where + message):
        load_ground_truth(path, with_masks=True)


def test_a_compressed_rle_as_pycocotools_writes_it_passes_the_check(tmp_path):
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[3:17, 5:31] = 1
    mask[20, ::3] = 1  # many runs, so most counts are written as differences from the run two before
    for mask in (mask, np.ones_like(mask)):
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
        path = _write_coco(tmp_path, [_ann(1, [0, 0, 10, 10], segmentation={"size": [30, 40], "counts": counts})])
        assert (CocoDetection(path, tmp_path / "img")[0].masks[0].numpy() == mask).all()
        assert load_ground_truth(path, with_masks=True).annToMask(load_ground_truth(path, True).anns[1]).sum() == mask.sum()
