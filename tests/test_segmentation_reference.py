"""Our segmentors against mmsegmentation's own outputs (shared/reference/mmseg_heads_ref.pt).

The reference holds mmseg 1.2's neck / decode-head / auxiliary-head outputs for random
weights in the released checkpoints' key layout, on fixed backbone maps. We write those
weights, with a backbone, into an mmseg-format checkpoint file, load it through the public
loader (the port under test), run our heads on the same maps and compare.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import crossformer
from crossformer.models import read_checkpoint
from crossformer.segmentation import Segmentor, build_segmentor, read_segmentation_meta
from crossformer.segmentation.heads import run_fpn_neck

TOL = 1e-4
CLASSES = tuple(f"class{i}" for i in range(150))
PALETTE = [[i, 255 - i, (7 * i) % 256] for i in range(150)]


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> dict:
    return torch.load(reference_dir / "mmseg_heads_ref.pt", weights_only=True)


def _segmentor_from_reference(kind: str, reference: dict, tmp_path: Path) -> tuple[Segmentor, Path]:
    """A segmentor with the reference channels [96, 192, 384, 768], loaded from an mmseg file."""
    segmentor = build_segmentor(kind, "crossformer_small", backbone_kwargs=dict(depths=(1, 1, 1, 1))).eval()
    # The authors' files name backbone weights "backbone.<CrossFormer key>".
    state = {f"backbone.{k.removeprefix('model.')}": v for k, v in segmentor.backbone.state_dict().items()}
    state.update(reference[kind]["state_dict"])
    path = tmp_path / f"{kind}_mmseg.pth"
    torch.save({"state_dict": state, "meta": {"CLASSES": CLASSES, "PALETTE": PALETTE}}, path)
    # Its heads are freshly initialised: only the port can give them the reference weights.
    crossformer.load_checkpoint(segmentor, path)
    return segmentor, path


def _check_labels(resized: torch.Tensor, expected: torch.Tensor) -> None:
    """Argmax labels equal, except where our top two logits are within TOL."""
    top2 = resized.topk(2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]) > TOL
    assert decisive.float().mean() > 0.99
    assert torch.equal(resized.argmax(1)[decisive], expected.long()[decisive])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fpn", "upernet"])
def test_segmentor_reproduces_mmseg(kind: str, reference: dict, tmp_path: Path) -> None:
    ref = reference[kind]
    maps = reference["inputs"]
    segmentor, path = _segmentor_from_reference(kind, reference, tmp_path)
    size = reference["meta"]["img_shape"]
    with torch.no_grad():
        if kind == "fpn":
            outs = run_fpn_neck(segmentor.neck, [m[:1] for m in maps])
            for ours, expected in zip(outs, ref["neck_outs_img0"], strict=True):
                torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
        logits = segmentor.decode(maps)
        torch.testing.assert_close(logits, ref["logits"], atol=TOL, rtol=0)
        resized = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        channels = ref["resize_channels"]
        torch.testing.assert_close(resized[:, channels], ref["logits_resized_sub"], atol=TOL, rtol=0)
        torch.testing.assert_close(resized.amax(1), ref["pred_max_logit"], atol=TOL, rtol=0)
        _check_labels(resized, ref["pred_label"])
        if kind == "upernet":
            aux = segmentor.auxiliary_head(maps[segmentor.aux_index])
            torch.testing.assert_close(aux, ref["aux_logits"], atol=TOL, rtol=0)
            aux_resized = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)[:, channels]
            torch.testing.assert_close(aux_resized, ref["aux_logits_resized_sub"], atol=TOL, rtol=0)
    meta = read_segmentation_meta(read_checkpoint(path))
    assert meta["classes"] == CLASSES
    assert meta["palette"][3] == (3, 252, 21)


def test_reference_parameter_counts(reference: dict) -> None:
    """The heads hold exactly as many parameters as mmseg's (neck + head, head + aux)."""
    with torch.device("meta"):
        for kind in ("fpn", "upernet"):
            segmentor = build_segmentor(kind, "crossformer_small")
            heads = sum(p.numel() for n, p in segmentor.named_parameters() if not n.startswith("backbone."))
            assert heads == reference[kind]["param_count"]["total"]
