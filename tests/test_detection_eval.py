"""Detection evaluation through pycocotools and prediction output, with ground-truth "detectors"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from crossformer.data import DataError
from crossformer.detection.data import CocoDetection, coco_paths
from crossformer.detection.evaluate import detections_to_coco, evaluate_detector, metric_names
from crossformer.detection.predict import predict_detections
from crossformer.detection.transforms import build_test_transform
from crossformer.engine import DistContext
from detection_fixtures import GroundTruthDetector, make_small_coco


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_small_coco(tmp_path_factory.mktemp("coco"))


def _val_set(root: Path) -> CocoDetection:
    return CocoDetection(*coco_paths(root, "val"), with_masks=False, transform=build_test_transform(256, 160))


def test_ground_truth_detector_scores_ap_one(coco_root, tmp_path):
    results_file = tmp_path / "results.json"
    metrics = evaluate_detector(GroundTruthDetector(coco_root), _val_set(coco_root), batch_size=2,
                                results_file=results_file)
    assert set(metric_names("bbox")) | set(metric_names("segm")) <= set(metrics)
    for name in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_AR_100", "segm_mAP", "segm_mAP_75", "segm_AR_100"):
        assert metrics[name] == pytest.approx(1.0), name
    assert metrics["images"] == len(_val_set(coco_root)) and metrics["skipped"] == 0
    results = json.loads(results_file.read_text())
    gt = COCO(str(coco_paths(coco_root, "val")[0]))
    assert len(results) == sum(1 for a in gt.anns.values() if not a["iscrowd"])
    assert {r["category_id"] for r in results} <= {1, 3, 6, 9}  # labels mapped back to the file's ids
    gt.loadRes(results)  # a valid COCO results file


def test_an_object_of_annotation_id_0_is_found_too(coco_root, tmp_path):
    # COCOeval takes a matched ground truth id of 0 for "not matched": files numbering their
    # annotations from 0 (many converters do) lost that object and scored its detection a false positive
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    ann_file = coco_paths(root, "val")[0]
    data = json.loads(ann_file.read_text())
    for number, ann in enumerate(data["annotations"]):
        ann["id"] = number
    ann_file.write_text(json.dumps(data))
    metrics = evaluate_detector(GroundTruthDetector(root), _val_set(root), batch_size=2)
    assert (metrics["bbox_mAP"], metrics["bbox_AR_100"], metrics["segm_mAP"]) == pytest.approx((1.0, 1.0, 1.0))


def test_box_only_detector_gets_box_metrics_only_and_misses_lower_recall(coco_root):
    metrics = evaluate_detector(GroundTruthDetector(coco_root, with_masks=False, drop_every=2), _val_set(coco_root))
    assert not any(k.startswith("segm_") for k in metrics)
    assert 0.2 < metrics["bbox_AR_100"] < 0.8 and metrics["bbox_mAP"] < 1.0


def test_skipped_unreadable_images_are_given_to_on_skip(coco_root, tmp_path):
    # as the training log names them (Task.skip_validation_file takes them), or evaluate on stderr
    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    val = _val_set(root)
    bad = val.records[1].path
    bad.write_bytes(b"not an image")
    named = []
    metrics = evaluate_detector(GroundTruthDetector(root), val, skip_corrupt=True, on_skip=named.append)
    assert metrics["skipped"] == 1 and metrics["images"] == len(val) - 1
    assert metrics["bbox_mAP"] == pytest.approx(1.0)  # the skipped image's objects are not counted as missed
    assert len(named) == 1 and named[0].startswith(f"image {bad}: "), named


class FixedDetections(nn.Module):
    """Returns the same detections for every image (original pixels)."""

    def __init__(self, boxes: list[list[float]], scores: list[float], labels: list[int]) -> None:
        super().__init__()
        self.out = {"boxes": torch.tensor(boxes), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}

    def forward(self, images: torch.Tensor, metas: list[dict]) -> list[dict[str, torch.Tensor]]:
        return [dict(self.out) for _ in metas]


def test_hand_checked_case(tmp_path):
    # One 100x100 image, category id 7: G1 box (10, 10, 30, 30) xywh and G2 (60, 60, 30, 30), both of
    # area 900 < 32^2, i.e. "small"; a crowd region (0, 70, 40, 30).
    # Detection D1 (10, 10, 30, 18.6) xywh, score 0.9: IoU with G1 = 558 / 900 = 0.62, so it matches G1
    # at the IoU thresholds 0.50, 0.55, 0.60 and nothing at 0.65 .. 0.95.
    # Detection D2 (5, 75, 10, 10), score 0.95, lies inside the crowd region (crowd IoU = overlap / its
    # own area = 1): matched to the crowd, so ignored, neither true nor false positive.
    # At a matching threshold: recall 1/2 with precision 1; the 101-point interpolated precision is 1
    # at recall 0, 0.01, .., 0.50 (51 points) and 0 above -> AP = 51/101 = 0.504950; elsewhere AP = 0.
    # mAP = 3/10 * 51/101 = 0.151485; mAP_50 = 0.504950; mAP_75 = 0; all GT small: mAP_s = mAP,
    # mAP_m = mAP_l = -1 (no ground truth there). AR_k = mean recall over thresholds = 3/10 * 1/2 = 0.15
    # for k = 10, 100; AR_s = 0.15. AR_1 = 0: COCOeval keeps the top-k detections by score *before*
    # matching, and the top one is D2, which the crowd then swallows.
    (tmp_path / "img").mkdir()
    Image.new("RGB", (100, 100), (128, 128, 128)).save(tmp_path / "img" / "one.png")
    square = lambda x, y, s: [[x, y, x + s, y, x + s, y + s, x, y + s]]  # noqa: E731
    crowd = np.zeros((100, 100), dtype=np.uint8)
    crowd[70:100, 0:40] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd))
    anns = [
        {"id": 1, "image_id": 3, "category_id": 7, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0,
         "segmentation": square(10, 10, 30)},
        {"id": 2, "image_id": 3, "category_id": 7, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0,
         "segmentation": square(60, 60, 30)},
        {"id": 3, "image_id": 3, "category_id": 7, "bbox": [0, 70, 40, 30], "area": 1200, "iscrowd": 1,
         "segmentation": {"size": [100, 100], "counts": rle["counts"].decode()}},
    ]
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 3, "file_name": "one.png", "width": 100, "height": 100}], "annotations": anns,
        "categories": [{"id": 7, "name": "square"}]}))
    dataset = CocoDetection(tmp_path / "ann.json", tmp_path / "img", with_masks=False, transform=build_test_transform())
    detector = FixedDetections([[10, 10, 40, 28.6], [5, 75, 15, 85]], [0.9, 0.95], [0, 0])
    m = evaluate_detector(detector, dataset)
    expected = {"bbox_mAP": 0.3 * 51 / 101, "bbox_mAP_50": 51 / 101, "bbox_mAP_75": 0.0,
                "bbox_mAP_s": 0.3 * 51 / 101, "bbox_mAP_m": -1.0, "bbox_mAP_l": -1.0,
                "bbox_AR_1": 0.0, "bbox_AR_10": 0.15, "bbox_AR_100": 0.15,
                "bbox_AR_s": 0.15, "bbox_AR_m": -1.0, "bbox_AR_l": -1.0}
    assert {k: m[k] for k in expected} == pytest.approx(expected, abs=1e-6)


def test_no_detections_score_as_cocoeval_scores_none(tmp_path):
    # with no detection at all every number was 0, where COCOeval gives -1 for a size range with
    # nothing to find (as soon as there is one detection): the curves jumped between 0 and -1
    from crossformer.detection.evaluate import coco_evaluate, load_ground_truth

    (tmp_path / "img").mkdir()
    Image.new("RGB", (100, 100), (128, 128, 128)).save(tmp_path / "img" / "one.png")
    square = [[10, 10, 40, 10, 40, 40, 10, 40]]
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 3, "file_name": "one.png", "width": 100, "height": 100}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 7, "bbox": [10, 10, 30, 30], "area": 900,
                         "iscrowd": 0, "segmentation": square}],
        "categories": [{"id": 7, "name": "square"}]}))
    dataset = CocoDetection(tmp_path / "ann.json", tmp_path / "img", with_masks=False, transform=build_test_transform())
    none = evaluate_detector(FixedDetections(torch.zeros(0, 4).tolist(), [], []), dataset)
    nothing_to_find = {"mAP_m", "mAP_l", "AR_m", "AR_l"}  # the one object is small
    for iou_type in ("bbox", "segm"):
        expected = {f"{iou_type}_{k}": -1.0 if k in nothing_to_find else 0.0
                    for k in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_1", "AR_10", "AR_100", "AR_s",
                              "AR_m", "AR_l")}
        if iou_type == "bbox":
            assert {k: none[k] for k in expected} == expected
        assert coco_evaluate(load_ground_truth(tmp_path / "ann.json", with_masks=True), [], [iou_type]) == expected


def test_polygons_under_three_points_in_the_ground_truth_do_not_stop_cocoeval(tmp_path):
    # G1, G2: squares; G3: a box whose only polygon has one point (pycocotools failed on it with a
    # TypeError deep in COCOeval). Detections: the three boxes, with the squares' masks and G3's box
    # as its mask. Boxes all match; G3's mask is empty, so its detection misses in segm.
    (tmp_path / "img").mkdir()
    Image.new("RGB", (100, 100), (128, 128, 128)).save(tmp_path / "img" / "one.png")
    boxes = [[10, 10, 20, 20], [60, 60, 20, 20], [40, 40, 15, 15]]
    segmentations = [[[10, 10, 30, 10, 30, 30, 10, 30]], [[60, 60, 80, 60, 80, 80, 60, 80], [1, 1, 3, 3]], [[45, 45]]]
    anns = [{"id": i + 1, "image_id": 1, "category_id": 4, "bbox": b, "area": b[2] * b[3], "iscrowd": 0, "segmentation": s}
            for i, (b, s) in enumerate(zip(boxes, segmentations))]
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "one.png", "width": 100, "height": 100}], "annotations": anns,
        "categories": [{"id": 4, "name": "square"}]}))
    masks = torch.zeros(3, 100, 100, dtype=torch.bool)
    for mask, (x, y, w, h) in zip(masks, boxes):
        mask[y : y + h, x : x + w] = True
    detector = FixedDetections([[x, y, x + w, y + h] for x, y, w, h in boxes], [0.9, 0.8, 0.7], [0, 0, 0])
    detector.out["masks"] = masks
    dataset = CocoDetection(tmp_path / "ann.json", tmp_path / "img", with_masks=False, transform=build_test_transform())
    m = evaluate_detector(detector, dataset)
    assert m["bbox_AR_100"] == pytest.approx(1.0) and m["segm_AR_100"] == pytest.approx(2 / 3)


def test_a_ground_truth_mask_that_cannot_match_is_one_line_not_a_silent_miss(tmp_path):
    # Evaluation read the file without the checks training makes: an RLE of another size than its
    # image matched no detection (pycocotools' IoU is -1 there), so mask AP fell without a word,
    # and an object without a segmentation stopped COCOeval with a traceback.
    (tmp_path / "img").mkdir()
    Image.new("RGB", (100, 100), (128, 128, 128)).save(tmp_path / "img" / "one.png")
    square = np.zeros((100, 100), dtype=np.uint8)
    square[10:30, 10:30] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    annotation = {"id": 5, "image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0,
                  "segmentation": {"size": [100, 100], "counts": rle["counts"].decode()}}

    def evaluate(*annotations: dict, with_masks: bool = True) -> dict[str, float]:
        (tmp_path / "ann.json").write_text(json.dumps({
            "images": [{"id": 1, "file_name": "one.png", "width": 100, "height": 100}], "annotations": annotations,
            "categories": [{"id": 4, "name": "square"}]}))
        detector = FixedDetections([[10, 10, 30, 30]], [0.9], [0])
        if with_masks:
            detector.out["masks"] = torch.from_numpy(square).bool()[None]
        dataset = CocoDetection(tmp_path / "ann.json", tmp_path / "img", with_masks=False, transform=build_test_transform())
        return evaluate_detector(detector, dataset)

    assert evaluate(annotation)["segm_mAP"] == pytest.approx(1.0)
    with pytest.raises(DataError, match=r"annotation 5 of image one\.png has an RLE segmentation of size \[100, 50\], "
                                        r"but the image is 100x100"):
        evaluate({**annotation, "segmentation": {**annotation["segmentation"], "size": [100, 50]}})
    # an object without one among objects with one: mask AP cannot be computed
    other = {**annotation, "id": 6}
    with pytest.raises(DataError, match=r"annotation 5 of image one\.png has no 'segmentation'; mask training and mask AP "
                                        r"need one per object \(give every object one, or none for box AP alone\)$"):
        evaluate({k: v for k, v in annotation.items() if k != "segmentation"}, other)
    # a box-only export's null: "neither a polygon list nor an RLE (None)" said nothing of box-only data
    with pytest.raises(DataError, match=r"annotation 5 of image one\.png has no 'segmentation'; mask training and mask AP"):
        evaluate({**annotation, "segmentation": None}, other)
    # box AP needs no segmentation; a mask detector on box-only data (none has one) gets box AP alone,
    # as mmdet's --eval bbox (it was refused, with a hint to use a box detector, for a checkpoint of masks)
    box_only = {k: v for k, v in annotation.items() if k != "segmentation"}
    for with_masks in (False, True):
        metrics = evaluate(box_only, {**box_only, "segmentation": None, "id": 6}, with_masks=with_masks)
        assert metrics["bbox_mAP"] == pytest.approx(51 / 101) and not [k for k in metrics if k.startswith("segm")]


def test_ground_truth_without_area_or_iscrowd_is_evaluated_as_training_reads_it(tmp_path):
    # Training read a missing "area" as the box's and a missing "iscrowd" as 0, but COCOeval
    # needs both: the first evaluation, an epoch into the run, stopped with KeyError: 'area'.
    (tmp_path / "img").mkdir()
    Image.new("RGB", (100, 100), (128, 128, 128)).save(tmp_path / "img" / "one.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
            {"id": 2, "image_id": 1, "category_id": 4, "bbox": [40, 30, 50, 60], "segmentation": [[40, 30, 90, 30, 90, 90, 40, 90]]}]
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "one.png", "width": 100, "height": 100}], "annotations": anns,
        "categories": [{"id": 4, "name": "square"}]}))
    detector = FixedDetections([[10, 10, 30, 30], [40, 30, 90, 90]], [0.9, 0.8], [0, 0])
    detector.out["masks"] = torch.zeros(2, 100, 100, dtype=torch.bool)
    detector.out["masks"][0, 10:30, 10:30] = detector.out["masks"][1, 30:90, 40:90] = True
    assert len(CocoDetection(tmp_path / "ann.json", tmp_path / "img")[0].boxes) == 2  # training keeps both
    dataset = CocoDetection(tmp_path / "ann.json", tmp_path / "img", with_masks=False, transform=build_test_transform())
    m = evaluate_detector(detector, dataset)
    # 20x20 is small (< 32^2), 50x60 medium: the box areas size the objects
    expected = {"bbox_mAP": 1.0, "bbox_mAP_s": 1.0, "bbox_mAP_m": 1.0, "bbox_mAP_l": -1.0, "segm_mAP": 1.0, "segm_mAP_s": 1.0}
    assert {k: m[k] for k in expected} == pytest.approx(expected)


def test_detections_to_coco_maps_labels_boxes_and_masks():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    out = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 8.0, 6.0]]), "scores": torch.tensor([0.8, 0.1]),
           "labels": torch.tensor([2, 0]), "masks": masks}
    records = detections_to_coco([out], [42], cat_ids=[1, 3, 6, 9])
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in records] == [
        (42, 6, [2.0, 1.0, 3.0, 2.0]), (42, 1, [0.0, 0.0, 8.0, 6.0])]
    assert records[0]["score"] == pytest.approx(0.8)
    assert np.array_equal(mask_utils.decode(records[0]["segmentation"]), masks[0].numpy().astype(np.uint8))


def test_masks_are_encoded_one_at_a_time_not_copied_whole():
    """A large photo's 100 masks of (H0, W0) each were held three times over (bool, uint8, Fortran
    order): predict on a 96-megapixel image grew past 22 GB and was killed. NumPy's allocations,
    as tracemalloc counts them, now stay within a few masks."""
    import tracemalloc

    count, height, width = 40, 120, 200
    masks = torch.zeros(count, height, width, dtype=torch.bool)
    for k in range(count):
        masks[k, k : k + 30, 2 * k : 2 * k + 50] = True
    out = {"boxes": torch.tensor([[2.0 * k, k, 2.0 * k + 50, k + 30] for k in range(count)]),
           "scores": torch.linspace(0.9, 0.1, count), "labels": torch.zeros(count, dtype=torch.int64), "masks": masks}
    tracemalloc.start()
    try:
        records = detections_to_coco([out], [1], cat_ids=[1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < count * height * width / 4, peak  # a quarter of one uint8 copy of all the masks
    for k in (0, count - 1):
        assert np.array_equal(mask_utils.decode(records[k]["segmentation"]), masks[k].numpy().astype(np.uint8))


def test_results_are_gathered_over_ranks_and_evaluated_once(tmp_path, monkeypatch):
    # Two "ranks" in one process: rank 1's share is computed first, then handed to rank 0's gather
    # (rank 1's own gather sees its share in rank 0's place too); errors stay with their rank.
    # 9 images: a share padded to match the other's would evaluate one image twice.
    coco_root = make_small_coco(tmp_path, images=18)
    dataset = _val_set(coco_root)
    assert len(dataset) == 9
    detector = GroundTruthDetector(coco_root)
    shares = []  # what rank 1 gave each of its gathers, in order

    class FakeRank(DistContext):
        def raise_together(self, error):
            if error is not None:
                raise error

        def gather_objects(self, obj):
            if self.rank == 1:
                shares.append(obj)
                return [obj, obj]
            return [obj, shares.pop(0)]

    assert evaluate_detector(detector, dataset, FakeRank(rank=1, world_size=2)) is None  # only rank 0 evaluates
    metrics = evaluate_detector(detector, dataset, FakeRank(rank=0, world_size=2))
    assert metrics["images"] == len(dataset) and metrics["bbox_mAP"] == pytest.approx(1.0)
    # rank 0's images all skipped as unreadable: rank 1's masks still make it a mask evaluation;
    # and one of rank 1's: every rank's skipped images are counted and named (on rank 0 too)
    for record in [*dataset.records[::2], dataset.records[1]]:
        record.path.write_bytes(b"not an image")
    shares.clear()
    evaluate_detector(detector, dataset, FakeRank(rank=1, world_size=2), skip_corrupt=True)
    named = []
    metrics = evaluate_detector(detector, dataset, FakeRank(rank=0, world_size=2), skip_corrupt=True, on_skip=named.append)
    assert (metrics["images"], metrics["skipped"]) == (3, 6) and metrics["segm_mAP"] == pytest.approx(1.0)
    assert [item.split(": ")[0] for item in named] == [f"image {r.path}" for r in [*dataset.records[::2], dataset.records[1]]]


def _evaluate_into(coco_root: Path, results_file: Path) -> str:
    """Under :func:`~two_ranks.on_two_ranks`: this rank's evaluation writing ``results_file``, or its one-line error."""
    from crossformer.engine import setup_distributed
    from crossformer.errors import UserInputError

    try:
        evaluate_detector(GroundTruthDetector(coco_root), _val_set(coco_root), setup_distributed("cpu"),
                          results_file=results_file)
    except UserInputError as err:  # an OutputError here
        return str(err)
    return "evaluated"


@pytest.mark.slow
def test_a_results_file_rank_0_cannot_write_stops_every_rank_with_its_line(coco_root, tmp_path):
    # rank 0 stopped alone while rank 1 waited for the metrics in a gather: until gloo's timeout
    from two_ranks import on_two_ranks

    (tmp_path / "file").write_text("")
    results_file = tmp_path / "file" / "results.json"  # rank 0 alone writes it, after the images are run
    said = f"cannot write {results_file}: {tmp_path / 'file'} is a file, not a folder"
    assert on_two_ranks(_evaluate_into, coco_root, results_file) == [said, said]


# ---- prediction output ------------------------------------------------------------------------------

class BoxInTheMiddle(nn.Module):
    """Ground-truth style: one object, a mask of the middle quarter of every image and its box."""

    def forward(self, images: torch.Tensor, metas: list[dict]) -> list[dict[str, torch.Tensor]]:
        outs = []
        for meta in metas:
            h, w = meta["ori_shape"]
            masks = torch.zeros(1, h, w, dtype=torch.bool)
            masks[0, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
            box = torch.tensor([[w // 4, h // 4, 3 * w // 4, 3 * h // 4]], dtype=torch.float32)
            outs.append({"boxes": box, "scores": torch.tensor([0.87]), "labels": torch.tensor([1]), "masks": masks})
        return outs


def _photo_like(path: Path, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 200 / width, yy * 200 / height, 100 + 40 * np.sin(xx / 7.0)], -1) + rng.normal(0, 10, (height, width, 3))
    pixels = pixels.clip(0, 255).astype(np.uint8)
    pixels[height // 3 : height // 2, width // 3 : width // 2] = (220, 30, 30)  # a red shape
    Image.fromarray(pixels).save(path)
    return pixels


def test_predict_writes_pngs_and_coco_results(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = _photo_like(folder / "street.png", 300, 180)
    Image.fromarray(pixels).convert("L").save(folder / "gray.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        predict_detections(BoxInTheMiddle(), [folder], tmp_path / "out0", ["a", "b"])
    detector = BoxInTheMiddle().train()
    out = predict_detections(detector, [folder], tmp_path / "out", ["cat", "dog"], cat_ids=[5, 9],
                             transform=build_test_transform(256, 160), skip_corrupt=True, score_threshold=0.87)  # its score: drawn
    assert detector.training  # run in eval mode, then left as it was
    assert [p.name for p in out.images] == ["gray.png", "street.png"] and len(out.skipped) == 1
    assert "broken.jpg" in out.skipped[0]
    drawn = np.asarray(Image.open(tmp_path / "out" / "street.png").convert("RGB"))
    assert drawn.shape == pixels.shape
    inside = (slice(90 - 20, 90 + 20), slice(150 - 30, 150 + 30))
    assert np.abs(drawn[inside].astype(int) - pixels[inside]).mean() > 10  # the mask overlay
    assert np.array_equal(drawn[:30, :60], pixels[:30, :60])  # far from the box and its caption: untouched
    assert (np.abs(drawn[45, 75:225].astype(int) - pixels[45, 75:225]).sum(-1) > 0).all()  # the box's top edge
    records = json.loads(out.json_path.read_text())
    assert len(records) == out.detections == 2
    for r in records:
        assert set(r) == {"image_id", "category_id", "category_name", "bbox", "score", "segmentation", "file_name"}
        assert (r["category_id"], r["category_name"]) == (9, "dog") and r["score"] == pytest.approx(0.87)
    street = next(r for r in records if r["file_name"].endswith("street.png"))
    assert street["bbox"] == [75.0, 45.0, 150.0, 90.0]
    assert mask_utils.decode(street["segmentation"]).sum() == 150 * 90


def test_predict_gives_each_input_its_own_png(tmp_path):
    # A second "a" took the name "a_<its input number>", which a file called so had already
    # taken: a_3.jpg's drawing was overwritten by sub/a.jpg's without a word. Then sub/a.jpg
    # drew a_2.png beside the others: the outputs mirror the input's folders now.
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.jpg", "a.png", "a_3.jpg", "sub/a.jpg"):
        _photo_like(folder / name, 300, 180)
    out = predict_detections(BoxInTheMiddle(), [folder], tmp_path / "out", ["cat", "dog"],
                             transform=build_test_transform(256, 160))
    assert [p.relative_to(tmp_path / "out").as_posix() for p in out.images] == ["a.png", "a_2.png", "a_3.png", "sub/a.png"]
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "a.png", "a_2.png", "a_3.png", "sub/a.png"]
    # a file given by itself writes its drawing at the top
    out = predict_detections(BoxInTheMiddle(), [folder / "sub" / "a.jpg"], tmp_path / "alone", ["cat", "dog"],
                             transform=build_test_transform(256, 160))
    assert out.images == [tmp_path / "alone" / "a.png"]


def test_predict_refuses_to_draw_over_its_input_images(tmp_path):
    # "predict photos --output photos" replaced photos/street.png with its drawing, without a word.
    from crossformer.atomic import OutputError

    pixels = _photo_like(tmp_path / "street.png", 300, 180)
    _photo_like(tmp_path / "other.jpg", 300, 180)
    for inputs in ([tmp_path], [tmp_path / "other.jpg", tmp_path / "street.png"]):
        with pytest.raises(OutputError, match=r"street\.png is an input in the output folder .*, where an output would "
                                              r"replace it; give --output another folder$"):
            predict_detections(BoxInTheMiddle(), inputs, tmp_path, ["cat", "dog"], transform=build_test_transform(256, 160))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "street.png").convert("RGB")), pixels)
    assert not (tmp_path / "other.png").exists()  # refused before any work
    # a JPEG alone there is no input a drawing replaces
    out = predict_detections(BoxInTheMiddle(), [tmp_path / "other.jpg"], tmp_path, ["cat", "dog"],
                             transform=build_test_transform(256, 160))
    assert [p.name for p in out.images] == ["other.png"]


def test_predict_reads_a_named_file_by_its_content(tmp_path):
    # a PNG named without an extension was refused ("is not an image file")
    _photo_like(tmp_path / "street.png", 300, 180)
    shutil.copy(tmp_path / "street.png", tmp_path / "snapshot")
    out = predict_detections(BoxInTheMiddle(), [tmp_path / "snapshot"], tmp_path / "out", ["cat", "dog"],
                             transform=build_test_transform(256, 160))
    assert [p.name for p in out.images] == ["snapshot.png"] and out.detections == 1
