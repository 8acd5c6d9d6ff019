"""Building blocks with faster CPU paths; each computes what the plain PyTorch layer does.

- :func:`linear` / :class:`GeluMlp`: in CPU inference, oneDNN's linear with a fused
  epilogue (``torch.ops.mkldnn._linear_pointwise``) computes ``x @ W.T + b`` (and the exact
  GELU after it) in one call. At the model's shapes on a 2-core Xeon that was 10-40%
  faster than ``F.linear`` (MKL ``addmm`` first copies the bias into the output), and it
  saves the separate GELU pass; on a 2-core AMD EPYC with AVX2, MKL and a GELU after it
  were up to 1.5x faster. So each shape class takes the one measured faster in this process.
  Autograd, autocast, CUDA, tracing, compiling, exporting and TorchScript keep ``F.linear``.
  Only plain, unhooked ``nn.Linear`` layers take these paths (:func:`call_linear`); any
  other is called, so that its hooks fire and a layer put in its place runs.
- In CPU float32 training, :func:`linear` runs the forward product and both backward
  products (input and weight gradient) each on MKL or oneDNN, whichever was measured
  faster for that shape class in this process (:func:`measured_gemm`).
- :func:`image_layout`: the cross-scale embedding reads the image NCHW or channels-last,
  whichever its convolutions were measured faster on.
- :func:`cross_scale_inference`: in CPU inference, the cross-scale convolutions with their
  weights kept cast under autocast, the two largest as one where that was measured faster.
- :class:`LargeKernelConv2d`: the cross-scale embedding's 16x16 and 32x32 kernels, whose
  CPU weight gradient is computed by space-to-depth.
- :class:`ResidualDropPath`: residual add and stochastic depth in one pass.

The fast paths sit behind ``if not torch.jit.is_scripting()``, which TorchScript does not
compile, so ``torch.jit.script`` sees only the plain layers. For FX, :class:`GeluMlp` and
:class:`LargeKernelConv2d` are timm notrace (leaf) modules: their dispatch reads the
input's device and dtype, which a symbolic trace cannot branch on.

Measurements: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Hashable, Iterable, Iterator, MutableMapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.module as module_hooks
from timm.layers import Mlp
from timm.models import register_notrace_module
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "GEMM_BACKENDS", "GeluMlp", "LargeKernelConv2d", "ResidualDropPath", "capturing_graph", "conv_input",
    "saved_copy", "without_autocast",
    "force_gemm_backend", "gemm_choices", "linear", "measured_gemm", "measured_gemm_training", "onednn_inference",
    "onednn_inference_bf16", "weights_fingerprint", "cached_on_weights", "hooked", "hooked_within", "plain_linear",
    "InferenceCaches",
    "call_linear",
    "alternative_wins", "may_time", "state_without", "unaltered", "image_layout", "image_layout_choices",
    "cross_scale_inference", "merged_kernel_choices",
]

_LINEAR_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_REORDER_LINEAR_WEIGHT = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _LINEAR_POINTWISE else None
# Rows the packed layout is tuned for; measured equal from 64 to 16K rows, and any row
# count gives bit-identical results.
_PACK_ROWS_HINT = 4096
# weight -> (fingerprint, the weight reordered into oneDNN's blocked layout, the weight: cached_on_weights)
_PACKED_WEIGHTS = WeakIdKeyDictionary()
# weight -> (fingerprint, a bfloat16 copy, reordered, the weight): CPU inference under bf16 autocast
_PACKED_BF16_WEIGHTS = WeakIdKeyDictionary()


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN multiplies bfloat16 on this CPU's own instructions (AVX-512 and its BF16
    extension, AMX). Without them CPU bf16 autocast still computes, but emulated: on a 2-core AVX2
    EPYC crossformer_tiny inferred 7x and trained 40x slower than in float32 (batch 8)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# oneDNN's bf16 kernels need the CPU's support (avx512_bf16, AMX); elsewhere autocast keeps its path
_BF16_GEMM = _LINEAR_POINTWISE is not None and cpu_has_bf16_kernels()


def without_autocast(backward: Callable[..., Any]) -> Callable[..., Any]:
    """A custom ``autograd.Function``'s ``backward`` run with autocast off, as it runs when
    ``loss.backward()`` is called after the ``autocast`` block: called inside it (common in
    user code, and fine for timm's models), its products were cast to bf16 among float32
    tensors (a dtype error, or gradients computed in bf16)."""
    @functools.wraps(backward)
    def run(ctx: Any, *grads: Any) -> Any:
        device = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)

    return run


def capturing_graph() -> bool:
    """Whether ``torch.jit.trace``, ``torch.fx`` symbolic tracing, ``torch.compile`` or
    ``torch.export`` is recording the model, or a ``torch.func`` transform (``grad``,
    ``vmap``, ``jacrev``, ...) or forward-mode AD (``torch.autograd.forward_ad.dual_level``)
    is running it.

    The eager-only fast paths and caches of this package step aside then: a recorded graph
    must hold plain, traceable ops and no tensors cached from an earlier call, and a
    transform needs ops it knows how to batch and differentiate (not this package's
    ``autograd.Function``s and oneDNN calls) and must not leave its wrapped tensors in a cache.
    """
    return (
        torch.jit.is_tracing()
        or is_fx_symbolic_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0  # dual tensors: ops with forward derivatives
    )


def saved_copy(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a fresh contiguous copy of it while ``torch.compile`` records a graph that
    autograd will differentiate.

    For views that an op saves for its backward. Inductor (torch 2.14) orders the strides
    of a saved view without the shape environment, so once sizes are symbolic (a second
    input size) it fails on strides whose order needs a size to be positive, such as
    ``W // 4 * C`` against ``C`` or ``(2 * h - 1) // h`` factors of a padded group map:
    "cannot determine truth value of Relational". A copy is a buffer, not a view, and is
    fused into its producer's write. Eager mode, tracing and export keep the view.
    """
    if not torch.jit.is_scripting():
        if torch.is_grad_enabled() and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            return x.clone(memory_format=torch.contiguous_format)
    return x


def conv_input(x: torch.Tensor) -> torch.Tensor:
    """A channels-last map ``(B, H, W, C)`` as a convolution's NCHW input ``(B, C, H, W)``:
    a view, or an NCHW copy while compiled training (:func:`saved_copy`)."""
    return saved_copy(x.permute(0, 3, 1, 2))


def weights_fingerprint(tensors: Iterable[torch.Tensor]) -> tuple | None:
    """Changes whenever any of the tensors does: storage address, in-place version, dtype.

    Optimizer steps and ``load_state_dict`` bump the version, ``.to()`` moves the storage.
    In-place edits through ``.data`` do neither (``.data`` has a version of its own): the
    modules holding such caches drop them in ``train(mode)`` for either mode, so
    ``model.eval()`` after such an edit makes the next call see it.
    ``None`` when one is an inference tensor (a model built under ``torch.inference_mode()``):
    those keep no version, so a cache could not see them change, and callers cache nothing.
    """
    tensors = tuple(tensors)
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


def cached_on_weights(
    cache: MutableMapping, key: Hashable, tensors: Iterable[torch.Tensor], compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``compute()``, kept in ``cache[key]`` and computed again only when ``tensors`` change
    (:func:`weights_fingerprint`); computed afresh on every call for inference tensors.

    The entry holds the tensors' storage too: ``.half()``, ``.float()`` and ``.to(dtype)`` put
    new storage under the same parameters through ``.data`` (which keeps the version), and
    after a round trip (bf16 and back) the new float32 storage could otherwise take the freed
    address, matching the fingerprint with other values.
    """
    tensors = tuple(tensors)
    fingerprint = weights_fingerprint(tensors)
    if fingerprint is None:
        return compute()
    hit = cache.get(key)
    if hit is not None and hit[0] == fingerprint:
        return hit[1]
    value = compute()
    cache[key] = (fingerprint, value, tuple(t.detach() for t in tensors))
    return value


def _packed(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight`` (cast to ``dtype``) reordered once for oneDNN, again only when it changes.

    Saves oneDNN the reorder it otherwise does on every call (5-8% of a linear layer at
    the model's shapes), and under bf16 autocast the weight's cast on every call, at the
    cost of a second copy of the weights while in inference. Builds without the reorder op
    get the (cast) weight itself.
    """
    if _REORDER_LINEAR_WEIGHT is None:
        return weight.to(dtype)
    cache = _PACKED_WEIGHTS if dtype == torch.float32 else _PACKED_BF16_WEIGHTS
    return cached_on_weights(cache, weight, (weight,), lambda: _REORDER_LINEAR_WEIGHT(weight.to(dtype), _PACK_ROWS_HINT))


def release_packed(*layers: nn.Module) -> None:
    """Drop the packed copies of these layers' weights (at any ``train(mode)`` call); a layer
    put in a linear's place (a LoRA adapter) may have no ``weight`` and was never packed."""
    for layer in layers:
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor):
            _PACKED_WEIGHTS.pop(weight, None)
            _PACKED_BF16_WEIGHTS.pop(weight, None)


def onednn_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes its CPU float32 inference path for this input (oneDNN's
    fused kernel, or MKL where that was measured faster: :func:`_inference_linear`)."""
    return (
        _LINEAR_POINTWISE is not None
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        # float32 only: measured there, and oneDNN's bf16 kernels need CPU support
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not capturing_graph()
    )


def onednn_inference_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` may take oneDNN's fused bf16 kernel: CPU inference under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` on a CPU with bf16 instructions."""
    return (
        _BF16_GEMM
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == torch.float32
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not capturing_graph()
    )


def _global_hooks() -> bool:
    """Whether hooks are registered for every module (FLOP counters, profilers)."""
    return bool(
        module_hooks._global_forward_hooks
        or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks
        or module_hooks._global_backward_pre_hooks
    )


def _own_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or global ones: feature extractors, FLOP
    counters, pruning, weight norm), the test ``nn.Module.__call__`` makes."""
    return _own_hooks(module) or _global_hooks()


def hooked_within(module: nn.Module) -> bool:
    """Whether calling ``module`` runs a hook anywhere inside it (:func:`hooked` of it or of any
    submodule): a fast path that splits its input or caches a submodule's result must not then
    (a hook would see parts, or be skipped)."""
    if _global_hooks():
        return True
    stack = [module]  # a plain walk: modules() also records each module it saw (1.4x the time)
    while stack:
        current = stack.pop()
        if _own_hooks(current):
            return True
        stack.extend(child for child in current._modules.values() if child is not None)
    return False


def state_without(state: dict, *caches: str) -> dict:
    """A module's pickled ``state`` (its ``__getstate__``: ``torch.save`` of a model,
    ``copy.deepcopy``) with the attributes ``caches`` empty: eager-mode caches, rebuilt at the
    next call."""
    return {**state, **{name: {} for name in caches}}


def unaltered(module: nn.Module, *types: type) -> bool:
    """Whether ``module`` is an instance of one of ``types`` itself (not of a subclass), with no
    ``forward`` set on the instance and no hook: calling it runs that class's ``forward`` and
    nothing else, so a fast path may compute it from its weights instead."""
    return type(module) in types and "forward" not in vars(module) and not hooked(module)


def plain_linear(layer: nn.Module) -> bool:
    """Whether calling ``layer`` computes ``F.linear(x, layer.weight, layer.bias)`` and nothing
    else: an ``nn.Linear`` itself (not a layer put in its place, e.g. a LoRA adapter) that no
    hook watches (:func:`unaltered`). Only such a layer may run on :func:`linear`'s fast paths,
    which read its weights instead of calling it."""
    return unaltered(layer, nn.Linear)


def call_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, ``(..., in) -> (..., out)``: by :func:`linear` for a :func:`plain_linear`
    layer, else by calling it (so that its hooks fire and a replacement runs). Eager only:
    TorchScript calls the layer."""
    if plain_linear(layer):
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then the exact GELU when ``gelu``; ``(..., in) -> (..., out)``."""
    if not torch.jit.is_scripting():
        if onednn_inference(x, weight):
            return _inference_linear(x, weight, bias, gelu)
        if onednn_inference_bf16(x, weight):
            # what autocast computes (bf16 product, bf16 output), with the cast weight kept packed
            bias16 = None if bias is None else bias.to(torch.bfloat16)
            return _LINEAR_POINTWISE(
                x.to(torch.bfloat16), _packed(weight, torch.bfloat16), bias16, "gelu" if gelu else "none", [], "none"
            )
        if measured_gemm_training(x, weight):
            x = _MeasuredLinear.apply(x, weight, bias)
            return F.gelu(x) if gelu else x
    x = F.linear(x, weight, bias)
    return F.gelu(x) if gelu else x


# Measured choices ---------------------------------------------------------------------------
# Which of two equal computations runs faster depends on the processor (its vector width,
# MKL's path on AMD chips) and the shape, so some paths are timed once per process and shape
# class instead of fixed by a rule measured on one machine.

# The alternative must beat the default (the plain path) by this fraction to be chosen: a
# timing should never make a machine slower than the plain path.
_TIMING_MARGIN = 0.05
_TIMING_PAIRS = 3


def alternative_wins(time_default: Callable[[], float], time_alternative: Callable[[], float]) -> bool:
    """Whether the alternative's fastest run beat the default's fastest by the margin, over
    :data:`_TIMING_PAIRS` pairs run back to back, the order alternating (default first, then
    second, ...: neither always runs in the caches the other left). Each callable runs once per
    call and returns its seconds.

    Load on a shared machine only ever adds time, so each candidate's fastest run is the one a
    moment of load touched least. The earlier rule (the alternative had to win every pair) let
    one slow run keep the default: on a 2-core AMD EPYC under load, crossformer_tiny's inference
    kept oneDNN for 9-15 of its 16 linear shape classes and ran 4-7% slower than with MKL for
    all of them; by the fastest runs it took MKL for 8-11 and ran 2-9% faster (on quiet minutes
    both rules matched MKL for all; RESULTS.md row 120).
    """
    default, alternative = [], []
    for pair in range(_TIMING_PAIRS):
        if pair % 2:
            alternative.append(time_alternative())
            default.append(time_default())
        else:
            default.append(time_default())
            alternative.append(time_alternative())
    return min(alternative) < min(default) * (1 - _TIMING_MARGIN)


def seconds(call: Callable[..., Any], *args: Any) -> float:
    """The wall time of one ``call(*args)``: a candidate's run in a measured choice."""
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def may_time() -> bool:
    """Whether a measured choice may time its candidates now.

    Not under a dispatch mode (FLOP counters, profilers, fake tensors see every op: the trial
    runs would be counted as the model's), and not in deterministic mode (``run.deterministic``:
    every process, a resumed run's too, must compute the same products, not what a timing
    picks, which a moment of load changes). Either way the plain path runs.
    """
    return _get_current_dispatch_mode() is None and not torch.are_deterministic_algorithms_enabled()


# Training GEMMs ---------------------------------------------------------------------------
# A linear layer's training step is three products: the forward ``x W^T``, the input
# gradient ``g W`` and the weight gradient ``g^T x``. PyTorch sends all three to MKL. On
# some processors oneDNN runs them much faster (a 2-core AMD EPYC: 473 against 211
# GFLOP/s), on others MKL wins some of them (a 2-core Xeon: oneDNN's forward is faster,
# as it fuses the bias, but MKL's weight gradient is). So each product is timed once per
# process on both, at its first call for each shape class, and runs on the faster one.

GEMM_BACKENDS = ("mkl", "onednn")
# (product, dtype, threads, rows bucket, inner, outer) -> backend
_GEMM_CHOICES: dict[tuple, str] = {}
_FORCED_GEMM: list[str] = []


# A linear layer's products are timed on at most this many of its rows (one shape class for
# all larger inputs): the two backends' time ratio at 16K rows was within 10% of theirs at 30K
# and 122K on the AMD EPYC (crossformer_small's stage 0 at 800x1216 has 122K rows), and 8 runs
# of every product on every row cost crossformer_small's first dense call 4 s in inference
# and its first training step 12 s.
_TIMING_ROWS = 1 << 14


def _gemm_mkl(product: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if product == "forward":  # x (M, K), weight (N, K) -> (M, N)
        return F.linear(a, b, bias)
    if product == "batched":  # (B, M, K), (B, K, N) -> (B, M, N)
        return torch.bmm(a, b)
    if product == "grad_input":  # grad (M, N), weight (N, K) -> (M, K)
        return a.mm(b)
    return a.t().mm(b)  # grad_weight: grad (M, N), x (M, K) -> (N, K)


def _gemm_onednn(product: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # _linear_pointwise(A, B) is A @ B^T; oneDNN reads the transposed views in place.
    if product == "forward":
        return _LINEAR_POINTWISE(a, b, bias, "none", [], "none")
    if product == "batched":
        return torch.stack([_LINEAR_POINTWISE(a_k, b_k.t(), None, "none", [], "none") for a_k, b_k in zip(a, b)])
    if product == "grad_input":
        return _LINEAR_POINTWISE(a, b.t(), None, "none", [], "none")
    return _LINEAR_POINTWISE(a.t(), b.t(), None, "none", [], "none")


_GEMMS = {"mkl": _gemm_mkl, "onednn": _gemm_onednn}


def _gemm_key(product: str, a: torch.Tensor, b: torch.Tensor) -> tuple:
    """Shape class of a product: exact inner sizes, rows rounded to a power of two (the rows it
    is timed on: at most :data:`_TIMING_ROWS`)."""
    if product == "batched":
        return (product, a.dtype, torch.get_num_threads(), a.shape[0], a.shape[1].bit_length(), a.shape[2], b.shape[2])
    return (product, a.dtype, torch.get_num_threads(), _rows_class(a.shape[0]), a.shape[1], b.shape[0 if product == "forward" else 1])


def _rows_class(rows: int) -> int:
    """A linear product's rows in its shape class: the power of two of the rows it is timed on."""
    return min(rows, _TIMING_ROWS).bit_length()


def _timing_sample(product: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The operands a product is timed on: its first :data:`_TIMING_ROWS` rows (both operands
    of a weight gradient, whose rows are its sum's terms; all of a batched product)."""
    if product == "batched" or a.shape[0] <= _TIMING_ROWS:
        return a, b
    return a[:_TIMING_ROWS], (b[:_TIMING_ROWS] if product == "grad_weight" else b)


def _timed_gemm(backend: str, product: str, a, b, bias) -> float:
    return seconds(_GEMMS[backend], product, a, b, bias)


def _choose_gemm(product: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """Time both backends on this product's :func:`_timing_sample` (one warm-up call each, then
    :func:`alternative_wins`); the product on the chosen one, as every later call of this shape
    class gets it."""
    sample_a, sample_b = _timing_sample(product, a, b)
    warm_up = _gemm_mkl(product, sample_a, sample_b, bias)
    _gemm_onednn(product, sample_a, sample_b, bias)
    onednn = alternative_wins(
        lambda: _timed_gemm("mkl", product, sample_a, sample_b, bias),
        lambda: _timed_gemm("onednn", product, sample_a, sample_b, bias),
    )
    if not onednn and sample_a is a and sample_b is b:
        return warm_up, "mkl"  # the whole product already
    backend = "onednn" if onednn else "mkl"
    return _GEMMS[backend](product, a, b, bias), backend


def measured_gemm(product: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A product on the backend measured fastest for its shape: a linear layer's training
    products, and the batched products of :mod:`crossformer.models.winograd`.

    ``product``: ``"forward"`` (``a`` = x ``(M, K)``, ``b`` = weight ``(N, K)``: ``a b^T + bias``),
    ``"grad_input"`` (``a`` = grad ``(M, N)``, ``b`` = weight: ``a b``), ``"grad_weight"``
    (``a`` = grad, ``b`` = x: ``a^T b``) or ``"batched"`` (``a`` ``(B, M, K)``, ``b``
    ``(B, K, N)``: ``a b`` per batch entry, no bias; MKL ``bmm`` against a oneDNN product
    per entry).
    """
    if _FORCED_GEMM:
        return _GEMMS[_FORCED_GEMM[-1]](product, a, b, bias)
    if not may_time():
        return _gemm_mkl(product, a, b, bias)
    key = _gemm_key(product, a, b)
    backend = _GEMM_CHOICES.get(key)
    if backend is None:
        out, _GEMM_CHOICES[key] = _choose_gemm(product, a, b, bias)
        return out
    return _GEMMS[backend](product, a, b, bias)


def _onednn_inference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    return _LINEAR_POINTWISE(x, _packed(weight), bias, "gelu" if gelu else "none", [], "none")


def _mkl_inference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    out = F.linear(x, weight, bias)
    return torch.ops.aten.gelu_(out) if gelu else out  # the product is ours: GELU in place


_INFERENCE_LINEARS = {"mkl": _mkl_inference_linear, "onednn": _onednn_inference_linear}


def _timed_inference_linear(backend: str, x, weight, bias, gelu: bool) -> float:
    return seconds(_INFERENCE_LINEARS[backend], x, weight, bias, gelu)


def _inference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """A CPU float32 inference linear (then GELU) on the backend measured faster for its shape
    class: oneDNN's fused kernel on the packed weight (the default: 10-40% faster on a 2-core
    Xeon) or MKL's ``F.linear`` and an in-place GELU (faster from the second stage on on a 2-core
    AMD EPYC with AVX2, where oneDNN's fused GELU costs most). Its choices are listed by
    :func:`gemm_choices` as the products ``"inference"`` and ``"inference_gelu"``."""
    if _FORCED_GEMM:
        return _INFERENCE_LINEARS[_FORCED_GEMM[-1]](x, weight, bias, gelu)
    if not may_time():
        return _onednn_inference_linear(x, weight, bias, gelu)
    product = "inference_gelu" if gelu else "inference"
    rows = x.numel() // x.shape[-1]
    key = (product, x.dtype, torch.get_num_threads(), _rows_class(rows), weight.shape[1], weight.shape[0])
    backend = _GEMM_CHOICES.get(key)
    if backend is None:
        sample = x.reshape(rows, x.shape[-1])[:_TIMING_ROWS]
        _onednn_inference_linear(sample, weight, bias, gelu)  # a warm-up of each
        _mkl_inference_linear(sample, weight, bias, gelu)
        mkl = alternative_wins(
            lambda: _timed_inference_linear("onednn", sample, weight, bias, gelu),
            lambda: _timed_inference_linear("mkl", sample, weight, bias, gelu),
        )
        backend = _GEMM_CHOICES[key] = "mkl" if mkl else "onednn"
    # the first call's result too is the chosen backend's: a model gives the same output for
    # the same input on every call
    return _INFERENCE_LINEARS[backend](x, weight, bias, gelu)


def gemm_choices() -> dict[tuple, str]:
    """The backend chosen per shape class so far in this process: ``(product, dtype, threads,
    rows.bit_length(), inner, outer) -> "mkl" | "onednn"`` (``"batched"`` products: the batch
    size follows ``threads``; ``"inference"`` and ``"inference_gelu"``: CPU inference linears)."""
    return dict(_GEMM_CHOICES)


@contextlib.contextmanager
def force_gemm_backend(backend: str) -> Iterator[None]:
    """Run every :func:`measured_gemm` and CPU inference linear on ``backend`` (tests and
    benchmarks), nothing timed."""
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"backend must be one of {GEMM_BACKENDS}, got {backend!r}")
    _FORCED_GEMM.append(backend)
    try:
        yield
    finally:
        _FORCED_GEMM.pop()


def measured_gemm_training(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` runs through :class:`_MeasuredLinear` (CPU float32 autograd)."""
    return (
        _LINEAR_POINTWISE is not None
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not capturing_graph()
        and x.numel() > 0  # after: a size test on a traced input is a guard on its size
    )


class _MeasuredLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with all three products through :func:`measured_gemm`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.input_shape = x.shape
        return measured_gemm("forward", rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out: torch.Tensor):
        rows, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        # create_graph=True (double backward): differentiable aten products, recorded by autograd
        gemm = _gemm_mkl if torch.is_grad_enabled() else measured_gemm
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = gemm("grad_input", grad, weight, None).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = gemm("grad_weight", grad, rows, None)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


@register_notrace_module  # FX: the fast-path dispatch depends on the input's device and dtype
class InferenceCaches(nn.Module):
    """A module keeping inference copies of its weights (packed, cast, transformed; position-bias
    tables), which :meth:`drop_caches` drops: at every ``train(mode)`` call (either mode: ``eval()``
    is the reset for ``.data`` edits no fingerprint sees) and whenever ``.to()``, ``.half()``,
    ``.cuda()`` convert or move its tensors (``Module._apply``), which otherwise kept the old
    weights' copies (and their storage) alive until the next call."""

    def drop_caches(self) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> "InferenceCaches":
        self.drop_caches()
        return super().train(mode)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "InferenceCaches":
        self.drop_caches()
        return super()._apply(fn, recurse)


class GeluMlp(InferenceCaches, Mlp):
    """timm's ``Mlp`` with exact GELU (keys ``fc1``, ``fc2``), both linears through :func:`linear`."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__(in_features, hidden_features, act_layer=nn.GELU, drop=drop)

    def drop_caches(self) -> None:
        release_packed(self.fc1, self.fc2)

    def _exact_gelu(self) -> bool:
        """Whether ``act`` is the exact GELU and no hook watches it (it may then be fused)."""
        return unaltered(self.act, nn.GELU) and self.act.approximate == "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` -> ``(..., in_features)``."""
        if not torch.jit.is_scripting():
            # timm's Mlp.forward, with both linears through the fast paths where they may be
            if plain_linear(self.fc1) and self._exact_gelu():
                x = linear(x, self.fc1.weight, self.fc1.bias, gelu=True)  # GELU fused into fc1
            else:
                x = self.act(self.fc1(x))
            return self.drop2(call_linear(self.fc2, self.norm(self.drop1(x))))
        # timm's Mlp.forward, spelt out: TorchScript cannot call super()
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


# The image's layout ------------------------------------------------------------------------
# The cross-scale embedding reads the 3-channel image with four strided kernels. oneDNN's
# direct convolution of an NCHW image ran at 25 GFLOP/s on a 2-core AMD EPYC (AVX2), 100-128
# on a channels-last copy; on a 2-core Xeon (AVX-512) only kernel 4 gained. So the layout is
# measured, as the training GEMMs are.

# (dtype, autocast dtype or None, threads, the convolutions, channels, the timed sample's
# images and pixels buckets) -> whether the convolutions read a channels-last copy
_IMAGE_LAYOUT_CHOICES: dict[tuple, bool] = {}

# The layouts are timed on a sample: the first few images, cropped to at most this side. The
# slow layout's 8 runs (a warm-up and 3 pairs of each) cost 1.4 s of tiny's first call on a
# whole batch of 32 on the AMD EPYC, and 3.6 s of crossformer_small's at 800x1216 (batch 2),
# while the two layouts' ratio per pixel was alike at both sizes (4.9x and 3.5x).
_LAYOUT_SAMPLE_IMAGES = 4
_LAYOUT_SAMPLE_SIDE = 256


def _measured_layout_applies(x: torch.Tensor) -> bool:
    return (
        not capturing_graph()  # first: a symbolic trace's proxy cannot answer the tests below
        and may_time()
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.numel() > 0
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)
    )


def _convs_time(convs: Sequence[nn.Conv2d], x: torch.Tensor, channels_last: bool) -> float:
    """Seconds for every convolution of ``convs`` on ``x`` (converted first if ``channels_last``),
    without autograd and without calling the modules (no hook sees a trial run)."""
    start = time.perf_counter()
    with torch.no_grad():
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for conv in convs:
            F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return time.perf_counter() - start


def _sample_size(x: torch.Tensor) -> tuple[int, int, int]:
    """Images, height and width of the sample a choice about convolutions on ``x`` is timed on."""
    return min(x.shape[0], _LAYOUT_SAMPLE_IMAGES), *(min(n, _LAYOUT_SAMPLE_SIDE) for n in x.shape[2:])


def _convs_class(x: torch.Tensor, convs: Sequence[nn.Conv2d], layout: Hashable) -> tuple:
    """The shape class of a timed choice about ``convs`` on the image ``x`` (``layout``: what else
    tells its classes apart): dtypes, threads, kernels, and the sample's images and pixels by
    powers of two."""
    images, height, width = _sample_size(x)
    return (
        x.dtype,
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
        torch.get_num_threads(),
        tuple((c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs),
        layout,
        images.bit_length(),
        (height * width).bit_length(),
    )


def _image_sample(x: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The first images of ``x``, cropped (:func:`_sample_size`): a copy laid out as ``memory_format``."""
    images, height, width = _sample_size(x)
    return x[:images, :, :height, :width].contiguous(memory_format=memory_format)


def image_layout(x: torch.Tensor, convs: Sequence[nn.Conv2d]) -> torch.Tensor:
    """The image ``x`` ``(B, C, H, W)`` as ``convs`` (which all read it) should get it: as it is,
    or a channels-last copy where that was measured faster in this process for this shape class
    (CPU, eager; the first call times both). The values are the same either way; the
    convolutions' results may differ in the last bits, as any two kernels' do.

    An image already channels-last, and every other case (CUDA, tracing, deterministic mode, a
    FLOP counter), is returned as it is.
    """
    if not _measured_layout_applies(x):
        return x
    key = _convs_class(x, convs, x.shape[1])
    channels_last = _IMAGE_LAYOUT_CHOICES.get(key)
    if channels_last is None:
        sample = _image_sample(x)  # a crop: copied, so laid out as the image is
        _convs_time(convs, sample, False)  # warm-up of each
        _convs_time(convs, sample, True)
        channels_last = _IMAGE_LAYOUT_CHOICES[key] = alternative_wins(
            lambda: _convs_time(convs, sample, False), lambda: _convs_time(convs, sample, True)
        )
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def image_layout_choices() -> dict[tuple, bool]:
    """The image layout chosen per shape class so far in this process (True: channels-last)."""
    return dict(_IMAGE_LAYOUT_CHOICES)


# Cross-scale convolutions in CPU inference --------------------------------------------------
# oneDNN's direct convolution of the 3-channel image computes its outputs in blocks of
# channels (16 on an AVX-512 EPYC: crossformer_tiny's 32x32 kernel took 29 ms at batch 32 in
# bf16, 40 in float32, with its 8 outputs and with 16 alike), so the embedding's two largest
# kernels, 8 channels each in crossformer_tiny and ++S, cost the larger one's time when run as
# one kernel: the smaller zero-padded, centred, to the larger's size. Where that pays depends
# on the CPU's blocking and the channel counts, so it is timed once per process and shape
# class. Under autocast, the weights are kept cast (autocast casts them again on every call)
# and the input is cast once for all kernels instead of once for each.

# _convs_class (its layout: whether the image is channels-last) -> merged
_MERGED_KERNEL_CHOICES: dict[tuple, bool] = {}


def _plain_conv(conv: nn.Module) -> bool:
    """Whether calling ``conv`` computes ``F.conv2d`` with its own weights and nothing else."""
    return unaltered(conv, nn.Conv2d, LargeKernelConv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _mergeable(small: nn.Conv2d, large: nn.Conv2d) -> bool:
    """Whether ``small`` fits centred inside ``large``: one input and stride, square kernels,
    no dilation or groups, the smaller's padding the larger's less the margin."""
    margin = large.kernel_size[0] - small.kernel_size[0]
    return (
        small.in_channels == large.in_channels
        and small.stride == large.stride
        and all(c.kernel_size[0] == c.kernel_size[1] and c.padding[0] == c.padding[1] for c in (small, large))
        and all(c.dilation == (1, 1) and c.groups == 1 for c in (small, large))
        and margin > 0
        and margin % 2 == 0
        and large.padding[0] - small.padding[0] == margin // 2
    )


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    return conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)


def _merged_weight(small: nn.Conv2d, large: nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Both kernels as one: weight ``(O_small + O_large, in, K, K)``, ``small``'s outputs first,
    its kernel centred in zeros; bias ``(O_small + O_large,)``."""
    margin = (large.kernel_size[0] - small.kernel_size[0]) // 2
    weight = torch.cat([F.pad(small.weight, (margin,) * 4), large.weight])
    return weight.to(dtype), torch.cat([_bias(small), _bias(large)]).to(dtype)


# keys of a cross_scale_inference cache that are not casts: what they were cast from
_CAST_FROM, _CAST_FROM_TENSORS = "cast from", "cast from tensors"


def _keep_casts_of(cache: MutableMapping, convs: Sequence[nn.Conv2d]) -> bool:
    """Empty ``cache`` unless it holds casts of the current weights of ``convs``
    (:func:`weights_fingerprint`): casts of earlier weights, of any dtype, go at the first call
    after a change. The cache holds those weights too: a weight put in place of one would
    otherwise be free to take its address, and a fresh tensor's version matches a fresh
    tensor's. False (nothing may be kept) for inference tensors."""
    sources = tuple(t for c in convs for t in (c.weight, c.bias) if t is not None)
    fingerprint = weights_fingerprint(sources)
    if fingerprint is None or cache.get(_CAST_FROM) != fingerprint:
        cache.clear()
        if fingerprint is None:
            return False
        cache[_CAST_FROM], cache[_CAST_FROM_TENSORS] = fingerprint, sources
    return True


def _kept(cache: MutableMapping | None, key: Hashable, compute: Callable[[], tuple]) -> tuple:
    """``cache[key]``, computed by ``compute()`` at its first use (every time where ``cache`` is None)."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _merge_pays(x: torch.Tensor, small: nn.Conv2d, large: nn.Conv2d, apart: list, together: Callable[[], tuple]) -> bool:
    """Whether one convolution with the weights ``together()`` builds was measured faster than
    the two with the ``apart`` ones, on a sample of ``x`` (the first images, cropped), once per
    class: the merged weights are built for the timing only, and kept only where they are used."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    key = _convs_class(x, (small, large), channels_last)
    merged = _MERGED_KERNEL_CHOICES.get(key)
    if merged is None:
        sample = _image_sample(x, torch.channels_last if channels_last else torch.contiguous_format)
        merged_weight = together()

        def run_apart() -> None:
            for weight, conv in zip(apart, (small, large)):
                _conv(sample, weight, conv)

        def run_together() -> None:
            _conv(sample, merged_weight, large)

        run_apart(), run_together()  # a warm-up of each
        merged = _MERGED_KERNEL_CHOICES[key] = alternative_wins(
            lambda: seconds(run_apart), lambda: seconds(run_together)
        )
    return merged


def cross_scale_inference(x: torch.Tensor, convs: Sequence[nn.Module], cache: MutableMapping) -> list[torch.Tensor] | None:
    """Each convolution of ``convs`` on ``x`` ``(B, C, H, W)`` (all of one stride and output
    size): ``[(B, O_i, H', W')]``, in CPU inference (eager, nothing needing a gradient, timing
    allowed: not in deterministic mode or under a FLOP counter) for plain, unhooked
    convolutions; None elsewhere. The two largest run as one where that was measured faster
    (their outputs then come as one map, ``O_small + O_large`` channels); the values are the
    same sums in another order, equal but for the last bits. ``cache`` keeps the weights of one
    module's convolutions as used, while they stay as they are (:func:`_keep_casts_of`; the
    owner clears it in ``train(mode)`` and leaves it out of pickles and copies)."""
    if (
        capturing_graph()
        or not may_time()
        or torch.is_grad_enabled()
        or x.device.type != "cpu"
        or x.dim() != 4
        or x.numel() == 0
        or not convs
        or not all(_plain_conv(c) for c in convs)
    ):
        return None
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    if autocast is not None and x.dtype in (torch.float32, autocast):
        dtype = autocast
        x = x.to(dtype)  # once, where autocast would cast it for each kernel
    else:
        dtype = convs[0].weight.dtype
    kept = cache if _keep_casts_of(cache, convs) else None
    weights = [
        _kept(kept, (index, dtype), lambda conv=conv: (conv.weight.to(dtype), _bias(conv).to(dtype)))
        for index, conv in enumerate(convs)
    ]
    if len(convs) >= 2 and _mergeable(convs[-2], convs[-1]):
        small, large = convs[-2], convs[-1]
        merge = functools.partial(_merged_weight, small, large, dtype)
        if _merge_pays(x, small, large, weights[-2:], merge):
            maps = [_conv(x, weight, conv) for weight, conv in zip(weights[:-2], convs[:-2])]
            return maps + [_conv(x, _kept(kept, ("merged", dtype), merge), large)]
    return [_conv(x, weight, conv) for weight, conv in zip(weights, convs)]


def _conv(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor], conv: nn.Conv2d) -> torch.Tensor:
    """``conv``'s convolution of ``x`` with ``weight`` (a weight and a bias) in place of its own."""
    return F.conv2d(x, *weight, conv.stride, conv.padding, conv.dilation, conv.groups)


def merged_kernel_choices() -> dict[tuple, bool]:
    """Per shape class so far in this process: whether the two largest kernels ran as one
    (:func:`cross_scale_inference`)."""
    return dict(_MERGED_KERNEL_CHOICES)


def _space_to_depth_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int
) -> torch.Tensor:
    """Weight gradient of ``conv2d(x, weight, stride, padding)`` through a stride-1 conv.

    Padded and cut into ``stride x stride`` pixel blocks (``pixel_unshuffle``), the image
    becomes ``in * stride**2`` channels and the kernel ``k / stride`` taps wide at stride 1,
    a shape oneDNN's weight-gradient kernel handles 3-4x faster than the original one.
    """
    out_chans, in_chans, kernel_h, kernel_w = weight.shape
    x = F.pad(x, (padding,) * 4)
    # rows/columns past the last window are read by no output
    x = x[..., : x.shape[-2] // stride * stride, : x.shape[-1] // stride * stride]
    blocks = F.pixel_unshuffle(x, stride)  # (B, in * s * s, Hp / s, Wp / s)
    block_weight = weight.new_empty(out_chans, in_chans * stride * stride, kernel_h // stride, kernel_w // stride)
    grad = torch.ops.aten.convolution_backward(
        grad_out, blocks, block_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]
    # (O, in, s, s, k/s, k/s) -> (O, in, k/s, s, k/s, s): tap (i, j) of block (u, v) is pixel (i*s+u, j*s+v)
    grad = grad.view(out_chans, in_chans, stride, stride, kernel_h // stride, kernel_w // stride)
    return grad.permute(0, 1, 4, 2, 5, 3).reshape(weight.shape)


class _LargeKernelConvCPU(torch.autograd.Function):
    """``conv2d(x, weight, bias, stride, padding)``: oneDNN forwards, weight grad by space-to-depth."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: int, padding: int):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.conv
        if torch.is_grad_enabled():  # create_graph=True: aten's backward, which autograd differentiates again
            return (*torch.ops.aten.convolution_backward(
                grad_out, x, weight, [weight.shape[0]], [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1,
                list(ctx.needs_input_grad[:3]),
            ), None, None)
        grad_out = grad_out.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [True, False, False]
            )[0]
        if ctx.needs_input_grad[1]:
            grad_weight = _space_to_depth_weight_grad(grad_out, x, weight, stride, padding)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


@register_notrace_module  # FX: the training path depends on the input's device and dtype
class LargeKernelConv2d(nn.Conv2d):
    """A square ``nn.Conv2d`` whose kernel spans at least 4 strides (the cross-scale embedding's 16
    and 32); CPU training computes its weight gradient by :func:`_space_to_depth_weight_grad`.

    oneDNN's own weight gradient for these shapes (3 input channels, stride 4) ran at ~10
    GMAC/s: 131 ms for the 32x32 kernel at batch 16, against 31 ms this way (14 ms forward).
    """

    @staticmethod
    def suits(kernel_size: int, stride: int) -> bool:
        """Whether this layer applies: the kernel is a multiple of the stride, at least 4x."""
        return kernel_size % stride == 0 and kernel_size >= 4 * stride

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int, padding: int) -> None:
        if not self.suits(kernel_size, stride):
            raise ValueError(f"kernel {kernel_size} must be a multiple of stride {stride}, at least 4x")
        super().__init__(in_chans, out_chans, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            dtype = self._custom_backward_dtype(x)
            if dtype is not None:
                # under autocast: the casts autocast would make, each with its own backward
                weight, bias = self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)
                return _LargeKernelConvCPU.apply(x.to(dtype), weight, bias, self.stride[0], self.padding[0])
        return self._conv_forward(x, self.weight, self.bias)

    def _custom_backward_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype CPU training runs this layer in through :class:`_LargeKernelConvCPU`, or
        None where it does not apply: float32, and bfloat16 (bf16 autocast, or bf16 input and
        weights), where oneDNN's own weight gradient is as slow (87 against 30 ms for the 32x32
        kernel at batch 16, forward included, on an AMD EPYC with avx512_bf16)."""
        if (
            not torch.is_grad_enabled()
            or not self.weight.requires_grad
            or x.device.type != "cpu"
            or capturing_graph()
            or x.shape[0] == 0  # pixel_unshuffle leaves an empty batch as it is
        ):
            return None
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            return dtype if dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16) else None
        return x.dtype if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.bfloat16) else None


class ResidualDropPath(nn.Module):
    """``x + drop_path(branch)``: a residual connection with stochastic depth, in one pass.

    In training each image's branch is kept with probability ``1 - drop_prob`` and scaled by
    ``1 / (1 - drop_prob)``, drawn exactly as timm's ``DropPath`` draws it (same generator
    calls), then added by one ``addcmul`` instead of a multiply and an add: one full-size
    temporary less per residual.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def adds_plainly(self) -> bool:
        """Whether :meth:`forward` is ``x + branch`` (eval, or no drop rate): nothing drawn."""
        return not self.training or self.drop_prob == 0.0

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``x``, ``branch``: ``(B, ...)`` of one shape -> ``(B, ...)``."""
        if self.adds_plainly():
            return x + branch
        keep_prob = 1.0 - self.drop_prob
        keep = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            keep.div_(keep_prob)
        return torch.addcmul(x, branch, keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
