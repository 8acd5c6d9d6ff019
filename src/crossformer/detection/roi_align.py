"""RoIAlign (``aligned=True``, adaptive sampling) on the CPU: a backward made of matrix products
and a forward on every thread.

torchvision's CPU backward adds one float at a time, on one thread: a Mask R-CNN training step
on the demo's small maps spent 30 % of its time there. Bilinear sampling on a regular grid is
separable, and so is torchvision's rule that drops samples more than a pixel outside the map,
so a roi's output is ``Wy @ map @ Wx^T`` per channel with ``(size, H)`` and ``(size, W)``
weight matrices, and the gradient of the map is ``Wy^T @ grad @ Wx``: two matrix products per
image. Their cost grows with the map's area, torchvision's with the rois' sample counts;
the products are used for maps of at most :data:`MATMUL_BACKWARD_PIXELS` pixels (measured:
benchmarks/RESULTS.md), torchvision's backward kernel above.

The forward pass is torchvision's kernel, which on the CPU also runs on one thread. It releases
the GIL, so the rois are split over ``torch.get_num_threads()`` Python threads: each chunk's
output is the kernel's own, so the values are unchanged.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.ops import roi_align as torchvision_roi_align

from ..models.layers import capturing_graph, without_autocast
from ..models.layout import nchw_contiguous

__all__ = ["roi_align", "MATMUL_BACKWARD_PIXELS", "THREADED_FORWARD_ROIS"]

MATMUL_BACKWARD_PIXELS = 128 * 128
# Fewer rois than this run on the calling thread: a chunk must outweigh a thread hand-off (~50 us).
THREADED_FORWARD_ROIS = 16

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _workers(count: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``count`` threads, made on first use."""
    with _pools_lock:
        if count not in _pools:
            _pools[count] = ThreadPoolExecutor(max_workers=count, thread_name_prefix="roi_align")
        return _pools[count]


# A forked child (a data-loader worker) inherits the pools but not their threads.
os.register_at_fork(after_in_child=_pools.clear)


def _kernel(features: torch.Tensor, rois: torch.Tensor, size: int, scale: float) -> torch.Tensor:
    """torchvision's forward kernel, outside autograd (grad mode is per thread)."""
    with torch.no_grad():
        return torch.ops.torchvision.roi_align(features, rois, scale, size, size, 0, True)


def _forward(features: torch.Tensor, rois: torch.Tensor, size: int, scale: float) -> torch.Tensor:
    """``(K, C, size, size)`` from torchvision's kernel, the rois split over torch's CPU threads."""
    if features.dtype != rois.dtype:
        # Under autocast (bf16 maps, float32 rois): what torchvision's autocast kernel does, done
        # here because autocast is per thread and the pool's threads run the plain CPU kernel.
        return _forward(features.float(), rois.float(), size, scale).to(features.dtype)
    threads = min(torch.get_num_threads(), rois.shape[0] // THREADED_FORWARD_ROIS)
    if threads < 2:
        return _kernel(features, rois, size, scale)
    features = nchw_contiguous(features)  # once: the kernel would copy a channels-last map in every chunk
    chunks = rois.tensor_split(threads)
    pool = _workers(threads - 1)
    pending = [pool.submit(_kernel, features, chunk, size, scale) for chunk in chunks[1:]]
    return torch.cat([_kernel(features, chunks[0], size, scale)] + [job.result() for job in pending])


def _axis_weights(start: torch.Tensor, length: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """``(K, size, extent)`` weights that average each bin's samples along one axis.

    ``start`` and ``length`` (``(K,)``, feature pixels) place each roi on the axis; a bin of
    length b holds ``ceil(b)`` samples at its ``(i + 0.5) / ceil(b)`` fractions, each spread over
    its two neighbouring pixels linearly, clamped at the borders and dropped more than a pixel
    outside, exactly as torchvision's ``aligned=True`` kernel does.
    """
    rois = start.shape[0]
    bin_length = length / size
    grid = torch.ceil(bin_length).long().clamp(min=0)
    samples = grid * size  # per roi
    roi = torch.repeat_interleave(torch.arange(rois, device=start.device), samples)
    local = torch.arange(roi.numel(), device=start.device) - (torch.cumsum(samples, 0) - samples)[roi]
    per_bin = grid[roi]
    bins, within = local // per_bin, local % per_bin
    dtype = start.dtype
    y = start[roi] + bins.to(dtype) * bin_length[roi] + (within.to(dtype) + 0.5) * bin_length[roi] / per_bin.to(dtype)
    inside = (y >= -1.0) & (y <= extent)
    y = y.clamp(min=0)
    low = y.floor().long()
    edge = low >= extent - 1
    low = torch.where(edge, extent - 1, low)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, 0.0, y - low.to(dtype))
    share = inside.to(dtype) / per_bin.to(dtype)
    weights = start.new_zeros(rois * size * extent)
    row = (roi * size + bins) * extent
    weights.index_put_((row + low,), (1.0 - frac) * share, accumulate=True)
    weights.index_put_((row + high,), frac * share, accumulate=True)
    return weights.view(rois, size, extent)


class _RoIAlign(torch.autograd.Function):
    """torchvision's forward on every CPU thread; the backward as matrix products on small maps
    (see the module), torchvision's kernel on large ones."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, rois: torch.Tensor, size: int, scale: float) -> torch.Tensor:
        ctx.save_for_backward(rois)
        ctx.shape, ctx.size, ctx.scale = features.shape, size, scale
        return _forward(features, rois, size, scale)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out: torch.Tensor):
        (rois,) = ctx.saved_tensors
        n, channels, height, width = ctx.shape
        size = ctx.size
        if height * width > MATMUL_BACKWARD_PIXELS:
            grad = torch.ops.torchvision._roi_align_backward(
                grad_out.contiguous(), rois, ctx.scale, size, size, n, channels, height, width, 0, True)
            return grad, None, None, None
        boxes = rois[:, 1:].to(grad_out.dtype) * ctx.scale - 0.5  # aligned: pixel centres at integers
        rows = _axis_weights(boxes[:, 1], boxes[:, 3] - boxes[:, 1], size, height)
        cols = _axis_weights(boxes[:, 0], boxes[:, 2] - boxes[:, 0], size, width)
        grad = grad_out.new_zeros(n, channels, height, width)
        image = rois[:, 0].long()
        for i in image.unique().tolist():
            index = (image == i).nonzero().squeeze(1)
            k = index.numel()
            # (C*size, size) @ (size, W) per roi, then one (H, k*size) @ (k*size, C*W) for the image.
            spread = torch.bmm(grad_out[index].reshape(k, channels * size, size), cols[index])
            spread = spread.view(k, channels, size, width).transpose(1, 2).reshape(k * size, channels * width)
            grad[i] = (rows[index].reshape(k * size, height).t() @ spread).view(height, channels, width).transpose(0, 1)
        return grad, None, None, None


def roi_align(features: torch.Tensor, rois: torch.Tensor, size: int, scale: float) -> torch.Tensor:
    """mmcv's ``RoIAlign(output_size=size, spatial_scale=scale, sampling_ratio=0, aligned=True)``.

    Args:
        features: ``(N, C, H, W)`` map.
        rois: ``(K, 5)`` rows ``(image index, x1, y1, x2, y2)`` in input pixels.
        size: output side, in bins.
        scale: the map's size over the input's (1 / its stride).
    Returns:
        ``(K, C, size, size)``.
    """
    if capturing_graph() or features.device.type != "cpu" or rois.shape[0] == 0:
        return torchvision_roi_align(features, rois, size, scale, 0, aligned=True)
    if features.requires_grad and torch.is_grad_enabled():
        return _RoIAlign.apply(features, rois, size, scale)
    return _forward(features, rois, size, scale)
