"""Spec section 5 rules for choosing groups, checked on the layout itself, and the export
path's gather-based grouping checked against the eager views."""

from __future__ import annotations

import pytest
import torch

from crossformer.models import CrossFormer, GroupLayout, group_layout
from crossformer.models.grouping import groups_tile_map, partition_groups, ungrouped_view

from conftest import REFERENCE_CONFIGS


@pytest.mark.parametrize(
    "size, group, interval, lda, semantics, expected",
    [
        # SDA: pad to multiples of G
        ((56, 56), 7, 8, False, "fixed_interval", GroupLayout(7, 7, 1, 56, 56)),
        ((25, 15), 7, 8, False, "fixed_interval", GroupLayout(7, 7, 1, 28, 21)),
        # CrossFormer LDA: pad to multiples of I, groups of (Hp/I) x (Wp/I), not square
        ((56, 56), 7, 8, True, "fixed_interval", GroupLayout(7, 7, 8, 56, 56)),
        ((25, 15), 4, 4, True, "fixed_interval", GroupLayout(7, 4, 4, 28, 16)),
        # CrossFormer++ LDA: pad to multiples of G*I, square groups
        ((56, 56), 4, 4, True, "fixed_group", GroupLayout(4, 4, 4, 64, 64)),
        ((25, 15), 4, 2, True, "fixed_group", GroupLayout(4, 4, 2, 32, 16)),
        # small maps (min side <= G): one SDA group size, min side (v1) or max side (++)
        ((7, 7), 7, 1, False, "fixed_interval", GroupLayout(7, 7, 1, 7, 7)),
        ((14, 14), 14, 1, True, "fixed_group", GroupLayout(14, 14, 1, 14, 14)),
        ((7, 10), 7, 2, True, "fixed_interval", GroupLayout(7, 7, 1, 7, 14)),
        ((7, 10), 7, 2, True, "fixed_group", GroupLayout(10, 10, 1, 10, 10)),
        ((1, 3), 7, 1, False, "fixed_interval", GroupLayout(1, 1, 1, 1, 3)),
        ((1, 3), 7, 1, False, "fixed_group", GroupLayout(3, 3, 1, 3, 3)),
    ],
)
def test_layout_rules(size, group, interval, lda, semantics, expected) -> None:
    layout = group_layout(*size, group, interval, lda, semantics)
    assert tuple(layout) == tuple(expected)
    assert layout.num_groups * layout.tokens_per_group == layout.padded_h * layout.padded_w


@pytest.mark.parametrize("semantics", ["fixed_interval", "fixed_group"])
def test_official_224_maps_need_no_padding_in_v1_settings(semantics: str) -> None:
    # v1 settings at 224: every stage map is a multiple of G*I, so both semantics coincide.
    for size, interval in ((56, 8), (28, 4), (14, 2)):
        layout = group_layout(size, size, 7, interval, True, semantics)
        assert tuple(layout) == (7, 7, interval, size, size)


@pytest.mark.parametrize("semantics", ["fixed_interval", "fixed_group"])
@pytest.mark.parametrize("input_size", [224, 448, 672])
def test_a_map_wide_interval_is_the_2021_classifiers_long_distance_grouping(input_size: int, semantics: str) -> None:
    """README: the authors' 2021 ImageNet classifier spaces its G x G long-distance groups
    H / G apart (its reshape to (B, G, H/G, G, W/G, C), groups indexed by the last of each
    pair), which either semantics gives with interval S // 28, S // 56, ... at S x S."""
    group = 7
    for stride, interval in ((4, input_size // 28), (8, input_size // 56), (16, input_size // 112)):
        side = input_size // stride
        x = torch.randn(2, side, side, 3)
        layout = group_layout(side, side, group, interval, True, semantics)
        assert (layout.padded_h, layout.group_h, layout.interval) == (side, group, side // group)
        authors = (x.reshape(2, group, side // group, group, side // group, 3).permute(0, 2, 4, 1, 3, 5)
                   .reshape(-1, group * group, 3))
        assert torch.equal(partition_groups(x, layout), authors)


@pytest.mark.parametrize(
    "size, group, interval, lda, semantics",
    [((56, 56), 7, 8, True, "fixed_interval"), ((28, 21), 7, 1, False, "fixed_interval"),
     ((32, 16), 4, 2, True, "fixed_group"), ((14, 14), 7, 2, True, "fixed_interval"), ((3, 6), 7, 1, False, "fixed_interval")],
)
def test_group_order_views_pair_each_pixel_with_its_token(size, group, interval, lda, semantics) -> None:
    layout = group_layout(*size, group, interval, lda, semantics)
    x = torch.randn(2, *size, 6)
    assert groups_tile_map(x, layout)
    in_map, in_groups = ungrouped_view(x, partition_groups(x, layout), layout)
    assert in_map.shape == in_groups.shape and in_map.data_ptr() == x.data_ptr()
    assert torch.equal(in_map, in_groups)
    assert torch.equal((in_map + 2 * in_groups).view(x.shape), 3 * x)  # written in map order


def test_padded_layouts_and_other_devices_keep_the_map_order_path() -> None:
    layout = group_layout(25, 15, 7, 8, False, "fixed_interval")
    assert not groups_tile_map(torch.zeros(1, 25, 15, 4), layout)
    unpadded = group_layout(28, 21, 7, 1, False, "fixed_interval")
    assert groups_tile_map(torch.zeros(1, 28, 21, 4), unpadded)
    assert not groups_tile_map(torch.zeros(1, 28, 21, 4, device="meta"), unpadded)  # stands for a GPU


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_export_grouping_path_computes_the_eager_outputs(name: str, monkeypatch) -> None:
    """The gathers, always-built padding mask and crop-by-gather taken while exporting give
    the eager views' outputs, in eager mode: the ONNX tests check the same only in minutes.
    93x77 pads the SDA and LDA groups of both semantics, with several CrossFormer++ LDA
    regions each way, and has small-map stages; 64x64 pads only v1's SDA (the other blocks
    get an all-False mask); a batch of two checks the batch axis of the gathers."""
    model = CrossFormer(**REFERENCE_CONFIGS[name]).eval()
    for height, width in ((93, 77), (64, 64)):
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            eager = model.forward_features(x)
            with monkeypatch.context() as exporting:
                exporting.setattr(torch.compiler, "is_exporting", lambda: True)
                export_path = model.forward_features(x)
        torch.testing.assert_close(export_path, eager, rtol=0, atol=1e-5)
