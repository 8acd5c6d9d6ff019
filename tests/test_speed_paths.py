"""The CPU speed paths of issue 15 compute what the plain path computes.

- Training linears (:func:`crossformer.models.layers.measured_gemm`): each of the three
  products on MKL or oneDNN, whichever was measured faster, equal to ``F.linear`` and its
  autograd gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crossformer.models import CrossFormer
from crossformer.models import layers
from crossformer.models.layers import (
    GEMM_BACKENDS,
    force_gemm_backend,
    gemm_choices,
    linear,
    measured_gemm_training,
)

TOL = 1e-4
needs_onednn = pytest.mark.skipif(layers._LINEAR_POINTWISE is None, reason="PyTorch built without oneDNN")
TINY = dict(embed_dim=32, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8), group_size=(7, 7, 7, 7),
            interval=(8, 4, 2, 1), num_classes=10, drop_path_rate=0.0)


def _linear_and_grads(x: torch.Tensor, layer: nn.Linear, gelu: bool, plain: bool):
    x = x.detach().requires_grad_()
    out = F.gelu(layer(x)) if plain and gelu else layer(x) if plain else linear(x, layer, gelu=gelu)
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


@needs_onednn
def test_backend_choice_is_measured_once_per_shape_class(monkeypatch) -> None:
    layer = nn.Linear(48, 80)
    x = torch.randn(300, 48, requires_grad=True)
    linear(x, layer).sum().backward()
    products = {key[0] for key in gemm_choices() if key[3:] in ((300 .bit_length(), 48, 80), (300 .bit_length(), 80, 48))}
    assert products == {"forward", "grad_input", "grad_weight"}
    assert set(gemm_choices().values()) <= set(GEMM_BACKENDS)

    def no_timing(*args):
        raise AssertionError("timed again")

    monkeypatch.setattr(layers, "_choose_gemm", no_timing)
    x = torch.randn(290, 48, requires_grad=True)  # same rows bucket: no new timing
    linear(x, layer).sum().backward()


class _Linear(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.layer)


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
def test_double_backward_matches_f_linear() -> None:
    """create_graph=True records the backward products, so a gradient penalty works."""
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    results = []
    for out in (linear(x, layer, gelu=True), F.gelu(layer(x))):
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
