"""Issue 16, item 9: the traced MAC count sees every path the forward pass takes, and agrees
with the official analytic count where no padding runs (spec section 7: within about 2%)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from crossformer.cli import main
from crossformer.models import CrossFormer, analytic_macs, dense_backbone_macs, layers, traced_macs
from crossformer.models.dense import authors_dense_settings, build_dense_backbone
from crossformer.models.flops import EXTRA_MAC_FORMULAS

from cli_errors import one_error_line

# The official group sizes and intervals at a small width: at 224 no stage pads.
V1 = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), group_size=(7, 7, 7, 7),
          interval=(8, 4, 2, 1), use_acl=False, long_distance="fixed_interval")
PP = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), group_size=(4, 4, 14, 7),
          interval=(4, 2, 1, 1), use_acl=True, long_distance="fixed_group")


def _plain_path_macs(model: CrossFormer, size: int) -> int:
    """MACs with autograd on: plain ``F.linear``, no caches, the autograd attention path."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_MAC_FORMULAS)
    with counter, torch.enable_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("config", [V1, PP], ids=["v1", "pp"])
def test_traced_agrees_with_analytic_and_with_the_plain_path(config):
    model = CrossFormer(**config, num_classes=1000).eval()
    traced, analytic = traced_macs(model, 224, 224), analytic_macs(model, 224, 224)
    # element-wise work (norms, pooling) is in the analytic count only: a fraction of a percent
    assert 0.98 * analytic <= traced <= 1.02 * analytic, (traced, analytic)
    # the inference fast paths (oneDNN linear, cached bias, CPU flash attention) count the same
    assert traced_macs(model, 112, 112) == _plain_path_macs(model, 112)


def test_traced_counts_the_padding_the_analytic_formula_leaves_out():
    model = CrossFormer(**V1, num_classes=1000).eval()
    # 100: stage maps 25, 12, 6, 3; attention runs on groups padded to 7x7, which the analytic
    # count ignores (at 224, with no padding, the traced count is the smaller)
    assert traced_macs(model, 100, 100) > analytic_macs(model, 100, 100)


@pytest.mark.parametrize("name", ["crossformer_small", "crossformer_pp_small"])
def test_the_dense_tasks_backbone_count_is_the_executed_one_within_a_quarter_percent(name):
    """Detection and segmentation price the backbone with one function: the formula on the real
    groups, which is what executes but for norms (counted) and padding (not)."""
    with torch.device("meta"):
        backbone = build_dense_backbone(name, **authors_dense_settings(name))
    for height, width in ((800, 1280), (512, 2048), (500, 700)):
        macs = dense_backbone_macs(backbone, height, width)
        assert abs(macs / traced_macs(backbone, height, width) - 1) < 0.0025, (height, width)
        formula = dense_backbone_macs(backbone, height, width, real_groups=False)
        if name == "crossformer_small":  # v1 long-distance groups of (h/I)x(w/I) tokens, not 7x7
            assert formula < 0.95 * macs
        else:  # CrossFormer++ groups are 7x7: only padding differs
            assert 0.98 * macs < formula < macs


def test_counting_leaves_a_training_model_training():
    model = CrossFormer(**V1, num_classes=10).train()
    traced_macs(model, 64, 64)
    assert model.training


@pytest.mark.skipif(layers._LINEAR_POINTWISE is None or layers._REORDER_LINEAR_WEIGHT is None,
                    reason="PyTorch built without oneDNN")
def test_the_fused_linear_is_counted_as_the_plain_one():
    # the model steps off its oneDNN linear under a counter, but a product called on it directly
    # (the benchmark's GEMM timings, a model of the user's) is priced as F.linear is: 2 * M * K * N
    x, weight = torch.randn(30, 40), torch.randn(24, 40)
    packed = layers._REORDER_LINEAR_WEIGHT(weight, 30)
    counts = []
    for product in (lambda: F.linear(x, weight), lambda: layers._LINEAR_POINTWISE(x, packed, None, "none", [], "none")):
        counter = FlopCounterMode(display=False, custom_mapping=EXTRA_MAC_FORMULAS)
        with counter:
            product()
        counts.append(counter.get_total_flops())
    assert counts == [2 * 30 * 40 * 24] * 2


def test_a_map_under_the_small_map_rule_is_priced_as_the_group_it_forms():
    # CrossFormer++ at 224x448: stage 3's 7x14 map has its short side at G = 7, so it forms one
    # 14x14 group (G' = max(h, w)), as it does with G = 14; the count must not price 7x7 groups
    def counted(last_group: int) -> int:
        return analytic_macs(CrossFormer(**dict(PP, group_size=(4, 4, 14, last_group)), num_classes=10), 224, 448)

    assert counted(7) == counted(14) != counted(6)


def test_cli_refuses_a_model_the_formula_does_not_describe(capsys):
    line = one_error_line(capsys, ["flops", "--model", "test_vit"])
    assert line.endswith("test_vit is not a CrossFormer: the analytic count applies to CrossFormer only"), line


@pytest.mark.slow
def test_cli_traced_crossformer_tiny(capsys):
    assert main(["flops", "--model", "crossformer_tiny", "--traced", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["macs"] == 2_858_292_352  # the official counter's 2.9G (spec section 7)
    assert abs(result["traced_macs"] / result["macs"] - 1) < 0.02, result


def test_the_dense_counters_refuse_small_images_and_the_other_tasks_model() -> None:
    # a 16x16 image was a ZeroDivisionError in the grouping, a segmentor given to detector_flops an
    # AttributeError from inside torchvision
    from crossformer.detection import build_detector
    from crossformer.detection.flops import detector_flops
    from crossformer.segmentation import build_segmentor
    from crossformer.segmentation.flops import segmentor_flops

    tiny = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    detector = build_detector("retinanet", num_classes=3, backbone_kwargs=tiny)
    segmentor = build_segmentor("fpn", "crossformer_tiny", 3, tiny, channels=8)
    for count, model in ((detector_flops, detector), (segmentor_flops, segmentor)):
        with pytest.raises(ValueError, match=r"^CrossFormer needs images of at least 32x32 pixels, got 16x24"):
            count(model, 16, 24)
    with pytest.raises(TypeError, match=r"^detector_flops counts a detector \(build_detector\), got Segmentor$"):
        detector_flops(segmentor, 64, 64)
    with pytest.raises(TypeError, match=r"^segmentor_flops counts a segmentor \(build_segmentor\), got RetinaNet$"):
        segmentor_flops(detector, 64, 64)
    with pytest.raises(ValueError, match="at least 32x32"):
        analytic_macs(CrossFormer(**tiny), 224, 31)
