"""Bilinear resizes of class logits as matrix products, a band of output rows at a time.

A bilinear resize (``align_corners=False``, no antialiasing) is separable: along each axis
every output is a weighted sum of two inputs, so resizing a ``(C, h, w)`` map to ``H x W`` is
``rows @ map @ cols^T`` with ``rows = bilinear_matrix(H, h)`` and ``cols = bilinear_matrix(W,
w)``, and two resizes in a row are one, by the product of their matrices. Computed for a few
output rows at a time, the full-size map (150 classes at 512x683: 210 MB) never exists: what
follows the resize (a softmax, a loss) reads each band while it is in cache. Used by the
training loss (:mod:`.loss`) and by test-time inference (:mod:`.inference`) on the CPU.
"""

from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["BAND_ELEMENTS", "bilinear_matrix", "row_bands"]

# Elements of one band of resized logits: 4 MB (1M float32), so that a band's resize and
# what follows it stay in cache.
BAND_ELEMENTS = 1 << 20


def bilinear_matrix(out_size: int, in_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(out_size, in_size)``: row ``i`` holds the weights ``F.interpolate(mode="bilinear",
    align_corners=False)`` gives output position ``i`` along one axis (no antialiasing)."""
    scale = in_size / out_size
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = (source - low).clamp(max=1).float()
    matrix = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.to(device)


def row_bands(rows: torch.Tensor, step: int) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """For an interpolation matrix ``rows`` ``(H, h)``, yield ``(out_rows, in_rows, weights)``
    for every ``step`` output rows: their slice, the slice of input rows they read and their
    weights over those, ``(band rows, used input rows)``."""
    for start in range(0, rows.shape[0], step):
        band = rows[start:start + step]
        used = band.abs().sum(0).nonzero()
        first, last = int(used[0]), int(used[-1]) + 1
        yield slice(start, start + step), slice(first, last), band[:, first:last]
