"""Exactness: official logits, and the independent spec transcription at any input size."""

from __future__ import annotations

import pytest
import torch

import crossformer
from conftest import REFERENCE_CONFIGS
from crossformer.models import CrossFormer
from spec_reference import reference_forward


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_official_logits(tag: str, reference_dir) -> None:
    model = CrossFormer(**REFERENCE_CONFIGS[tag]).eval()
    crossformer.load_checkpoint(model, reference_dir / f"{tag}_cls.pth")
    io = torch.load(reference_dir / f"{tag}_cls_io.pt")
    with torch.no_grad():
        logits = model(io["x"])
    assert logits.shape == io["logits"].shape
    assert (logits - io["logits"]).abs().max().item() <= 1e-4


def _perturbed(tag: str, **overrides) -> CrossFormer:
    """A reference-sized model whose every parameter is away from its init."""
    cfg = {**REFERENCE_CONFIGS[tag], "drop_path_rate": 0.0, **overrides}
    model = CrossFormer(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _spec_cfg(model: CrossFormer) -> dict:
    blocks = [stage.blocks[0] for stage in model.layers]
    return dict(
        depths=[len(stage.blocks) for stage in model.layers],
        num_heads=[b.attn.num_heads for b in blocks],
        group_size=[b.group_size for b in blocks],
        interval=[b.interval for b in blocks],
        use_acl=any(b.ex_conv is not None for stage in model.layers for b in stage.blocks),
        long_distance=model.long_distance,
    )


SIZES = [(224, 224), (32, 32), (33, 47), (100, 60), (161, 250), (64, 320), (230, 230)]


@pytest.mark.parametrize("tag", ["v1", "pp"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_matches_spec_at_any_size(tag: str, size: tuple[int, int]) -> None:
    model = _perturbed(tag)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref_logits, ref_features = reference_forward(model.state_dict(), _spec_cfg(model), x)
        logits = model(x)
        features = model.forward_intermediates(x, intermediates_only=True)
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    for ours, ref in zip(features, ref_features, strict=True):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_both_lda_semantics_agree_at_224_only() -> None:
    v1 = _perturbed("v1")
    fixed_group = _perturbed("v1", long_distance="fixed_group")
    fixed_group.load_state_dict(v1.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert torch.allclose(v1(x), fixed_group(x), atol=1e-5)
        x = torch.randn(1, 3, 256, 256)
        assert not torch.allclose(v1(x), fixed_group(x), atol=1e-3)


def test_forward_changes_no_state() -> None:
    model = _perturbed("v1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = [(b.group_size, b.interval, b.long_distance_groups) for s in model.layers for b in s.blocks]
    with torch.no_grad():
        model(torch.randn(1, 3, 40, 40))  # small maps take the SDA fallback in every stage
        out_224 = model(torch.randn(1, 3, 224, 224))
    assert settings == [(b.group_size, b.interval, b.long_distance_groups) for s in model.layers for b in s.blocks]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.isfinite(out_224).all()


@pytest.mark.parametrize("precision", ["half", "autocast"])
def test_float16_training_keeps_groups_made_only_of_padding_finite(precision: str) -> None:
    # 68x68: stage 0 is 17x17, padded to 32x32 for its 4x4-group, interval-4 LDA block, so 39 of
    # its 64 groups hold only padding. A padding score float16 cannot hold (-1e6 is -inf there)
    # made their softmax NaN, and the NaN reached the position-bias weights' gradients.
    model = CrossFormer(embed_dim=32, depths=(2, 1, 1, 1), num_heads=(1, 2, 4, 8), group_size=(4, 4, 14, 7),
                        interval=(4, 2, 1, 1), long_distance="fixed_group", num_classes=3).train()
    images = torch.randn(2, 3, 68, 68)
    if precision == "half":
        model.half()
        logits = model(images.half())
    else:
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(images)
    logits.float().square().mean().backward()
    assert torch.isfinite(logits).all()
    assert [name for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()] == []


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 31, 64), "at least 32x32"),
    ((1, 3, 64, 31), "at least 32x32"),
    ((1, 1, 64, 64), "expects images shaped"),
    ((3, 64, 64), "expects images shaped"),
])
def test_bad_input_is_one_clear_error(shape, message) -> None:
    model = CrossFormer(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=3)
    with pytest.raises(ValueError, match=message) as info:
        model(torch.randn(*shape))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["numpy", "pil", "uint8"])
def test_images_that_are_no_float_tensor_are_one_clear_error(kind: str) -> None:
    # a NumPy array failed 13 frames deep ("'str' object has no attribute 'type'"), a uint8 tensor
    # in a convolution ("Input type (unsigned char) and bias type (float) should be the same")
    import numpy as np
    from PIL import Image

    model = CrossFormer(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=3)
    images = {"numpy": np.zeros((1, 3, 64, 64), np.float32), "pil": Image.new("RGB", (64, 64)),
              "uint8": torch.zeros(1, 3, 64, 64, dtype=torch.uint8)}[kind]
    expected = "takes floating-point images, got torch.uint8" if kind == "uint8" else "takes images as a torch.Tensor"
    for call in (model, model.forward_intermediates):
        with pytest.raises(TypeError, match=expected) as info:
            call(images)
        assert "\n" not in str(info.value)
