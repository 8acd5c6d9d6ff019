"""A deliberately plain, functional transcription of shared/spec/crossformer.md.

It shares no code with the package: it runs on a state dict and a config dict, builds
every group from the spec's coordinate formulas (gather/scatter of token indices, no
reshapes), pads *before* qkv as the official code does, computes the position bias
afresh on every call and uses an explicit softmax. Tests compare the package's fast
model against it at many input sizes, in eval and training (gradients too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PADDING_SCORE = -1e6


def _ln(x: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{key}.weight"], state[f"{key}.bias"], eps=1e-5)


def _linear(x: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    return F.linear(x, state[f"{key}.weight"], state[f"{key}.bias"])


def _cross_scale(x: torch.Tensor, state: dict, key: str, kernels: list[int], stride: int) -> torch.Tensor:
    """NCHW in, NHWC out: parallel convs, concatenated in kernel order."""
    outs = [
        F.conv2d(x, state[f"{key}.{i}.weight"], state[f"{key}.{i}.bias"], stride=stride, padding=(k - stride) // 2)
        for i, k in enumerate(kernels)
    ]
    return torch.cat(outs, dim=1).permute(0, 2, 3, 1)


def group_coordinates(
    height: int, width: int, group_size: int, interval: int, long_distance_groups: bool, semantics: str
) -> tuple[int, int, int, int, list[list[tuple[int, int]]]]:
    """Spec section 5, literally: (Hp, Wp, Gh, Gw, groups as lists of (row, col) in order)."""
    if min(height, width) <= group_size:
        size = min(height, width) if semantics == "fixed_interval" else max(height, width)
        long_distance_groups, group_size = False, size
    if not long_distance_groups:
        g = group_size
        hp, wp = math.ceil(height / g) * g, math.ceil(width / g) * g
        groups = [
            [(ty * g + gy, tx * g + gx) for gy in range(g) for gx in range(g)]
            for ty in range(hp // g)
            for tx in range(wp // g)
        ]
        return hp, wp, g, g, groups
    i_ = interval
    if semantics == "fixed_group":
        g = group_size
        span = g * i_
        hp, wp = math.ceil(height / span) * span, math.ceil(width / span) * span
        groups = [
            [(ry * span + gy * i_ + iy, rx * span + gx * i_ + ix) for gy in range(g) for gx in range(g)]
            for ry in range(hp // span)
            for rx in range(wp // span)
            for iy in range(i_)
            for ix in range(i_)
        ]
        return hp, wp, g, g, groups
    hp, wp = math.ceil(height / i_) * i_, math.ceil(width / i_) * i_
    gh, gw = hp // i_, wp // i_
    groups = [
        [(gy * i_ + iy, gx * i_ + ix) for gy in range(gh) for gx in range(gw)]
        for iy in range(i_)
        for ix in range(i_)
    ]
    return hp, wp, gh, gw, groups


def _position_bias(state: dict, key: str, gh: int, gw: int) -> torch.Tensor:
    """(heads, N, N) from the DPB MLP evaluated on the offset table."""
    offsets = torch.tensor(
        [[dy, dx] for dy in range(1 - gh, gh) for dx in range(1 - gw, gw)], dtype=torch.float32
    ).to(state[f"{key}.pos_proj.weight"])
    pos = _linear(offsets, state, f"{key}.pos_proj")
    for layer in ("pos1", "pos2"):
        pos = _linear(torch.relu(_ln(pos, state, f"{key}.{layer}.0")), state, f"{key}.{layer}.2")
    pos = _linear(torch.relu(_ln(pos, state, f"{key}.pos3.0")), state, f"{key}.pos3.2")
    coords = [(y, x) for y in range(gh) for x in range(gw)]
    index = torch.tensor(
        [[(yq - yk + gh - 1) * (2 * gw - 1) + (xq - xk + gw - 1) for (yk, xk) in coords] for (yq, xq) in coords]
    )
    return pos[index].permute(2, 0, 1)


def _block(x: torch.Tensor, state: dict, key: str, heads: int, group_size: int, interval: int,
           long_distance_groups: bool, semantics: str, cooling: bool) -> torch.Tensor:
    batch, height, width, channels = x.shape
    shortcut = x
    x = _ln(x, state, f"{key}.norm1")
    hp, wp, gh, gw, groups = group_coordinates(height, width, group_size, interval, long_distance_groups, semantics)
    x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))
    flat_index = torch.tensor([[r * wp + c for r, c in grp] for grp in groups])  # (nG, N)
    is_pad = torch.tensor([[r >= height or c >= width for r, c in grp] for grp in groups])
    tokens = x.reshape(batch, hp * wp, channels)[:, flat_index]  # (B, nG, N, C)
    n = flat_index.shape[1]
    qkv = _linear(tokens, state, f"{key}.attn.qkv").reshape(batch, -1, n, 3, heads, channels // heads)
    q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # each (B, nG, heads, N, d)
    scores = (q * (channels // heads) ** -0.5) @ k.transpose(-2, -1)
    scores = scores + _position_bias(state, f"{key}.attn.pos", gh, gw)
    scores = scores + (is_pad.float() * PADDING_SCORE)[None, :, None, None, :]
    out = (scores.softmax(-1) @ v).permute(0, 1, 3, 2, 4).reshape(batch, -1, n, channels)
    out = _linear(out, state, f"{key}.attn.proj")
    restored = torch.zeros(batch, hp * wp, channels, dtype=out.dtype)
    restored = restored.index_copy(1, flat_index.reshape(-1), out.reshape(batch, -1, channels))
    x = shortcut + restored.reshape(batch, hp, wp, channels)[:, :height, :width]
    hidden = F.gelu(_linear(_ln(x, state, f"{key}.norm2"), state, f"{key}.mlp.fc1"))
    x = x + _linear(hidden, state, f"{key}.mlp.fc2")
    if cooling:
        conv = F.conv2d(x.permute(0, 3, 1, 2), state[f"{key}.ex_conv.weight"], state[f"{key}.ex_conv.bias"],
                        padding=1, groups=channels)
        x = _ln(conv.permute(0, 2, 3, 1), state, f"{key}.ex_ln")
    return x


def reference_forward(state: dict, cfg: dict, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the four pre-merge NCHW stage maps.

    ``cfg``: depths, num_heads, group_size (per stage), interval (per stage), use_acl,
    long_distance. ``state`` holds the package's (= official) state-dict keys.
    """
    x = _ln(_cross_scale(images, state, "patch_embed.projs", [4, 8, 16, 32], 4), state, "patch_embed.norm")
    features = []
    stages = len(cfg["depths"])
    for s in range(stages):
        depth = cfg["depths"][s]
        for j in range(depth):
            x = _block(
                x, state, f"layers.{s}.blocks.{j}", cfg["num_heads"][s], cfg["group_size"][s],
                cfg["interval"][s], j % 2 == 1, cfg["long_distance"],
                cfg["use_acl"] and (j + 1) % 3 == 0 and j < depth - 1,
            )
        features.append(x.permute(0, 3, 1, 2))
        if s < stages - 1:
            x = _cross_scale(_ln(x, state, f"layers.{s}.downsample.norm").permute(0, 3, 1, 2), state,
                             f"layers.{s}.downsample.reductions", [2, 4], 2)
    pooled = _ln(x, state, "norm").mean(dim=(1, 2))
    return _linear(pooled, state, "head"), features
