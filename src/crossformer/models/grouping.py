"""Token grouping for short-distance (SDA) and long-distance (LDA) attention.

Every grouping the architecture uses is one pattern: the padded map splits into regions of
``(Gh * I) x (Gw * I)`` tokens, and each region holds ``I x I`` groups of ``Gh x Gw`` tokens
that sit ``I`` pixels apart. Token ``(gy, gx)`` of group ``(iy, ix)`` in region ``(ry, rx)`` is
at row ``ry*Gh*I + gy*I + iy`` and column ``rx*Gw*I + gx*I + ix``; groups are ordered
``(batch, ry, rx, iy, ix)``.

- SDA with group G: ``Gh = Gw = G``, ``I = 1`` (contiguous tiles).
- LDA, CrossFormer++ ("fixed_group"): ``Gh = Gw = G`` and interval ``I``.
- LDA, CrossFormer ("fixed_interval"): one region, ``Gh = Hp / I``, ``Gw = Wp / I``.

Export (``torch.export``, used by ONNX export): the layout arithmetic is integer-only
(``torch.sym_min``/``sym_max`` on SymInts, ceiling division of positive values), so sizes stay
symbolic; and while ``torch.compiler.is_exporting()`` the grouping is done with index
gathers instead of views and every block builds its padding mask, so that one graph
serves many input sizes without shape proofs. Eager mode keeps the views and fast paths.

TorchScript compiles these functions as they are (the export paths are never taken there).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models import register_notrace_function

from .layers import capturing_graph, saved_copy

LONG_DISTANCE_CHOICES: tuple[str, ...] = ("fixed_interval", "fixed_group")


class GroupLayout(NamedTuple):
    """How one block groups an ``H x W`` map: group shape, interval and padded size."""

    group_h: int
    group_w: int
    interval: int
    padded_h: int
    padded_w: int

    @property
    def tokens_per_group(self) -> int:
        return self.group_h * self.group_w

    @property
    def num_groups(self) -> int:
        return (self.padded_h * self.padded_w) // self.tokens_per_group


def _ceil_div(value: int, divisor: int) -> int:
    # Integer-only (no float ceil) so that SymInts stay symbolic; both arguments positive.
    return (value + divisor - 1) // divisor


def _round_up(value: int, multiple: int) -> int:
    return _ceil_div(value, multiple) * multiple


def _min(a: int, b: int) -> int:
    # torch.sym_min keeps SymInts symbolic (export); plain min for ints and traced sizes.
    if not torch.jit.is_scripting():
        if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
            return torch.sym_min(a, b)
    return min(a, b)


def _max(a: int, b: int) -> int:
    if not torch.jit.is_scripting():
        if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
            return torch.sym_max(a, b)
    return max(a, b)


@register_notrace_function  # FX: decided from the actual size, at run time
def group_layout(
    height: int,
    width: int,
    group_size: int,
    interval: int,
    long_distance_groups: bool,
    long_distance: str,
) -> GroupLayout:
    """Choose the grouping of one block for an actual ``height x width`` map.

    ``long_distance`` is one of :data:`LONG_DISTANCE_CHOICES` (typed ``str`` for TorchScript).
    Decided per call from the real size (the official code fixed it at construction or
    mutated the block on the first small input). On maps whose short side is at most
    ``group_size`` the block falls back to one SDA group size ``G'``: ``min(H, W)`` for
    CrossFormer semantics, ``max(H, W)`` for CrossFormer++ semantics.

    ``height``/``width`` may be ``SymInt`` (export): the small-map test is then the only
    guard, and it holds over the size range that ``crossformer.export`` computes.
    """
    short = _min(height, width)
    if short <= group_size:
        size = short if long_distance == "fixed_interval" else _max(height, width)
        return GroupLayout(size, size, 1, _round_up(height, size), _round_up(width, size))
    if not long_distance_groups:
        return GroupLayout(
            group_size, group_size, 1, _round_up(height, group_size), _round_up(width, group_size)
        )
    if long_distance == "fixed_group":
        span = group_size * interval
        return GroupLayout(
            group_size, group_size, interval, _round_up(height, span), _round_up(width, span)
        )
    group_h, group_w = _ceil_div(height, interval), _ceil_div(width, interval)
    return GroupLayout(group_h, group_w, interval, group_h * interval, group_w * interval)


def pad_to_layout(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom and right to the layout's padded size."""
    pad_h = layout.padded_h - x.shape[1]
    pad_w = layout.padded_w - x.shape[2]
    if not torch.jit.is_scripting():
        if torch.compiler.is_exporting():
            return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    if pad_h != 0 or pad_w != 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def _group_positions(layout: GroupLayout, device: torch.device) -> torch.Tensor:
    """Flat padded-map position of every token in group order: long ``(num_groups, Gh * Gw)``."""
    gh, gw, step = layout.group_h, layout.group_w, layout.interval
    span_h, span_w = gh * step, gw * step
    regions_h, regions_w = layout.padded_h // span_h, layout.padded_w // span_w

    def axis(size: int, dim: int) -> torch.Tensor:  # arange(size) along dimension ``dim`` of 6
        shape = [1] * 6
        shape[dim] = size
        return torch.arange(size, device=device).view(shape)

    # dimensions (ry, rx, iy, ix, gy, gx), as in the module docstring
    row = axis(regions_h, 0) * span_h + axis(gh, 4) * step + axis(step, 2)
    col = axis(regions_w, 1) * span_w + axis(gw, 5) * step + axis(step, 3)
    flat = row * layout.padded_w + col
    return flat.reshape(regions_h * regions_w * step * step, gh * gw)


def _divmod(values: torch.Tensor, divisor: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Without ``%``: the ONNX exporter cannot translate a tensor remainder by a SymInt.
    quotient = values // divisor
    return quotient, values - quotient * divisor


def _group_order(layout: GroupLayout, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Where each real token (row-major, ``H * W``) sits in the group-ordered token list."""
    gh, gw, step = layout.group_h, layout.group_w, layout.interval
    span_h, span_w = gh * step, gw * step
    regions_w = layout.padded_w // span_w
    tokens = gh * gw
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    # row = ry*span_h + gy*step + iy; group = ((ry*Rw + rx)*step + iy)*step + ix; token = gy*Gw + gx
    ry, rest = _divmod(rows, span_h)
    gy, iy = _divmod(rest, step)
    rx, rest = _divmod(cols, span_w)
    gx, ix = _divmod(rest, step)
    row_part = (ry * (regions_w * step * step) + iy * step) * tokens + gy * gw
    col_part = (rx * (step * step) + ix) * tokens + gx
    return (row_part[:, None] + col_part[None, :]).reshape(height * width)


def partition_groups(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` -> ``(B * num_groups, Gh * Gw, C)``, tokens row-major in each group."""
    batch, height, width, channels = x.shape
    gh, gw, step = layout.group_h, layout.group_w, layout.interval
    if not torch.jit.is_scripting():
        if torch.compiler.is_exporting():  # a gather: the views below would need divisibility proofs
            index = _group_positions(layout, x.device)
            groups = x.reshape(batch, height * width, channels).index_select(1, index.reshape(-1))
            return groups.reshape(batch * index.shape[0], gh * gw, channels)
    regions_h, regions_w = height // (gh * step), width // (gw * step)
    x = x.view(batch, regions_h, gh, step, regions_w, gw, step, channels)
    # -> (B, ry, rx, iy, ix, gy, gx, C)
    x = x.permute(0, 1, 4, 3, 6, 2, 5, 7)
    return x.reshape(-1, gh * gw, channels)


def groups_tile_map(x: torch.Tensor, layout: GroupLayout) -> bool:
    """Whether the eager in-group path applies to ``x`` ``(B, H, W, C)``: a CPU tensor, the
    layout pads nothing (so the linear layers see no padded tokens either way) and no graph is
    being recorded (:func:`.layers.capturing_graph`: tracers, ``torch.compile`` and exporters
    take the map-order path). GPUs keep the map-order path: their SDPA kernels were not
    measured on the strided q, k and v this path hands them."""
    if capturing_graph() or x.device.type != "cpu":
        return False
    return layout.padded_h == x.shape[1] and layout.padded_w == x.shape[2]


def ungrouped_view(x: torch.Tensor, tokens: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(B, H, W, C)`` and its group-ordered ``tokens`` ``(B * nG, Gh * Gw, C)`` as views
    of one 8-d shape ``(B, ry, gy, iy, rx, gx, ix, C)``, index for index the same pixel.

    An unpadded layout only. An elementwise op of the two (a residual add) then reads the
    tokens in place of a copy back to map order, and writes in ``x``'s order (TensorIterator
    follows its first operand's strides), so its result views back to ``(B, H, W, C)``.
    """
    batch, height, width, channels = x.shape
    gh, gw, step = layout.group_h, layout.group_w, layout.interval
    regions_h, regions_w = height // (gh * step), width // (gw * step)
    in_map = x.view(batch, regions_h, gh, step, regions_w, gw, step, channels)
    # tokens are (B, ry, rx, iy, ix, gy, gx, C) -> (B, ry, gy, iy, rx, gx, ix, C)
    in_groups = tokens.view(batch, regions_h, regions_w, step, step, gh, gw, channels)
    return in_map, in_groups.permute(0, 1, 5, 3, 2, 6, 4, 7)


def _ungroup_real_tokens(x: torch.Tensor, layout: GroupLayout, batch: int, height: int, width: int) -> torch.Tensor:
    """Export path of :func:`merge_heads`: ``(B * nG, Gh * Gw, C)`` -> ``(B, height, width, C)``.

    A gather of the real tokens: a crop of the padded map would be a strided view whose
    contiguity depends on the (symbolic) size.
    """
    channels = x.shape[-1]
    x = x.reshape(batch, x.shape[0] * x.shape[1] // batch, channels)
    x = x.index_select(1, _group_order(layout, height, width, x.device))
    return x.reshape(batch, height, width, channels)


def partition_heads(x: torch.Tensor, layout: GroupLayout, parts: int, num_heads: int) -> torch.Tensor:
    """Group and split heads in one copy: ``(B, Hp, Wp, parts*heads*d)`` -> ``(parts, B, nG, heads, N, d)``.

    Groups and tokens as :func:`partition_groups`; the channels split as ``(parts, heads, d)``
    (``parts = 3`` for a fused qkv projection), so each part comes out contiguous.
    """
    batch, height, width, channels = x.shape
    head_dim = channels // (parts * num_heads)
    gh, gw, step = layout.group_h, layout.group_w, layout.interval
    if not torch.jit.is_scripting():
        if torch.compiler.is_exporting():
            x = partition_groups(x, layout).view(batch, -1, gh * gw, parts, num_heads, head_dim)
            return x.permute(3, 0, 1, 4, 2, 5)
    regions_h, regions_w = height // (gh * step), width // (gw * step)
    x = x.view(batch, regions_h, gh, step, regions_w, gw, step, parts, num_heads, head_dim)
    # -> (parts, B, ry, rx, iy, ix, heads, gy, gx, d)
    x = x.permute(7, 0, 1, 4, 3, 6, 8, 2, 5, 9)
    return x.reshape(parts, batch, regions_h * regions_w * step * step, num_heads, gh * gw, head_dim)


def merge_heads(x: torch.Tensor, layout: GroupLayout, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`partition_heads` for one part, with the padding cropped.

    ``(B, nG, heads, N, d)`` -> ``(B, height, width, heads * d)`` in one copy (a view of it
    when cropped).
    """
    batch, num_groups, num_heads, tokens, head_dim = x.shape
    if not torch.jit.is_scripting():
        if torch.compiler.is_exporting():
            x = x.transpose(2, 3).reshape(batch * num_groups, tokens, num_heads * head_dim)
            return _ungroup_real_tokens(x, layout, batch, height, width)
    gh, gw, step = layout.group_h, layout.group_w, layout.interval
    regions_h = layout.padded_h // (gh * step)
    regions_w = layout.padded_w // (gw * step)
    x = x.view(batch, regions_h, regions_w, step, step, num_heads, gh, gw, head_dim)
    # (B, ry, rx, iy, ix, heads, gy, gx, d) -> (B, ry, gy, iy, rx, gx, ix, heads, d)
    x = x.permute(0, 1, 6, 3, 2, 7, 4, 5, 8)
    x = x.reshape(batch, layout.padded_h, layout.padded_w, num_heads * head_dim)
    return saved_copy(x[:, :height, :width])  # the projection saves its input


def padding_key_mask(
    height: int, width: int, layout: GroupLayout, device: torch.device
) -> torch.Tensor | None:
    """Which tokens of each group are padding: bool ``(num_groups, Gh * Gw)``, or None."""
    if not torch.jit.is_scripting():
        if torch.compiler.is_exporting():  # always a mask: one graph serves padded and exact sizes
            rows = torch.arange(layout.padded_h, device=device) >= height
            cols = torch.arange(layout.padded_w, device=device) >= width
            is_pad = (rows[:, None] | cols[None, :]).reshape(-1)
            return is_pad[_group_positions(layout, device)]
    if layout.padded_h == height and layout.padded_w == width:
        return None
    is_pad = torch.ones(1, layout.padded_h, layout.padded_w, 1, dtype=torch.bool, device=device)
    is_pad[:, :height, :width] = False
    return partition_groups(is_pad, layout).squeeze(-1)
