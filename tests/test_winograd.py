"""Winograd 3x3 convolutions (``crossformer.models.winograd``) compute what ``F.conv2d`` does.

The layer thresholds are lowered in most tests (``narrow_ok``) so that small layers take
the Winograd path and the tests stay fast; one test keeps the real ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from crossformer.models import layers, winograd
from crossformer.models.layers import GEMM_BACKENDS, force_gemm_backend, gemm_choices
from crossformer.models.winograd import Conv3x3, winograd_conv3x3, winograd_weight
from crossformer.segmentation.heads import ConvModule, UPerHead

needs_onednn = pytest.mark.skipif(layers._LINEAR_POINTWISE is None, reason="PyTorch built without oneDNN")


@pytest.fixture
def narrow_ok(monkeypatch) -> None:
    monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_OUT_CHANNELS", 1)


def _layer(in_channels: int, out_channels: int, bias: bool = True, seed: int = 0) -> Conv3x3:
    torch.manual_seed(seed)
    layer = Conv3x3(in_channels, out_channels, bias=bias).eval()
    if bias:
        nn.init.uniform_(layer.bias, -1, 1)
    return layer


def _float64_conv(x: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return F.conv2d(x.double(), layer.weight.double(), bias, padding=1).float()


@needs_onednn
@pytest.mark.parametrize("backend", (*GEMM_BACKENDS, "measured"))
@pytest.mark.parametrize(
    "shape, out_channels, bias, channels_last",
    [
        ((1, 512, 10, 60), 24, True, True),  # bands of 4 rows of 30 tiles, then one of 1 row
        ((9, 512, 7, 9), 8, False, False),  # odd sizes; bands of 6 whole images, then of 3
        ((1, 16, 40, 52), 24, True, True),  # narrow input: one band of 256+ rows
        ((2, 3, 1, 1), 4, True, False),  # one pixel: the whole tile is padding but one value
    ],
)
def test_winograd_equals_the_direct_convolution(narrow_ok, backend, shape, out_channels, bias, channels_last) -> None:
    layer = _layer(shape[1], out_channels, bias)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert layer.uses_winograd(x)
        if backend == "measured":
            y = layer(x)
        else:
            with force_gemm_backend(backend):
                y = layer(x)
        direct = F.conv2d(x, layer.weight, layer.bias, padding=1)
    expected = _float64_conv(x, layer)
    assert y.shape == expected.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    # F(2x2, 3x3) is at least as accurate as the direct kernel (module docstring)
    direct_error = (direct - expected).abs().max().item()
    assert (y - expected).abs().max().item() <= max(2 * direct_error, 2e-6)
    torch.testing.assert_close(y, direct, atol=1e-5, rtol=1e-5)


def test_band_plans_of_the_value_tests() -> None:
    assert winograd._band(1, 5, 30, 512) == (1, 4)
    assert winograd._band(9, 4, 5, 512) == (6, 4)
    assert winograd._band(1, 20, 26, 16) == (1, 20)
    assert winograd._band(1, 64, 64, 2048) == (1, 2)


def test_real_thresholds_pick_the_wide_layers() -> None:
    x = torch.randn(1, 384, 6, 5)
    with torch.no_grad():
        assert Conv3x3(384, 256).uses_winograd(x)
        assert not Conv3x3(383, 256).uses_winograd(torch.randn(1, 383, 6, 5))
        assert not Conv3x3(384, 255).uses_winograd(x)
        wide = _layer(384, 256)
        torch.testing.assert_close(wide(x), _float64_conv(x, wide), atol=1e-5, rtol=1e-5)


def test_plain_path_elsewhere(narrow_ok) -> None:
    layer = _layer(8, 8)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert not layer.uses_winograd(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not layer.uses_winograd(x)
        assert not layer.uses_winograd(x[:0])
        with FlopCounterMode(display=False) as counter:
            layer(x)
    # a FLOP counter sees the convolution, not Winograd's products
    assert counter.get_total_flops() == 2 * 2 * 8 * 6 * 6 * 8 * 9
    with torch.no_grad():
        kinds = {node.kind() for node in torch.jit.trace(layer, x).graph.nodes()}
    assert "aten::_convolution" in kinds and "aten::bmm" not in kinds
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        torch.testing.assert_close(out, F.conv2d(x, layer.weight, layer.bias, padding=1), atol=0, rtol=0)


def _conv_and_grads(layer: nn.Conv2d, x: torch.Tensor, plain: bool):
    x = x.detach().requires_grad_(x.requires_grad)
    out = F.conv2d(x, layer.weight, layer.bias, padding=1) if plain else layer(x)
    grad_out = torch.linspace(-1, 1, out.numel()).view(out.shape)
    inputs = [t for t in (x, layer.weight, layer.bias) if t is not None and t.requires_grad]
    return out.detach(), torch.autograd.grad(out, inputs, grad_out)


@needs_onednn
@pytest.mark.parametrize("backend", (*GEMM_BACKENDS, "measured"))
@pytest.mark.parametrize(
    "min_in, shape, out_channels, bias, input_grad",
    [
        (1, (1, 512, 10, 60), 24, True, True),  # both products by Winograd, in bands
        (1, (3, 12, 7, 9), 16, False, True),  # odd sizes
        (12, (2, 12, 8, 6), 5, True, True),  # input gradient 5 -> 12 channels: not wide, by oneDNN
        (1, (2, 6, 9, 9), 7, True, False),  # an image as input: no input gradient
    ],
)
def test_training_gradients_equal_the_direct_convolution(
    monkeypatch, backend, min_in, shape, out_channels, bias, input_grad
) -> None:
    monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", min_in)
    monkeypatch.setattr(winograd, "MIN_OUT_CHANNELS", 1)
    layer = _layer(shape[1], out_channels, bias).train()
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(input_grad)
    assert layer.uses_winograd(x)
    convs, weight_grads = [], []
    conv_tiles, weight_grad_tiles = winograd._conv_tiles, winograd._weight_grad_tiles
    monkeypatch.setattr(winograd, "_conv_tiles", lambda *a: convs.append(a[-1]) or conv_tiles(*a))
    monkeypatch.setattr(winograd, "_weight_grad_tiles", lambda *a: weight_grads.append(1) or weight_grad_tiles(*a))
    if backend == "measured":
        out, grads = _conv_and_grads(layer, x, plain=False)
    else:
        with force_gemm_backend(backend):
            out, grads = _conv_and_grads(layer, x, plain=False)
    # forward, then the input gradient (flipped kernels) where it is wide, and the weight gradient
    assert convs == [False] + ([True] if input_grad and min_in == 1 else []) and weight_grads == [1]
    expected_out, expected_grads = _conv_and_grads(layer, x, plain=True)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(expected_grads) == 1 + bias + input_grad
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-5)


def test_training_path_refuses_double_backward(narrow_ok) -> None:
    layer = _layer(4, 4)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    grad_x, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


def test_transformed_weight_follows_the_weight(narrow_ok) -> None:
    layer = _layer(6, 5)
    x = torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        layer(x)
        cached = winograd._TRANSFORMED_WEIGHTS[layer.weight][1]
        layer.weight.mul_(-2)  # an optimizer step or load_state_dict changes it in place
        y = layer(x)
    torch.testing.assert_close(y, _float64_conv(x, layer), atol=1e-5, rtol=1e-5)
    assert winograd._TRANSFORMED_WEIGHTS[layer.weight][1] is not cached
    layer.train()
    assert layer.weight not in winograd._TRANSFORMED_WEIGHTS


def test_layer_built_under_inference_mode(narrow_ok) -> None:
    reference = _layer(6, 5)
    x = torch.randn(1, 6, 8, 8)
    with torch.inference_mode():
        layer = Conv3x3(6, 5).eval()
        layer.load_state_dict(reference.state_dict())
        layer(x)
        layer.weight.mul_(-2)  # no version counter: nothing was cached, so this shows
        y = layer(x)
    with torch.no_grad():
        reference.weight.mul_(-2)
    torch.testing.assert_close(y, _float64_conv(x, reference), atol=1e-5, rtol=1e-5)


def test_weight_transform_is_g_g_gt() -> None:
    weight = torch.randn(3, 2, 3, 3)
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    expected = g @ weight[1, 0] @ g.T  # output 1, input 0
    torch.testing.assert_close(winograd_weight(weight)[:, 0, 1].view(4, 4), expected)


def test_function_reads_any_memory_format(narrow_ok) -> None:
    layer = _layer(4, 3)
    x = torch.randn(2, 4, 9, 6)
    with torch.no_grad():
        transformed = winograd_weight(layer.weight)
        a = winograd_conv3x3(x, transformed, layer.bias)
        b = winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), transformed, layer.bias)
        c = winograd_conv3x3(x.transpose(2, 3).contiguous().transpose(2, 3), transformed, layer.bias)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_conv_module_state_dict_is_mmcvs() -> None:
    module = ConvModule(8, 4, 3)
    assert isinstance(module.conv, Conv3x3)
    assert set(module.state_dict()) == {
        "conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
    }
    assert type(ConvModule(8, 4, 1).conv) is nn.Conv2d


def test_uper_head_logits_equal_the_direct_paths(monkeypatch) -> None:
    torch.manual_seed(0)
    head = UPerHead([16, 24, 32, 40], channels=24, num_classes=5).eval()
    for module in head.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    maps = [torch.randn(2, c, 32 // 2**i, 40 // 2**i) for i, c in enumerate([16, 24, 32, 40])]
    with torch.no_grad():
        direct = head(maps)
        monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", 1)
        monkeypatch.setattr(winograd, "MIN_OUT_CHANNELS", 1)
        assert head.fpn_bottleneck.conv.uses_winograd(maps[0])
        fast = head(maps)
    torch.testing.assert_close(fast, direct, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_batched_products_equal_bmm() -> None:
    a, b = torch.randn(16, 37, 24), torch.randn(16, 24, 11)
    expected = torch.bmm(a.double(), b.double()).float()
    for backend in GEMM_BACKENDS:
        with force_gemm_backend(backend):
            torch.testing.assert_close(layers.measured_gemm("batched", a, b), expected, atol=1e-5, rtol=1e-5)
    layers.measured_gemm("batched", a, b)
    assert ("batched", torch.float32, torch.get_num_threads(), 16, 37 .bit_length(), 24, 11) in gemm_choices()


@pytest.mark.parametrize("band_rows", [7, 30, 256])
@pytest.mark.parametrize("shape", [(2, 6, 9, 13), (3, 5, 4, 4)])
def test_weight_gradient_sums_every_band(monkeypatch, band_rows, shape) -> None:
    """The weight gradient sums its products over bands of tiles (rows of tiles of an image,
    or several images) and over odd edges, and equals the direct weight gradient."""
    monkeypatch.setattr(winograd, "_WEIGHT_GRAD_BAND_ROWS", band_rows)
    x = torch.randn(shape, dtype=torch.float64)
    grad_out = torch.randn(shape[0], 4, *shape[2:], dtype=torch.float64)
    expected = torch.nn.grad.conv2d_weight(x, (4, shape[1], 3, 3), grad_out, padding=1)
    torch.testing.assert_close(winograd.winograd_weight_grad(x, grad_out), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("wide", [True, False])
def test_a_list_of_maps_is_the_conv_of_their_concatenation(monkeypatch, wide) -> None:
    """UPerHead's fpn_bottleneck gets its levels as a list: by Winograd they are copied straight
    into the padded tiles, else concatenated NCHW; values, every map's gradient and the
    weight's equal the conv of ``torch.cat``, and forward hooks see the call."""
    if wide:
        monkeypatch.setattr(winograd, "MIN_IN_CHANNELS", 1)
        monkeypatch.setattr(winograd, "MIN_OUT_CHANNELS", 1)
    head = ConvModule(10, 6, 3)
    with torch.no_grad():
        head.bn.weight.uniform_(0.5, 1.5)
    maps = [torch.randn(2, c, 9, 7).contiguous(memory_format=torch.channels_last) for c in (4, 3)] + [torch.randn(2, 3, 9, 7)]
    assert head.conv.uses_winograd(maps[0]) == wide
    calls = []
    for module in (head, head.conv):
        module.register_forward_hook(lambda module, inputs, output: calls.append(type(module).__name__))
    for mode in ("eval", "train"):
        getattr(head, mode)()
        leaves = [m.detach().requires_grad_(mode == "train") for m in maps]
        got = head(leaves)
        want = F.relu(head.bn(F.conv2d(torch.cat(leaves, dim=1), head.conv.weight, padding=1)))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if mode == "train":
            grad = torch.linspace(-1, 1, got.numel()).view(got.shape)
            inputs = [*leaves, head.conv.weight]
            for g, w in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad), strict=True):
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
    assert calls == ["Conv3x3", "ConvModule"] * 2
