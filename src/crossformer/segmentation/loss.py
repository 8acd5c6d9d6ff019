"""Cross-entropy of logits resized to the labels' size, a band of rows at a time.

mmseg's loss resizes the decode head's logits (stride 4) bilinearly to the label size and
takes the cross-entropy there: at 512x512 with 150 classes that makes full-size maps of
157 MB an image (the resized logits, their log-softmax, and in backward their gradients),
each written once and read once. On the CPU those fresh maps cost more than their
arithmetic: in a profiled UPerNet-S training step at batch 2 (20.4 s), ``log_softmax`` and
its backward took 4.0 s, where resize and cross-entropy, forward and backward, take 0.7 s
alone on memory already in use.

:func:`resized_cross_entropy` computes the same sum a band of output rows at a time:
resize the band (as two small interpolation products), log-softmax it, pick the labels'
terms, and keep nothing but the low-resolution logits for backward, which recomputes each
band's softmax. Its values and gradients equal the plain path's to float32 rounding
(tests). A UPerNet-S training step ran 1.25x faster and peaked 0.75 GB lower on 2 cores
(benchmarks/RESULTS.md, row 76).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.layers import without_autocast
from .bands import BAND_ELEMENTS, bilinear_matrix, row_bands

__all__ = ["resized_cross_entropy"]


def _bands(logits: torch.Tensor, height: int, width: int):
    """:func:`.bands.row_bands` of the resize of ``logits`` ``(B, C, h, w)`` to ``height``
    rows, in bands of :data:`.bands.BAND_ELEMENTS` resized logits."""
    batch, classes = logits.shape[:2]
    step = max(1, BAND_ELEMENTS // max(1, batch * classes * width))
    return row_bands(bilinear_matrix(height, logits.shape[2], logits.device), step)


def _resized_band(logits: torch.Tensor, in_rows: slice, rows: torch.Tensor, cols_t: torch.Tensor) -> torch.Tensor:
    """One band of the resized logits: ``(B, C, band rows, W)``."""
    return rows @ logits[:, :, in_rows] @ cols_t


class _ResizedCrossEntropy(torch.autograd.Function):
    @staticmethod
    @torch.autocast("cpu", enabled=False)  # float32 throughout, as the plain path's `.float()`
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        height, width = labels.shape[1:]
        cols_t = bilinear_matrix(width, logits.shape[3], logits.device).t()
        total = logits.new_zeros((), dtype=torch.float64)
        for out_rows, in_rows, weights in _bands(logits, height, width):
            band = _resized_band(logits, in_rows, weights, cols_t)
            total += F.cross_entropy(band, labels[:, out_rows], ignore_index=ignore_index, reduction="sum").double()
        ctx.save_for_backward(logits, labels)
        ctx.ignore_index = ignore_index
        return total.to(logits.dtype)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_total: torch.Tensor):
        logits, labels = ctx.saved_tensors
        height, width = labels.shape[1:]
        cols = bilinear_matrix(width, logits.shape[3], logits.device)
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        for out_rows, in_rows, weights in _bands(logits, height, width):
            band = _resized_band(logits, in_rows, weights, cols.t())
            target = labels[:, out_rows]
            valid = target != ctx.ignore_index
            # d(-log softmax(z)[y]) / dz = softmax(z) - onehot(y), zero where ignored
            band_grad = band.softmax(1)
            band_grad.scatter_add_(1, target.where(valid, 0).unsqueeze(1), -valid.unsqueeze(1).to(band.dtype))
            band_grad.mul_(valid.unsqueeze(1) * grad_total)
            grad[:, :, in_rows] += weights.t() @ band_grad @ cols
        return grad, None, None


def resized_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """``F.cross_entropy(resize(logits, labels.shape[1:]), labels, ignore_index=ignore_index,
    reduction="sum")`` with the bilinear (``align_corners=False``) resize, computed a band of
    rows at a time (module docstring).

    Shapes: ``logits`` ``(B, C, h, w)`` float, ``labels`` ``(B, H, W)`` int64 -> a scalar.
    """
    return _ResizedCrossEntropy.apply(logits, labels, ignore_index)
