"""Segmentors: parameter counts of every authors' config, FLOPs, shapes, losses, weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REFERENCE_CONFIGS

import crossformer
from crossformer.models import CheckpointError, CrossFormer, count_params, layer_macs
from crossformer.models.dense import build_dense_backbone
from crossformer.segmentation import (
    SEGMENTOR_KINDS,
    FCNHead,
    FPNHead,
    Segmentor,
    UPerHead,
    build_segmentor,
    read_segmentation_meta,
    segmentor_flops,
)
from crossformer.segmentation.flops import head_macs
from crossformer.segmentation.heads import fpn_neck

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def tiny_segmentor(kind: str, num_classes: int = 4, embed_dim: int = 16) -> Segmentor:
    """The authors' segmentor structure with narrow heads, for fast tests of the wiring."""
    backbone = build_dense_backbone("crossformer_tiny", **{**TINY, "embed_dim": embed_dim})
    if kind == "fpn":
        head = FPNHead([16] * 4, backbone.strides, 8, num_classes)
        return Segmentor(kind, backbone, head, neck=fpn_neck(backbone.channels, 16))
    head = UPerHead(backbone.channels, 16, num_classes)
    return Segmentor(kind, backbone, head, auxiliary_head=FCNHead(backbone.channels[2], 8, num_classes))

# The authors' tables (ADE20K, 150 classes): params in millions, and GFLOPs at 512x2048.
AUTHORS_PARAMS = {
    ("fpn", "crossformer_small"): 34.3,
    ("fpn", "crossformer_base"): 55.6,
    ("fpn", "crossformer_large"): 95.4,
    ("fpn", "crossformer_pp_small"): 27.1,
    ("fpn", "crossformer_pp_base"): 55.6,
    ("upernet", "crossformer_small"): 62.3,
    ("upernet", "crossformer_base"): 83.6,
    ("upernet", "crossformer_large"): 125.5,
    ("upernet", "crossformer_pp_small"): 53.1,
    ("upernet", "crossformer_pp_base"): 83.7,
}
AUTHORS_GFLOPS = {("fpn", "crossformer_small"): 209.8, ("upernet", "crossformer_small"): 979.5}


@pytest.mark.parametrize(("kind", "backbone"), list(AUTHORS_PARAMS))
def test_parameter_counts_match_authors(kind: str, backbone: str) -> None:
    with torch.device("meta"):
        segmentor = build_segmentor(kind, backbone)
    assert count_params(segmentor) / 1e6 == pytest.approx(AUTHORS_PARAMS[(kind, backbone)], rel=0.005)


def test_crossformer_pp_uses_the_authors_segmentation_grouping() -> None:
    with torch.device("meta"):
        segmentor = build_segmentor("fpn", "crossformer_pp_small")
    blocks = [stage.blocks[0] for stage in segmentor.backbone.model.layers]
    assert [b.group_size for b in blocks] == [7, 7, 7, 7]
    assert [b.interval for b in blocks] == [8, 4, 2, 1]
    assert segmentor.backbone.model.layers[0].blocks[1].long_distance == "fixed_group"


@pytest.mark.parametrize(("kind", "backbone"), list(AUTHORS_GFLOPS))
def test_flops_near_the_authors(kind: str, backbone: str) -> None:
    with torch.device("meta"):
        segmentor = build_segmentor(kind, backbone)
    flops = segmentor_flops(segmentor, 512, 2048)
    assert flops["params"] == count_params(segmentor)
    assert flops["macs"] == flops["backbone_macs"] + flops["head_macs"]
    # Executed backbone MACs (v1 long-distance groups of (H/I) x (W/I) tokens) + mmcv-style heads.
    assert flops["macs"] / 1e9 == pytest.approx(AUTHORS_GFLOPS[(kind, backbone)], rel=0.05)
    assert flops["backbone_macs_analytic"] < flops["backbone_macs"]


def test_head_macs_by_hand() -> None:
    """Semantic FPN's neck and head on a 64x64 image, counted layer by layer as mmcv does."""
    segmentor = build_segmentor("fpn", "crossformer_tiny", num_classes=3, backbone_kwargs=TINY)
    channels = [16, 32, 64, 128]
    sizes = [16, 8, 4, 2]  # map side at strides 4..32
    expected = 0
    for c, s in zip(channels, sizes, strict=True):
        expected += s * s * (c * 256 + 256)  # lateral 1x1 conv with bias
        expected += s * s * (256 * 9 * 256 + 256)  # output 3x3 conv with bias
    unit = lambda c_in, s: s * s * (c_in * 9 * 128) + 2 * s * s * 128 + s * s * 128  # conv, BN, ReLU  # noqa: E731
    expected += unit(256, 16)  # stride 4: one unit
    expected += unit(256, 8)  # stride 8: unit, upsample
    expected += unit(256, 4) + unit(128, 8)  # stride 16: two units
    expected += unit(256, 2) + unit(128, 4) + unit(128, 8)  # stride 32: three units
    expected += 16 * 16 * (128 * 3 + 3)  # conv_seg
    assert head_macs(segmentor, [(1, c, s, s) for c, s in zip(channels, sizes, strict=True)]) == expected


def test_pyramid_pooling_is_counted_by_its_input_as_mmcv_does() -> None:
    """UPerNet's pooling module (no layer of the FPN head above): mmcv counts one add per input element."""
    x = torch.zeros(1, 8, 12, 20)
    for pool in (nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(6)):
        assert layer_macs([pool], lambda: pool(x)) == 8 * 12 * 20


@pytest.mark.parametrize("kind", SEGMENTOR_KINDS)
def test_shapes_any_size(kind: str) -> None:
    segmentor = tiny_segmentor(kind, num_classes=5).eval()
    assert (segmentor.kind, segmentor.num_classes, segmentor.align_corners) == (kind, 5, False)
    images = torch.randn(2, 3, 70, 45)
    with torch.no_grad():
        logits = segmentor(images)
        assert logits.shape == (2, 5, 17, 11)
        resized = segmentor.predict_logits(images, (70, 45))
    expected = F.interpolate(logits, size=(70, 45), mode="bilinear", align_corners=False)
    assert torch.equal(resized, expected)


@pytest.mark.parametrize("kind", SEGMENTOR_KINDS)
def test_losses_and_training_step(kind: str) -> None:
    segmentor = tiny_segmentor(kind)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 4, (2, 64, 64))
    labels[:, :10] = 255

    # In eval mode (no dropout, BN running stats) the loss is a plain function of the logits.
    segmentor.eval()
    with torch.no_grad():
        losses = segmentor.losses(images, labels)
        log_probs = F.interpolate(segmentor(images), size=(64, 64), mode="bilinear").log_softmax(1)
    valid = labels != 255
    picked = log_probs.gather(1, labels.clamp(max=3)[:, None])[:, 0]
    # mmseg 0.29's default (avg_non_ignore=False): sum over valid pixels / all pixels.
    assert losses["loss_decode"].item() == pytest.approx(-(picked * valid).sum().item() / labels.numel(), rel=1e-5)
    assert ("loss_aux" in losses) == (kind == "upernet")

    with pytest.raises(crossformer.errors.UserInputError, match=r"outside 0\.\.3 and 255 \(ignore\), e\.g\. 7"):
        segmentor.losses(images, torch.where(labels == 2, 7, labels))
    # float labels were truncated (3.7 trained as 3), a float mask in 0..1 as class 0
    with pytest.raises(crossformer.errors.UserInputError, match=r"labels must be integer class indices .* torch\.float32$"):
        segmentor.losses(images, labels.float() + 0.7)

    segmentor.train()
    losses = segmentor.losses(images, labels)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    parts = ["backbone", "decode_head"] + (["auxiliary_head"] if kind == "upernet" else ["neck"])
    for part in parts:
        grads = [p.grad for p in getattr(segmentor, part).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert any(g.abs().sum() > 0 for g in grads), part
    assert segmentor.decode_head.conv_seg.weight.grad.abs().sum() > 0


def test_upernet_weights_the_auxiliary_head_on_the_stride_16_map_by_0_4() -> None:
    """The authors' UPerNet configs: an FCN head on the third backbone map, its loss (the decode
    head's rule) weighted 0.4."""
    torch.manual_seed(0)
    segmentor = build_segmentor("upernet", num_classes=4, channels=16, aux_channels=8, backbone_kwargs=TINY).eval()
    images = torch.randn(1, 3, 64, 64)
    labels = torch.randint(0, 4, (1, 64, 64))
    labels[:, :10] = 255
    with torch.no_grad():
        losses = segmentor.losses(images, labels)
        aux = segmentor.auxiliary_head(segmentor.backbone(images)[2])
    log_probs = F.interpolate(aux, size=(64, 64), mode="bilinear").log_softmax(1)
    picked = log_probs.gather(1, labels.clamp(max=3)[:, None])[:, 0]
    expected = -(picked * (labels != 255)).sum().item() / labels.numel()
    assert losses["loss_aux"].item() == pytest.approx(0.4 * expected, rel=1e-5)


def test_our_checkpoints_round_trip_and_refusals(tmp_path: Path) -> None:
    upernet = tiny_segmentor("upernet").eval()
    path = tmp_path / "ours.pth"
    torch.save({"model": upernet.state_dict(), "meta": {"classes": ["a", "b", "c", "d"]}}, path)
    other = tiny_segmentor("upernet").eval()
    crossformer.load_checkpoint(other, path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(other(images), upernet(images))
    assert read_segmentation_meta(torch.load(path, weights_only=True)) == dict(classes=("a", "b", "c", "d"), palette=None)
    # Converted to safetensors, the whole segmentor keeps its keys (backbone. beside the heads).
    converted = crossformer.convert_to_safetensors(path, tmp_path / "ours.safetensors")
    again = tiny_segmentor("upernet").eval()
    crossformer.load_checkpoint(again, converted)
    with torch.no_grad():
        assert torch.equal(again(images), upernet(images))

    fpn = tiny_segmentor("fpn")
    with pytest.raises(CheckpointError, match=r"holds a UPerNet segmentor, this model is Semantic FPN"):
        crossformer.load_checkpoint(fpn, path)
    with pytest.raises(CheckpointError, match=r"predicts 4 classes, this model 150"):
        crossformer.load_checkpoint(tiny_segmentor("upernet", num_classes=150), path)
    wider = tiny_segmentor("upernet", embed_dim=32)
    with pytest.raises(CheckpointError, match=r"does not fit this segmentor(.|\n)*wrong shape: backbone\.model"):
        crossformer.load_checkpoint(wider, path)

    classifier = tmp_path / "imagenet.pth"
    torch.save({"model": CrossFormer(**TINY, num_classes=10).state_dict()}, classifier)
    with pytest.raises(CheckpointError, match=r"backbone \(ImageNet\) checkpoint .*\(model\.pretrained, pretrained_backbone\)"):
        crossformer.load_checkpoint(fpn, classifier)


def test_pretrained_backbone_loads_official_classification_weights(reference_dir: Path) -> None:
    settings = {k: v for k, v in REFERENCE_CONFIGS["v1"].items() if k != "num_classes"}
    segmentor = build_segmentor(
        "fpn", "crossformer_tiny", backbone_kwargs=settings, pretrained_backbone=str(reference_dir / "v1_cls.pth")
    )
    classifier = CrossFormer(**REFERENCE_CONFIGS["v1"])
    crossformer.load_checkpoint(classifier, reference_dir / "v1_cls.pth")
    backbone = segmentor.backbone.model.state_dict()
    assert backbone and all(torch.equal(v, classifier.state_dict()[k]) for k, v in backbone.items())


def test_pretrained_weights_of_other_settings_name_the_backbone_kwargs_to_set(reference_dir: Path) -> None:
    # segmentation and detection listed the differing keys over three lines (2 KB) with no hint,
    # where classification said which model.kwargs setting the file's weights show
    from crossformer.detection import build_detector

    settings = {k: v for k, v in REFERENCE_CONFIGS["v1"].items() if k not in ("num_classes", "depths")}
    checkpoint = str(reference_dir / "v1_cls.pth")  # depths 2, 2, 4, 2
    for build in (lambda: build_segmentor("upernet", "crossformer_tiny", 3, backbone_kwargs=settings,
                                          pretrained_backbone=checkpoint),
                  lambda: build_detector("retinanet", num_classes=3, backbone_kwargs=settings, pretrained_backbone=checkpoint)):
        with pytest.raises(CheckpointError) as misfit:
            build()
        message = str(misfit.value)
        assert "\n" not in message and message.startswith(f"{checkpoint} does not fit this model (missing: "), message
        assert message.endswith("its weights show other settings: set model.backbone_kwargs.depths=[2,2,4,2]"), message


def test_meta_of_mmseg_checkpoints() -> None:
    assert read_segmentation_meta({"meta": {"CLASSES": ("wall", "sky"), "PALETTE": [[1, 2, 3], [4, 5, 6]]}}) == dict(
        classes=("wall", "sky"), palette=((1, 2, 3), (4, 5, 6))
    )
    v1 = {"meta": {"dataset_meta": {"classes": ["wall"], "palette": [(9, 9, 9)]}}}
    assert read_segmentation_meta(v1) == dict(classes=("wall",), palette=((9, 9, 9),))
    assert read_segmentation_meta({"state_dict": {}}) == dict(classes=None, palette=None)


def test_bad_arguments() -> None:
    with pytest.raises(crossformer.errors.UserInputError, match="unknown segmentor kind 'pspnet'"):
        build_segmentor("pspnet")
    with pytest.raises(crossformer.errors.UserInputError, match="unknown backbone 'crossformer_tiiny'"):
        build_segmentor("fpn", "crossformer_tiiny")


def test_the_exportable_pyramid_pooling_equals_adaptive_average_pooling() -> None:
    """While exporting, UPerNet's pooling is running sums read at bin edges (symbolic sizes);
    it must give what ``adaptive_avg_pool2d`` gives, bins larger than the map included."""
    from crossformer.segmentation.heads import _bin_means

    for height, width in ((1, 1), (2, 3), (7, 10), (13, 17), (16, 64)):
        x = torch.randn(2, 4, height, width)
        for bins in (1, 2, 3, 6):
            pooled = _bin_means(_bin_means(x, bins, -2), bins, -1)
            assert torch.allclose(pooled, torch.nn.functional.adaptive_avg_pool2d(x, bins), atol=1e-6, rtol=0)
