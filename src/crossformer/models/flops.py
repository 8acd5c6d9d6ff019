"""Parameter and multiply-accumulate (MAC) counts in the papers' convention.

The papers' "FLOPs" are MACs from the official analytic counter (spec section 7):
attention is counted per group without padding, the activation cooling layer is not
counted, and the final norm/pool term is ``C3 * h0 * w0 // 16``. :func:`analytic_macs`
reproduces it exactly; :func:`traced_macs` counts what actually executes (padding
included) with PyTorch's FLOP counter, for comparison. :func:`dense_backbone_macs` is the
backbone's share in the detection and segmentation papers' figures.

PyTorch's counter knows the generic matmul, convolution and attention ops only. In CPU
inference the model runs two that it does not know: oneDNN's fused linear
(``mkldnn._linear_pointwise``, every qkv / proj / MLP layer) and the CPU flash attention
kernel. :data:`EXTRA_MAC_FORMULAS` counts them, so every path is counted, and the count
does not depend on which one the forward pass takes.
"""

from __future__ import annotations

from fractions import Fraction
from math import prod
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from ..modes import eval_mode
from .crossformer import CrossFormer, check_image_size
from .grouping import group_layout
from .weights import unwrap_model

__all__ = ["count_params", "analytic_macs", "dense_backbone_macs", "traced_macs", "layer_macs", "EXTRA_MAC_FORMULAS"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def analytic_macs(model: CrossFormer, height: int = 224, width: int = 224) -> int:
    """MACs of one ``height x width`` image by the official analytic formula."""
    check_image_size(height, width, fix="count a larger size")  # the model refuses such images
    embed = model.patch_embed
    sizes = model.stage_sizes(height, width)
    h, w = h0, w0 = sizes[0]
    total = Fraction(0)
    for conv in embed.projs:
        total += h * w * conv.out_channels * conv.in_channels * conv.kernel_size[0] ** 2
    total += h * w * embed.norm.normalized_shape[0]

    for stage, (h, w) in zip(model.layers, sizes):
        for block in stage.blocks:
            channels = block.norm1.normalized_shape[0]
            heads = block.attn.num_heads
            hidden = block.attn.pos.pos_proj.out_features
            group = group_layout(
                h, w, block.group_size, block.interval, block.long_distance_groups, block.long_distance
            )
            # The official counter uses the square group size G, or G' on small maps.
            size = group.group_h if min(h, w) <= block.group_size else block.group_size
            tokens = size * size
            per_group = (
                tokens * channels * 3 * channels
                + 2 * tokens * tokens * channels
                + tokens * channels * channels
                + tokens * 2 * hidden
                + 2 * tokens * hidden * hidden
                + tokens * hidden * heads
            )
            total += channels * h * w  # norm1
            total += Fraction(h * w, tokens) * per_group
            total += 2 * h * w * channels * stage.mlp_hidden  # fc1 + fc2 (whatever layer stands in fc1's place)
            total += channels * h * w  # norm2
        if stage.downsample is not None:
            channels = stage.downsample.norm.normalized_shape[0]
            total += h * w * channels
            for conv in stage.downsample.reductions:
                total += (h // 2) * (w // 2) * conv.kernel_size[0] ** 2 * conv.out_channels * channels

    total += model.num_features * h0 * w0 // 16
    if isinstance(model.head, nn.Linear):
        total += model.head.in_features * model.head.out_features
    return int(total)


def _real_group_correction(model: CrossFormer, height: int, width: int) -> int:
    """MACs of the attention products on the groups the model really forms, minus the formula's.

    The official formula prices every group as ``G x G`` tokens, true at 224. At dense-task
    sizes the long-distance groups of fixed intervals 8, 4, 2, 1 hold ``(h / I) x (w / I)``
    tokens (1000 in stage 1 at 1280x800), so ``q k^T`` and ``attn v`` cost ``2 T^2 C`` per
    group on the padded map.
    """
    correction = 0
    for stage, (h, w) in zip(model.layers, model.stage_sizes(height, width)):
        for block in stage.blocks:
            channels = block.norm1.normalized_shape[0]
            layout = group_layout(h, w, block.group_size, block.interval, block.long_distance_groups, block.long_distance)
            size = layout.group_h if min(h, w) <= block.group_size else block.group_size
            actual = layout.num_groups * 2 * layout.tokens_per_group**2 * channels
            correction += actual - 2 * h * w * size * size * channels
    return correction


def dense_backbone_macs(backbone: nn.Module, height: int, width: int, real_groups: bool = True) -> int:
    """MACs of a CrossFormer feature backbone on one ``height x width`` image, as the authors'
    detection and segmentation figures count them.

    That is the official analytic formula (:func:`analytic_macs`) with the attention products
    priced on the groups the model really forms (their dense backbones' own ``flops()``;
    ``real_groups=False``: the classification formula's ``G x G`` groups), less the final
    norm/pool term when the model has no final norm (a features-only backbone). ``backbone``:
    a :class:`CrossFormer` or a wrapper of one (timm ``features_only``, DDP, ``torch.compile``).
    For the bundled backbones it is within 0.25% of the MACs executed (:func:`traced_macs`,
    which counts padding and not norms).
    """
    model, _ = unwrap_model(backbone)
    macs = analytic_macs(model, height, width)
    if real_groups:
        macs += _real_group_correction(model, height, width)
    if isinstance(model.norm, nn.Identity):  # the formula counts a final norm the features model lacks
        macs -= model.num_features * (height // 4) * (width // 4) // 16
    return macs


def _mmcv_layer_macs(layer: nn.Module, x: torch.Tensor, output: torch.Tensor) -> int:
    """One call's MACs by mmcv's rule for its layer kind (0 for a kind it does not count)."""
    if isinstance(layer, nn.ConvTranspose2d):  # per input pixel: every kernel tap of every output channel
        macs = x.numel() * layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1] // layer.groups
        return macs + (output.numel() if layer.bias is not None else 0)
    if isinstance(layer, nn.Conv2d):  # per output element: k*k*C_in/groups, and one add for a bias
        per_output = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        return output.numel() * per_output + (output.numel() if layer.bias is not None else 0)
    if isinstance(layer, nn.Linear):
        return output.numel() * layer.in_features
    if isinstance(layer, nn.BatchNorm2d):
        return x.numel() * (2 if layer.affine else 1)
    if isinstance(layer, nn.ReLU):
        return output.numel()
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return x.numel()
    return 0


def layer_macs(modules: Iterable[nn.Module], run: Callable[[], object]) -> int:
    """MACs of the layers in ``modules`` (and their submodules) over ``run()``, without
    gradients, as mmcv's ``get_model_complexity_info`` counts them in the authors' dense-task
    figures: convolutions ``k*k*C_in/groups`` per output element plus one add per element for
    a bias, transposed convolutions per input element, linears, BatchNorm 2 per element (1
    without affine), ReLU modules and adaptive average pooling 1 per element. Functional calls
    (``F.relu``, ``F.interpolate``) are not seen, as mmcv's hooks do not see them. ``run`` may
    work on meta tensors: only shapes are read."""
    total = 0

    def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += _mmcv_layer_macs(layer, args[0], output)

    handles = [layer.register_forward_hook(hook) for module in modules for layer in module.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return total


def _fused_linear_flops(x_shape: torch.Size, *args: Any, out_shape: torch.Size, **kwargs: Any) -> int:
    """``(..., K) -> (..., N)``: ``2 * rows * K * N`` (the weight may be in a packed layout)."""
    return 2 * prod(out_shape[:-1]) * x_shape[-1] * out_shape[-1]


def _cpu_attention_flops(
    q_shape: torch.Size, k_shape: torch.Size, v_shape: torch.Size, *args: Any, **kwargs: Any
) -> int:
    """``(B, heads, N, d)`` q, k, v: ``q @ k^T`` and ``attn @ v``, ``2 * B * heads * Nq * Nk * d`` each."""
    batch_heads = prod(q_shape[:-2])
    return 2 * batch_heads * q_shape[-2] * k_shape[-2] * (q_shape[-1] + v_shape[-1])


# FLOP formulas (arguments' shapes -> FLOPs) for the ops PyTorch's counter does not know.
EXTRA_MAC_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    EXTRA_MAC_FORMULAS[torch.ops.mkldnn._linear_pointwise] = _fused_linear_flops


@torch.no_grad()
def traced_macs(model: nn.Module, height: int = 224, width: int = 224) -> int:
    """MACs actually executed for one image (padding included), from PyTorch's counter.

    Counts every matmul, convolution and attention product the eval forward pass runs,
    whichever kernels it takes (:data:`EXTRA_MAC_FORMULAS`); element-wise work (norms,
    softmax, GELU, the pooling) is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.zeros(1, getattr(model, "in_chans", 3), height, width, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_MAC_FORMULAS)
    with eval_mode(model), counter:
        model(x)
    return counter.get_total_flops() // 2

