"""Our RoIAlign backward (matrix products) against torchvision's kernel."""

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from crossformer.detection import roi_align as roi_align_module
from crossformer.detection.roi_align import roi_align


def _backward(out: torch.Tensor) -> str:
    name = type(out.grad_fn).__name__
    return "torchvision" if "torchvision" in name else "ours" if name == "_RoIAlignBackward" else name


def _case(seed: int, n: int, channels: int, height: int, width: int, rois: int, scale: float, longest: float):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, channels, height, width, generator=generator, dtype=torch.float64, requires_grad=True)
    # Corners from a little outside the map (dropped / clamped samples) to well inside.
    extent = torch.tensor([width / scale, height / scale], dtype=torch.float64)
    corner = torch.rand(rois, 2, generator=generator, dtype=torch.float64) * extent * 1.2 - 0.1 * extent
    size = torch.rand(rois, 2, generator=generator, dtype=torch.float64) * longest
    image = torch.randint(0, n, (rois, 1), generator=generator).to(torch.float64)
    boxes = torch.cat([image, corner, corner + size], dim=1)
    boxes[:3, 3:] = boxes[:3, 1:3]  # empty rois: no samples, zero output and gradient
    boxes[3, 1:] = torch.tensor([-30.0, -30.0, -20.0, -20.0])  # wholly outside
    return features, boxes


@pytest.mark.parametrize("seed,n,channels,height,width,rois,output,scale,longest", [
    (0, 2, 5, 13, 17, 40, 7, 0.25, 90.0),  # rois from sub-pixel to larger than the map
    (1, 3, 4, 28, 28, 60, 14, 0.25, 60.0),  # mask head size
    (2, 1, 3, 9, 6, 20, 5, 1.0, 12.0),  # one image, stride 1, sampling grids up to 3x3
    (3, 2, 2, 1, 1, 10, 2, 0.5, 4.0),  # one-pixel map: every sample clamped to the edge
])
def test_values_and_gradients_equal_torchvision(seed, n, channels, height, width, rois, output, scale, longest):
    features, boxes = _case(seed, n, channels, height, width, rois, scale, longest)
    expected = torchvision_roi_align(features, boxes, output, scale, 0, aligned=True)
    ours = roi_align(features, boxes, output, scale)
    assert _backward(ours) == "ours"
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    grad_out = torch.randn_like(expected)
    (want,) = torch.autograd.grad(expected, features, grad_out)
    (got,) = torch.autograd.grad(ours, features, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got.abs().sum() > 0


def test_gradcheck():
    features, boxes = _case(4, 2, 2, 6, 7, 6, 0.5, 14.0)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, boxes, 3, 0.5), (features,))


def test_large_maps_and_inference_use_torchvision(monkeypatch):
    features, boxes = _case(5, 1, 2, 8, 8, 5, 1.0, 6.0)
    assert _backward(roi_align(features, boxes, 2, 1.0)) == "ours"
    monkeypatch.setattr(roi_align_module, "MATMUL_BACKWARD_PIXELS", 63)  # the map has 64
    assert _backward(roi_align(features, boxes, 2, 1.0)) == "torchvision"
    with torch.no_grad():
        out = roi_align(features, boxes, 2, 1.0)
    assert out.grad_fn is None
    torch.testing.assert_close(out, torchvision_roi_align(features, boxes, 2, 1.0, 0, aligned=True))
