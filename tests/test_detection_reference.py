"""Our detectors against what mmdetection 3.3 computes (``../shared/reference/mmdet_heads_ref.pt``).

The reference holds random head weights in mmdet's checkpoint layout and fixed backbone
maps; every raw output must agree to 1e-4 and >= 98% of the final detections must be
found among ours (IoU > 0.99, same label, score within 1e-4, masks >= 99.5% equal).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from crossformer.detection import build_detector
from crossformer.detection.assign import MaxIoUAssigner
from crossformer.detection.cascade import STAGE_LOSS_WEIGHTS
from crossformer.detection.rpn import ProposalSettings
from crossformer.detection.roi_heads import boxes_to_rois
from crossformer.models import load_state

IMG_SHAPE = (256, 320)
METAS = [dict(img_shape=IMG_SHAPE, ori_shape=IMG_SHAPE, scale_factor=(1.0, 1.0))] * 2
TOL = 1e-4


@pytest.fixture(scope="module")
def ref(reference_dir):
    return torch.load(reference_dir / "mmdet_heads_ref.pt", weights_only=True)


def _detector(ref, kind):
    """A detector whose neck and heads hold the reference weights, loaded through the
    mmdet checkpoint port (the backbone, absent from the reference, is a depth-1
    CrossFormer with the reference's channels; its weights are passed mmdet-style)."""
    detector = build_detector(kind, backbone_kwargs=dict(embed_dim=96, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)))
    state = dict(ref[kind]["state_dict"])
    for key, value in detector.state_dict().items():
        if key.startswith("backbone.model."):
            state["backbone." + key[len("backbone.model."):]] = value
    load_state(detector, {"state_dict": state, "meta": {"mmdet_version": "3.3.0", "CLASSES": [str(i) for i in range(80)]}}, "reference")
    return detector.eval()


@pytest.fixture(scope="module")
def mask_rcnn(ref):
    detector = _detector(ref, "mask_rcnn")
    with torch.no_grad():
        return detector, detector.neck(ref["inputs"])


def _max_err(ours, theirs) -> float:
    if isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs)
        return max(_max_err(a, b) for a, b in zip(ours, theirs))
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return (ours.float() - theirs.float()).abs().max().item() if ours.numel() else 0.0


def _max_rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Max error relative to the reference magnitude (at least 1): for pixel coordinates."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return ((ours - theirs).abs() / theirs.abs().clamp(min=1)).max().item()


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return ((packed[..., None] >> torch.arange(7, -1, -1)) & 1).flatten(-2).bool()


def _match_rate(ours, boxes, scores, labels, masks=None) -> float:
    """Fraction of reference detections found among ours."""
    if boxes.shape[0] == 0:
        return 1.0
    if ours["boxes"].shape[0] == 0:
        return 0.0
    iou = box_iou(boxes, ours["boxes"])
    found = 0
    for i in range(boxes.shape[0]):
        candidates = (iou[i] > 0.99) & (ours["labels"] == labels[i]) & ((ours["scores"] - scores[i]).abs() <= TOL)
        for j in candidates.nonzero().flatten().tolist():
            if masks is None or (ours["masks"][j] == masks[i]).float().mean() >= 0.995:
                found += 1
                break
    return found / boxes.shape[0]


def _check_detections(results, expected, prefix: str, with_masks: bool) -> None:
    for i, ours in enumerate(results):
        masks = _unpack(expected[f"{prefix}masks_packbits"][i]) if with_masks else None
        rate = _match_rate(ours, expected[f"{prefix}bboxes"][i], expected[f"{prefix}scores"][i],
                           expected[f"{prefix}labels"][i], masks)
        assert rate >= 0.98, f"image {i}: {rate:.3f} of the reference detections matched"
        # as many as the reference keeps (its max_per_img, 100, here), not more
        assert ours["boxes"].shape[0] == expected[f"{prefix}bboxes"][i].shape[0]
        assert ours["labels"].dtype == torch.int64


def _assigner(cfg: dict) -> MaxIoUAssigner:
    """An mmdet ``MaxIoUAssigner`` config as ours (``match_low_quality`` defaults to True there)."""
    return MaxIoUAssigner(cfg["pos_iou_thr"], cfg["neg_iou_thr"], cfg["min_pos_iou"], cfg.get("match_low_quality", True))


def test_training_settings_are_the_reference_configs(ref):
    """What the training step reads from mmdet's ``train_cfg`` (assigners, sample counts, RPN
    proposals and border) and from the heads' loss settings, as the reference configs hold them."""
    tiny = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    for kind in ("mask_rcnn", "cascade_mask_rcnn"):
        detector, cfg = build_detector(kind, backbone_kwargs=tiny, channels=8, fc_channels=8), ref[kind]["cfg"]
        train, rpn = cfg["train_cfg"], detector.rpn_head
        assert rpn.assigner == _assigner(train["rpn"]["assigner"]) and rpn.num_samples == train["rpn"]["sampler"]["num"]
        assert rpn.allowed_border == train["rpn"]["allowed_border"]
        proposal = train["rpn_proposal"]
        assert detector.train_proposals == ProposalSettings(proposal["nms_pre"], proposal["max_per_img"],
                                                            proposal["nms"]["iou_threshold"])
        assert rpn.bbox_loss == {"L1Loss": "l1", "SmoothL1Loss": "smooth_l1"}[cfg["rpn_head"]["loss_bbox"]["type"]]
        stages = train["rcnn"] if isinstance(train["rcnn"], list) else [train["rcnn"]]
        assigners = getattr(detector.roi_head, "assigners", [getattr(detector.roi_head, "assigner", None)])
        assert assigners == [_assigner(stage["assigner"]) for stage in stages]
        assert {stage["sampler"]["num"] for stage in stages} == {detector.roi_head.num_samples}
    assert list(STAGE_LOSS_WEIGHTS) == ref["cascade_mask_rcnn"]["cfg"]["roi_head"]["stage_loss_weights"]
    retinanet = build_detector("retinanet", backbone_kwargs=tiny, channels=8)
    assert retinanet.bbox_head.assigner == _assigner(ref["retinanet"]["cfg"]["train_cfg"]["assigner"])


@torch.no_grad()
def test_mask_rcnn_fpn_anchors_rpn(ref, mask_rcnn):
    detector, fpn = mask_rcnn
    expected = ref["mask_rcnn"]
    assert _max_err([f[:1] for f in fpn], expected["fpn_outs_img0"]) <= TOL
    anchors = detector.rpn_head.anchors(fpn)
    assert _max_err(anchors, expected["anchors"]) <= TOL
    scores, deltas = detector.rpn_head(fpn)
    assert _max_err(scores, expected["rpn_cls_scores"]) <= TOL
    assert _max_err(deltas, expected["rpn_bbox_preds"]) <= TOL
    proposals = detector.rpn_head.proposals(scores, deltas, anchors, [IMG_SHAPE] * 2, detector.test_proposals)
    # Scores can sit 1e-7 apart, so their order may differ: match each reference proposal
    # to one of ours (score within 1e-4, box within 1e-4 relative: coordinates are pixels
    # up to 320, where float32 carries ~2e-5 per rounding; measured up to 1.2e-4 px).
    for (boxes, scores), ref_boxes, ref_scores in zip(proposals, expected["rpn_proposals"], expected["rpn_proposal_scores"]):
        assert boxes.shape == ref_boxes.shape
        scale = ref_boxes.abs().clamp(min=1)[:, None]
        close = ((ref_boxes[:, None] - boxes[None]).abs().div(scale).amax(dim=-1) <= TOL) & (
            (ref_scores[:, None] - scores[None]).abs() <= TOL)
        assert close.any(dim=1).all(), f"{int((~close.any(dim=1)).sum())} reference proposals not found"
        assert torch.equal(scores, scores.sort(descending=True).values)


@torch.no_grad()
def test_mask_rcnn_roi_levels_align_and_box_head(ref, mask_rcnn):
    detector, fpn = mask_rcnn
    expected = ref["mask_rcnn"]
    rois = boxes_to_rois(expected["fixed_proposals"])
    levels = detector.roi_head.bbox_roi_extractor.levels(rois)
    assert torch.equal(levels, expected["roi_levels"])
    assert set(levels.tolist()) == {0, 1, 2, 3}
    pooled = detector.roi_head.bbox_roi_extractor(fpn[:4], rois)
    assert _max_err(pooled[expected["roi_feats_sample_idx"]], expected["roi_feats_sample"]) <= TOL
    logits, deltas = detector.roi_head.forward_boxes(fpn[:4], rois)
    assert _max_err(logits, expected["bbox_cls_score"]) <= TOL
    assert _max_err(deltas, expected["bbox_bbox_pred"]) <= TOL


@pytest.mark.slow
@torch.no_grad()
def test_mask_rcnn_detections_and_masks(ref, mask_rcnn):
    detector, fpn = mask_rcnn
    expected = ref["mask_rcnn"]
    raw = detector.roi_head.predict(fpn[:4], expected["fixed_proposals"], [IMG_SHAPE] * 2, detector.rcnn_settings)
    assert _max_err([r["mask_probs"] for r in raw], expected["det_mask_probs"]) <= TOL
    results = detector.finalize(raw, METAS)
    _check_detections(results, expected, "det_", with_masks=True)
    assert results[0]["masks"].dtype == torch.bool and results[0]["masks"].shape[1:] == IMG_SHAPE


@pytest.mark.slow
@torch.no_grad()
def test_mask_rcnn_end_to_end(ref, mask_rcnn):
    detector, fpn = mask_rcnn
    _check_detections(detector.predict(fpn, METAS), ref["mask_rcnn"], "e2e_", with_masks=False)


@torch.no_grad()
def test_retinanet(ref):
    detector = _detector(ref, "retinanet")
    expected = ref["retinanet"]
    fpn = detector.neck(ref["inputs"])
    assert _max_err([f[:1] for f in fpn], expected["fpn_outs_img0"]) <= TOL
    anchors = detector.bbox_head.anchors(fpn)
    assert _max_err(anchors, expected["anchors"]) <= TOL
    scores, deltas = detector.bbox_head(fpn)
    assert _max_err(scores, expected["cls_scores"]) <= TOL
    assert _max_err(deltas, expected["bbox_preds"]) <= TOL
    _check_detections(detector.predict(fpn, METAS), expected, "det_", with_masks=False)


@pytest.mark.slow
@torch.no_grad()
def test_cascade_mask_rcnn(ref, mask_rcnn, monkeypatch):
    detector = _detector(ref, "cascade_mask_rcnn")
    expected, proposals = ref["cascade_mask_rcnn"], ref["mask_rcnn"]["fixed_proposals"]
    _, fpn = mask_rcnn  # the cascade's neck weights are Mask R-CNN's
    assert _max_err([f[:1] for f in detector.neck(ref["inputs"])], ref["mask_rcnn"]["fpn_outs_img0"]) <= TOL
    # The stages are checked as predict runs them on the fixed proposals: running them a
    # second time for the check (full-size heads on 600 rois) was a sixth of this test's time.
    stages = []
    refine_stages = detector.roi_head.refine_stages

    def recorded(*args, **kwargs):
        stages.append(refine_stages(*args, **kwargs))
        return stages[-1]

    monkeypatch.setattr(detector.roi_head, "refine_stages", recorded)
    raw = detector.roi_head.predict(fpn[:4], proposals, [IMG_SHAPE] * 2, detector.rcnn_settings)
    monkeypatch.undo()
    [(rois, logits, deltas)] = stages
    for stage in range(3):
        assert _max_rel_err(rois[stage], expected["stage_rois"][stage]) <= TOL, stage  # pixels
        assert _max_err(logits[stage], expected["stage_cls_score"][stage]) <= TOL, stage
        assert _max_err(deltas[stage], expected["stage_bbox_pred"][stage]) <= TOL, stage
    assert _max_err([r["mask_probs"] for r in raw], expected["det_mask_probs"]) <= TOL
    _check_detections(detector.finalize(raw, METAS), expected, "det_", with_masks=True)
    _check_detections(detector.predict(fpn, METAS), expected, "e2e_", with_masks=False)
