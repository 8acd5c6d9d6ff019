"""CrossFormer and CrossFormer++ (one definition for classification and dense tasks).

Papers: "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention"
(ICLR 2022) and "CrossFormer++: A Versatile Vision Transformer Hinging on Cross-scale
Attention" (TPAMI 2023). The contract is ``shared/spec/crossformer.md``; state-dict keys
follow the official release so its checkpoints load unchanged.

Inside the network a feature map is kept channels-last, ``(B, H, W, C)``, so LayerNorms,
linear layers and the grouping all work on the last dimension without copies; the
convolutions (embeddings, activation cooling) see the same memory as an NCHW view.
``forward_features`` returns that layout too (``output_fmt = "NHWC"``, as timm's swin).

``torch.jit.script`` compiles the plain path (the eager fast paths and caches sit behind
``if not torch.jit.is_scripting()``). FX symbolic tracing (timm's ``features_only=True,
feature_cls="fx"``, torchvision's ``create_feature_extractor`` with timm's tracer settings)
keeps :class:`GroupAttention` whole and calls the size-dependent functions
(:func:`group_layout`, :func:`check_input`) at run time: timm notrace module / functions.
"""

import functools
import math
import numbers
from typing import Final, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d, get_device_dtype, trunc_normal_
from timm.models import checkpoint as grad_checkpoint
from timm.models import register_notrace_function, register_notrace_module
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP

from ..pixels import MIN_INPUT_SIZE
from .attention import biased_attention
from .grouping import (
    LONG_DISTANCE_CHOICES,
    GroupLayout,
    group_layout,
    groups_tile_map,
    merge_heads,
    pad_to_layout,
    padding_key_mask,
    partition_groups,
    partition_heads,
    ungrouped_view,
)
from .layers import (
    GeluMlp,
    InferenceCaches,
    LargeKernelConv2d,
    ResidualDropPath,
    call_linear,
    capturing_graph,
    hooked,
    hooked_within,
    plain_linear,
    state_without,
    unaltered,
    conv_input,
    cached_on_weights,
    image_layout,
    cross_scale_inference,
    release_packed,
)

__all__ = ["CrossFormer", "MIN_INPUT_SIZE", "check_image_size", "check_input"]

# Added to attention scores of padded keys. Finite, as officially, so that a group made
# only of padding stays finite (its outputs are cropped away).
PADDING_SCORE = -1e6
# The same in float16, whose range ends at 65504 (-1e6 would be -inf, and such a group NaN,
# which reaches the position-bias gradients): still far below any real score.
FLOAT16_PADDING_SCORE = -1e4
# timm's global pooling choices for a channels-last map ("" keeps the map)
GLOBAL_POOL_CHOICES = ("avg", "max", "avgmax", "catavgmax", "")


def _per_stage(value: int | Sequence[int], num_stages: int, name: str) -> tuple[int, ...]:
    """``value`` for each stage (one int for all of them); each must be a whole number, at least 1."""
    given = (value,) * num_stages if isinstance(value, numbers.Number) else value
    try:
        values = tuple(int(v) for v in given)
        whole = all(v == w for v, w in zip(given, values))
    except (TypeError, ValueError):
        whole = False
    if not whole:  # int() would truncate 2.5 to 2
        raise ValueError(f"{name} needs a whole number or one per stage, got {value!r}")
    if len(values) != num_stages:
        raise ValueError(f"{name} needs one value per stage ({num_stages}), got {values}")
    if min(values, default=1) < 1:
        raise ValueError(f"{name} must be at least 1 in every stage, got {values}")
    return values


def check_mlp_ratio(mlp_ratio: float, embed_dim: int) -> None:
    """A one-line ``ValueError`` unless ``mlp_ratio`` is a number that gives stage 0's MLP
    (``int(embed_dim * mlp_ratio)`` wide, the narrowest) at least one hidden channel: a
    negative width failed inside torch's ``nn.Linear``, a zero width in CPU inference."""
    width = embed_dim * mlp_ratio if isinstance(mlp_ratio, numbers.Real) and not isinstance(mlp_ratio, bool) else 0
    if not (math.isfinite(width) and width >= 1):
        raise ValueError(f"mlp_ratio must be a number above 0 that leaves the MLP at least one hidden channel "
                         f"(embed_dim {embed_dim} x mlp_ratio >= 1), got {mlp_ratio!r}")


def global_pool_layer(global_pool: str) -> SelectAdaptivePool2d:
    """timm's pooling over the tokens of a ``(B, h, w, C)`` map: ``(B, C * feat_mult())``,
    the map itself for ``""``. A one-line ``ValueError`` for a choice it does not know."""
    if global_pool not in GLOBAL_POOL_CHOICES:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOL_CHOICES}, got {global_pool!r}")
    return SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool), input_fmt="NHWC")


def cross_scale_branch_dims(out_dim: int, num_kernels: int) -> list[int]:
    """Output channels per kernel of a cross-scale embedding, smallest kernel first.

    Branch ``i < n-1`` gets ``D // 2**(i+1)``, the last gets ``D // 2**(n-1)``
    (e.g. D=64 with 4 kernels: 32, 16, 8, 8).
    """
    dims = [out_dim // 2 ** (i + 1) for i in range(num_kernels - 1)]
    return dims + [out_dim // 2 ** (num_kernels - 1)]


def check_cross_scale_kernels(kernel_sizes: Sequence[int], stride: int, out_dim: int, name: str) -> None:
    """A one-line ``ValueError`` unless every kernel gives the same output size at ``stride``.

    With padding ``(k - s) / 2`` on each side a kernel ``k`` maps ``H`` to
    ``floor((H - s) / s) + 1`` whatever ``k`` is, but only for ``k >= s`` with ``k - s``
    even: an odd difference loses a row whenever ``s`` divides ``H`` (the concatenation
    then fails), and ``k < s`` would need negative padding. Every branch must also get at
    least one of the ``out_dim`` channels (:func:`cross_scale_branch_dims`), and the branches
    all of them: ``out_dim`` a multiple of ``2**(n-1)`` for ``n`` kernels.
    """
    if not kernel_sizes:
        raise ValueError(f"{name} needs at least one kernel, got {tuple(kernel_sizes)}")
    unfit = [k for k in kernel_sizes if k < stride or (k - stride) % 2]
    if unfit:
        raise ValueError(
            f"{name} {tuple(kernel_sizes)}: kernel {', '.join(map(str, unfit))} does not fit stride {stride}; each "
            f"kernel must be at least {stride} and differ from it by an even number ({stride}, {stride + 2}, {stride + 4}, ...)"
        )
    dims = cross_scale_branch_dims(out_dim, len(kernel_sizes))
    if min(dims) < 1:
        raise ValueError(
            f"{name} {tuple(kernel_sizes)}: {len(kernel_sizes)} kernels leave a branch of the {out_dim} "
            f"channels empty (the last gets {out_dim} // 2**{len(kernel_sizes) - 1}); use fewer kernels or more channels"
        )
    if sum(dims) != out_dim:  # the concatenation would be narrower than the norm that follows it
        raise ValueError(
            f"{name} {tuple(kernel_sizes)}: {len(kernel_sizes)} kernels split the {out_dim} channels as "
            f"{' + '.join(map(str, dims))} = {sum(dims)}; the channels must be a multiple of "
            f"{2 ** (len(kernel_sizes) - 1)}: change embed_dim or use fewer kernels"
        )


@register_notrace_module  # FX: the input's layout is chosen by a measurement, in eager mode
class CrossScaleConvs(InferenceCaches, nn.ModuleList):
    """Parallel convolutions of one stride, concatenated: NCHW ``(B, in_dim, H, W)`` ->
    channels-last ``(B, H', W', out_dim)``. Padding ``(k - s) // 2`` gives equal outputs
    for the kernels :func:`check_cross_scale_kernels` admits (``name`` is the setting it names).
    An NCHW input (the image) reaches them as given or as a channels-last copy, whichever they
    were measured faster on (:func:`~crossformer.models.layers.image_layout`).

    CPU inference runs them by :func:`~crossformer.models.layers.cross_scale_inference` (the
    weights kept cast under autocast, the two largest kernels as one where measured faster).

    A ``ModuleList``, so that the kernels keep the official keys (``projs.0``, ...).
    """

    __jit_ignored_attributes__ = ["_inference_weights"]  # eager-only, and TorchScript cannot type it

    def __init__(
        self, in_dim: int, out_dim: int, kernel_sizes: Sequence[int], stride: int, name: str = "kernel_sizes"
    ) -> None:
        check_cross_scale_kernels(kernel_sizes, stride, out_dim, name)
        dims = cross_scale_branch_dims(out_dim, len(kernel_sizes))
        super().__init__(
            (LargeKernelConv2d if LargeKernelConv2d.suits(k, stride) else nn.Conv2d)(
                in_dim, dim, kernel_size=k, stride=stride, padding=(k - stride) // 2
            )
            for k, dim in zip(sorted(kernel_sizes), dims)
        )
        # cross_scale_inference's casts of the kernels' weights: (kernel index or "merged", dtype) -> (weight, bias)
        self._inference_weights: dict[tuple, tuple] = {}

    def drop_caches(self) -> None:
        self._inference_weights.clear()

    def __getstate__(self) -> dict:
        return state_without(super().__getstate__(), "_inference_weights")

    def output_side(self, side: int) -> int:
        """The output's height (width) for an input ``side`` pixels high (wide): every kernel's."""
        conv = self[0]
        return (side + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            x = image_layout(x, self)
            inferred = cross_scale_inference(x, list(self), self._inference_weights)
            if inferred is not None:
                return torch.cat([m.permute(0, 2, 3, 1) for m in inferred], dim=-1)
        maps: list[torch.Tensor] = []
        for conv in self:
            maps.append(conv(x).permute(0, 2, 3, 1))
        return torch.cat(maps, dim=-1)


class PatchEmbed(nn.Module):
    """Cross-scale patch embedding: ``(B, in_chans, H, W)`` -> ``(B, H/4, W/4, embed_dim)``."""

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        kernel_sizes: Sequence[int] = (4, 8, 16, 32),
        stride: int = 4,
    ) -> None:
        super().__init__()
        self.projs = CrossScaleConvs(in_chans, embed_dim, kernel_sizes, stride, "patch_kernel_sizes")
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.projs(x))


class PatchMerging(nn.Module):
    """Cross-scale merge: LayerNorm, then kernels (2, 4) at stride 2.

    ``(B, H, W, C)`` -> ``(B, floor(H/2), floor(W/2), out_dim)``.
    """

    def __init__(self, dim: int, out_dim: int, kernel_sizes: Sequence[int] = (2, 4)) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reductions = CrossScaleConvs(dim, out_dim, kernel_sizes, stride=2, name="merge_kernel_sizes")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reductions(conv_input(self.norm(x)))


def relative_offsets(group_h: int, group_w: int, device: torch.device) -> torch.Tensor:
    """Every offset ``(dy, dx)`` in a ``Gh x Gw`` group: float ``((2Gh-1)(2Gw-1), 2)``, dy outer."""
    dy = torch.arange(1 - group_h, group_h, device=device)
    dx = torch.arange(1 - group_w, group_w, device=device)
    return torch.stack(torch.meshgrid([dy, dx], indexing="ij"), dim=-1).reshape(-1, 2).float()


def relative_position_index(group_h: int, group_w: int, device: torch.device) -> torch.Tensor:
    """Row of :func:`relative_offsets` for each (query, key) pair: long ``(N, N)``."""
    # expand, not repeat_interleave: the ONNX exporter mistranslates SymInt repeats
    ys = torch.arange(group_h, device=device)[:, None].expand(group_h, group_w).reshape(-1)
    xs = torch.arange(group_w, device=device)[None, :].expand(group_h, group_w).reshape(-1)
    dy = ys[:, None] - ys[None, :] + group_h - 1
    dx = xs[:, None] - xs[None, :] + group_w - 1
    return dy * (2 * group_w - 1) + dx


def _build_offset_tables(group_h: int, group_w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return relative_offsets(group_h, group_w, device), relative_position_index(group_h, group_w, device).view(-1)


@functools.lru_cache(maxsize=64)
def _cached_offset_tables(group_h: int, group_w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):  # usable in autograd even if first built in inference mode
        return _build_offset_tables(group_h, group_w, device)


def _offset_tables(group_h: int, group_w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`relative_offsets` and the flat :func:`relative_position_index`, cached per shape.

    They hold no parameters, so one copy per (Gh, Gw, device) serves training too.
    """
    if not torch.jit.is_scripting():
        # a recorded graph holds no cached tensor, and its sizes may be symbolic
        if not capturing_graph():
            return _cached_offset_tables(group_h, group_w, device)
    return _build_offset_tables(group_h, group_w, device)


class DynamicPositionBias(nn.Module):
    """Dynamic position bias: an MLP from a relative offset ``(dy, dx)`` to one bias per head.

    ``(M, 2)`` offsets -> ``(M, num_heads)``. Width ``hidden_dim`` is ``C // 16`` officially.
    """

    def __init__(self, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        self.pos_proj = nn.Linear(2, hidden_dim)
        self.pos1 = self._layer(hidden_dim, hidden_dim)
        self.pos2 = self._layer(hidden_dim, hidden_dim)
        self.pos3 = self._layer(hidden_dim, num_heads)

    @staticmethod
    def _layer(in_dim: int, out_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.LayerNorm(in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))

    @property
    def reference_weight(self) -> torch.Tensor:
        """A weight whose device and dtype are the module's: the first norm's, which stays a
        float tensor where the linears become other kinds of layer (``quantize_dynamic``)."""
        return self.pos1[0].weight


@register_notrace_module  # FX: groups by the map's size and dispatches on device / dtype
class GroupAttention(InferenceCaches):
    """Multi-head self-attention inside token groups, with dynamic position bias.

    Takes the whole normalised map and does the grouping itself, so that the linear
    layers only ever see real tokens: qkv runs before padding and proj after cropping.
    Padded keys get a large negative score, so padding never changes real outputs.
    """

    __jit_ignored_attributes__ = ["_bias_cache"]  # eager-only, and TorchScript cannot type it
    # a class constant: TorchScript reads no float globals, and models pickled whole before it keep working
    float16_padding_score: Final[float] = FLOAT16_PADDING_SCORE

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"channels ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        # Fused attention kernels where they are exact and faster (see models/attention.py);
        # False always takes the explicit softmax: the tests' reference, and what export traces.
        self.fused_attn = True
        self.padding_score = PADDING_SCORE  # an attribute: TorchScript reads no float globals
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = attn_drop  # dropout rate on the attention weights, in training
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pos = DynamicPositionBias(dim // 16, num_heads)
        # Eval-time cache: (Gh, Gw, autocast dtype or None) -> (weights fingerprint, (heads, N, N) bias,
        # the weights: cached_on_weights)
        self._bias_cache: dict[tuple[int, int, torch.dtype | None], tuple[tuple, torch.Tensor, tuple]] = {}

    def drop_caches(self) -> None:
        self._bias_cache.clear()
        release_packed(self.qkv, self.proj)

    def __getstate__(self) -> dict:
        return state_without(super().__getstate__(), "_bias_cache")

    def _can_cache(self) -> bool:
        return (
            not self.training
            and not torch.is_grad_enabled()
            and not capturing_graph()
            and not hooked_within(self.pos)  # a hook may change the bias, and may be removed
        )

    def position_bias(self, group_h: int, group_w: int) -> torch.Tensor:
        """Bias of every (query, key) pair of a ``Gh x Gw`` group: ``(heads, N, N)``."""
        if not torch.jit.is_scripting():
            if self._can_cache():
                return self._cached_position_bias(group_h, group_w)
        return self._position_bias(group_h, group_w)

    def _cached_position_bias(self, group_h: int, group_w: int) -> torch.Tensor:
        # autocast computes the bias in its own dtype: an entry per precision, so that neither
        # mode is served the other's
        device_type = self.pos.reference_weight.device.type
        autocast = None
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):  # not "meta"
            autocast = torch.get_autocast_dtype(device_type)
        return cached_on_weights(
            self._bias_cache,
            (group_h, group_w, autocast),
            self.pos.parameters(),
            lambda: self._position_bias(group_h, group_w),
        )

    def _position_bias(self, group_h: int, group_w: int) -> torch.Tensor:
        weight = self.pos.reference_weight
        offsets, index = _offset_tables(group_h, group_w, weight.device)
        # (M, heads) table -> (heads, N * N), gathered straight into the layout used.
        table = self.pos(offsets.to(weight.dtype))
        return table.t().index_select(1, index).view(-1, group_h * group_w, group_h * group_w)

    def attention_mask(self, layout: GroupLayout, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Position bias plus padding scores as one float mask ``(1, M, N, N)``.

        ``M = heads`` (shared by all groups) when nothing is padded, else ``nG * heads``
        (groups differ in their padded keys). A 4-d mask broadcast over the batch keeps
        CPU SDPA on its fused kernel.
        """
        bias = self.position_bias(layout.group_h, layout.group_w)
        is_pad = padding_key_mask(height, width, layout, bias.device)
        if is_pad is not None:
            float16 = bias.dtype == torch.float16 or dtype == torch.float16
            score = self.float16_padding_score if float16 else self.padding_score
            # (heads, N, N) + (nG, 1, 1, N) -> (nG * heads, N, N)
            pad_scores = is_pad.to(bias.dtype).mul(score)[:, None, None, :]
            bias = (bias + pad_scores).flatten(0, 1)
        return bias.to(dtype).unsqueeze(0)

    def forward(self, x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        """``(B, H, W, C)`` normalised map -> ``(B, H, W, C)`` attention output."""
        batch, height, width, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        # (3, B, nG, heads, N, d): q, k, v grouped and split into heads by one copy.
        qkv = partition_heads(pad_to_layout(self._qkv(x), layout), layout, 3, heads)
        num_groups, tokens = qkv.shape[2], qkv.shape[4]
        mask = self.attention_mask(layout, height, width, qkv.dtype)
        # Viewed as (-1, M, N, d) to line up with the (1, M, N, N) mask: M = heads or nG * heads.
        qkv = qkv.reshape(3, -1, mask.shape[1], tokens, head_dim)
        dropout_p = self.attn_drop if self.training else 0.0
        out = biased_attention(qkv, mask, self.scale, dropout_p, fused=self.fused_attn)
        out = merge_heads(out.view(batch, num_groups, heads, tokens, head_dim), layout, height, width)
        return self.proj_drop(self._proj(out))

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``self.qkv(x)``, on the fast paths where they compute the same (:func:`call_linear`)."""
        if not torch.jit.is_scripting():
            return call_linear(self.qkv, x)
        return self.qkv(x)

    def _proj(self, x: torch.Tensor) -> torch.Tensor:
        """``self.proj(x)``, on the fast paths where they compute the same (:func:`call_linear`)."""
        if not torch.jit.is_scripting():
            return call_linear(self.proj, x)
        return self.proj(x)

    def forward_groups(self, x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        """:meth:`forward` for a layout that pads nothing, left in group order.

        ``(B, H, W, C)`` normalised map -> ``(B * nG, N, C)`` attention output, tokens as
        :func:`partition_groups` orders them. The map is grouped once, ``C`` channels wide,
        before the qkv projection (instead of its ``3 C`` output after it), q, k and v reach
        the attention as views of that projection's output, and nothing is ungrouped here:
        the caller's residual add reads the result through :func:`ungrouped_view`.
        """
        heads, head_dim = self.num_heads, self.head_dim
        tokens = partition_groups(x, layout)  # (B * nG, N, C), one copy
        groups, size, channels = tokens.shape
        qkv = call_linear(self.qkv, tokens).view(groups, size, 3, heads, head_dim)
        mask = self.attention_mask(layout, x.shape[1], x.shape[2], qkv.dtype)  # (1, heads, N, N)
        dropout_p = self.attn_drop if self.training else 0.0
        # q, k, v as (3, B * nG, heads, N, d) views
        out = biased_attention(qkv.permute(2, 0, 3, 1, 4), mask, self.scale, dropout_p, fused=self.fused_attn)
        # SDPA writes (B * nG, N, heads, d) and returns it transposed: a view back
        out = out.transpose(1, 2).reshape(groups, size, channels)
        return self.proj_drop(call_linear(self.proj, out))


# CPU inference runs a stage on a few images at a time once its largest temporary (the MLP's
# hidden activations) would exceed this many bytes. Every image's result is the same, but
# the temporaries stay small enough for the C allocator to reuse them, where tensors of
# tens of MB are mapped fresh from the OS on every call and page-faulted in: +20%
# images/s for crossformer_pp_small at batch 32 (benchmarks/RESULTS.md, row 12).
INFERENCE_CHUNK_BYTES = 16 << 20


def inference_chunks(batch: int, height: int, width: int, hidden_channels: int, element_size: int = 4) -> int:
    """How many chunks a stage splits ``batch`` images of a ``height x width`` map into in CPU
    inference: the fewest that keep its ``hidden_channels``-wide MLP activations under
    :data:`INFERENCE_CHUNK_BYTES` (1 for an empty batch). The stage makes their sizes as even as
    can be (32 images at 5 at most: 5, 5, 5, 5, 4, 4, 4, not six 5s and a 2): even chunks share
    their linears' shape class (:func:`.layers.gemm_choices`), so one timing serves them all,
    and no small last chunk runs its products at a small chunk's speed."""
    per_image = height * width * hidden_channels * element_size
    most = max(1, min(batch, INFERENCE_CHUNK_BYTES // per_image))
    return max(1, -(-batch // most))


def images_per_chunk(batch: int, height: int, width: int, hidden_channels: int, element_size: int = 4) -> int:
    """The images of a stage's largest chunk in CPU inference (:func:`inference_chunks`)."""
    return -(-batch // inference_chunks(batch, height, width, hidden_channels, element_size))


def _eager_cpu_inference(x: torch.Tensor) -> bool:
    """Whether ``x`` runs in CPU inference outside a recorded graph (which keeps its shapes whole):
    where the chunkings below apply."""
    # the graph test before the device's: an FX proxy's device is no value to branch on
    return not torch.is_grad_enabled() and not capturing_graph() and x.device.type == "cpu"


def _inference_chunks(x: torch.Tensor, hidden_channels: int) -> int:
    """How many chunks a stage runs ``x`` ``(B, H, W, C)`` in (1 but in :func:`_eager_cpu_inference`)."""
    if not _eager_cpu_inference(x):
        return 1
    return inference_chunks(x.shape[0], x.shape[1], x.shape[2], hidden_channels, x.element_size())


# Where one image's MLP activations alone exceed INFERENCE_CHUNK_BYTES (dense sizes: 93 MB at
# crossformer_small's stage 0 at 800x1216), CPU inference runs a block's MLP residual a few
# rows at a time, each chunk's hidden activations under this many bytes: 1.03x the dense
# inference of crossformer_small and crossformer_pp_small on a 2-core AMD EPYC (RESULTS.md
# row 113; 16 MB chunks gained less for pp_small, and chunking classification's 16 MB stage
# chunks further cost 10%).
MLP_CHUNK_BYTES = 8 << 20


def mlp_rows_per_chunk(x: torch.Tensor, hidden_channels: int) -> int:
    """The rows (tokens) of ``x`` ``(B, H, W, C)`` a block's MLP residual runs at once in eager
    CPU inference, or 0: all of them (training, other devices, graphs being recorded, and
    inputs whose ``hidden_channels``-wide activations fit :data:`INFERENCE_CHUNK_BYTES`)."""
    if not _eager_cpu_inference(x):
        return 0
    per_row = hidden_channels * x.element_size()
    if x.numel() // x.shape[-1] * per_row <= INFERENCE_CHUNK_BYTES:
        return 0
    return max(1, MLP_CHUNK_BYTES // per_row)


class CrossFormerBlock(nn.Module):
    """Pre-norm transformer block on ``(B, H, W, C)``: group attention, MLP, optional ACL."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_size: int,
        interval: int,
        long_distance_groups: bool,
        long_distance: str,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        activation_cooling: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.group_size = group_size
        self.interval = interval
        self.long_distance_groups = long_distance_groups
        self.long_distance = long_distance
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GroupAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = ResidualDropPath(drop_path)  # applied to both residual branches
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GeluMlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        # Activation cooling layer (CrossFormer++): depthwise 3x3 conv + LayerNorm, no
        # residual. Attribute names are the official checkpoint keys.
        self.ex_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if activation_cooling else None
        self.ex_ln = nn.LayerNorm(dim) if activation_cooling else None

    def layout(self, height: int, width: int) -> GroupLayout:
        """The grouping this block applies to an ``height x width`` map."""
        return group_layout(
            height, width, self.group_size, self.interval, self.long_distance_groups, self.long_distance
        )

    def _attention_residual(self, x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        """``x + drop_path(attn(norm1(x)))`` for ``x`` ``(B, H, W, C)``."""
        if not torch.jit.is_scripting():  # TorchScript compiles only the map-order path
            # the attention itself (no hook, subclass or replacement: it is not called here), and
            # hooks on the linears see maps, as they do on every other path
            if (groups_tile_map(x, layout) and unaltered(self.attn, GroupAttention) and plain_linear(self.attn.qkv)
                    and plain_linear(self.attn.proj)):
                # the attention's output added in group order: no copy back to map order
                in_map, in_groups = ungrouped_view(x, self.attn.forward_groups(self.norm1(x), layout), layout)
                return self.drop_path(in_map, in_groups).view(x.shape)
        return self.drop_path(x, self.attn(self.norm1(x), layout))

    def _mlp_residual(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x + drop_path(mlp(norm2(x)))`` for ``x`` ``(B, H, W, C)``; written into ``out``
        (contiguous, ``x``'s shape) where given, by :meth:`forward_into` only."""
        if not torch.jit.is_scripting():
            # our own per-token MLP only, no hook in it or on its norm (a hook sees maps, as on every
            # other path), and a residual that is a plain add (no drop path drawn per image)
            # (a layer put in fc1's place, e.g. a LoRA adapter, may not say its width: not chunked)
            hidden = getattr(self.mlp.fc1, "out_features", None) if type(self.mlp) is GeluMlp else None
            rows = mlp_rows_per_chunk(x, hidden) if isinstance(hidden, int) else 0
            if rows and self.drop_path.adds_plainly() and not hooked_within(self.mlp) and not hooked(self.norm2):
                # the hidden activations of a chunk stay in cache
                flat = x.reshape(-1, x.shape[-1])
                dest = torch.empty_like(flat) if out is None else out.view(flat.shape)
                for start in range(0, flat.shape[0], rows):
                    part = flat[start:start + rows]
                    torch.add(part, self.mlp(self.norm2(part)), out=dest[start:start + rows])
                return dest.view(x.shape)
            if out is not None:
                return torch.add(x, self.mlp(self.norm2(x)), out=out)
        return self.drop_path(x, self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._attention_residual(x, self.layout(x.shape[1], x.shape[2]))
        x = self._mlp_residual(x)
        if self.ex_conv is not None:
            x = self.activation_cooling(x)
        return x

    def writes_into(self) -> bool:
        """Whether :meth:`forward_into` computes what calling the block does: this class's own
        block, unhooked (:func:`~crossformer.models.layers.unaltered`), no activation cooling
        after the residual, a residual that is a plain add."""
        return unaltered(self, CrossFormerBlock) and self.ex_conv is None and self.drop_path.adds_plainly()

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` (where :meth:`writes_into`), the result written into ``out``
        (contiguous, ``x``'s shape and the result's dtype): a stage's chunks in CPU inference
        land in one tensor instead of being concatenated."""
        x = self._attention_residual(x, self.layout(x.shape[1], x.shape[2]))
        return self._mlp_residual(x, out)

    def activation_cooling(self, x: torch.Tensor) -> torch.Tensor:
        """The ACL (CrossFormer++): ``(B, H, W, C)`` -> ``ex_ln(ex_conv(x))``, ``(B, H, W, C)``."""
        return self.ex_ln(self.ex_conv(conv_input(x)).permute(0, 2, 3, 1))


class CrossFormerStage(nn.Module):
    """Blocks at one resolution, alternating SDA (even j) and LDA (odd j).

    The stage owns the cross-scale merge that follows it (official keys
    ``layers.s.downsample``), but :meth:`forward` returns the map *before* the merge,
    which is what dense tasks take; the model applies ``downsample`` itself. That map
    leaves through ``output`` (an identity), the point timm's hook and FX feature
    extraction name: an FX node named ``layers.s`` would be the merge's output.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        group_size: int,
        interval: int,
        long_distance: str,
        mlp_ratio: float,
        drop_path: Sequence[float],
        use_acl: bool,
        merge_kernel_sizes: Sequence[int] | None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.mlp_hidden = int(dim * mlp_ratio)  # widest per-token activation, for inference chunking
        self.blocks = nn.Sequential(
            *[
                CrossFormerBlock(
                    dim,
                    num_heads,
                    group_size,
                    interval,
                    long_distance_groups=j % 2 == 1,
                    long_distance=long_distance,
                    mlp_ratio=mlp_ratio,
                    drop_path=drop_path[j],
                    activation_cooling=use_acl and (j + 1) % 3 == 0 and j < depth - 1,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                )
                for j in range(depth)
            ]
        )
        self.output = nn.Identity()
        self.downsample = (
            PatchMerging(dim, 2 * dim, merge_kernel_sizes) if merge_kernel_sizes is not None else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)`` (before the merge)."""
        if not torch.jit.is_scripting():
            if self.grad_checkpointing:
                for block in self.blocks:
                    x = grad_checkpoint(block, x)
                return self.output(x)
            chunks = _inference_chunks(x, self.mlp_hidden)
            # sizes as even as can be; not where a hook would see parts of the batch
            if chunks > 1 and len(self.blocks) and not hooked_within(self.blocks):
                return self.output(self._in_chunks(x, chunks))
        return self.output(self.blocks(x))

    def _in_chunks(self, x: torch.Tensor, chunks: int) -> torch.Tensor:
        """The blocks on ``chunks`` parts of the batch in turn (CPU inference), ``(B, H, W, C)``.
        The last block writes each part's result into its rows of the output (the first part's,
        which sets the output's dtype, is copied there): one pass over the stage's output less
        than concatenating the parts (1% of crossformer_tiny's float32 inference)."""
        blocks = list(self.blocks)
        last = blocks[-1]
        if not isinstance(last, CrossFormerBlock) or not last.writes_into():
            return torch.cat([self.blocks(part) for part in x.tensor_split(chunks)])
        out: torch.Tensor | None = None
        start = 0
        for part in x.tensor_split(chunks):
            for block in blocks[:-1]:
                part = block(part)
            rows = slice(start, start + part.shape[0])
            start = rows.stop
            if out is None:
                first = last(part)
                out = first.new_empty((x.shape[0], *first.shape[1:]))
                out[rows] = first
            else:
                last.forward_into(part, out[rows])
        return out


@register_notrace_function  # FX: checks the actual input at run time
def check_input(x: torch.Tensor, in_chans: int) -> None:
    """Raise a ``ValueError`` (``TypeError`` for what is no floating-point tensor) that says what
    to fix unless ``x`` is ``(B, in_chans, >=32, >=32)``."""
    if not isinstance(x, torch.Tensor):  # a NumPy array failed deep inside, on its string device
        if isinstance(x, torch.fx.Proxy):  # plain symbolic_trace: the size-dependent grouping needs real sizes
            raise TypeError(
                "plain torch.fx.symbolic_trace cannot trace CrossFormer, whose grouping depends on the input size: "
                "use timm's feature extractor (timm.create_model(..., features_only=True, feature_cls='fx')), "
                "torchvision's create_feature_extractor with timm's tracer settings, or torch.export"
            )
        raise TypeError(
            f"CrossFormer takes images as a torch.Tensor shaped (batch, {in_chans}, height, width), got "
            f"{type(x).__name__}: convert it first (torch.from_numpy, or torchvision's transforms for an image)"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"CrossFormer takes floating-point images, got {x.dtype}: convert them (x.float() / 255, then "
            f"normalise with the model's mean and std)"
        )
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"CrossFormer expects images shaped (batch, {in_chans}, height, width), got {tuple(x.shape)}"
        )
    check_image_size(x.shape[2], x.shape[3])


def check_image_size(height: int, width: int, fix: str = "resize or pad the input") -> None:
    """Raise a ``ValueError`` ending in ``fix`` for an image under :data:`MIN_INPUT_SIZE` a side."""
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise ValueError(f"CrossFormer needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, "
                         f"got {height}x{width}: {fix}")


class CrossFormer(nn.Module):
    """CrossFormer / CrossFormer++ backbone and classifier, for any input size >= 32.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs (0 for no head).
        global_pool: ``"avg"`` (mean over tokens), timm's ``"max"``, ``"avgmax"``,
            ``"catavgmax"`` (twice the features), or ``""`` (no pooling).
        embed_dim: Channels of stage 0; stage s has ``embed_dim * 2**s``.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        group_size: SDA/LDA group size, one per stage (or one for all).
        interval: LDA sampling interval, one per stage (or one for all).
        use_acl: Add activation cooling layers (CrossFormer++).
        long_distance: LDA semantics: ``"fixed_interval"`` (CrossFormer) or
            ``"fixed_group"`` (CrossFormer++). Also selects the small-map rule.
        mlp_ratio: MLP hidden width over channels.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after attention projection and in the MLP.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, rising linearly over all blocks to this rate.
        patch_kernel_sizes: Kernels of the cross-scale patch embedding (stride 4): each at
            least 4, differing from 4 by an even number, so that all give one output size.
        merge_kernel_sizes: Kernels of each cross-scale merge (stride 2), likewise: 2, 4, 6, ...
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: Sequence[int] = (1, 1, 8, 6),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        group_size: int | Sequence[int] = 7,
        interval: int | Sequence[int] = (8, 4, 2, 1),
        use_acl: bool = False,
        long_distance: str = "fixed_interval",
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        patch_kernel_sizes: Sequence[int] = (4, 8, 16, 32),
        merge_kernel_sizes: Sequence[int] = (2, 4),
    ) -> None:
        super().__init__()
        if long_distance not in LONG_DISTANCE_CHOICES:
            raise ValueError(f"long_distance must be one of {LONG_DISTANCE_CHOICES}, got {long_distance!r}")
        # 0 built a model whose first forward failed inside LayerNorm; text failed inside nn.Conv2d
        if not isinstance(in_chans, numbers.Integral) or isinstance(in_chans, bool) or in_chans < 1:
            raise ValueError(f"in_chans must be a whole number of at least 1 (3 for RGB images), got {in_chans!r}")
        # --model-arg depths=2,2,4,2 is text: min() below would fail on it with a bare TypeError
        if isinstance(depths, (str, numbers.Number)) or not all(isinstance(d, numbers.Integral) for d in depths):
            raise ValueError(f"depths needs a list of whole numbers, one per stage (e.g. [2, 2, 6, 2]), got {depths!r}")
        if len(depths) == 0:
            raise ValueError(f"depths needs at least one stage, got {tuple(depths)}")
        if min(depths) < 0:
            raise ValueError(f"depths must be at least 0 in every stage, got {tuple(depths)}")
        for name, rate in (("drop_rate", drop_rate), ("proj_drop_rate", proj_drop_rate),
                           ("attn_drop_rate", attn_drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate <= 1.0:  # else an error deep inside the first training step
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        num_stages = len(depths)
        num_heads = _per_stage(num_heads, num_stages, "num_heads")
        group_size = _per_stage(group_size, num_stages, "group_size")
        interval = _per_stage(interval, num_stages, "interval")

        self.in_chans = in_chans
        self.num_classes = num_classes
        self.output_fmt = "NHWC"  # of forward_features (timm reads it)
        self.global_pool = global_pool
        self.pool = global_pool_layer(global_pool)
        self.long_distance = long_distance
        dims = [embed_dim * 2**s for s in range(num_stages)]
        self.num_features = dims[-1]
        self.head_hidden_size = self.num_features * self.pool.feat_mult()  # what the head sees
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_kernel_sizes)
        check_mlp_ratio(mlp_ratio, embed_dim)  # after the embedding has checked embed_dim

        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages = []
        self.feature_info = []
        for s in range(num_stages):
            first = sum(depths[:s])
            stages.append(
                CrossFormerStage(
                    dims[s],
                    depths[s],
                    num_heads[s],
                    group_size[s],
                    interval[s],
                    long_distance,
                    mlp_ratio,
                    rates[first : first + depths[s]],
                    use_acl,
                    merge_kernel_sizes if s < num_stages - 1 else None,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                )
            )
            self.feature_info.append(dict(num_chs=dims[s], reduction=4 * 2**s, module=f"layers.{s}.output"))
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Whole models pickled (torch.save(model)) before the pooling became timm's layer
        # pooled by global_pool alone ("avg" or ""): rebuild the layer it implies.
        if "pool" not in self._modules:
            self.pool = global_pool_layer(self.global_pool)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if getattr(module, "weight", None) is not None and module.weight.is_meta:
            return  # shapes only (identify_variant, flops): nothing to draw, and drawing on meta takes seconds
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # timm model interface -------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None: as in the official recipe (whose names match no parameter here), every
        weight matrix decays; timm's optimizer factory spares the 1-D ones (norms, biases) itself."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in the order they run, for timm's layer-wise lr decay.

        A stage's merge runs after its blocks (not before, as in timm's Swin), so it joins
        the last block's group: timm's ``MATCH_PREV_GROUP`` suffix, as the final norm does.
        """
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", MATCH_PREV_GROUP),
                (r"^norm", MATCH_PREV_GROUP),
            ],
        )

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """``(h, w)`` of each stage's token map for a ``height x width`` input (strides 4, 8, 16
        and 32 in the standard variants, rounded down as the convolutions round)."""
        h, w = self.patch_embed.projs.output_side(height), self.patch_embed.projs.output_side(width)
        sizes = []
        for stage in self.layers:
            sizes.append((h, w))
            if stage.downsample is not None:
                h, w = stage.downsample.reductions.output_side(h), stage.downsample.reductions.output_side(w)
        return sizes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations (training)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` where ``num_classes`` is 0)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head of ``num_classes`` outputs (0: pooled features); ``global_pool``
        (``'avg'``, ``''`` for the unpooled ``(B, H, W, C)`` map, ...) where given."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.pool = global_pool_layer(global_pool)
            self.global_pool = global_pool
            self.head_hidden_size = self.num_features * self.pool.feat_mult()
        # on the model's device and dtype (as timm's models do): it may have moved since built
        placement = get_device_dtype(self)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **placement) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs before each merge, as NCHW maps at strides 4, 8, 16, 32.

        Args:
            x: ``(B, in_chans, H, W)`` images, ``H, W >= 32``.
            indices: Last n stages if int, all if None, else these stage indices.
            norm: Apply the final norm to the last stage's map (if taken).
            stop_early: Stop after the last stage needed.
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: Return only the list of maps.

        Returns:
            The maps, or ``(final (B, h, w, C3) features, maps)``; after an early stop the
            "final" features are the last stage run's map, ``(B, h, w, C)``, without the norm.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got '{output_fmt}'")
        if not torch.jit.is_scripting():  # TorchScript cannot format the message
            check_input(x, self.in_chans)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        # only the final features need the stages after the last one taken
        last_run = max_index if stop_early or intermediates_only else last
        intermediates: list[torch.Tensor] = []
        x = self.patch_embed(x)
        for i, stage in enumerate(self.layers):  # not a slice of them: TorchScript unrolls this loop
            if i <= last_run:
                x = stage(x)
                if i in take_indices:
                    feature = self.norm(x) if norm and i == last else x
                    intermediates.append(feature.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feature)
                if stage.downsample is not None and i < last_run:
                    x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        # the final norm is sized for the last stage: an early stop returns its map as it is (as Swin)
        return self.norm(x) if last_run == last else x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop stages (and the head/norm) not needed to produce the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        # The last kept stage's merge is never used once later stages are gone.
        self.layers[-1].downsample = None
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> normalised ``(B, H/32, W/32, C3)``."""
        if not torch.jit.is_scripting():  # TorchScript cannot format the message
            check_input(x, self.in_chans)
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, h, w, C3)`` -> logits ``(B, num_classes)`` (or pooled features ``(B, head_hidden_size)``)."""
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
