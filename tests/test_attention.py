"""``biased_attention``: every path equals the explicit softmax, values and gradients."""

from __future__ import annotations

import pytest
import torch

from crossformer.models import attention
from crossformer.models.attention import biased_attention

TOL = 1e-5


def _inputs(batch: int, groups: int, tokens: int, head_dim: int, padded: bool, contiguous: bool):
    """[qkv (3, B, M, N, d), mask (1, M, N, N)], leaves that need gradients."""
    gen = torch.Generator().manual_seed(0)
    if contiguous:  # as partition_heads groups it
        qkv = torch.randn(3, batch, groups, tokens, head_dim, generator=gen)
    else:  # a view of a (B, N, 3, M, d) projection output, as GroupAttention.forward_groups passes it
        qkv = torch.randn(batch, tokens, 3, groups, head_dim, generator=gen).permute(2, 0, 3, 1, 4)
    mask = torch.randn(1, groups, tokens, tokens, generator=gen) * 0.5
    if padded:  # the last third of the keys are padding in half the groups
        mask[:, : groups // 2, :, -(tokens // 3) :] = -1e6
    return [t.requires_grad_() for t in (qkv, mask)]


def _value_and_grads(inputs, grad_out, **kwargs):
    out = biased_attention(*inputs, scale=inputs[0].shape[-1] ** -0.5, **kwargs)
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("padded", [False, True], ids=["bias", "bias+padding"])
@pytest.mark.parametrize("shape", [(5, 4, 49, 8), (3, 2, 16, 32), (4, 1, 25, 8)], ids=["N49", "N16", "M1"])
@pytest.mark.parametrize("chunk", [(2, 0), (1, 0), (0, 3), (0, 1)], ids=["2rows", "1row", "3heads", "1head"])
def test_cpu_training_path_matches_explicit(monkeypatch, shape, padded, contiguous, chunk) -> None:
    # A small chunk size, so that backward runs several chunks: whole rows (with 2, the last
    # one partial), or heads of one row when a row is larger than a chunk (950-token groups at
    # detection size; with 3 of 4 heads, the last chunk partial).
    rows, heads = chunk
    monkeypatch.setattr(attention, "_CHUNK_ELEMENTS", (rows * shape[1] + heads) * shape[2] ** 2)
    inputs = _inputs(*shape, padded=padded, contiguous=contiguous)
    grad_out = torch.randn(inputs[0].shape[1:])
    out, grads = _value_and_grads(inputs, grad_out)
    assert out.grad_fn is not None and "BiasedAttentionCPU" in type(out.grad_fn).__name__
    ref_out, ref_grads = _value_and_grads(inputs, grad_out, fused=False)
    assert (out - ref_out).abs().max().item() <= TOL
    for name, got, want in zip(("qkv", "mask"), grads, ref_grads):
        assert got.shape == want.shape, name
        assert (got - want).abs().max().item() <= TOL, name


def test_cpu_training_path_saves_no_score_matrix() -> None:
    """Backward recomputes the (B, M, N, N) probabilities; forward keeps none of them."""
    batch, groups, tokens, head_dim = 4, 2, 49, 8
    inputs = _inputs(batch, groups, tokens, head_dim, padded=True, contiguous=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = biased_attention(*inputs, scale=head_dim**-0.5)
    out.sum().backward()
    assert saved and all(shape[0] != batch or shape[-2:] != (tokens, tokens) for shape in saved), saved
    assert all(t.grad is not None for t in inputs)


def test_paths_chosen() -> None:
    inputs = _inputs(2, 2, 16, 8, padded=True, contiguous=True)
    scale = 8**-0.5
    # A mask without gradient: PyTorch's fused kernel, equal to the explicit formula.
    frozen = [t.detach() for t in inputs]
    fused = biased_attention(*frozen, scale=scale)
    assert (fused - biased_attention(*frozen, scale=scale, fused=False)).abs().max().item() <= TOL
    # Attention dropout in training: the explicit formula (dropout needs the weights).
    torch.manual_seed(0)
    dropped = biased_attention(*inputs, scale=scale, dropout_p=0.5)
    assert "BiasedAttentionCPU" not in type(dropped.grad_fn).__name__
    # Another dtype: the explicit formula, in that dtype.
    doubled = [t.detach().double().requires_grad_() for t in inputs]
    assert biased_attention(*doubled, scale=scale).dtype == torch.float64


def test_double_backward_equals_the_explicit_formulas() -> None:
    """Gradients of gradients (gradient penalties, Hessian-vector products) through the CPU
    training path: those of the explicit formula (it refused them: "once_differentiable").
    A mask that needs no gradient goes to torch's SDPA, which has no double backward."""
    results = []
    for fused in (True, False):
        inputs = _inputs(2, 2, 16, 8, padded=True, contiguous=False)
        out = biased_attention(*inputs, scale=8**-0.5, fused=fused)
        assert ("BiasedAttentionCPU" in type(out.grad_fn).__name__) == fused
        grads = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
        penalty = grads[0].square().sum()
        results.append(torch.autograd.grad(penalty, inputs))
    for fused, explicit in zip(*results):
        torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)
