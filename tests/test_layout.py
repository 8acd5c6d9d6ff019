"""NCHW copies and concatenations of channels-last maps, strip by strip (models/layout.py)."""

import pytest
import torch

from crossformer.models import layout


@pytest.fixture
def small_strips(monkeypatch):
    """Strip copies from 1000 elements on, 500 elements a strip; records each strip's rows."""
    monkeypatch.setattr(layout, "STRIP_COPY_ELEMENTS", 1000)
    monkeypatch.setattr(layout, "STRIP_ELEMENTS", 500)
    strips = []
    original = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda out, x: strips.append(tuple(out.shape)) or original(out, x))
    return strips


def _channels_last(*shape: int) -> torch.Tensor:
    return torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)


@pytest.mark.parametrize("shape,rows", [((2, 8, 67, 9), [3] * 22 + [1]), ((1, 3, 5, 400), [1] * 5)])
def test_nchw_contiguous_copies_large_maps_in_strips(small_strips, shape, rows):
    """Strips of ~500 elements (the last one short): the values, the NCHW layout and the
    gradient are those of ``.contiguous()``."""
    x = _channels_last(*shape)
    out = layout.nchw_contiguous(x)
    assert out.is_contiguous() and torch.equal(out, x.detach())
    assert [s[2] for s in small_strips] == rows
    weight = torch.randn(shape)
    (out * weight).sum().backward()
    assert torch.equal(x.grad, weight)


def test_small_contiguous_and_traced_maps_take_plain_copies(small_strips, monkeypatch):
    small = torch.randn(1, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    assert layout.nchw_contiguous(small).is_contiguous() and not small_strips
    plain = torch.randn(2, 8, 67, 9)
    assert layout.nchw_contiguous(plain) is plain
    monkeypatch.setattr(layout, "capturing_graph", lambda: True)  # a recorded graph holds plain ops
    large = _channels_last(2, 8, 67, 9)
    assert torch.equal(layout.nchw_contiguous(large), large) and not small_strips


def test_nchw_cat_of_mixed_layouts_equals_torch_cat(small_strips):
    """Channels-last maps go in strips, NCHW ones in one copy each; the gradient splits back."""
    maps = [_channels_last(2, 8, 67, 9), torch.randn(2, 4, 67, 9, requires_grad=True), _channels_last(2, 2, 67, 9)]
    out = layout.nchw_cat(maps)
    assert out.is_contiguous() and torch.equal(out, torch.cat([m.detach() for m in maps], dim=1))
    assert [s[1:3] for s in small_strips] == [(8, 3)] * 22 + [(8, 1), (4, 67)] + [(2, 13)] * 5 + [(2, 2)]
    weight = torch.randn(out.shape)
    (out * weight).sum().backward()
    for m, w in zip(maps, weight.split([8, 4, 2], dim=1)):
        assert torch.equal(m.grad, w)


def test_nchw_cat_leaves_mixed_dtypes_to_torch_cat(small_strips):
    maps = [_channels_last(2, 8, 67, 9).detach(), torch.randn(2, 4, 67, 9, dtype=torch.float64)]
    out = layout.nchw_cat(maps)
    assert out.dtype == torch.float64 and torch.equal(out, torch.cat(maps, dim=1)) and not small_strips
