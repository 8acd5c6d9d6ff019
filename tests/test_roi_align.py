"""Our RoIAlign (threaded forward, matrix-product backward) against torchvision's kernels."""

import threading

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
    # one-pixel bins whose last samples fall exactly on the bottom and right borders (kept: torchvision
    # drops a sample only beyond them)
    boxes[4, 1:] = torch.tensor([width - output + 1, height - output + 1, width + 1, height + 1], dtype=torch.float64) / scale
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


def test_large_maps_use_torchvision_backward(monkeypatch):
    features, boxes = _case(5, 1, 2, 8, 8, 5, 1.0, 6.0)
    features = features.detach().float().requires_grad_()
    boxes = boxes.float()
    expected = torchvision_roi_align(features, boxes, 2, 1.0, 0, aligned=True)
    grad_out = torch.randn_like(expected)
    (want,) = torch.autograd.grad(expected, features, grad_out)
    monkeypatch.setattr(roi_align_module, "MATMUL_BACKWARD_PIXELS", 63)  # the map has 64
    (got,) = torch.autograd.grad(roi_align(features, boxes, 2, 1.0), features, grad_out)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the kernel's own sums, bit for bit


@pytest.fixture
def two_threads():
    torch.set_num_threads(2)  # conftest gives the count back


def _record_kernel_threads(monkeypatch) -> list[str]:
    """The names of the threads that run torchvision's forward kernel from now on."""
    callers: list[str] = []
    kernel = roi_align_module._kernel

    def recording_kernel(*args):
        callers.append(threading.current_thread().name)
        return kernel(*args)

    monkeypatch.setattr(roi_align_module, "_kernel", recording_kernel)
    return callers


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_split_over_threads_equals_torchvision(monkeypatch, two_threads, channels_last):
    features, boxes = _case(6, 2, 8, 20, 24, 3 * roi_align_module.THREADED_FORWARD_ROIS, 0.5, 30.0)
    features = features.detach().float()
    if channels_last:  # as the FPN's maps are
        features = features.contiguous(memory_format=torch.channels_last)
    boxes = boxes.float()
    callers = _record_kernel_threads(monkeypatch)
    expected = torchvision_roi_align(features, boxes, 7, 0.5, 0, aligned=True)
    with torch.inference_mode():
        inferred = roi_align(features, boxes, 7, 0.5)
    assert inferred.grad_fn is None
    torch.testing.assert_close(inferred, expected, rtol=0, atol=0)
    assert len(callers) == 2 and any(name.startswith("roi_align") for name in callers)
    trained = roi_align(features.requires_grad_(), boxes, 7, 0.5)
    assert _backward(trained) == "ours"
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)


def test_few_rois_stay_on_the_calling_thread(monkeypatch, two_threads):
    features, boxes = _case(7, 1, 2, 8, 8, roi_align_module.THREADED_FORWARD_ROIS, 1.0, 6.0)
    callers = _record_kernel_threads(monkeypatch)
    with torch.no_grad():
        out = roi_align(features, boxes, 2, 1.0)
    torch.testing.assert_close(out, torchvision_roi_align(features, boxes, 2, 1.0, 0, aligned=True), rtol=0, atol=0)
    assert callers == [threading.current_thread().name]


def test_bf16_autocast_maps_split_over_threads(monkeypatch, two_threads):
    # The pool's threads do not inherit autocast: the plain kernel got bf16 maps with float32 rois
    # and failed ("input should have the same type as rois"), e.g. evaluate --amp bf16 on 2 cores.
    features, boxes = _case(8, 2, 8, 20, 24, 3 * roi_align_module.THREADED_FORWARD_ROIS, 0.5, 30.0)
    features, boxes = features.detach().float().bfloat16(), boxes.float()
    callers = _record_kernel_threads(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = roi_align(features, boxes, 7, 0.5)
        expected = torchvision_roi_align(features, boxes, 7, 0.5, 0, aligned=True)  # its autocast kernel
    assert len(callers) == 2 and got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
