"""Detector construction, sizes, training losses, stage logic and the checkpoint port."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

import crossformer
from crossformer.detection import DETECTOR_KINDS, build_detector, detector_flops
from crossformer.detection.anchors import AnchorGenerator
from crossformer.detection.assign import MaxIoUAssigner, sample
from crossformer.detection.box_coding import WH_RATIO_CLIP, DeltaXYWHCoder
from crossformer.detection.cascade import STAGE_STDS, regress_by_class
from crossformer.detection.flops import count_layer_macs
from crossformer.detection.roi_heads import (
    MaskHead, RoIExtractor, Sampled, boxes_to_rois, mask_loss, mask_targets, paste_masks, rcnn_losses,
)
from crossformer.detection.retinanet import RetinaHead, RetinaSettings
from crossformer.detection.rpn import ProposalSettings, RPNHead, inside_image
from crossformer.errors import UserInputError
from crossformer.models import CheckpointError, count_params

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
H, W = 64, 96


def _tiny(kind: str, num_classes: int = 5):
    detector = build_detector(kind, num_classes=num_classes, backbone_kwargs=TINY)
    if kind != "retinanet":  # few proposals and samples keep the CPU test fast
        detector.train_proposals = ProposalSettings(200, 12, 0.7)
        detector.test_proposals = ProposalSettings(200, 8, 0.7)
        detector.roi_head.num_samples = 12
    return detector


def _batch():
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long)]
    targets = []
    for b, lab in zip(boxes, labels):
        masks = torch.zeros(len(b), H, W, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(b.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        targets.append(dict(boxes=b, labels=lab, masks=masks))
    metas = [dict(img_shape=(H, W), ori_shape=(H, W), scale_factor=(1.0, 1.0)),
             dict(img_shape=(48, 80), ori_shape=(24, 20), scale_factor=(4.0, 2.0))]
    return torch.randn(2, 3, H, W), metas, targets


# Sizes ------------------------------------------------------------------------------

# The authors' table (80 classes); RetinaNet ++S is ours (their 40.8M repeats the S row).
PARAMS_M = [
    ("retinanet", "crossformer_small", 40.8), ("retinanet", "crossformer_base", 62.1),
    ("retinanet", "crossformer_pp_small", 33.0), ("retinanet", "crossformer_pp_base", 62.2),
    ("mask_rcnn", "crossformer_small", 50.2), ("mask_rcnn", "crossformer_base", 71.5),
    ("mask_rcnn", "crossformer_pp_small", 43.0), ("mask_rcnn", "crossformer_pp_base", 71.5),
    ("cascade_mask_rcnn", "crossformer_small", 88.0),
]


@pytest.mark.parametrize("kind,backbone,millions", PARAMS_M)
def test_parameter_counts_match_the_authors_table(kind, backbone, millions):
    with torch.device("meta"):
        detector = build_detector(kind, backbone)
    assert abs(count_params(detector) / 1e6 - millions) <= 0.005 * millions


def test_small_parameter_counts_are_exact():
    # CrossFormer-S features (29,886,858) plus mmdet's heads as counted by mmdet itself.
    with torch.device("meta"):
        counts = {kind: count_params(build_detector(kind)) for kind in DETECTOR_KINDS}
    assert counts == {"retinanet": 29_886_858 + 10_938_100, "mask_rcnn": 29_886_858 + 20_273_904,
                      "cascade_mask_rcnn": 29_886_858 + 58_109_106}


def test_layer_macs_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    expected = (4 * 4 * 8 * (3 * 9) + 4 * 4 * 8) + (4 * 4 * 8 * 4 * 4 + 8 * 8 * 4) + 5 * 256
    assert count_layer_macs(net, torch.zeros(1, 3, 4, 4)) == expected


def test_flops_at_1280x800_against_the_authors():
    authors = {"retinanet": 282e9, "mask_rcnn": 301e9, "cascade_mask_rcnn": 769.7e9}
    with torch.device("meta"):
        detectors = {kind: build_detector(kind) for kind in DETECTOR_KINDS}
    flops = {kind: detector_flops(d, 800, 1280) for kind, d in detectors.items()}
    for kind, figure in authors.items():
        assert flops[kind]["params"] == count_params(detectors[kind])
        # Ours: 280.2G, 299.2G, 777.8G (docs/detection.md says where the last 1% comes from).
        assert abs(flops[kind]["macs"] - figure) <= 0.015 * figure, (kind, flops[kind]["macs"] / 1e9)
    # The cascade adds, per extra stage, a 4conv1fc box head on 1000 rois and a mask head on 100,
    # and its first stage replaces the 2fc head: by hand.
    conv = 49 * (256 * 9 * 256)
    box4 = 1000 * (4 * conv + 4 * 2 * 49 * 256 + 12544 * 1024 + 1024 * 81 + 1024 * 320)  # conv-BN (mmcv: 2 per element)
    box2 = 1000 * (12544 * 1024 + 1024 * 1024 + 1024 * 81 + 1024 * 320)
    mask = 100 * (196 * 4 * (256 * 9 * 256 + 256) + 196 * 256 * 4 * 256 + 784 * 256 + 784 * (256 * 80 + 80))
    assert flops["cascade_mask_rcnn"]["macs"] - flops["mask_rcnn"]["macs"] == 3 * box4 - box2 + 2 * mask


# Building blocks ----------------------------------------------------------------------

def test_coder_round_trip_and_clamp():
    coder = DeltaXYWHCoder((0.1, 0.1, 0.2, 0.2))
    priors = torch.tensor([[10.0, 10.0, 30.0, 50.0]])
    boxes = torch.tensor([[12.0, 5.0, 40.0, 45.0]])
    assert torch.allclose(coder.decode(priors, coder.encode(priors, boxes)), boxes, atol=1e-4)
    huge = coder.decode(priors, torch.tensor([[0.0, 0.0, 100.0, -100.0]]))
    w, h = huge[0, 2] - huge[0, 0], huge[0, 3] - huge[0, 1]
    assert math.isclose(w.item(), 20 * math.exp(0.2 * 100 if 0.2 * 100 < WH_RATIO_CLIP else WH_RATIO_CLIP), rel_tol=1e-5)
    assert math.isclose(h.item(), 40 * math.exp(-WH_RATIO_CLIP), rel_tol=1e-5)
    clipped = coder.decode(priors, torch.tensor([[0.0, 0.0, 5.0, 5.0]]), max_shape=(40, 35))
    assert clipped.min() >= 0 and clipped[0, 2] <= 35 and clipped[0, 3] <= 40


def test_assigner_by_hand():
    """RPN rule: >= 0.7 positive, < 0.3 negative, between ignored; each gt also takes the
    priors that overlap it best (if >= 0.3), even when they prefer another gt."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    priors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],   # IoU 1 with gt 0
        [0.0, 0.0, 10.0, 20.0],   # IoU 0.5 with gt 0 (its best): between -> but gt 0's best is prior 0
        [40.0, 40.0, 50.0, 50.0],  # no overlap: negative
        [20.0, 0.0, 30.0, 16.0],  # IoU 0.625 with gt 1, gt 1's best: positive by low-quality rule
        [0.0, 0.0, 10.0, 40.0],   # IoU 0.25 with gt 0: negative
    ])
    assigned = MaxIoUAssigner(0.7, 0.3, 0.3).assign(priors, gt)
    assert assigned.tolist() == [0, -2, -1, 1, -1]
    # Without the low-quality rule prior 3 is ignored; with min_pos_iou above its IoU too.
    assert MaxIoUAssigner(0.7, 0.3, 0.3, match_low_quality=False).assign(priors, gt).tolist() == [0, -2, -1, -2, -1]
    assert MaxIoUAssigner(0.7, 0.3, 0.7).assign(priors, gt).tolist() == [0, -2, -1, -2, -1]
    assert MaxIoUAssigner(0.7, 0.3, 0.3).assign(priors, torch.zeros(0, 4)).tolist() == [-1] * 5


def test_assigner_thresholds_are_inclusive_and_every_tied_best_prior_is_matched():
    """mmdet's boundaries: IoU == pos_iou_thr is positive, IoU == neg_iou_thr is not negative,
    IoU == min_pos_iou still gets the low-quality match, and every prior tied as a gt's best
    gets it (``gt_max_assign_all``). The IoUs here (0.5, 0.4) are exact in float32."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    priors = torch.tensor([
        [0.0, 0.0, 10.0, 20.0],    # IoU 0.5
        [0.0, -10.0, 10.0, 10.0],  # IoU 0.5: tied with the first
        [0.0, 0.0, 10.0, 25.0],    # IoU 0.4
    ])
    assert MaxIoUAssigner(0.5, 0.4, 0.0, match_low_quality=False).assign(priors, gt).tolist() == [0, 0, -2]
    assert MaxIoUAssigner(0.7, 0.3, 0.5).assign(priors, gt).tolist() == [0, 0, -2]


def test_sampled_negatives_come_from_negatives_never_from_ignored_priors():
    assigned = torch.tensor([0] + [-2] * 10 + [-1, -1])
    pos, neg = sample(assigned, 8, 0.5)
    assert pos.tolist() == [0] and sorted(neg.tolist()) == [11, 12]


def _target_delta_sum(gt: torch.Tensor, priors: torch.Tensor, term=abs) -> float:
    """The sum over ``(K, 4)`` priors of ``term`` of each target delta of the ``(1, 4)`` gt box
    (stds 1): ``dx``, ``dy``, ``log(gw / pw)``, ``log(gh / ph)``, written out by hand."""
    (gx1, gy1, gx2, gy2), total = gt[0].tolist(), 0.0
    for x1, y1, x2, y2 in priors.tolist():
        aw, ah = x2 - x1, y2 - y1
        total += term((gx1 + gx2 - x1 - x2) / 2 / aw) + term((gy1 + gy2 - y1 - y2) / 2 / ah)
        total += term(math.log((gx2 - gx1) / aw)) + term(math.log((gy2 - gy1) / ah))
    return total


@pytest.mark.parametrize("bbox_loss", ["l1", "smooth_l1"])
def test_rpn_loss_on_a_hand_made_case(bbox_loss):
    rpn = RPNHead(8, bbox_loss=bbox_loss)  # smooth L1 with beta 1/9: the Swin cascade configs' RPN
    levels = [torch.zeros(1, 256, H // s, W // s) for s in (4, 8, 16, 32, 64)]
    anchors = rpn.anchors(levels)
    gt = anchors[0][[500]].clone()  # a gt exactly on one stride-4 anchor
    scores = [torch.zeros(1, 3, *f.shape[-2:]) for f in levels]
    deltas = [torch.zeros(1, 12, *f.shape[-2:]) for f in levels]
    losses = rpn.loss(scores, deltas, anchors, [gt], [(H, W)])
    # All logits 0: BCE is log 2 for each of the 256 sampled anchors. Positives: IoU >= 0.7
    # (the exact anchor among them); with zero predicted deltas the L1 is the sum of their
    # target deltas |dx| + |dy| + |log(gw/aw)| + |log(gh/ah)| (each through smooth L1 for
    # "smooth_l1"), over 256.
    assert math.isclose(losses["loss_rpn_cls"].item(), math.log(2), rel_tol=1e-6)
    flat = torch.cat(anchors)
    iou = box_iou(gt, flat)[0]
    positives = flat[iou >= 0.7]
    assert 1 <= positives.shape[0] < 128
    beta = 1 / 9
    term = abs if bbox_loss == "l1" else (lambda d: 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta)
    assert math.isclose(losses["loss_rpn_bbox"].item(), _target_delta_sum(gt, positives, term) / 256, rel_tol=1e-5)


def test_retinanet_loss_on_a_hand_made_case():
    head = RetinaHead(3, in_channels=8)  # only the anchors and the rules are used
    levels = [torch.zeros(1, 8, max(H // s, 1), max(W // s, 1)) for s in (8, 16, 32, 64, 128)]
    anchors = head.anchors(levels)
    gt = anchors[0][[200]].clone()  # a gt exactly on one stride-8 anchor
    scores = [torch.zeros(1, 9 * 3, *f.shape[-2:]) for f in levels]
    deltas = [torch.zeros(1, 36, *f.shape[-2:]) for f in levels]
    losses = head.loss(scores, deltas, anchors, [{"boxes": gt, "labels": torch.tensor([1])}])
    # IoU >= 0.5 positive, < 0.4 negative, between ignored (in neither term). All logits 0: the focal
    # loss is log 2 * (1 - 0.5)^2 times alpha 0.25 for a positive's own class, 0.75 for every other
    # (anchor, class) pair counted; both sums over the number of positives.
    flat = torch.cat(anchors)
    iou = box_iou(gt, flat)[0]
    positives, negatives = flat[iou >= 0.5], int((iou < 0.4).sum())
    num_pos = positives.shape[0]
    assert 1 <= num_pos and int(((iou >= 0.4) & (iou < 0.5)).sum()) > 0  # some ignored
    pairs_pos, pairs_neg = num_pos, num_pos * 2 + negatives * 3
    expected = math.log(2) * 0.25 * (0.25 * pairs_pos + 0.75 * pairs_neg) / num_pos
    assert math.isclose(losses["loss_cls"].item(), expected, rel_tol=1e-5)
    assert math.isclose(losses["loss_bbox"].item(), _target_delta_sum(gt, positives) / num_pos, rel_tol=1e-5)


def test_retinanet_rescales_x_by_the_width_factor_and_y_by_the_height_factor():
    """mmdet divides RetinaNet's boxes by ``scale_factor = (w_scale, h_scale)`` before its NMS; with
    no overlap suppressed the result is the resized-image boxes divided, in the same order."""
    torch.manual_seed(0)
    head = RetinaHead(3, in_channels=8)  # only the anchors and the rules are used
    levels = [torch.zeros(1, 8, max(H // s, 1), max(W // s, 1)) for s in (8, 16, 32, 64, 128)]
    scores = [torch.randn(1, 27, *f.shape[-2:]) for f in levels]
    deltas = [torch.randn(1, 36, *f.shape[-2:]) * 0.1 for f in levels]
    settings = RetinaSettings(score_thr=0.5, iou=1.0, max_per_img=1000)
    args = (scores, deltas, head.anchors(levels), [(H, W)], settings)
    [resized], [original] = head.predict(*args), head.predict(*args, scale_factors=[(4.0, 2.0)])
    assert resized["boxes"].shape[0] > 10
    torch.testing.assert_close(original["boxes"], resized["boxes"] / torch.tensor([4.0, 2.0, 4.0, 2.0]))
    assert torch.equal(original["labels"], resized["labels"])


def test_rpn_proposals_take_the_best_nms_pre_anchors_of_each_level():
    """Per level the ``nms_pre`` best anchors (by logit), then NMS and the best ``max_per_img`` overall.
    One square anchor per location: neighbours do not overlap, so the NMS keeps every candidate."""
    rpn = RPNHead(8, AnchorGenerator((8, 16), (1.0,), (1,)))
    scores = [torch.arange(16.0).view(1, 1, 4, 4), torch.arange(4.0).view(1, 1, 2, 2) + 0.5]
    deltas = [torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 2, 2)]
    anchors = rpn.anchor_generator([(4, 4), (2, 2)], torch.device("cpu"))
    [(boxes, probs)] = rpn.proposals(scores, deltas, anchors, [(32, 32)], ProposalSettings(nms_pre=3, max_per_img=5))
    # level 0 logits 15, 14, 13 (anchors 15, 14, 13), level 1 logits 3.5, 2.5, 1.5: the best five of those
    assert torch.allclose(probs, torch.tensor([15.0, 14.0, 13.0, 3.5, 2.5]).sigmoid())
    expected = torch.cat([anchors[0][[15, 14, 13]], anchors[1][[3, 2]]]).clamp(0, 32)
    assert torch.equal(boxes, expected)


def test_anchors_inside_the_image_by_the_allowed_border():
    """mmdet's ``anchor_inside_flags``: x against the width, y against the height."""
    anchors = torch.tensor([
        [0.0, 0.0, 30.0, 10.0],   # wider than the image is high: inside a 20 x 40 image
        [0.0, 0.0, 10.0, 30.0],   # taller than the image: outside
        [-1.0, 0.0, 5.0, 5.0],    # one pixel past the left edge
        [0.0, 0.0, 40.0, 20.0],   # the whole image: x2 == w is outside without a border
    ])
    assert inside_image(anchors, (20, 40), 0).tolist() == [True, False, False, False]
    assert inside_image(anchors, (20, 40), 1).tolist() == [True, False, True, True]
    assert inside_image(anchors, (20, 40), -1).all()


def test_mask_head_runs_channels_last_on_cpu_with_nchw_values():
    """The CPU layout choice (channels-last: faster deconv) changes no value beyond rounding."""
    torch.manual_seed(0)
    head = MaskHead(5, channels=16)
    x = torch.randn(3, 16, 14, 14, requires_grad=True)
    out = head(x)
    assert out.shape == (3, 5, 28, 28) and out.is_contiguous(memory_format=torch.channels_last)
    nchw = x
    for conv in head.convs:
        nchw = torch.relu(conv(nchw))
    expected = head.conv_logits(torch.relu(head.upsample(nchw)))
    assert expected.is_contiguous() and torch.allclose(out, expected, atol=1e-5)
    weight = torch.randn(out.shape)
    (grad,) = torch.autograd.grad((out * weight).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weight).sum(), x)
    assert torch.allclose(grad, expected_grad, atol=1e-5)


def test_paste_masks_by_hand():
    probs = torch.ones(1, 28, 28)
    masks = paste_masks(probs, torch.tensor([[2.0, 3.0, 10.0, 7.0]]), 12, 14, 0.5)
    expected = torch.zeros(12, 14, dtype=torch.bool)
    expected[3:7, 2:10] = True
    assert torch.equal(masks[0], expected)
    gt = expected[None].repeat(2, 1, 1).to(torch.uint8)
    targets = mask_targets(gt, torch.tensor([[3.0, 4.0, 9.0, 6.0], [11.0, 0.0, 14.0, 12.0]]))
    assert targets.shape == (2, 28, 28) and bool(targets[0].all()) and not bool(targets[1].any())
    # A sample exactly on the mask's edge reads 0.5, which mmdet's binarising (>= 0.5) keeps: the
    # box's 1-pixel bins sample x = 0.5, 1.5, ...; the mask covers pixels 0..4, so 4.5 is half in.
    edge = torch.zeros(1, 32, 32, dtype=torch.uint8)
    edge[:, :, :5] = 1
    targets = mask_targets(edge, torch.tensor([[0.5, 0.5, 28.5, 28.5]]))
    assert targets[0].sum(dim=0).tolist() == [28.0] * 5 + [0.0] * 23


def test_roi_levels_at_the_boundaries():
    """mmdet's ``floor(log2(sqrt(wh) / 56 + 1e-6))`` clamped to 0..3: the 1e-6 puts a roi a hair
    under a boundary (float32 sqrt of 112 x 111.9999) on the coarser level, as mmdet does."""
    sides = [(0.0, 0.0), (20.0, 20.0), (112.0, 112.0), (112.0, 111.9999), (112.0, 111.999), (224.0, 224.0),
             (448.0, 448.0), (2000.0, 2000.0)]
    rois = torch.tensor([[0.0, 0.0, 0.0, w, h] for w, h in sides])
    assert RoIExtractor(7).levels(rois).tolist() == [0, 0, 1, 1, 0, 2, 3, 3]


def test_rcnn_losses_by_hand():
    """One positive (label 1) and two negatives: cross-entropy over all three; the positive's
    own class deltas against its target, summed and divided by the three sampled rois."""
    coder = DeltaXYWHCoder((0.1, 0.1, 0.2, 0.2))
    gt = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [70.0, 0.0, 90.0, 10.0]])
    sampled = Sampled(boxes, torch.tensor([1, 2, 2]), torch.tensor([0]), 1, torch.tensor([False]))
    rois = boxes_to_rois([boxes])
    logits = torch.zeros(3, 3)
    deltas = torch.zeros(3, 8)
    deltas[:, :4] = 100.0  # class 0's deltas: not the positive's label
    l1 = rcnn_losses(coder, rois, [sampled], [gt], logits, deltas, decoded_giou=False)
    assert math.isclose(l1["loss_cls"].item(), math.log(3), rel_tol=1e-6)
    # targets: dy = (10 - 5) / 10 / 0.1 = 5, dh = log(20 / 10) / 0.2; dx = dw = 0
    assert math.isclose(l1["loss_bbox"].item(), (5 + math.log(2) / 0.2) / 3, rel_tol=1e-5)
    # GIoU of the undecoded roi with the gt: IoU 1/2 and the enclosing box is the gt: loss 1/2, times 10
    giou = rcnn_losses(coder, rois, [sampled], [gt], logits, deltas, decoded_giou=True)
    assert math.isclose(giou["loss_bbox"].item(), 10 * 0.5 / 3, rel_tol=1e-5)


def test_mask_loss_reads_the_channel_of_each_positives_label():
    sampled = Sampled(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([1]), torch.tensor([0]), 1, torch.tensor([False]))
    gt_masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
    gt_masks[0, :4] = 1
    logits = torch.zeros(1, 3, 28, 28)
    logits[:, 0] = logits[:, 2] = 5.0  # the other classes' channels would give another loss
    assert math.isclose(mask_loss(logits, [sampled], [gt_masks]).item(), math.log(2), rel_tol=1e-6)


# Cascade stage logic -----------------------------------------------------------------

def test_regress_by_class_uses_the_deltas_of_the_label():
    coder = DeltaXYWHCoder(STAGE_STDS[1])
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    deltas = torch.zeros(1, 12)
    deltas[0, 4:8] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # class 1 moves right by 0.05 * 20
    moved = regress_by_class(coder, boxes, deltas, torch.tensor([1]), (100, 100))
    assert torch.allclose(moved, torch.tensor([[11.0, 10.0, 31.0, 30.0]]))
    assert torch.equal(regress_by_class(coder, boxes, deltas, torch.tensor([0]), (100, 100)), boxes)


@torch.no_grad()
def test_cascade_refines_rois_between_stages_and_averages_scores():
    detector = _tiny("cascade_mask_rcnn", num_classes=3).eval()
    head = detector.roi_head
    features = [torch.randn(1, 256, H // s, W // s) for s in (4, 8, 16, 32)]
    proposals = [torch.tensor([[5.0, 5.0, 40.0, 40.0], [20.0, 10.0, 90.0, 60.0], [0.0, 0.0, 16.0, 16.0]])]
    rois, logits, deltas = head.refine_stages(features, proposals, [(H, W)])
    for stage in range(2):
        expected = regress_by_class(head.coders[stage], rois[stage][:, 1:], deltas[stage],
                                    logits[stage][:, :-1].argmax(dim=1), (H, W))
        assert torch.equal(rois[stage + 1][:, 1:], expected)
        assert not torch.equal(rois[stage + 1], rois[stage])
    head_settings = detector.rcnn_settings.__class__(score_thr=0.0, iou=1.0, max_per_img=1000)
    result = head.predict(features, proposals, [(H, W)], head_settings)[0]
    probs = torch.stack(logits).mean(dim=0).softmax(dim=-1)[:, :-1]
    assert torch.allclose(result["scores"].sort().values, probs.flatten().sort().values, atol=1e-6)
    last = head.coders[2].decode(rois[2][:, 1:], deltas[2], max_shape=(H, W)).reshape(3, 3, 4)
    for box, label in zip(result["boxes"], result["labels"]):
        assert (last[:, label] - box).abs().sum(dim=1).min() < 1e-4
    assert result["mask_probs"].shape == (result["boxes"].shape[0], 28, 28)


def test_cascade_training_drops_gt_positives_before_the_next_stage():
    head = _tiny("cascade_mask_rcnn").roi_head
    from crossformer.detection.roi_heads import sample_rois

    gt = torch.tensor([[4.0, 6.0, 40.0, 50.0]])
    proposals = torch.tensor([[4.0, 6.0, 40.0, 51.0], [50.0, 40.0, 90.0, 60.0]])
    s = sample_rois(proposals, gt, torch.tensor([2]), head.assigners[0], head.num_classes, 16)
    assert s.num_pos == 2 and s.pos_is_gt.tolist().count(True) == 1 and s.labels.tolist().count(5) == 1
    logits = torch.zeros(3, 6)
    logits[:, 4] = 1.0  # background rois are refined with their best class (4), never background (5)
    logits[:, 5] = 2.0
    deltas = torch.zeros(3, 4 * 5)
    deltas[:, 16] = 1.0  # class 4 moves right by 0.1 of the width; class 2 (the positives') stays
    refined = head._refine_training(0, [s], logits, deltas, [(H, W)])
    # the gt copy is gone; the proposal stays, the negative moves by 0.1 * 40
    assert sorted(refined[0].tolist()) == [[4.0, 6.0, 40.0, 51.0], [54.0, 40.0, 94.0, 60.0]]


def test_cascade_stage_losses_are_weighted_one_half_and_a_quarter(monkeypatch):
    """The Swin cascade configs weight the three stages' losses 1, 0.5 and 0.25."""
    from crossformer.detection import cascade

    monkeypatch.setattr(cascade, "rcnn_losses", lambda *a, **k: {"loss_cls": torch.tensor(1.0), "loss_bbox": torch.tensor(2.0)})
    monkeypatch.setattr(cascade, "mask_loss", lambda *a: torch.tensor(4.0))
    head = cascade.CascadeRoIHead(5, channels=8, fc_channels=16)
    head.num_samples = 12
    images, _, targets = _batch()
    features = [torch.randn(2, 8, H // s, W // s) for s in (4, 8, 16, 32)]
    proposals = [targets[0]["boxes"] + 1, torch.tensor([[0.0, 0.0, 20.0, 20.0]])]
    losses = head.loss(features, proposals, targets, [(H, W)] * 2)
    expected = {f"s{i}.{name}": weight * value for i, weight in enumerate((1.0, 0.5, 0.25))
                for name, value in (("loss_cls", 1.0), ("loss_bbox", 2.0), ("loss_mask", 4.0))}
    assert {k: v.item() for k, v in losses.items()} == expected


def _head_losses(cascade: bool, proposals: list[torch.Tensor], targets: list[dict]) -> tuple[nn.Module, list, dict]:
    """A tiny RoI head (cascade or Mask R-CNN's), its features ``(2, 8, H/s, W/s)`` (requiring
    grad) and its training losses on them."""
    from crossformer.detection.cascade import CascadeRoIHead
    from crossformer.detection.roi_heads import StandardRoIHead

    head = (CascadeRoIHead if cascade else StandardRoIHead)(5, channels=8, fc_channels=16)
    head.num_samples = 12
    features = [torch.randn(2, 8, H // s, W // s, requires_grad=True) for s in (4, 8, 16, 32)]
    extra = ([(H, W)] * 2,) if cascade else ()
    return head, features, head.loss(features, proposals, targets, *extra)


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "mask_rcnn"])
@pytest.mark.parametrize("second", ["nothing", "gt_without_proposals"])
def test_an_image_without_proposals_trains_beside_the_others(cascade: bool, second: str):
    # The cascade's refinement between stages stopped with "cannot reshape tensor of 0 elements
    # into shape [0, -1, 4]" for an image with no sampled roi (no gt, no proposal: a crop
    # without objects whose proposals are gone).
    _, _, targets = _batch()  # the second image has no gt
    if second == "gt_without_proposals":
        targets[1] = targets[0]
    proposals = [targets[0]["boxes"] + 1, torch.zeros(0, 4)]
    _, features, losses = _head_losses(cascade, proposals, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert features[0].grad[0].abs().sum() > 0  # the first image trains
    assert (features[0].grad[1].abs().sum() > 0) == (second == "gt_without_proposals")  # its gt boxes are rois


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "mask_rcnn"])
def test_a_batch_without_a_single_roi_gives_zero_losses_connected_to_the_head(cascade: bool):
    # as mmdetection's losses of an empty roi set: zero, with a gradient (of zeros) for every
    # parameter of the head, so that DDP finds none unused
    _, _, targets = _batch()
    empty = [{key: value[:0] for key, value in targets[1].items()}] * 2
    head, _, losses = _head_losses(cascade, [torch.zeros(0, 4)] * 2, empty)
    assert all(v.item() == 0 and v.requires_grad for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())


# Training and inference ----------------------------------------------------------------

EXPECTED_LOSSES = {
    "retinanet": {"loss_cls", "loss_bbox"},
    "mask_rcnn": {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"},
    "cascade_mask_rcnn": {"loss_rpn_cls", "loss_rpn_bbox"} | {f"s{i}.{n}" for i in range(3) for n in ("loss_cls", "loss_bbox", "loss_mask")},
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", DETECTOR_KINDS)
def test_one_training_step_and_inference(kind):
    detector = _tiny(kind).train()
    images, metas, targets = _batch()
    losses = detector(images, metas, targets)
    assert set(losses) == EXPECTED_LOSSES[kind]
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert all(v > 0 for k, v in losses.items() if "cls" in k or "mask" in k)
    sum(losses.values()).backward()
    heads = {n: p for n, p in detector.named_parameters() if not n.startswith("backbone.")}
    dead = [n for n, p in heads.items() if p.grad is None or not p.grad.abs().sum() > 0]
    if kind == "cascade_mask_rcnn":
        # Its RPN trains only anchors inside the image (allowed_border 0): none of the
        # stride-16+ anchors (128 px and up) fit in 64x96, and the tiny rois all pool from
        # P2/P3, so P4/P5's output convs get no gradient here, as in mmdet.
        dead = [n for n in dead if not n.startswith(("neck.fpn_convs.2.", "neck.fpn_convs.3."))]
    assert dead == []
    for stage in range(4):  # the backbone learns at every stage
        grads = [p.grad for n, p in detector.named_parameters() if n.startswith(f"backbone.model.layers.{stage}.")]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)

    detector.eval()
    with torch.no_grad():
        results = detector(images, metas)
    assert len(results) == 2
    for result, meta in zip(results, metas):
        assert result["labels"].dtype == torch.int64 and result["scores"].shape == result["labels"].shape
        assert all(0 <= label < 5 for label in result["labels"].tolist())
        h0, w0 = meta["ori_shape"]
        # boxes are in original pixels: clipped to the resized image, then divided by the scale
        assert max(result["boxes"][:, 2].tolist(), default=0) <= meta["img_shape"][1] / meta["scale_factor"][0] + 1e-4
        assert max(result["boxes"][:, 3].tolist(), default=0) <= meta["img_shape"][0] / meta["scale_factor"][1] + 1e-4
        if detector.has_masks:
            assert result["masks"].dtype == torch.bool and result["masks"].shape[1:] == (h0, w0)
        else:
            assert "masks" not in result


def test_bad_input_is_one_line_errors():
    with pytest.raises(UserInputError, match="unknown detector"):
        build_detector("yolo")
    with pytest.raises(UserInputError, match="unknown backbone"):
        build_detector("mask_rcnn", "resnet50")
    detector = _tiny("retinanet").train()
    images, metas, _ = _batch()
    with pytest.raises(UserInputError, match="needs targets"):
        detector(images, metas)
    with pytest.raises(UserInputError, match="metas"):
        detector(images, metas[:1])


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_targets_and_metas_the_losses_would_misread_are_one_line(kind: str) -> None:
    # RetinaNet trained a label -1 as the last class; 5 was an IndexError deep in a head, float
    # labels torch's "expected target dtype", a missing mask or scale_factor a KeyError
    detector = _tiny(kind).train()
    images, metas, targets = _batch()

    def refused(changed_target: dict | None, message: str, changed_metas=metas) -> None:
        changed = [changed_target, targets[1]] if changed_target is not None else targets
        with pytest.raises(UserInputError, match=message):
            detector(images, changed_metas, changed)

    refused({**targets[0], "labels": torch.tensor([1, -1])}, r"^target 0: labels must be in 0\.\.4 .*, got -1$")
    refused({**targets[0], "labels": torch.tensor([1, 5])}, r"^target 0: labels must be in 0\.\.4 .*, got 5$")
    refused({**targets[0], "labels": torch.tensor([1.0, 3.0])}, r"labels must be integer class indices .*float32$")
    refused({**targets[0], "boxes": targets[0]["boxes"][:, :3]}, r"boxes must be \(N, 4\) and labels \(N,\)")
    refused(None, r"^image meta 1 has no img_shape", [metas[0], {}])
    if kind == "mask_rcnn":
        refused({"boxes": targets[0]["boxes"], "labels": targets[0]["labels"]}, r"^target 0 has no masks")
        refused({**targets[0], "masks": targets[0]["masks"][:1]}, r"^target 0: 1 masks for 2 boxes$")
    detector.eval()
    with torch.no_grad(), pytest.raises(UserInputError, match=r"^image meta 0 has no scale_factor"):
        detector(images, [{"img_shape": (H, W), "ori_shape": (H, W)}, metas[1]])


# Checkpoints -------------------------------------------------------------------------

def _mmdet_file(detector, path, classes=80):
    state = {}
    for key, value in detector.state_dict().items():
        key = "backbone." + key[len("backbone.model."):] if key.startswith("backbone.model.") else key
        state[key] = value.clone()
    torch.save({"meta": {"mmdet_version": "2.26.0", "CLASSES": tuple(str(i) for i in range(classes))},
                "state_dict": state}, path)
    return state


def test_mmdet_checkpoint_round_trip_and_refusals(tmp_path):
    source = _tiny("mask_rcnn", num_classes=80)
    for p in source.parameters():
        nn.init.normal_(p)
    _mmdet_file(source, tmp_path / "mmdet.pth")
    target = _tiny("mask_rcnn", num_classes=80)
    crossformer.load_checkpoint(target, tmp_path / "mmdet.pth")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name

    ours = tmp_path / "ours.pth"
    torch.save({"model": target.state_dict(), "epoch": 3}, ours)
    again = _tiny("mask_rcnn", num_classes=80)
    crossformer.load_checkpoint(again, ours)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), again.state_dict().values()))

    with pytest.raises(CheckpointError, match="80 classes"):
        crossformer.load_checkpoint(_tiny("mask_rcnn", num_classes=5), tmp_path / "mmdet.pth")
    with pytest.raises(CheckpointError, match="holds a mask_rcnn detector, not a cascade_mask_rcnn"):
        crossformer.load_checkpoint(_tiny("cascade_mask_rcnn", num_classes=80), tmp_path / "mmdet.pth")
    state = _mmdet_file(source, tmp_path / "extra.pth")
    state["roi_head.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected: roi_head\.extra\.weight"):
        crossformer.load_checkpoint(target, tmp_path / "extra.pth")


def test_imagenet_checkpoint_loads_the_backbone_alone(tmp_path):
    import timm

    classifier = timm.create_model("crossformer_small", num_classes=10, group_size=7, interval=(8, 4, 2, 1), **TINY)
    torch.save({"model": classifier.state_dict()}, tmp_path / "cls.pth")
    detector = build_detector("retinanet", num_classes=5, backbone_kwargs=TINY, pretrained_backbone=str(tmp_path / "cls.pth"))
    ours = detector.backbone.model.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, classifier.state_dict()[key]), key
    neck_before = detector.neck.state_dict()["lateral_convs.0.conv.weight"].clone()
    crossformer.load_checkpoint(detector, tmp_path / "cls.pth")
    assert torch.equal(detector.neck.state_dict()["lateral_convs.0.conv.weight"], neck_before)


def test_a_whole_detector_as_the_pretrained_backbone_points_to_init_from(tmp_path):
    # Its backbone.model.* keys fit no backbone: the error listed 300 keys as missing and unexpected.
    torch.save({"model": _tiny("mask_rcnn").state_dict()}, tmp_path / "detector.pth")
    with pytest.raises(UserInputError, match=r"detector\.pth is a whole detector, not an ImageNet backbone: start every "
                                             r"weight from it with --init-from"):
        build_detector("mask_rcnn", num_classes=5, backbone_kwargs=TINY, pretrained_backbone=str(tmp_path / "detector.pth"))
