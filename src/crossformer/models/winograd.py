"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3), for wide layers on the CPU.

A 3x3, stride-1 convolution computes each 2x2 block of outputs from a 4x4 tile of input. In
the Winograd domain (Lavin & Gray, 2016) that block costs 16 products per channel pair
instead of 36: the tiles and the weights are transformed by small integer and half-integer
matrices, multiplied position by position (16 GEMMs of ``tiles x C_in`` by
``C_in x C_out``) and transformed back. The GEMMs do 2.25x fewer multiply-adds than the
direct convolution; the transforms are adds and subtractions, memory-bound. For wide
layers (UPerNet's 512- to 2816-channel convs) the saving outweighs the transforms: on a
2-core Xeon UPerNet's ``fpn_bottleneck`` (2048 -> 512 channels at 128x128) ran 1.9x faster
than oneDNN's direct convolution; at 256 channels in or out it gained little or lost, so
:data:`MIN_IN_CHANNELS` and :data:`MIN_OUT_CHANNELS` keep those on the direct path
(benchmarks/RESULTS.md, row 73).

F(2x2, 3x3) is the Winograd variant that loses no accuracy: its transforms hold only 0, 1,
-1 and 1/2, and at UPerNet's layers its largest difference from a float64 convolution
measured 1.5-2.1e-6, against 5.7-8.2e-6 for oneDNN's direct kernel. Larger tiles
(F(4x4, 3x3)) save more products but were 5-10x less accurate than the direct kernel and no
faster here (row 74).

Training runs the forward, the input gradient (a 3x3 convolution too, by the flipped kernels)
and the weight gradient (the forward's adjoint: products of transformed tiles and transformed
output gradients, summed over the tiles) this way; the weight is transformed once a step.

The tiles are processed a band at a time (:func:`_band`: about 128 GEMM rows), so that the
transformed tiles stay in cache; each GEMM runs on the backend measured faster for its
shape class (:func:`crossformer.models.layers.measured_gemm`: one MKL ``bmm`` of all 16, or
a oneDNN product each).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from timm.models import register_notrace_module
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

from .layers import InferenceCaches, cached_on_weights, capturing_graph, measured_gemm, without_autocast
from .layout import nchw_cat

__all__ = ["Conv3x3", "MIN_IN_CHANNELS", "MIN_OUT_CHANNELS", "winograd_conv3x3", "winograd_weight", "winograd_weight_grad"]

MIN_IN_CHANNELS = 384
MIN_OUT_CHANNELS = 256

# G: the weight transform, U = G g G^T for each 3x3 kernel g
_WEIGHT_TRANSFORM = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# Of the 16 products, the one whose output transform coefficient is 1 for all four outputs
# (the middle of A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] in both directions): adding the bias
# there adds it to every output.
_BIAS_PRODUCT = 5
# Tile positions (4 i + j) with 0 and 3 swapped along each axis: a flipped kernel's transform
_FLIPPED = tuple(4 * (3 - i if i in (0, 3) else i) + (3 - j if j in (0, 3) else j) for i in range(4) for j in range(4))
# Tiles per band of the weight gradient, whose products add into one (16, C_out, C_in) sum:
# the best or within 5% of it among 128-2048 at UPerNet's shapes (RESULTS.md, row 80).
_WEIGHT_GRAD_BAND_ROWS = 256
# weight -> (fingerprint, its Winograd transform, the weight: cached_on_weights)
_TRANSFORMED_WEIGHTS = WeakIdKeyDictionary()


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """``(C_out, C_in, 3, 3)`` -> ``(16, C_in, C_out)``: ``G g G^T`` of every kernel ``g``, for
    each of its 16 positions the ``C_in x C_out`` matrix the tiles multiply by. One product
    with ``G (x) G``, then a copy into the layout MKL's batched product reads fastest (12-20%
    faster than the transposed view at ``fpn_bottleneck``'s shapes)."""
    g = torch.tensor(_WEIGHT_TRANSFORM, dtype=weight.dtype, device=weight.device)
    out_channels, in_channels = weight.shape[:2]
    kernels = weight.detach().reshape(out_channels * in_channels, 9)
    transformed = torch.mm(torch.kron(g, g), kernels.t()).view(16, out_channels, in_channels)
    return transformed.transpose(1, 2).contiguous()


def _transformed(weight: torch.Tensor) -> torch.Tensor:
    """:func:`winograd_weight`, computed once and again only when the weight changes."""
    return cached_on_weights(_TRANSFORMED_WEIGHTS, weight, (weight,), lambda: winograd_weight(weight))


def _input_transform(d: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> None:
    """``out[i] = (B^T d)[i]`` along one axis, ``B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]``."""
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])


def _output_transform(m: Sequence[torch.Tensor], out: Sequence[torch.Tensor], scratch: torch.Tensor) -> None:
    """``out[a] = (A^T m)[a]`` along one axis, ``A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]``."""
    torch.add(m[1], m[2], out=scratch)
    torch.add(scratch, m[0], out=out[0])
    torch.sub(m[1], m[2], out=scratch)
    torch.sub(scratch, m[3], out=out[1])


def _band(images: int, tiles_h: int, tiles_w: int, in_channels: int, rows: int = 0) -> tuple[int, int]:
    """``(images, tile_rows)`` per band: whole images of small maps, or rows of tiles of one
    image, for ``rows`` GEMM rows or, by default, about 128 (256 for narrow inputs, whose GEMMs
    are cheaper per tile): measured best among 32-256 rows on a 2-core Xeon at 256-2816 channels."""
    rows = rows or max(128, 65536 // in_channels)
    if tiles_h * tiles_w >= rows:
        return 1, max(1, min(tiles_h, rows // tiles_w))
    return max(1, min(images, rows // (tiles_h * tiles_w))), tiles_h


def _padded_tiles(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(N, C_i, H, W)`` maps -> ``(N, 2 Th + 2, 2 Tw + 2, sum C_i)``: their concatenation
    along the channels, channels-last, zero-padded by one pixel, and to whole 2x2 output
    tiles (``Th = ceil(H / 2)``) at the bottom and right. Each map is copied once, into place."""
    n, _, height, width = maps[0].shape
    tiles_h, tiles_w = (height + 1) // 2, (width + 1) // 2
    padded = maps[0].new_empty((n, 2 * tiles_h + 2, 2 * tiles_w + 2, sum(x.shape[1] for x in maps)))
    padded[:, 0].zero_()
    padded[:, height + 1:].zero_()
    padded[:, :, 0].zero_()
    padded[:, :, width + 1:].zero_()
    start = 0
    for x in maps:
        padded[:, 1:height + 1, 1:width + 1, start:start + x.shape[1]] = x.permute(0, 2, 3, 1)
        start += x.shape[1]
    return padded


def _transform_tiles(
    src: torch.Tensor, t0: int, tiles_w: int, row_sums: torch.Tensor, tiles: torch.Tensor, order: Sequence[int]
) -> None:
    """``B^T d B`` of the tiles of output tile rows ``t0 ...`` of ``src`` (images of
    :func:`_padded_tiles`), into ``tiles[order[k]]`` for tile position ``k``.

    ``row_sums`` ``(4, b, t, 2 Tw + 2, C)`` is scratch; ``tiles`` is ``(16, b, t, Tw, C)``.
    """
    t = tiles.shape[2]
    # first down the tiles' rows (input rows 2y + k), then across their columns
    _input_transform([src[:, 2 * t0 + k: 2 * (t0 + t) + k: 2] for k in range(4)], row_sums)
    for i in range(4):
        columns = [row_sums[i][:, :, k::2][:, :, :tiles_w] for k in range(4)]
        _input_transform(columns, [tiles[order[4 * i + j]] for j in range(4)])


def winograd_conv3x3(
    x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, flipped: bool = False
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` given as
    ``weights = winograd_weight(weight)``.

    With ``flipped`` it computes the input gradient's convolution instead: ``weights`` is
    ``winograd_weight(weight).transpose(1, 2)`` and the kernels are turned by 180 degrees.
    Turning a kernel swaps the first and last rows of ``G``, so its transform is the
    original's with positions 0 and 3 of each axis swapped (:data:`_FLIPPED`).

    Shapes: ``x`` ``(N, C_in, H, W)`` (any memory format; channels-last reads fastest),
    ``weights`` ``(16, C_in, C_out)`` (any strides) -> ``(N, C_out, H, W)``, channels-last.
    """
    return _conv_tiles(_padded_tiles((x,)), x.shape[2], x.shape[3], weights, bias, flipped)


def _conv_tiles(
    padded: torch.Tensor, height: int, width: int, weights: torch.Tensor, bias: torch.Tensor | None, flipped: bool
) -> torch.Tensor:
    """:func:`winograd_conv3x3` of an ``height x width`` input given as its
    :func:`_padded_tiles`."""
    n, channels = padded.shape[0], padded.shape[3]
    out_channels = weights.shape[2]
    # the products: tile position k multiplies by weights[order[k]], in slot order[k]
    order = _FLIPPED if flipped else range(16)
    tiles_h, tiles_w = (height + 1) // 2, (width + 1) // 2
    out = padded.new_empty((n, 2 * tiles_h, 2 * tiles_w, out_channels))

    images, tile_rows = _band(n, tiles_h, tiles_w, channels)
    row_sums = padded.new_empty((4, images, tile_rows, padded.shape[2], channels))
    tiles = padded.new_empty((16, images, tile_rows, tiles_w, channels))
    half = padded.new_empty((8, images, tile_rows, tiles_w, out_channels))
    scratch = padded.new_empty((images, tile_rows, tiles_w, out_channels))
    for i0 in range(0, n, images):
        b = min(n, i0 + images) - i0
        for t0 in range(0, tiles_h, tile_rows):
            t = min(tiles_h, t0 + tile_rows) - t0
            v, h, s = tiles[:, :b, :t], half[:, :b, :t], scratch[:b, :t]
            _transform_tiles(padded[i0:i0 + b], t0, tiles_w, row_sums[:, :b, :t], v, order)
            m = measured_gemm("batched", v.reshape(16, -1, channels), weights)
            if bias is not None:
                m[order[_BIAS_PRODUCT]] += bias
            m = m.view(16, b, t, tiles_w, out_channels)
            # A^T M A: across each row of products, then down, into the output's 2x2 blocks
            for i in range(4):
                _output_transform([m[order[4 * i + j]] for j in range(4)], h[2 * i: 2 * i + 2], s)
            block = out[i0:i0 + b, 2 * t0: 2 * (t0 + t)].view(b, t, 2, tiles_w, 2, out_channels)
            h = h.view(4, 2, b, t, tiles_w, out_channels)
            for j in range(2):
                _output_transform(h[:, j], [block[:, :, a, :, j] for a in range(2)], s)
    if out.shape[1:3] != (height, width):  # odd sizes: the last tiles' extra row or column
        out = out[:, :height, :width].contiguous()
    return out.permute(0, 3, 1, 2)


def _gradient_transform(y: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> None:
    """``out[i] = (A y)[i]`` along one axis, ``A = [[1, 0], [1, 1], [1, -1], [0, -1]]``: the
    adjoint of the output transform, taking a 2x2 block's gradient to the 16 products'."""
    out[0].copy_(y[0])
    torch.add(y[0], y[1], out=out[1])
    torch.sub(y[0], y[1], out=out[2])
    torch.neg(y[1], out=out[3])


def winograd_weight_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The weight gradient of ``F.conv2d(x, weight, padding=1)`` for a 3x3 ``weight``:
    ``(N, C_in, H, W)`` input and ``(N, C_out, H, W)`` output gradient -> ``(C_out, C_in, 3, 3)``.

    The adjoint of :func:`winograd_conv3x3`: for each of the 16 positions the transformed
    weight's gradient is ``V^T dM``, the transformed tiles ``V`` (``tiles x C_in``, as in
    forward) by the output gradient taken to the products (``dM = A dY A^T`` of each 2x2
    block: ``tiles x C_out``), summed over bands of tiles; then ``G^T dU G`` once. 2.25x
    fewer multiply-adds than the direct weight gradient, as in forward.
    """
    return _weight_grad_tiles(_padded_tiles((x,)), grad_out)


def _weight_grad_tiles(padded: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """:func:`winograd_weight_grad` of an input given as its :func:`_padded_tiles`."""
    n, channels = padded.shape[0], padded.shape[3]
    out_channels, height, width = grad_out.shape[1:]
    tiles_h, tiles_w = (height + 1) // 2, (width + 1) // 2
    # the gradient, channels-last and zero over the last tiles' extra row or column
    grads = grad_out.permute(0, 2, 3, 1)
    if not grads.is_contiguous() or (height % 2, width % 2) != (0, 0):
        grads = grad_out.new_empty((n, 2 * tiles_h, 2 * tiles_w, out_channels))
        grads[:, height:].zero_()
        grads[:, :, width:].zero_()
        grads[:, :height, :width] = grad_out.permute(0, 2, 3, 1)

    images, tile_rows = _band(n, tiles_h, tiles_w, channels, _WEIGHT_GRAD_BAND_ROWS)
    row_sums = padded.new_empty((4, images, tile_rows, padded.shape[2], channels))
    tiles = padded.new_empty((16, images, tile_rows, tiles_w, channels))
    half = padded.new_empty((4, 2, images, tile_rows, tiles_w, out_channels))
    products = padded.new_empty((16, images, tile_rows, tiles_w, out_channels))
    transformed = padded.new_empty((16, out_channels, channels))  # dU, transposed: see the end
    first = True
    for i0 in range(0, n, images):
        b = min(n, i0 + images) - i0
        for t0 in range(0, tiles_h, tile_rows):
            t = min(tiles_h, t0 + tile_rows) - t0
            v, h, dm = tiles[:, :b, :t], half[:, :, :b, :t], products[:, :b, :t]
            _transform_tiles(padded[i0:i0 + b], t0, tiles_w, row_sums[:, :b, :t], v, range(16))
            block = grads[i0:i0 + b, 2 * t0: 2 * (t0 + t)].view(b, t, 2, tiles_w, 2, out_channels)
            # A dY A^T: down each 2x2 block's columns, then across its rows
            for j in range(2):
                _gradient_transform([block[:, :, a, :, j] for a in range(2)], h[:, j])
            for i in range(4):
                _gradient_transform(h[i], [dm[4 * i + j] for j in range(4)])
            dm_t, v = dm.reshape(16, -1, out_channels).transpose(1, 2), v.reshape(16, -1, channels)
            if first:
                torch.bmm(dm_t, v, out=transformed)
                first = False
            else:
                transformed.baddbmm_(dm_t, v)
    g = torch.tensor(_WEIGHT_TRANSFORM, dtype=padded.dtype, device=padded.device)
    # G^T dU G of every kernel: (C_out * C_in, 16) by (16, 9), already the weight's layout
    kernels = torch.mm(transformed.view(16, -1).t(), torch.kron(g, g))
    return kernels.view(out_channels, channels, 3, 3)


def _wide(in_channels: int, out_channels: int) -> bool:
    """Whether a 3x3 convolution is wide enough for Winograd to pay (module docstring)."""
    return in_channels >= MIN_IN_CHANNELS and out_channels >= MIN_OUT_CHANNELS


class _WinogradConvCPU(torch.autograd.Function):
    """``F.conv2d(torch.cat(maps, 1), weight, bias, padding=1)`` with forward, input gradient
    and weight gradient by Winograd. The weight is transformed once a step, in forward."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bias: torch.Tensor | None, *maps: torch.Tensor) -> torch.Tensor:
        transformed = winograd_weight(weight)
        padded = _padded_tiles(maps)  # kept for the weight gradient: it holds the input
        ctx.save_for_backward(padded, weight, transformed)
        ctx.size = maps[0].shape[2:]
        ctx.channels = [x.shape[1] for x in maps]
        return _conv_tiles(padded, *ctx.size, transformed, bias, False)

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx, grad_out: torch.Tensor):
        padded, weight, transformed = ctx.saved_tensors
        out_channels, in_channels = weight.shape[:2]
        grad_weight = grad_bias = grad_x = None
        if any(ctx.needs_input_grad[2:]):
            if _wide(out_channels, in_channels):
                # its convolution maps C_out -> C_in with the kernels flipped
                grad_x = winograd_conv3x3(grad_out, transformed.transpose(1, 2), None, flipped=True)
            else:
                size = (padded.shape[0], in_channels, *ctx.size)
                grad_x = torch.nn.grad.conv2d_input(size, weight, grad_out, padding=1)
        if ctx.needs_input_grad[0]:
            grad_weight = _weight_grad_tiles(padded, grad_out)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.sum((0, 2, 3))
        grad_maps = (None,) * len(ctx.channels) if grad_x is None else grad_x.split(ctx.channels, dim=1)
        return (grad_weight, grad_bias, *grad_maps)


@register_notrace_module  # FX: the dispatch reads the input's device and dtype
class Conv3x3(InferenceCaches, nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 3, padding=1)`` that runs by Winograd on the CPU
    in float32 when it is wide (at least :data:`MIN_IN_CHANNELS` in and
    :data:`MIN_OUT_CHANNELS` out); its output is channels-last then.

    Inference keeps the transformed weight (16/9 the weight's size) until ``train()``;
    training transforms it once a step and computes both gradients by Winograd too.
    Autocast, other devices and dtypes, tracing, compiling, exporting, TorchScript and
    dispatch modes (e.g. FLOP counters) get ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)

    def uses_winograd(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` computes this input by Winograd."""
        return (
            not capturing_graph()
            and _wide(self.in_channels, self.out_channels)
            and x.device.type == "cpu"
            and x.dim() == 4
            and x.numel() > 0
            and x.dtype == self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and _get_current_dispatch_mode() is None
        )

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``(N, C_in, H, W)`` -> ``(N, C_out, H, W)``. ``x`` may also be a list of maps
        ``(N, C_i, H, W)`` to concatenate along the channels, which this layer does as it reads
        fastest: by Winograd straight into its padded tiles (no concatenated map in memory: a
        fresh 134 MB an image at UPerNet's ``fpn_bottleneck``), else NCHW, which oneDNN's
        direct kernel reads faster there (RESULTS.md rows 69, 73)."""
        maps = (x,) if isinstance(x, torch.Tensor) else tuple(x)
        if not torch.jit.is_scripting() and self.uses_winograd(maps[0]):
            return self._winograd(maps)
        return super().forward(maps[0] if len(maps) == 1 else nchw_cat(maps))

    def _winograd(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*maps, *self.parameters())):
            return _WinogradConvCPU.apply(self.weight, self.bias, *maps)
        return _conv_tiles(_padded_tiles(maps), *maps[0].shape[2:], _transformed(self.weight), self.bias, False)

    def drop_caches(self) -> None:
        _TRANSFORMED_WEIGHTS.pop(self.weight, None)
