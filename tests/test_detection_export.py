"""Detectors exported to ONNX: one image in, its detections out, as onnxruntime runs them.

The graph (``DetectionGraph``) must give what ``predict`` gives in the resized image's frame
(tested on a trained Mask R-CNN in ``test_detection_cli.py``), and onnxruntime what the
graph gives in PyTorch, at sizes other than the example's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402

from crossformer.detection.detectors import build_detector  # noqa: E402
from crossformer.detection.export import DetectionGraph  # noqa: E402
from crossformer.errors import UserInputError  # noqa: E402
from crossformer.export import SizeRange, export_onnx  # noqa: E402
from detection_train_fixtures import TINY_MODEL, agree, make_tiny_coco, resized_images  # noqa: E402

# One backbone block (stride 32, where the example's 8x10 map is padded to the group size): the
# export's cost grows with every block (the tiny detectors' other three were 30% of these tests'
# time), and the heads are what these tests are about. The blocks of every stage go through the graph in
# test_detection_cli's Mask R-CNN export; the size range is the four-block backbone's (>= 225).
ONE_BLOCK_BACKBONE = dict(TINY_MODEL["backbone_kwargs"], depths=[0, 0, 0, 1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["retinanet", "cascade_mask_rcnn"])
def test_other_detectors_export_to_onnx(kind: str, tmp_path: Path) -> None:
    """Untrained heads, their classification weights drawn wide so that scores spread out and
    pass the score thresholds; compared on real images at two shapes."""
    torch.manual_seed(0)
    settings = {k: TINY_MODEL[k] for k in ("channels", "fc_channels")}
    detector = build_detector(kind, TINY_MODEL["backbone"], num_classes=4, backbone_kwargs=ONE_BLOCK_BACKBONE,
                              **settings).eval()
    heads = detector.bbox_head if kind == "retinanet" else detector.roi_head
    for name, module in heads.named_modules():  # classification branches wide, box deltas kept small
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and "reg" not in name:
            torch.nn.init.normal_(module.weight, std=0.3)
    graph = DetectionGraph(detector).eval()
    path = tmp_path / f"{kind}.onnx"
    valid = export_onnx(graph, path, (256, 320), size_range=graph.size_range(256, 320), batch=1)
    assert valid.contains(256, 320) and valid.contains(240, 300) and not valid.contains(224, 300)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    coco = make_tiny_coco(tmp_path / "coco")
    found = 0
    for size in ((256, 320), (240, 400)):
        for _, image in resized_images(coco, size):
            with torch.no_grad():
                expected = graph(image)
            agree(session.run(None, {"images": image.numpy()}), expected)
            found += expected[0].shape[0]
    assert found > 20


def test_the_graph_refuses_batches_and_examples_below_its_range() -> None:
    detector = build_detector("retinanet", TINY_MODEL["backbone"], num_classes=4,
                              backbone_kwargs=TINY_MODEL["backbone_kwargs"], channels=16).eval()
    graph = DetectionGraph(detector)
    assert graph.coarsest_stride == 128 and graph.size_range(300, 400) == SizeRange(225, None, 225, None)
    with pytest.raises(ValueError, match=r"one image, \(1, 3, H, W\)"):
        graph(torch.zeros(2, 3, 64, 64))
    with pytest.raises(UserInputError, match="use --img-size 225 225 or larger"):
        graph.size_range(200, 400)


def test_export_errors_are_one_line(tmp_path: Path, capsys) -> None:
    from cli_errors import one_error_line

    torch.save({}, tmp_path / "some.pth")  # the file is checked first, the options before it is read
    base = ["export", "--config", "mask_rcnn_crossformer_small_1x", "--checkpoint", str(tmp_path / "some.pth")]
    assert "a detector exports to ONNX or safetensors" in one_error_line(capsys, [*base, "--format", "torchscript"])
    assert "--features is for classifiers and backbones" in one_error_line(capsys, [*base, "--format", "onnx",
                                                                                   "--features"])
