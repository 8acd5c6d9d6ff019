"""The CPU speed paths of issue 15 compute what the plain path computes.

- Training linears (:func:`crossformer.models.layers.measured_gemm`): each of the three
  products on MKL or oneDNN, whichever was measured faster, equal to ``F.linear`` and its
  autograd gradients.
- Inference linears: oneDNN's fused kernel or MKL's, whichever was measured faster, equal to
  ``F.linear`` (and GELU).
- The image's layout (:func:`crossformer.models.layers.image_layout`): the patch embedding's
  convolutions read it NCHW or channels-last, whichever was measured faster, with the same
  results.
- The cross-scale convolutions in CPU inference
  (:func:`crossformer.models.layers.cross_scale_inference`): weights kept cast under autocast,
  the two largest kernels as one where measured faster, each kernel's maps either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crossformer.engine.seeding import deterministic_kernels
from crossformer.models import CrossFormer
from crossformer.models.crossformer import CrossScaleConvs
from crossformer.models import layers
from crossformer.models.layers import (
    GEMM_BACKENDS,
    force_gemm_backend,
    gemm_choices,
    linear,
    measured_gemm_training,
)

from cli_errors import one_error_line

TOL = 1e-4
needs_onednn = pytest.mark.skipif(layers._LINEAR_POINTWISE is None, reason="PyTorch built without oneDNN")
TINY = dict(embed_dim=32, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8), group_size=(7, 7, 7, 7),
            interval=(8, 4, 2, 1), num_classes=10, drop_path_rate=0.0)


def _linear_and_grads(x: torch.Tensor, layer: nn.Linear, gelu: bool, plain: bool):
    x = x.detach().requires_grad_()
    out = F.gelu(layer(x)) if plain and gelu else layer(x) if plain else linear(x, layer.weight, layer.bias, gelu=gelu)
    grad_out = torch.linspace(-1, 1, out.numel()).view_as(out)
    params = [x, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return out.detach(), torch.autograd.grad(out, params, grad_out)


@needs_onednn
@pytest.mark.parametrize("backend", (*GEMM_BACKENDS, "measured"))
@pytest.mark.parametrize(
    "shape, out_features, bias, gelu",
    [((1, 7), 5, True, False), ((33, 65), 97, False, True), ((2, 5, 9, 64), 192, True, True),
     ((3, 50, 256), 64, True, False)],
)
def test_measured_linear_matches_f_linear(backend, shape, out_features, bias, gelu) -> None:
    layer = nn.Linear(shape[-1], out_features, bias=bias)
    x = torch.randn(shape)
    assert measured_gemm_training(x.requires_grad_(), layer.weight)
    ref, ref_grads = _linear_and_grads(x, layer, gelu, plain=True)
    if backend == "measured":
        out, grads = _linear_and_grads(x, layer, gelu, plain=False)
    else:
        with force_gemm_backend(backend):
            out, grads = _linear_and_grads(x, layer, gelu, plain=False)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())


def _forbid_gemm_timing(monkeypatch: pytest.MonkeyPatch, message: str) -> None:
    """From now on a GEMM backend timing raises ``AssertionError(message)``."""
    def no_timing(*args):
        raise AssertionError(message)

    monkeypatch.setattr(layers, "_choose_gemm", no_timing)


@needs_onednn
def test_backend_choice_is_measured_once_per_shape_class(monkeypatch) -> None:
    layer = nn.Linear(48, 80)
    x = torch.randn(300, 48, requires_grad=True)
    linear(x, layer.weight, layer.bias).sum().backward()
    products = {key[0] for key in gemm_choices() if key[3:] in ((300 .bit_length(), 48, 80), (300 .bit_length(), 80, 48))}
    assert products == {"forward", "grad_input", "grad_weight"}
    assert set(gemm_choices().values()) <= set(GEMM_BACKENDS)

    _forbid_gemm_timing(monkeypatch, "timed again")
    x = torch.randn(290, 48, requires_grad=True)  # same rows bucket: no new timing
    linear(x, layer.weight, layer.bias).sum().backward()
    torch.set_num_threads(torch.get_num_threads() + 1)  # another thread count: each product timed again
    with pytest.raises(AssertionError, match="timed again"):
        linear(x, layer.weight, layer.bias)


@needs_onednn
def test_deterministic_runs_time_nothing_and_take_mkl(monkeypatch) -> None:
    # a --deterministic run killed and resumed must compute as the unkilled one; a timing made
    # in the resumed process could pick the other backend (under load it picks MKL alone)
    _forbid_gemm_timing(monkeypatch, "timed")
    layer = nn.Linear(40, 72)
    x = torch.randn(200, 40, requires_grad=True)
    with deterministic_kernels(True):
        got = linear(x, layer.weight, layer.bias)
        got.sum().backward()
    with force_gemm_backend("mkl"):
        x_mkl = x.detach().clone().requires_grad_()
        want = linear(x_mkl, layer.weight, layer.bias)
        want.sum().backward()
    assert torch.equal(got, want) and torch.equal(x.grad, x_mkl.grad)


class _Linear(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.layer.weight, self.layer.bias)


@pytest.mark.parametrize("default_times, alternative_times, wins", [
    ((2.0, 2.0, 2.0), (1.0, 1.0, 1.0), True),  # faster in every pair
    ((2.0, 2.0, 2.0), (1.0, 2.5, 2.5), True),  # two runs slowed by load: its fastest still wins (the old rule kept the default)
    ((2.0, 2.0, 2.0), (1.91, 2.0, 1.92), False),  # within the 5% margin of the default's fastest
    ((5.0, 2.0, 5.0), (1.95, 1.95, 1.95), False),  # the default's loaded runs do not count against it
])
def test_alternative_wins_by_the_fastest_runs_in_alternating_order(default_times, alternative_times, wins) -> None:
    order = []

    def timer(name, times):
        def run() -> float:
            order.append(name)
            return times[sum(n == name for n in order) - 1]
        return run

    assert layers.alternative_wins(timer("default", default_times), timer("alternative", alternative_times)) is wins
    # 3 pairs, neither always second (in the caches the other left)
    assert order == ["default", "alternative", "alternative", "default", "default", "alternative"]


@needs_onednn
@pytest.mark.parametrize("onednn_times, chosen", [((1.0, 1.0, 1.0), "onednn"), ((1.97, 1.97, 1.97), "mkl")])
def test_backend_rule(monkeypatch, onednn_times, chosen) -> None:
    """oneDNN only when its fastest run beats MKL's (2.0 s here) by the margin."""
    timed = []

    def fake_timing(backend, *args):
        timed.append(backend)
        return 2.0 if backend == "mkl" else onednn_times[timed.count("onednn") - 1]

    monkeypatch.setattr(layers, "_timed_gemm", fake_timing)
    a, w = torch.randn(5, 3), torch.randn(4, 3)
    out, backend = layers._choose_gemm("forward", a, w, None)
    assert backend == chosen
    assert sorted(timed) == ["mkl"] * 3 + ["onednn"] * 3
    assert (out - a @ w.t()).abs().max().item() <= 1e-6


@needs_onednn
@pytest.mark.parametrize("wins", ["mkl", "onednn"])
def test_training_products_are_timed_on_at_most_16k_rows(monkeypatch, wins: str) -> None:
    # every row was timed: crossformer_small's first training step at 800x1216 took 12 s more
    timed = []

    def fake_timing(backend, product, a, b, bias) -> float:
        timed.append((product, tuple(a.shape), tuple(b.shape)))
        return 1.0 if backend == wins else 2.0

    monkeypatch.setattr(layers, "_timed_gemm", fake_timing)
    monkeypatch.setattr(layers, "_GEMM_CHOICES", {})
    rows = (1 << 14) + 500
    layer = nn.Linear(8, 12)
    x = torch.randn(rows, 8, requires_grad=True)
    out = linear(x, layer.weight, layer.bias)
    out.backward(torch.ones_like(out))
    sample = 1 << 14
    # each product's pairs on the sample: the weight gradient's sum over rows takes both operands' first rows
    assert {t for t in timed} == {("forward", (sample, 8), (12, 8)), ("grad_input", (sample, 12), (12, 8)),
                                  ("grad_weight", (sample, 12), (sample, 8))}
    assert set(gemm_choices().values()) == ({"onednn"} if wins == "onednn" else {"mkl"})
    assert {key[3] for key in gemm_choices()} == {sample.bit_length()}
    # and the products themselves on every row
    assert (out - layer(x)).abs().max().item() <= TOL
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(rows, 8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, x.detach().sum(0).expand(12, 8), rtol=1e-4, atol=1e-3)


@needs_onednn
@pytest.mark.parametrize("mkl_times, chosen", [((1.0, 1.0, 1.0), "mkl"), ((1.97, 1.97, 1.97), "onednn")])
def test_inference_backend_rule(monkeypatch, mkl_times, chosen) -> None:
    """A CPU inference linear takes MKL (F.linear, GELU after) only when its fastest run beats
    oneDNN's fused kernel (2.0 s here) by the margin; the choice is kept for the shape class."""
    timed = []

    def fake_timing(backend, *args):
        timed.append(backend)
        return 2.0 if backend == "onednn" else mkl_times[timed.count("mkl") - 1]

    monkeypatch.setattr(layers, "_timed_inference_linear", fake_timing)
    monkeypatch.setattr(layers, "_GEMM_CHOICES", {})
    layer = nn.Linear(24, 40)
    x = torch.randn(3, 100, 24)
    with torch.inference_mode():
        out = linear(x, layer.weight, layer.bias, gelu=True)
        assert sorted(timed) == ["mkl"] * 3 + ["onednn"] * 3
        again = linear(x[:, :90], layer.weight, layer.bias, gelu=True)  # same rows bucket: not timed
    assert len(timed) == 6
    assert gemm_choices() == {("inference_gelu", torch.float32, torch.get_num_threads(), 300 .bit_length(), 24, 40): chosen}
    want = F.gelu(layer(x)).detach()
    assert (out - want).abs().max().item() <= TOL
    assert (again - want[:, :90]).abs().max().item() <= TOL


@needs_onednn
def test_inference_backends_are_timed_on_at_most_16k_rows(monkeypatch) -> None:
    # every row was timed: 8 runs of each of crossformer_small's 122K-row linears at 800x1216
    timed_rows = []

    def fake_timing(backend, x, *args):
        timed_rows.append(x.shape[0])
        return 1.0 if backend == "mkl" else 2.0

    monkeypatch.setattr(layers, "_timed_inference_linear", fake_timing)
    monkeypatch.setattr(layers, "_GEMM_CHOICES", {})
    layer = nn.Linear(8, 12)
    x = torch.randn(2, 10000, 8)
    with torch.inference_mode():
        out = linear(x, layer.weight, layer.bias)
        assert timed_rows == [1 << 14] * 6
        linear(torch.randn(50000, 8), layer.weight, layer.bias)  # any larger input: the same class
    assert len(timed_rows) == 6 and list(gemm_choices().items()) == [
        (("inference", torch.float32, torch.get_num_threads(), 15, 8, 12), "mkl")]
    assert out.shape == (2, 10000, 12) and (out - layer(x).detach()).abs().max().item() <= TOL


@needs_onednn
def test_deterministic_inference_times_nothing_and_takes_onednn(monkeypatch) -> None:
    def no_timing(*args):
        raise AssertionError("timed")

    monkeypatch.setattr(layers, "_timed_inference_linear", no_timing)
    monkeypatch.setattr(layers, "_GEMM_CHOICES", {})
    layer = nn.Linear(40, 72)
    x = torch.randn(200, 40)
    with torch.inference_mode():
        with deterministic_kernels(True):
            got = linear(x, layer.weight, layer.bias, gelu=True)
        with force_gemm_backend("onednn"):
            want = linear(x, layer.weight, layer.bias, gelu=True)
    assert torch.equal(got, want) and gemm_choices() == {}


def test_measured_path_steps_aside() -> None:
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    assert measured_gemm_training(x, layer.weight)  # the weight needs a gradient
    with torch.no_grad():
        assert not measured_gemm_training(x, layer.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not measured_gemm_training(x, layer.weight)
    assert not measured_gemm_training(x.double(), layer.weight.double())
    assert not measured_gemm_training(x[:0], layer.weight)
    # tracing records plain ops: the traced graph holds aten::linear, no Python function
    traced = torch.jit.trace(_Linear(layer), (x,))
    assert "linear" in str(traced.graph) and "PythonOp" not in str(traced.graph)
    with pytest.raises(ValueError, match="backend must be one of"):
        with force_gemm_backend("blas"):
            pass


@needs_onednn
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_double_backward_matches_f_linear(backend: str) -> None:
    """create_graph=True records the backward products, so a gradient penalty works, whichever
    backend the products were measured fastest on."""
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    results = []
    with force_gemm_backend(backend):
        for out in (linear(x, layer.weight, layer.bias, gelu=True), F.gelu(layer(x))):
            (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
            results.append(torch.autograd.grad(grad_x.pow(2).sum(), (x, layer.weight, layer.bias)))
    for got, want in zip(*results):
        assert (got - want).abs().max().item() <= TOL


def _model_grads(model: CrossFormer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    loss = model(x).logsumexp(-1).sum()
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


@needs_onednn
@pytest.mark.parametrize("checkpointing", (False, True))
def test_model_training_gradients_match_plain_linears(monkeypatch, checkpointing: bool) -> None:
    model = CrossFormer(**TINY).train()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 3, 70, 94)
    with force_gemm_backend("onednn"):
        onednn = _model_grads(model, x)
    measured = _model_grads(model, x)
    monkeypatch.setattr(layers, "_LINEAR_POINTWISE", None)  # every linear through F.linear
    plain = _model_grads(model, x)
    for grads in (onednn, measured):
        for name, want in plain.items():
            assert (grads[name] - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item()), name


# The image's layout ------------------------------------------------------------------------


def _fresh_layout_choices(monkeypatch: pytest.MonkeyPatch, channels_last_wins: bool | None = None) -> list:
    """An empty choice table; with ``channels_last_wins`` set, a fake timing that says so and
    records every timed run (``True`` for a channels-last one) in the list returned."""
    monkeypatch.setattr(layers, "_IMAGE_LAYOUT_CHOICES", {})
    timed: list[bool] = []
    if channels_last_wins is not None:
        def fake_time(convs, x, channels_last: bool) -> float:
            timed.append(channels_last)
            return 1.0 if channels_last == channels_last_wins else 2.0

        monkeypatch.setattr(layers, "_convs_time", fake_time)
    return timed


@pytest.mark.parametrize("channels_last_wins", (True, False))
def test_image_layout_is_measured_once_per_shape_class(monkeypatch, channels_last_wins: bool) -> None:
    timed = _fresh_layout_choices(monkeypatch, channels_last_wins)
    convs = nn.ModuleList([nn.Conv2d(3, 4, 4, stride=4), nn.Conv2d(3, 4, 8, stride=4, padding=2)])
    x = torch.randn(2, 3, 32, 40)
    got = layers.image_layout(x, convs)
    # one warm-up each, then 3 pairs, the order alternating
    assert timed == [False, True] + [False, True, True, False, False, True]
    assert got.is_contiguous(memory_format=torch.channels_last) is channels_last_wins
    assert torch.equal(got, x) and (got is x) is not channels_last_wins
    assert list(layers.image_layout_choices().values()) == [channels_last_wins]
    timed.clear()
    layers.image_layout(torch.randn(3, 3, 30, 40), convs)  # same batch and pixel buckets
    assert timed == []
    layers.image_layout(torch.randn(2, 3, 64, 80), convs)  # four times the pixels: timed again
    assert len(timed) > 0 and len(layers.image_layout_choices()) == 2


def test_image_layout_is_timed_on_a_sample_of_the_batch(monkeypatch) -> None:
    # the whole batch was timed: 1.4 s of tiny's first call at batch 32 on a 2-core AMD EPYC,
    # 3.6 s of crossformer_small's at 800x1216
    _fresh_layout_choices(monkeypatch)
    timed: list[tuple[int, ...]] = []

    def fake_time(convs, x, channels_last: bool) -> float:
        timed.append((*x.shape, x.is_contiguous()))
        return 1.0 if channels_last else 2.0

    monkeypatch.setattr(layers, "_convs_time", fake_time)
    convs = nn.ModuleList([nn.Conv2d(3, 4, 4, stride=4)])
    x = torch.randn(32, 3, 300, 40)
    got = layers.image_layout(x, convs)
    # 4 images, at most 256 pixels a side, copied as the image is (a crop of it is not contiguous)
    assert timed == [(4, 3, 256, 40, True)] * 8
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, x)  # the whole batch
    layers.image_layout(torch.randn(9, 3, 400, 40), convs)  # the same sample's shape: the same class
    assert len(timed) == 8 and len(layers.image_layout_choices()) == 1


def test_image_layout_times_nothing_where_it_steps_aside(monkeypatch) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    timed = _fresh_layout_choices(monkeypatch, channels_last_wins=True)
    convs = [nn.Conv2d(3, 4, 4, stride=4)]
    x = torch.randn(1, 3, 16, 16)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    strided, empty = x[:, :, ::2], x[:0]
    assert layers.image_layout(x_cl, convs) is x_cl  # already channels-last
    assert layers.image_layout(strided, convs) is strided  # neither layout: the convolution copies it anyway
    assert layers.image_layout(empty, convs) is empty
    with deterministic_kernels(True):  # every process must compute the same
        assert layers.image_layout(x, convs) is x
    with FlopCounterMode(display=False):  # a counter would count the trial runs
        assert layers.image_layout(x, convs) is x
    traced = torch.jit.trace(lambda image: layers.image_layout(image, convs) * 1, (x,), check_trace=False)
    assert "contiguous" not in str(traced.graph)  # a recorded graph keeps the image as given
    assert timed == []


@pytest.mark.parametrize("channels_last_wins", (True, False))
def test_model_computes_the_same_on_either_image_layout(monkeypatch, channels_last_wins: bool) -> None:
    """Logits and every gradient of a training step agree with the NCHW image's, as the patch
    embedding's convolutions get the image in the layout measured faster."""
    model = CrossFormer(**TINY)
    x = torch.randn(2, 3, 70, 94)
    _fresh_layout_choices(monkeypatch)
    with deterministic_kernels(True):  # nothing timed: the NCHW image
        want_logits = model.eval()(x)
        want_grads = _model_grads(model.train(), x)
    timed = _fresh_layout_choices(monkeypatch, channels_last_wins)
    layouts = []
    model.patch_embed.projs[0].register_forward_pre_hook(
        lambda conv, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    got_logits = model.eval()(x)
    assert timed and layouts == [channels_last_wins]
    got_grads = _model_grads(model.train(), x)
    assert (got_logits - want_logits).abs().max().item() <= TOL
    for name, want in want_grads.items():
        assert (got_grads[name] - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item()), name


# The cross-scale convolutions in CPU inference ---------------------------------------------


def _embedding(seed: int = 0) -> CrossScaleConvs:
    torch.manual_seed(seed)
    return CrossScaleConvs(3, 32, (4, 8, 16, 32), stride=4)  # 16, 8, 4, 4 channels


def _each_kernel(convs: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """What the embedding computes: every kernel called on its own, channels-last, concatenated."""
    with torch.no_grad():
        return torch.cat([conv(x).permute(0, 2, 3, 1) for conv in convs], dim=-1)


def _fresh_merge_choices(monkeypatch: pytest.MonkeyPatch, merged_wins: bool) -> list:
    """An empty choice table and a fake timing that says ``merged_wins`` (the image's layout as
    given); the returned list records each ``F.conv2d`` call's output channels."""
    import crossformer.models.crossformer as network

    monkeypatch.setattr(network, "image_layout", lambda x, convs: x)
    monkeypatch.setattr(layers, "_MERGED_KERNEL_CHOICES", {})
    monkeypatch.setattr(layers, "alternative_wins", lambda apart, together: apart() > 0 and together() > 0 and merged_wins)
    calls: list[int] = []
    real_conv2d = F.conv2d
    monkeypatch.setattr(layers.F, "conv2d", lambda x, w, *a: calls.append(w.shape[0]) or real_conv2d(x, w, *a))
    return calls


@pytest.mark.parametrize("merged_wins", (True, False))
def test_cross_scale_inference_matches_each_kernel(monkeypatch, merged_wins: bool) -> None:
    """In CPU inference the embedding's two largest kernels run as one (the 16x16 centred in
    zeros inside the 32x32) where that was timed faster, once per shape class, else apart; the
    maps are each kernel's either way."""
    convs, x = _embedding(), torch.randn(2, 3, 70, 94)
    want = _each_kernel(convs, x)
    calls = _fresh_merge_choices(monkeypatch, merged_wins)
    with torch.no_grad():
        got = convs(x)
        calls.clear()
        again = convs(x)
    assert calls == ([16, 8, 8] if merged_wins else [16, 8, 4, 4])  # the merged kernel: 4 + 4 outputs
    assert list(layers.merged_kernel_choices().values()) == [merged_wins]
    assert got.shape == want.shape == (2, 17, 23, 32) and torch.equal(got, again)
    assert (got - want).abs().max().item() <= 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want16 = torch.cat([conv(x).permute(0, 2, 3, 1) for conv in convs], dim=-1)
        convs(x)  # another class: timed again
        calls.clear()
        got16 = convs(x)
    assert got16.dtype == want16.dtype == torch.bfloat16 and len(calls) == (3 if merged_wins else 4)
    assert (got16.float() - want16.float()).abs().max().item() <= 2e-2 * want16.float().abs().max().item()


def test_cross_scale_inference_keeps_the_cast_weights_until_they_change(monkeypatch) -> None:
    """Under autocast the kernels' bf16 weights are cast once and kept, the image cast once;
    an optimizer-like in-place step, a new weight, a new kernel and a ``.data`` edit followed by
    ``eval()`` are all seen."""
    convs, x = _embedding(), torch.randn(1, 3, 40, 40)
    _fresh_merge_choices(monkeypatch, merged_wins=True)
    casts: list[tuple] = []
    real_to = torch.Tensor.to

    def counting_to(tensor, *args, **kwargs):
        if args and args[0] == torch.bfloat16:
            casts.append(tuple(tensor.shape))
        return real_to(tensor, *args, **kwargs)

    def check() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            want = torch.cat([conv(x).permute(0, 2, 3, 1) for conv in convs], dim=-1).float()
            got = convs(x).float()
        assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()

    check()
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        convs(x)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert casts == [(1, 3, 40, 40)]  # the image once, no weight
    with torch.no_grad():
        convs[3].weight.mul_(-2)
    check()
    convs[3].weight = nn.Parameter(torch.randn_like(convs[3].weight))
    check()
    convs[0] = nn.Conv2d(3, 16, 4, stride=4)
    check()
    convs[2].weight.data.mul_(3)  # no version bump: seen after eval()
    convs.eval()
    check()


def test_cross_scale_inference_steps_aside(monkeypatch) -> None:
    """Training, deterministic mode, a FLOP counter and a hooked or replaced kernel get each
    kernel called as it is, and nothing is timed."""
    from torch.utils.flop_counter import FlopCounterMode

    convs, x = _embedding(), torch.randn(1, 3, 40, 40)
    calls = _fresh_merge_choices(monkeypatch, merged_wins=True)
    monkeypatch.setattr(layers, "alternative_wins", lambda *a: pytest.fail("timed"))
    convs(x)  # gradients needed
    with torch.no_grad():
        with deterministic_kernels(True):
            convs(x)
        with FlopCounterMode(display=False) as counter:
            convs(x)
        assert counter.get_total_flops() == 2 * 40 * 40 // 16 * 3 * (16 * 16 + 8 * 64 + 4 * 256 + 4 * 1024)
        assert calls == [16, 8, 4, 4] * 3
        seen = []
        handle = convs[3].register_forward_hook(lambda *a: seen.append(True))
        convs(x)
        assert seen == [True]
        handle.remove()

        class Scaled(nn.Conv2d):
            def forward(self, x):
                return super().forward(x) * 2

        convs[3] = Scaled(3, 4, 32, stride=4, padding=14)
        convs[3].load_state_dict(_embedding()[3].state_dict())
        assert torch.equal(convs(x)[..., -4:], 2 * _each_kernel(_embedding(), x)[..., -4:])
    assert layers.merged_kernel_choices() == {}


@pytest.mark.parametrize("merged_wins", (True, False))
def test_cross_scale_inference_keeps_only_the_casts_it_uses(monkeypatch, merged_wins: bool) -> None:
    """The merged weights are kept only where the merge was chosen; casts of earlier weights, of
    any dtype, go at the first call after the weights change; pickles and copies leave the cache
    out; a kernel whose instance has a forward of its own is called."""
    import copy
    import io

    convs, x = _embedding(), torch.randn(1, 3, 40, 40)
    _fresh_merge_choices(monkeypatch, merged_wins)
    with torch.no_grad():
        convs(x)
        kept = [key for key in convs._inference_weights if isinstance(key, tuple)]
        assert (("merged", torch.float32) in kept) is merged_wins and len(kept) == 4 + merged_wins
        copied = copy.deepcopy(convs)
        assert copied._inference_weights == {} and torch.equal(copied(x), convs(x))
        saved = io.BytesIO()
        torch.save(convs, saved)
        assert torch.load(io.BytesIO(saved.getvalue()), weights_only=False)._inference_weights == {}
        convs.load_state_dict(_embedding(1).state_dict(), assign=True)  # new tensors, float32 casts stale
        with torch.autocast("cpu", dtype=torch.bfloat16):
            convs(x)
        dtypes = {key[1] for key in convs._inference_weights if isinstance(key, tuple)}
        assert dtypes == {torch.bfloat16}
        original = convs[3].forward
        convs[3].forward = lambda t: original(t) + 1
        assert torch.equal(convs(x)[..., -4:], _each_kernel(convs, x)[..., -4:])


def test_cross_scale_inference_keeps_each_kernels_dilation_and_groups(monkeypatch) -> None:
    """A kernel put in place of one, dilated or grouped, computes as itself (and is not merged)."""
    convs, x = _embedding(), torch.randn(1, 3, 40, 40)
    _fresh_merge_choices(monkeypatch, merged_wins=True)
    convs[0] = nn.Conv2d(3, 15, 3, stride=4, padding=2, dilation=2, groups=3)  # 13 + 15 + 4 + 4 channels
    convs[2] = nn.Conv2d(3, 6, 16, stride=4, padding=6, groups=3)  # no longer fits in the 32x32 as one
    with torch.no_grad():
        got = convs(x)
    assert (got - _each_kernel(convs, x)).abs().max().item() <= 1e-5
    assert layers.merged_kernel_choices() == {}


@pytest.mark.parametrize("merged_wins", (True, False))
def test_model_inference_is_the_same_with_merged_kernels(monkeypatch, merged_wins: bool) -> None:
    model, x = CrossFormer(**TINY).eval(), torch.randn(2, 3, 70, 94)
    with torch.no_grad(), deterministic_kernels(True):
        want = model(x)
    _fresh_merge_choices(monkeypatch, merged_wins)
    with torch.no_grad():
        got = model(x)
    assert merged_wins in layers.merged_kernel_choices().values()
    assert (got - want).abs().max().item() <= TOL


# bf16 autocast on the CPU ------------------------------------------------------------------

needs_bf16 = pytest.mark.skipif(not layers._BF16_GEMM, reason="this CPU has no oneDNN bf16 kernels")


def _moved_off_init(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@needs_bf16
def test_bf16_inference_linear_is_autocasts_product() -> None:
    """Under bf16 autocast, the fused oneDNN path gives what autocast's F.linear + GELU gives."""
    mlp = layers.GeluMlp(64, 256).eval()
    x = torch.randn(4, 7, 5, 64)[:, :, :3]  # non-contiguous, as after a crop
    with torch.inference_mode():
        want32 = mlp.fc2(F.gelu(mlp.fc1(x)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layers.onednn_inference_bf16(x, mlp.fc1.weight)
            got = mlp(x)
            packed = layers._PACKED_BF16_WEIGHTS[mlp.fc1.weight][1]
            plain = mlp.fc2(F.gelu(mlp.fc1(x)))  # nn.Linear under autocast
            assert torch.equal(mlp(x), got)
            assert layers._PACKED_BF16_WEIGHTS[mlp.fc1.weight][1] is packed, "cast and packed once"
    assert got.dtype == plain.dtype == torch.bfloat16
    scale = want32.abs().max().item()
    # bf16 keeps 8 bits: both paths are within a few bf16 steps of float32 and of each other
    assert (got.float() - want32).abs().max().item() <= 2e-2 * scale
    assert (got.float() - plain.float()).abs().max().item() <= 2e-2 * scale
    mlp.train()
    assert mlp.fc1.weight not in layers._PACKED_BF16_WEIGHTS


def test_bf16_path_steps_aside() -> None:
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert not layers.onednn_inference_bf16(x, layer.weight)  # no autocast
        with torch.autocast("cpu", dtype=torch.float16):
            assert not layers.onednn_inference_bf16(x, layer.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layers.onednn_inference_bf16(x, layer.weight)  # gradients flow: autocast's path


@needs_bf16
def test_bf16_model_agrees_with_fp32() -> None:
    """Logits under bf16 autocast stay close to float32's; every clear top-1 is the same."""
    model = _moved_off_init(CrossFormer(**TINY)).eval()
    x = torch.randn(32, 3, 64, 64)
    with torch.inference_mode():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
    err = (bf16 - fp32).abs().max(-1).values
    assert err.max().item() <= 0.05 * fp32.abs().max().item()
    top2 = fp32.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err  # no bf16 error of this size can swap them
    agree = bf16.argmax(-1) == fp32.argmax(-1)
    assert agree[clear].all()
    assert agree.float().mean().item() >= 0.9


@needs_bf16
def test_bf16_training_step_gradients_follow_fp32() -> None:
    model = _moved_off_init(CrossFormer(**TINY)).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 3, 5, 9])
    loss32 = F.cross_entropy(model(x), y)
    grads32 = torch.autograd.grad(loss32, list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = F.cross_entropy(model(x), y)
    grads16 = torch.autograd.grad(loss16, list(model.parameters()))
    assert abs(loss16.item() - loss32.item()) <= 0.02 * loss32.item()
    flat32 = torch.cat([g.flatten() for g in grads32])
    flat16 = torch.cat([g.float().flatten() for g in grads16])
    assert F.cosine_similarity(flat32, flat16, dim=0).item() >= 0.99


@pytest.mark.parametrize("float32_softmax", (False, True))
@pytest.mark.parametrize(
    "qkv_shape",
    [
        (3, 5, 4, 49, 16),  # several images per chunk, the last chunk shorter
        (3, 2, 3, 700, 8),  # one image's groups split over chunks (3 x 700^2 > 1M scores)
    ],
)
def test_bf16_inference_attention_in_chunks(qkv_shape, float32_softmax: bool, monkeypatch) -> None:
    """bf16 attention without gradients (autocast inference) on the CPU, where the chunks were
    timed faster (their softmax to bf16, or to float32 and cast, as timed against each other
    first): products and softmax in chunks, not the fused kernel, within bf16's steps of the
    float32 formula, for a ``qkv`` that is a strided view too (as the qkv projection's output is)."""
    from crossformer.models import attention

    three, batch, groups, tokens, dim = qkv_shape
    # (B, groups, N, 3, d) read as (3, B, groups, N, d): q, k, v interleaved, not contiguous
    qkv = torch.randn(batch, groups, tokens, three, dim).bfloat16().permute(3, 0, 1, 2, 4)
    mask = (torch.randn(1, groups, tokens, tokens) * 2).bfloat16()
    seen, real_chunks = [], attention._chunks
    monkeypatch.setattr(attention, "_ATTENTION_CHOICES", {})
    verdicts = iter([float32_softmax, True])  # the two softmaxes, then the chunks against the fused kernel
    monkeypatch.setattr(attention, "alternative_wins", lambda default, alternative: default() > 0 and alternative() > 0 and next(verdicts))
    with torch.no_grad():
        first = attention.biased_attention(qkv, mask, scale=dim**-0.5)  # timed: the chunks win
        monkeypatch.setattr(attention, "_chunks", lambda *a: seen.append(a) or real_chunks(*a))
        monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: pytest.fail("fused kernel taken"))
        got = attention.biased_attention(qkv, mask, scale=dim**-0.5)
        other = attention._chunked_cpu_inference(qkv, mask, dim**-0.5, float32_softmax=not float32_softmax)
    chosen = attention.CHUNKS_FLOAT32_SOFTMAX if float32_softmax else attention.CHUNKS
    assert attention.attention_choices() == {(torch.bfloat16, torch.get_num_threads(), groups, tokens, dim): chosen}
    assert seen[0] == (batch, groups, tokens) and torch.equal(first, got)
    assert got.dtype == torch.bfloat16 and got.shape == qkv.shape[1:]
    monkeypatch.undo()
    want = attention.biased_attention(qkv.float(), mask.float(), scale=dim**-0.5, fused=False)
    assert (got.float() - want).abs().max().item() <= 3e-2 * want.abs().max().item()
    assert (got.float() - other.float()).abs().max().item() <= 2e-2 * want.abs().max().item()


def test_bf16_inference_attention_timing_sample_is_bounded(monkeypatch) -> None:
    """The choice is timed on at most _TIMING_SCORES scores: whole images while one fits, else
    the first groups of one image with their part of the mask (950-token groups at detection
    size held 173M scores per image of crossformer_small)."""
    from crossformer.models import attention

    monkeypatch.setattr(attention, "_TIMING_SCORES", 3 * 49 * 49)
    qkv, mask = torch.randn(3, 8, 2, 49, 4), torch.randn(1, 2, 49, 49)
    sample, sample_mask = attention._timing_sample(qkv, mask)
    assert sample.shape == (3, 1, 2, 49, 4) and sample_mask is mask  # one image of 2 groups
    qkv, mask = torch.randn(3, 8, 7, 49, 4), torch.randn(1, 7, 49, 49)
    sample, sample_mask = attention._timing_sample(qkv, mask)
    assert sample.shape == (3, 1, 3, 49, 4) and torch.equal(sample_mask, mask[:, :3])
    assert torch.equal(sample, qkv[:, :1, :3])


def test_bf16_inference_attention_keeps_the_fused_kernel(monkeypatch) -> None:
    """Where the fused kernel was timed faster, where nothing may be timed (deterministic mode),
    and for float32 or a mask that needs a gradient, bf16 inference attention is SDPA's."""
    from crossformer.models import attention

    qkv, mask = torch.randn(3, 2, 4, 49, 16).bfloat16(), torch.randn(1, 4, 49, 49).bfloat16()
    fused = F.scaled_dot_product_attention(*qkv.unbind(0), attn_mask=mask, scale=0.25)
    monkeypatch.setattr(attention, "_ATTENTION_CHOICES", {})
    monkeypatch.setattr(attention, "alternative_wins", lambda default, alternative: False)
    with torch.no_grad():
        assert torch.equal(attention.biased_attention(qkv, mask, scale=0.25), fused)
        assert list(attention.attention_choices().values()) == [attention.FUSED]
        monkeypatch.setattr(attention, "_ATTENTION_CHOICES", {})
        monkeypatch.setattr(attention, "alternative_wins", lambda fused, chunked: pytest.fail("timed"))
        with deterministic_kernels(True):
            assert torch.equal(attention.biased_attention(qkv, mask, scale=0.25), fused)
        assert attention.biased_attention(qkv[:, :0], mask, scale=0.25).shape == (0, 4, 49, 16)  # an empty batch
        assert torch.equal(attention.biased_attention(qkv.float(), mask.float(), scale=0.25),
                           F.scaled_dot_product_attention(*qkv.float().unbind(0), attn_mask=mask.float(), scale=0.25))
    # gradients for q, k, v through a frozen bias (fine-tuning under autocast): autograd's SDPA
    leaf = qkv.clone().requires_grad_()
    out = attention.biased_attention(leaf, mask, scale=0.25)
    out.sum().backward()
    assert leaf.grad is not None and torch.equal(out.detach(), fused)
    assert attention.attention_choices() == {}


def test_bf16_training_attention_takes_the_fused_path() -> None:
    """bf16 q, k, v and learnt mask (autocast training): the fused CPU function, gradients as float32's."""
    from crossformer.models.attention import biased_attention

    shapes = [(3, 2, 4, 49, 16), (1, 4, 49, 49)]  # qkv, mask
    leaves16 = [torch.randn(shape).bfloat16().requires_grad_() for shape in shapes]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves16]  # the same values in float32
    out16 = biased_attention(*leaves16, scale=0.25)
    assert "BiasedAttentionCPU" in type(out16.grad_fn).__name__ and out16.dtype == torch.bfloat16
    out32 = biased_attention(*leaves32, scale=0.25, fused=False)
    grad_out = torch.randn_like(out32)
    got = torch.autograd.grad(out16, leaves16, grad_out.bfloat16())
    want = torch.autograd.grad(out32, leaves32, grad_out)
    assert (out16.float() - out32).abs().max().item() <= 2e-2 * out32.abs().max().item()
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert (g.float() - w).abs().max().item() <= 2e-2 * w.abs().max().item()


# crossformer benchmark --peak ----------------------------------------------------------------


def test_benchmark_peak_reports_rates_and_the_models_share(monkeypatch, capsys) -> None:
    import json

    from crossformer import benchmark
    from crossformer.cli import main as cli_main

    monkeypatch.setattr(benchmark, "PEAK_SQUARE", 96)
    timed = benchmark.gemm_rates
    monkeypatch.setattr(benchmark, "gemm_rates", lambda shapes, rounds=3, device="cpu": timed(shapes, rounds=1, min_seconds=0.0, device=device))
    cli_main(["benchmark", "--model", "crossformer_tiny", "--peak", "--img-size", "64", "--batch-size", "2",
              "--mode", "both", "--rounds", "2", "--warmup", "1", "--no-memory", "--json"])
    out = json.loads(capsys.readouterr().out)
    peak = out["peak"]
    square, *model_rows = peak["gemm"]
    assert (square["m"], square["k"], square["n"]) == (96, 96, 96)
    expected_backends = {"fp32 mkl"} | ({"fp32 onednn packed"} if layers._REORDER_LINEAR_WEIGHT else set())
    assert expected_backends <= set(square["gflops"]) and all(v > 0 for v in square["gflops"].values())
    # crossformer_tiny at 64x64, batch 2: stage s has 2 * (16 / 2**s)**2 tokens of 64 * 2**s channels
    assert [(r["shape"], r["m"], r["k"], r["n"]) for r in model_rows[:4]] == [
        ("stage 0 qkv", 512, 64, 192), ("stage 0 proj", 512, 64, 64), ("stage 0 fc1", 512, 64, 256),
        ("stage 0 fc2", 512, 256, 64)]
    assert (model_rows[-1]["m"], model_rows[-1]["k"], model_rows[-1]["n"]) == (8, 2048, 512)
    best_fp32 = max(v for k, v in square["gflops"].items() if k.startswith("fp32"))
    assert peak["best_square_gflops"]["fp32"] == best_fp32
    images_per_s = out["infer_images_per_s"]
    assert peak["model_gflops"] == pytest.approx(2 * peak["model_macs_per_image"] * images_per_s / 1e9)
    # the fraction: each round's rate against the square product timed right after that round
    squares = peak["square_gflops_rounds"]
    assert len(squares) == 2 and min(squares) > 0
    rounds = out["models"]["crossformer_tiny"]["infer"]["images_per_s_rounds"]
    fractions = sorted(2 * peak["model_macs_per_image"] * r / 1e9 / q for r, q in zip(rounds, squares))
    assert peak["model_fraction_of_best"] == pytest.approx(sum(fractions) / 2)
    assert peak["model_fraction_of_best_spread"] == pytest.approx(fractions)
    # a training step is priced at 3 forward passes
    train_per_s = out["train_images_per_s"]
    assert peak["model_train_gflops"] == pytest.approx(3 * 2 * peak["model_macs_per_image"] * train_per_s / 1e9)
    train_rounds = out["models"]["crossformer_tiny"]["train"]["images_per_s_rounds"]
    train_fractions = [6 * peak["model_macs_per_image"] * r / 1e9 / q for r, q in zip(train_rounds, squares)]
    assert peak["model_train_fraction_of_best"] == pytest.approx(sum(train_fractions) / 2)
    # the linear layers alone, at their shapes' measured rates, bound what the model can reach
    depths, dims = (1, 1, 8, 6), (64, 128, 256, 512)
    linear_flops = sum(depth * 2 * (16 // 2**s) ** 2 * 24 * dim**2 for s, (depth, dim) in enumerate(zip(depths, dims)))
    assert peak["linear_gflop_per_batch"] == pytest.approx(linear_flops / 1e9)
    assert peak["linear_seconds_per_batch"] == pytest.approx(sum(
        flops / 1e9 / max(v for k, v in row["gflops"].items() if k.startswith("fp32"))
        for flops, row in zip(_layer_flops(depths, dims, 2, 16), model_rows)))
    assert peak["linear_bound_fraction_of_best"] == pytest.approx(
        peak["model_gflop_per_batch"] / peak["linear_seconds_per_batch"] / best_fp32)
    # the warm-up step's time is reported (with --compile it is the compilation)
    for mode in ("infer", "train"):
        assert out["models"]["crossformer_tiny"][mode]["first_step_s"] > 0
    # a training run alone: the shapes at its batch (they were batch 32's, the inference default),
    # and no inference bound
    cli_main(["benchmark", "--model", "crossformer_tiny", "--peak", "--img-size", "64", "--batch-size", "2",
              "--mode", "train", "--rounds", "1", "--warmup", "1", "--no-memory", "--json"])
    peak = json.loads(capsys.readouterr().out)["peak"]
    assert peak["gemm"][1]["m"] == 512 and "linear_bound_fraction_of_best" not in peak and "model_train_gflops" in peak


def _layer_flops(depths, dims, batch, side):
    """FLOPs per batch of qkv, proj, fc1, fc2 in each stage (MLP ratio 4), in that order."""
    return [depth * 2 * batch * (side // 2**s) ** 2 * dim * dim * factor
            for s, (depth, dim) in enumerate(zip(depths, dims)) for factor in (3, 1, 4, 4)]


def test_model_gemm_shapes_are_the_calls_cpu_inference_makes() -> None:
    import timm

    from crossformer.benchmark import model_gemm_shapes

    with torch.device("meta"):
        model = timm.create_model("crossformer_tiny")
    # batch 32 at 224: a stage runs its batch in as few even chunks as keep its MLP hidden tensor
    # under 16 MB (stage 0: 3136 tokens x 256 x 4 bytes = 3.2 MB an image -> at most 5 -> 7 chunks
    # of 5 or 4; stage 1: at most 10 -> 4 of 8; stage 2: at most 20 -> 2 of 16; stage 3: all 32)
    shapes = model_gemm_shapes(model, 32, 224, 224)
    rows = {label: m for label, m, *_ in shapes}
    assert rows["stage 0 qkv"] == 5 * 56 * 56 and rows["stage 1 fc1"] == 8 * 28 * 28
    assert rows["stage 2 fc2"] == 16 * 14 * 14 and rows["stage 3 proj"] == 32 * 7 * 7
    assert [flops for *_, flops in shapes] == _layer_flops((1, 1, 8, 6), (64, 128, 256, 512), 32, 56)
    # a training step multiplies the whole batch at once
    training = model_gemm_shapes(model, 32, 224, 224, chunked=False)
    assert [m for _, m, *_ in training] == [32 * (56 // 2**s) ** 2 for s in range(4) for _ in range(4)]


@pytest.mark.parametrize("argv", [["--model", "crossformer_tiny", "--peak"], ["--model", "crossformer_tiny"],
                                  ["--config", "mask_rcnn_shapes_demo"], ["--config", "upernet_demo"]])
@pytest.mark.parametrize("device", ["cpu:1", "foo", "mps"])
def test_a_device_benchmark_cannot_use_is_one_line(capsys, argv: list[str], device: str) -> None:
    # --device foo or mps was a RuntimeError traceback from model.to() in every task
    line = one_error_line(capsys, ["benchmark", *argv, "--device", device, "--img-size", "64", "--rounds", "1"])
    assert line.endswith(f"--device must be auto, cpu or cuda[:N], got {device!r}"), line


@pytest.mark.parametrize("argv, message", [
    # the bare flag named a model 'auto' the user never typed
    (["--model", "crossformer_tiny", "--compare"], "--compare needs a NAME with --model (e.g. --compare "
                                                   "swin_tiny_patch4_window7_224); alone it takes torchvision's Mask "
                                                   "R-CNN for a detection --config"),
    # segmentation's peer: "Unknown model (auto)", an unknown encoder and 64x100 were tracebacks from timm and smp
    (["--config", "upernet_demo", "--compare", "nosuch_encoder"], "--compare: unknown model 'nosuch_encoder'"),
    # the peer was dropped without a word, and no ratio printed
    (["--model", "crossformer_tiny", "--compare", "crossformer_tiny"], "--compare crossformer_tiny is --model itself: "
                                                                       "give another model to compare with"),

    (["--config", "upernet_demo", "--img-size", "64", "100"], "--img-size 64 100: the segmentation benchmark runs "
                                                              "smp's UPerNet beside ours, which takes sides that are "
                                                              "multiples of 32"),
])
def test_benchmark_peers_it_cannot_run_are_one_line(capsys, argv: list[str], message: str) -> None:
    line = one_error_line(capsys, ["benchmark", *argv, "--rounds", "1"])
    assert message in line, line


def test_flops_names_the_models_it_counts(capsys) -> None:
    # flops takes CrossFormers only, yet named "any timm model" among the choices
    line = one_error_line(capsys, ["flops", "--model", "nosuch"])
    assert line.endswith(", crossformer_pp_huge"), line
    assert json.loads(_flops_json(capsys, ["--config", "digits"]))["model_kwargs"]["embed_dim"] == 32


def _flops_json(capsys, argv: list[str]) -> str:
    from crossformer.cli import main as cli_main

    assert cli_main(["flops", *argv, "--json"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [("--rounds", "0", "--rounds must be at least 1"),
                                                  ("--steps", "0", "--steps must be at least 1"),
                                                  ("--warmup", "-1", "--warmup must be at least 0"),
                                                  ("--batch-size", "0", "--batch-size must be at least 1")])
def test_benchmark_counts_below_their_minimum_are_one_line(capsys, flag: str, value: str, message: str) -> None:
    line = one_error_line(capsys, ["benchmark", "--model", "crossformer_tiny", flag, value])
    assert line.endswith(message), line


def test_benchmark_train_and_another_mode_are_one_line(capsys) -> None:
    # the last of the two won without a word (--train --mode infer timed inference alone)
    from crossformer.cli import main as cli_main

    with pytest.raises(SystemExit) as stop:
        cli_main(["benchmark", "--model", "crossformer_tiny", "--train", "--mode", "infer"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("crossformer benchmark: error: argument --mode: not allowed with "
                                                   "argument --train") and err.count("\n") == 1, err


def test_each_mode_times_a_model_of_its_own() -> None:
    # --mode both (and --compare) ran one model in both modes: every timed inference step began by
    # rebuilding the inference caches the training step had dropped (infer peak +101 MB, train +0 MB)
    from crossformer.benchmark import BenchConfig, run_benchmark

    built: list[nn.Module] = []
    switched: list[int] = []

    class Counted(nn.Sequential):
        def train(self, mode: bool = True):
            switched.append(id(self))
            return super().train(mode)

    initial: list[torch.Tensor] = []

    def factory() -> nn.Module:
        built.append(Counted(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        initial.append(built[-1][0].weight.detach().clone())
        return built[-1]

    config = BenchConfig(modes=("infer", "train"), batch_size={"infer": 1, "train": 1}, img_size=(32, 32), rounds=2,
                         warmup=1, memory=False, num_classes=4)
    results = run_benchmark({"m": factory}, config)
    assert len(built) == 2 and torch.equal(initial[0], initial[1])  # the same weights
    assert results[0].params == sum(p.numel() for p in built[0].parameters())
    assert all(switched.count(id(m)) <= 1 for m in built)  # each set to its mode once, not every round


def test_no_warmup_reports_no_first_step() -> None:
    from crossformer.benchmark import BenchConfig, run_benchmark, summarise

    config = BenchConfig(batch_size={"infer": 1}, img_size=(32, 32), rounds=1, warmup=0, memory=False)
    summary = summarise(run_benchmark({"m": lambda: torch.nn.Conv2d(3, 4, 3)}, config), config)
    assert summary["models"]["m"]["infer"]["first_step_s"] is None


class _Timed(nn.Module):
    """Takes ``costs[i]`` seconds of a fake clock at its ``i``-th call: the benchmark's arithmetic
    without a real timing's noise."""

    def __init__(self, clock: list[float], costs: list[float]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))
        self.clock, self.costs, self.calls = clock, costs, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock[0] += self.costs[self.calls]
        self.calls += 1
        return x


def test_rates_are_images_over_seconds_medians_over_rounds_and_ratios_of_ours_to_the_peer(monkeypatch) -> None:
    from types import SimpleNamespace

    from crossformer import benchmark

    clock = [0.0]
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    # 2 warm-up calls (the first one timed), then 3 rounds of 2 timed steps each
    ours = _Timed(clock, [10.0, 5.0, 1.0, 1.0, 2.0, 2.0, 0.5, 0.5])
    peer = _Timed(clock, [3.0, 3.0] + [2.0] * 6)
    config = benchmark.BenchConfig(batch_size={"infer": 4}, img_size=(8, 8), rounds=3, warmup=2, steps=2, memory=False)
    summary = benchmark.summarise(benchmark.run_benchmark({"ours": lambda: ours, "peer": lambda: peer}, config),
                                  config, compare="peer")
    assert ours.calls == peer.calls == 8
    measured = summary["models"]["ours"]["infer"]
    # 4 images x 2 steps over 2, 4 and 1 seconds
    assert measured["images_per_s_rounds"] == [4.0, 2.0, 8.0] and measured["images_per_s"] == 4.0
    assert measured["images_per_s_spread"] == [2.0, 8.0] and measured["first_step_s"] == 10.0
    assert measured["peak_mem_mb"] is None and summary["models"]["peer"]["infer"]["images_per_s"] == 2.0
    # each round's ratio (2, 1, 4), then their median: not the ratio of the medians, nor their mean
    assert (summary["infer_ratio"], summary["infer_ratio_spread"]) == (2.0, [1.0, 4.0])
    assert "ratio 2.00x [1.00, 4.00]" in benchmark.format_summary(summary)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_is_the_resident_growth_in_mib(monkeypatch) -> None:
    from crossformer import benchmark

    resident = {"VmRSS": 100 * 1024, "VmHWM": 100 * 1024}  # kB, as /proc/self/status gives them
    monkeypatch.setattr(benchmark, "_status_kb", lambda key: resident[key])
    steps = []

    def step() -> None:
        steps.append(1)
        resident["VmHWM"] += 3 * 1024 + 512

    assert benchmark.peak_memory_mb(step, "cpu") == 3.5 and steps == [1]
    # a VmHWM the kernel has not updated yet, a page under the VmRSS read after it: "peak +-0 MB"
    resident.update(VmRSS=100 * 1024 + 4, VmHWM=100 * 1024)
    assert benchmark.peak_memory_mb(lambda: None, "cpu") == 0.0


def test_peak_under_bf16_autocast_is_a_share_of_the_best_bf16_rate(monkeypatch) -> None:
    from crossformer import benchmark

    rates = {"fp32 mkl": 100.0, "bf16 onednn packed": 400.0}
    monkeypatch.setattr(benchmark, "gemm_rates", lambda shapes, rounds=3, device="cpu": [
        dict(shape=label, m=m, k=k, n=n, gflops=dict(rates)) for label, m, k, n, *_ in shapes])
    config = benchmark.BenchConfig(batch_size={"infer": 2}, img_size=(64, 64), amp="bf16")
    summary = {"models": {"crossformer_tiny": {"infer": {"images_per_s": 30.0, "images_per_s_rounds": [20.0, 40.0]}}}}
    squares = [{"fp32 mkl": 50.0, "bf16 mm (autocast)": 200.0}, {"fp32 mkl": 50.0, "bf16 mm (autocast)": 800.0}]
    report = benchmark.peak_report("crossformer_tiny", config, summary, square_samples=squares)
    macs = report["model_macs_per_image"]
    assert report["model_dtype"] == "bf16" and report["best_square_gflops"] == {"fp32": 100.0, "bf16": 400.0}
    assert report["model_gflops"] == pytest.approx(2 * macs * 30 / 1e9)
    assert report["square_gflops_rounds"] == [200.0, 800.0]
    fractions = [2 * macs * 20 / 1e9 / 200, 2 * macs * 40 / 1e9 / 800]
    assert report["model_fraction_of_best"] == pytest.approx(sum(fractions) / 2)
    assert report["linear_seconds_per_batch"] == pytest.approx(report["linear_gflop_per_batch"] / 400)


def test_gemm_rates_count_every_repeat_of_the_product(monkeypatch) -> None:
    from types import SimpleNamespace

    from crossformer import benchmark

    clock = [0.0]

    def tick() -> float:  # 1/64 s between any two readings (exact in binary), however many products ran
        clock[0] += 2**-6
        return clock[0]

    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=tick))
    sampler = benchmark.GemmSampler(8, 16, 4, min_seconds=5 * 2**-6)
    sampler()
    # a product "takes" 1/64 s, so each backend repeats it 5 times to fill 5/64 s; then 5 products in 1/64 s
    assert set(sampler.repeats.values()) == {5}
    assert sampler.samples == [{name: pytest.approx(2 * 8 * 16 * 4 * 5 * 64 / 1e9) for name in sampler.calls}]


def test_channels_last_reaches_the_models_input() -> None:
    from crossformer.benchmark import BenchConfig, make_step

    seen = []

    class Records(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
            return x

    for channels_last in (True, False):
        make_step(Records(), "infer", BenchConfig(batch_size={"infer": 2}, img_size=(8, 8), channels_last=channels_last))()
    assert seen == [True, False]


def test_the_benchmark_flags_set_the_measurement() -> None:
    import argparse

    from crossformer.benchmark import BenchConfig
    from crossformer.commands import benchmark as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    # the defaults: a training step beside inference with --compare, at batch 16 beside 32
    assert command.build_config(parser.parse_args(["--model", "m", "--compare", "p"])) == BenchConfig(
        modes=("infer", "train"), batch_size={"infer": 32, "train": 16})
    given = parser.parse_args(["--model", "m", "--train", "--batch-size", "3", "--img-size", "64", "96", "--amp", "bf16",
                               "--channels-last", "--grad-checkpointing", "--num-classes", "0", "--rounds", "4",
                               "--warmup", "0", "--steps", "2", "--no-memory"])
    assert command.build_config(given) == BenchConfig(
        modes=("train",), batch_size={"train": 3}, img_size=(64, 96), amp="bf16", channels_last=True,
        grad_checkpointing=True, num_classes=0, rounds=4, warmup=0, steps=2, memory=False)


@needs_onednn
def test_nothing_is_timed_under_a_flop_counter(monkeypatch) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    _forbid_gemm_timing(monkeypatch, "timed under a dispatch mode")
    layer = nn.Linear(40, 24)
    x = torch.randn(3 * 1021, 40, requires_grad=True)  # a shape class no other test measures
    counter = FlopCounterMode(display=False)
    with counter:
        linear(x, layer.weight, layer.bias).sum().backward()
    # forward, input gradient and weight gradient, each counted once: 3 products of 2 * M * K * N
    assert counter.get_total_flops() == 3 * 2 * 3 * 1021 * 40 * 24
    assert not any(key[3:] == ((3 * 1021).bit_length(), 40, 24) for key in gemm_choices())


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")))
def test_every_benchmark_script_imports(script: str) -> None:
    """The scripts of benchmarks/ run outside the tests; a helper they import that moved broke
    ratios.py unnoticed for a session. Importing each (its __main__ part not run) catches that."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    spec = importlib.util.spec_from_file_location(f"benchmark_script_{path.stem}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_ab_loads_the_network_of_a_revision() -> None:
    """benchmarks/ab.py's loader broke once the network imported a module outside models/ (it
    copied four files): it loads the whole package at the revision, and that network computes
    what the working tree's does."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    spec = importlib.util.spec_from_file_location("benchmark_script_ab_loader", root / "benchmarks" / "ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    old_cls = ab.load_revision("HEAD")
    assert old_cls.__module__ == "crossformer_at_rev.models.crossformer"
    new = CrossFormer(**TINY).eval()
    old = old_cls(**TINY).eval()
    old.load_state_dict(new.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (old(x) - new(x)).abs().max().item() <= TOL
