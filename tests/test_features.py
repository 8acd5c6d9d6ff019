"""Dense-task backbones: timm features_only, segmentation_models_pytorch, torchvision FPN."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import timm
import torch

import crossformer  # noqa: F401
from crossformer.models.weights import unwrap_model

TINY = dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4))


@pytest.mark.parametrize("name", ["crossformer_tiny", "crossformer_pp_small"])
@pytest.mark.parametrize("size", [(64, 64), (96, 160), (70, 45)])
def test_features_only_strides_and_channels(name: str, size: tuple[int, int]) -> None:
    model = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), **TINY).eval()
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(2, 3, *size))
    h, w = size[0] // 4, size[1] // 4
    for i, feature in enumerate(maps):
        assert feature.shape == (2, 16 * 2**i, h, w)
        h, w = h // 2, w // 2


@pytest.mark.parametrize("stages", [3, 5])
def test_features_only_returns_every_stage_by_default(stages: int) -> None:
    # out_indices defaulted to (0, 1, 2, 3): a 3-stage model failed ("feature index 3 is out of
    # range"), a 5-stage one silently lost its stride-64 maps
    settings = dict(embed_dim=16, depths=(1,) * stages, num_heads=(1, 1, 2, 2, 4)[:stages], group_size=2,
                    interval=(4, 2, 1, 1, 1)[:stages])
    model = timm.create_model("crossformer_tiny", features_only=True, **settings).eval()
    assert model.feature_info.reduction() == [4 * 2**i for i in range(stages)]
    with torch.no_grad():
        assert [m.shape[-1] for m in model(torch.randn(1, 3, 128, 128))] == [32 // 2**i for i in range(stages)]


def test_features_equal_classifier_stage_outputs() -> None:
    classifier = timm.create_model("crossformer_tiny", **TINY).eval()
    features = timm.create_model("crossformer_tiny", features_only=True, out_indices=(1, 3), **TINY).eval()
    features.model.load_state_dict(classifier.state_dict(), strict=False)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        taken = classifier.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(features(x), taken, strict=True))
        final, maps = classifier.forward_intermediates(x)
        assert len(maps) == 4
        assert torch.allclose(classifier.forward_head(final), classifier(x))


def test_forward_intermediates_of_early_stages() -> None:
    """Indices short of the last stage, with and without ``stop_early`` / ``intermediates_only``."""
    model = timm.create_model("crossformer_tiny", **TINY).eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        early = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(early, maps[:2], strict=True))
        stopped, taken = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(stopped, maps[1].permute(0, 2, 3, 1)) and torch.equal(taken[0], maps[1])
        ran_on, taken = model.forward_intermediates(x, indices=[1])
        assert torch.equal(ran_on, final) and torch.equal(taken[0], maps[1])
        # norm=True: the final norm on the last stage's map only (it is sized for that stage)
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(normed[:3], maps[:3], strict=True))
        assert torch.equal(normed[3], model.norm(maps[3].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_a_pruned_model_keeps_only_what_its_maps_use() -> None:
    """``prune_intermediate_layers`` drops the later stages, the last kept stage's merge, the
    norm and the head: every parameter left gets a gradient (as DDP requires)."""
    model = timm.create_model("crossformer_tiny", **TINY)
    assert model.prune_intermediate_layers(indices=[0, 1]) == [0, 1]
    maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[0, 1], intermediates_only=True)
    sum(m.square().sum() for m in maps).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("feature_cls", [None, "getter", "hook"])
def test_features_only_gradient_checkpointing(feature_cls: str | None) -> None:
    """``set_grad_checkpointing`` on the features_only wrapper, as on timm's Swin: the blocks
    run again in backward, with the same gradients."""
    settings = dict(features_only=True, out_indices=(1, 3), drop_path_rate=0.0, feature_cls=feature_cls, **TINY)
    plain = timm.create_model("crossformer_tiny", **settings)
    checkpointed = timm.create_model("crossformer_tiny", **settings)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 96)
    grads, block_runs = [], []
    for model in (plain, checkpointed):
        runs = []
        block = unwrap_model(model)[0].layers[1].blocks[0]
        hook = block.register_forward_pre_hook(lambda *_: runs.append(1))  # a recompute may stop early
        sum(m.square().mean() for m in model(x)).backward()
        hook.remove()
        grads.append([p.grad for p in model.parameters()])
        block_runs.append(len(runs))
    assert block_runs == [1, 2]  # recomputed in backward: checkpointed
    assert all(layer.grad_checkpointing for layer in unwrap_model(checkpointed)[0].layers)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("feature_cls", ["list", "dict"])
def test_features_only_wrappers_that_cannot_work_say_so(feature_cls: str) -> None:
    with pytest.raises(ValueError, match=f"feature_cls='{feature_cls}' cannot .* use 'hook' or 'fx'"):
        timm.create_model("crossformer_tiny", features_only=True, feature_cls=feature_cls, **TINY)


def test_segmentation_models_pytorch_unet() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("tu-crossformer_tiny", encoder_weights=None, classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()


def test_torchvision_feature_pyramid_network() -> None:
    from torchvision.ops import FeaturePyramidNetwork

    backbone = timm.create_model("crossformer_pp_small", features_only=True, **TINY).eval()
    fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=32).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 128, 96))
        pyramid = fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
    assert [tuple(p.shape) for p in pyramid.values()] == [
        (1, 32, 32, 24), (1, 32, 16, 12), (1, 32, 8, 6), (1, 32, 4, 3)
    ]


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1,)])
def test_features_only_torchscript_matches_eager(out_indices: tuple[int, ...]) -> None:
    """``torch.jit.script`` of the features_only network, as of timm's Swin and ConvNeXt."""
    model = timm.create_model("crossformer_pp_small", features_only=True, out_indices=out_indices, **TINY).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        for size in [(64, 96), (70, 45)]:
            x = torch.randn(1, 3, *size)
            for got, expected in zip(scripted(x), model(x), strict=True):
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
