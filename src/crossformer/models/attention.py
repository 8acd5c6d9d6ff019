"""Attention with an additive float mask (position bias plus padding scores), fast on CPU.

``biased_attention(qkv, mask)`` computes ``softmax(q k^T * scale + mask) v`` for ``q, k, v``
of shape ``(B, M, N, d)``, stacked as ``qkv`` ``(3, B, M, N, d)``, and a mask ``(1, M, N, N)``
broadcast over ``B``, and picks the fastest exact way to do it:

- ``F.scaled_dot_product_attention`` whenever the mask needs no gradient (inference, frozen
  bias), and on every non-CPU device: one fused kernel, no ``N x N`` tensor in memory.
- CPU bfloat16 inference (autocast): that kernel or :func:`_chunked_cpu_inference`, products
  and softmax a few images at a time (softmax to bf16, or to float32 and then cast), whichever
  was measured faster in this process for the shape class (:func:`attention_choices`). PyTorch's fused CPU kernel can run bf16 slower than
  float32 (a 2-core AMD EPYC with avx512_bf16 and no AMX: 28 against 24 ms at
  crossformer_tiny's first stage, 28 against 17 at crossformer_pp_small's; the chunks take 21
  and 13 ms), but a CPU with AMX may well run it faster.
- CPU training with a learnt mask (the dynamic position bias): :class:`_BiasedAttentionCPU`.
  PyTorch's CPU SDPA falls back to an unfused path when the mask needs a gradient, and the
  explicit autograd graph keeps ``softmax`` outputs of every block alive until backward
  (354 MB per step for crossformer_pp_small at batch 16) and allocates several more
  ``(B, M, N, N)`` tensors per block. Fresh allocations that large page-fault: 210K
  faults and 1.5 s of system time in a 3.6 s step of that model, 86K faults and 0.3 s
  with this function. It runs the fused kernel forwards, saves only its inputs, output
  and log-sum-exp, and in backward recomputes the probabilities a few images at a time,
  so every ``N x N`` temporary stays small and is reused.
- The explicit formula otherwise (attention dropout during training, dtypes other than
  float32 and bfloat16).

TorchScript compiles only the SDPA and explicit paths (the autograd function is eager-only).

A query whose keys are all masked (a group made only of padding) gets probabilities
recomputed from a log-sum-exp near -1e6, which float32 holds only to ~0.06; its gradient
is then approximate. The network crops such queries, so their output gradient is zero
and nothing of it reaches the parameters.
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.nn.functional as F

from .layers import alternative_wins, capturing_graph, may_time, seconds, without_autocast

__all__ = ["biased_attention", "attention_choices"]

# Elements of one backward chunk's (c, M, N, N) tensors: 1M floats = 4 MB, small enough
# to be reused from the heap instead of page-faulted in, large enough to keep the Python
# loop short (4 chunks per block on crossformer_pp_small's 14x14 stage at batch 16).
_CHUNK_ELEMENTS = 1 << 20


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``(c, m, N, X)`` -> ``(c * m, N, X)``: a view for the chunks :func:`_chunks` makes."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _chunks(batch: int, groups: int, tokens: int) -> Iterator[tuple[slice, slice]]:
    """``(rows, heads)`` slices of a ``(batch, groups, N, N)`` score tensor, each about
    :data:`_CHUNK_ELEMENTS`: several rows with all of ``groups`` while one row fits, else one
    row a few of ``groups`` at a time (950-token groups at detection size: 3.6 MB per head)."""
    per_head = tokens * tokens
    if groups * per_head <= _CHUNK_ELEMENTS:
        step = _CHUNK_ELEMENTS // (groups * per_head)
        for start in range(0, batch, step):
            yield slice(start, min(start + step, batch)), slice(0, groups)
        return
    step = max(1, _CHUNK_ELEMENTS // per_head)
    for row in range(batch):
        for start in range(0, groups, step):
            yield slice(row, row + 1), slice(start, min(start + step, groups))


class _BiasedAttentionCPU(torch.autograd.Function):
    """``softmax(q k^T * scale + mask) v`` with gradients for ``qkv`` and the mask (CPU).

    q, k and v come stacked as ``qkv`` ``(3, B, M, N, d)`` and their gradients are written
    into one contiguous tensor of that shape, so that autograd need not stack three (for a
    contiguous ``qkv``, the grouping's output, nothing is copied; for a view of the qkv
    projection's output, autograd's one copy back into that layout costs less than writing
    each chunk into its strides). float32 or bfloat16 inputs (bf16 autocast); backward
    computes in float32 either way.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, mask: torch.Tensor, scale: float):
        q, k, v = qkv.unbind(0)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=mask, scale=scale
        )
        ctx.save_for_backward(qkv, mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out: torch.Tensor):
        qkv, mask, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the explicit formula's gradients, with their graph
            return (*_gradients_with_graph(qkv, mask, ctx.scale, grad_out, ctx.needs_input_grad[:2]), None)
        dtype = qkv.dtype
        qkv, mask, out, grad_out = (t.float() for t in (qkv, mask, out, grad_out))  # no-ops in fp32
        q, k, v = qkv.unbind(0)
        scale = ctx.scale
        grad_out = grad_out.contiguous()
        batch, groups, tokens, head_dim = q.shape
        neg_delta = (grad_out * out).sum(-1, keepdim=True).neg_()  # D = rowsum(dO * O): (B, M, N, 1)
        # dO v^T - D: for long groups as one product, dO and v each given one more column (-D
        # and 1): two (B, M, N, d + 1) copies instead of a pass broadcasting -D over every
        # N x N block, which pays from N ~ 4 d (49-token groups: the copies cost more).
        one_product = tokens >= 4 * head_dim
        if one_product:
            grad_out_delta = torch.cat([grad_out, neg_delta], dim=-1)
            v_ones = torch.cat([v, torch.ones_like(neg_delta)], dim=-1)
        # contiguous, so that the per-chunk views below are written in place
        grad_qkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        grad_q, grad_k, grad_v = grad_qkv.unbind(0)
        grad_mask = torch.zeros(mask.shape[1:], dtype=mask.dtype, device=mask.device)
        for rows, heads in _chunks(batch, groups, tokens):
            part = (rows, heads)
            qs, ks, vs, dos = _flat(q[part]), _flat(k[part]), _flat(v[part]), _flat(grad_out[part])
            # P = exp(q k^T * scale + mask - lse): the forward's probabilities, recomputed
            probs = _flat(mask[0, heads] - lse[part].unsqueeze(-1))
            probs.baddbmm_(qs, ks.transpose(1, 2), alpha=scale).exp_()
            # dS = P * (dO v^T - D)
            if one_product:
                grad_scores = torch.bmm(_flat(grad_out_delta[part]), _flat(v_ones[part]).transpose(1, 2))
            else:
                grad_scores = torch.baddbmm(_flat(neg_delta[part]), dos, vs.transpose(1, 2))
            grad_scores.mul_(probs)
            per_row = grad_scores.view(rows.stop - rows.start, heads.stop - heads.start, tokens, tokens)
            grad_mask[heads] += per_row[0] if per_row.shape[0] == 1 else per_row.sum(0)  # one row: no reduction pass
            torch.bmm(probs.transpose(1, 2), dos, out=_flat(grad_v[part]))
            dq, dk = _flat(grad_q[part]), _flat(grad_k[part])
            torch.baddbmm(dq, grad_scores, ks, beta=0, alpha=scale, out=dq)
            torch.baddbmm(dk, grad_scores.transpose(1, 2), qs, beta=0, alpha=scale, out=dk)
        return grad_qkv.to(dtype), grad_mask.unsqueeze(0).to(dtype), None


def _chunked_cpu_inference(
    qkv: torch.Tensor, mask: torch.Tensor, scale: float, float32_softmax: bool = False
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` without gradients, :func:`_chunks` at a time, each
    chunk's ``N x N`` scores kept small enough to stay in the caches: ``(B, M, N, d)``,
    contiguous. The probabilities, as in a GPU's fused bf16 kernel, enter the second product
    in the scores' precision, rounded once from float32 (softmax computes in float32 inside).

    ``float32_softmax`` has softmax write float32, then casts it: PyTorch's CPU softmax from
    bf16 to bf16 takes vectors of 32 and the rest of each row one element at a time (17 of a
    49-token row, all of a 16-token row), while to float32 it runs whole rows in vectors
    (RESULTS.md row 135). Both compute in float32; their bf16 probabilities differ by one
    last bit in a few places (5 in a million of crossformer_tiny's 49-token rows)."""
    q, k, v = qkv.unbind(0)
    batch, groups, tokens, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    probs32 = probs = None  # the first chunk is the largest: its buffers serve every chunk
    for rows, heads in _chunks(batch, groups, tokens):
        part = (rows, heads)
        scores = torch.bmm(_flat(q[part]), _flat(k[part]).transpose(1, 2))
        per_row = scores.view(rows.stop - rows.start, heads.stop - heads.start, tokens, tokens)
        torch.add(mask[0, heads], per_row, alpha=scale, out=per_row)  # mask + scale * q k^T
        if probs is None:
            probs = torch.empty_like(scores)
            if float32_softmax:
                probs32 = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        chunk = probs[: scores.shape[0]]
        if probs32 is not None:
            chunk.copy_(torch.softmax(scores, -1, dtype=torch.float32, out=probs32[: scores.shape[0]]))
        else:
            torch.softmax(scores, -1, out=chunk)
        torch.bmm(chunk, _flat(v[part]), out=_flat(out[part]))
    return out


# How CPU bf16 inference attention runs, per shape class (dtype, threads, M, N, d)
FUSED, CHUNKS, CHUNKS_FLOAT32_SOFTMAX = "fused", "chunks", "chunks, float32 softmax"
_ATTENTION_CHOICES: dict[tuple, str] = {}
# A choice is timed on the first images of its first call, up to this many scores (8 MB in bf16).
_TIMING_SCORES = 1 << 22


def _fused(qkv: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    q, k, v = qkv.unbind(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _timing_sample(qkv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first images of ``qkv`` and, where one image holds more than :data:`_TIMING_SCORES`
    scores (950-token groups at detection size), its first groups with their mask's."""
    _, batch, groups, tokens, _ = qkv.shape
    per_group = tokens * tokens
    if groups * per_group <= _TIMING_SCORES:
        return qkv[:, : min(batch, _TIMING_SCORES // (groups * per_group))], mask
    kept = max(1, _TIMING_SCORES // per_group)
    return qkv[:, :1, :kept], mask[:, :kept]


_ATTENTION_PATHS = {
    FUSED: _fused,
    CHUNKS: _chunked_cpu_inference,
    CHUNKS_FLOAT32_SOFTMAX: functools.partial(_chunked_cpu_inference, float32_softmax=True),
}


def _faster(default: str, alternative: str, qkv: torch.Tensor, mask: torch.Tensor, scale: float) -> str:
    """Whichever of two :data:`_ATTENTION_PATHS` :func:`.layers.alternative_wins` picks on this input."""
    first, second = _ATTENTION_PATHS[default], _ATTENTION_PATHS[alternative]
    first(qkv, mask, scale), second(qkv, mask, scale)  # a warm-up of each
    wins = alternative_wins(lambda: seconds(first, qkv, mask, scale), lambda: seconds(second, qkv, mask, scale))
    return alternative if wins else default


def _cpu_bf16_inference(qkv: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`_fused` or :func:`_chunked_cpu_inference` (softmax to bf16, or to float32 and
    cast), as measured for the shape class at its first call: the chunks' two softmaxes against
    each other, then the faster against the fused kernel (the fused kernel when nothing may be
    timed: :func:`.layers.may_time`). The first call's result too is the chosen one's: the same
    input always gives the same output."""
    if not may_time() or qkv.numel() == 0:  # an empty batch would time nothing and decide
        return _fused(qkv, mask, scale)
    _, batch, groups, tokens, head_dim = qkv.shape
    key = (qkv.dtype, torch.get_num_threads(), groups, tokens, head_dim)
    path = _ATTENTION_CHOICES.get(key)
    if path is None:
        sample, sample_mask = _timing_sample(qkv, mask)
        chunks = _faster(CHUNKS, CHUNKS_FLOAT32_SOFTMAX, sample, sample_mask, scale)
        path = _ATTENTION_CHOICES[key] = _faster(FUSED, chunks, sample, sample_mask, scale)
    return _ATTENTION_PATHS[path](qkv, mask, scale)


def _bf16_cpu_inference_applies(qkv: torch.Tensor, mask: torch.Tensor, dropout_p: float) -> bool:
    """Whether :func:`_cpu_bf16_inference` computes this attention: bf16 on the CPU, no dropout,
    nothing needing a gradient (its products write into their output), eager mode."""
    return (
        qkv.device.type == "cpu"
        and not (torch.is_grad_enabled() and (qkv.requires_grad or mask.requires_grad))
        and qkv.dtype == mask.dtype == torch.bfloat16
        and dropout_p == 0.0
        and not torch.jit.is_tracing()
        and not capturing_graph()
    )


def _gradients_with_graph(
    qkv: torch.Tensor, mask: torch.Tensor, scale: float, grad_out: torch.Tensor, needed: tuple[bool, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of :func:`_explicit` for ``qkv`` and ``mask`` where ``needed``, as
    differentiable tensors (a double backward: gradient penalties, Hessian-vector products)."""
    q, k, v = qkv.unbind(0)
    out = _explicit(q, k, v, mask, scale, 0.0)
    inputs = [t for t, wanted in zip((qkv, mask), needed) if wanted]
    grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True))
    return tuple(next(grads) if wanted else None for wanted in needed)


def attention_choices() -> dict[tuple, str]:
    """Per shape class ``(dtype, threads, M, N, d)`` of CPU bf16 inference attention so far in
    this process: how it runs (:data:`FUSED`, :data:`CHUNKS` or :data:`CHUNKS_FLOAT32_SOFTMAX`)."""
    return dict(_ATTENTION_CHOICES)


def _explicit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, dropout_p: float
) -> torch.Tensor:
    attn = (q * scale) @ k.transpose(-2, -1) + mask
    attn = attn.softmax(dim=-1)
    if dropout_p:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def biased_attention(
    qkv: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    fused: bool = True,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` for q, k, v stacked as ``qkv`` ``(3, B, M, N, d)``
    (any strides, e.g. a view of the qkv projection's output) and a ``(1, M, N, N)`` mask:
    ``(B, M, N, d)``.

    ``dropout_p`` applies to the attention weights (pass 0 in eval); ``fused=False`` always
    takes the explicit formula (a reference for tests).
    """
    q, k, v = qkv.unbind(0)
    if not fused:
        return _explicit(q, k, v, mask, scale, dropout_p)
    mask_grad = mask.requires_grad and torch.is_grad_enabled()
    if not torch.jit.is_scripting():  # alone in its test: TorchScript then compiles nothing below it
        if _bf16_cpu_inference_applies(qkv, mask, dropout_p):
            return _cpu_bf16_inference(qkv, mask, scale)
        if torch._C._are_functorch_transforms_active():  # fused SDPA cannot differentiate its mask
            return _explicit(q, k, v, mask, scale, dropout_p)
    # torch.jit.trace checks its graph by tracing again under no_grad: one path in both modes
    if not mask_grad or qkv.device.type != "cpu" or torch.jit.is_tracing():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if not torch.jit.is_scripting():
        if (
            dropout_p == 0.0
            and qkv.dtype == mask.dtype
            and qkv.dtype in (torch.float32, torch.bfloat16)
            and not capturing_graph()
        ):
            return _BiasedAttentionCPU.apply(qkv, mask, scale)
    return _explicit(q, k, v, mask, scale, dropout_p)
