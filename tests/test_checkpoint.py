"""crossformer.load_checkpoint: official formats, prefixes, heads, mismatches, safety."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import timm
import torch

import crossformer
from conftest import REFERENCE_CONFIGS
from crossformer.models import CheckpointError, CrossFormer, read_checkpoint


@pytest.fixture(scope="module")
def v1_state(reference_dir) -> dict:
    model = CrossFormer(**REFERENCE_CONFIGS["v1"])
    crossformer.load_checkpoint(model, reference_dir / "v1_cls.pth")
    return model.state_dict()


def test_official_file_needs_no_yacs_and_keeps_its_config(reference_dir) -> None:
    ckpt = read_checkpoint(reference_dir / "v1_cls.pth")
    assert type(ckpt["config"]) is dict and "MODEL" in ckpt["config"]
    assert any(k.endswith(".attn.relative_position_index") for k in ckpt["model"])  # dropped on load


def test_refuses_foreign_globals_without_running_them(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle the global '(posix|os)\.system'"):
        read_checkpoint(path)
    assert not marker.exists()


def test_bare_backbone_with_prefix_into_features_model(tmp_path, v1_state) -> None:
    backbone = {f"backbone.{k}": v for k, v in v1_state.items() if not k.startswith(("head.", "norm."))}
    path = tmp_path / "backbone.pth"
    torch.save(backbone, path)
    cfg = {k: v for k, v in REFERENCE_CONFIGS["v1"].items() if k != "num_classes"}
    features = timm.create_model("crossformer_tiny", features_only=True, **cfg)
    crossformer.load_checkpoint(features, path)

    classifier = CrossFormer(**REFERENCE_CONFIGS["v1"]).eval()
    classifier.load_state_dict(v1_state)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = classifier.forward_intermediates(x, intermediates_only=True)
        for ours, ref in zip(features.eval()(x), expected, strict=True):
            assert torch.equal(ours, ref)


def test_full_checkpoint_into_features_model_and_module_prefix(tmp_path, v1_state) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in v1_state.items()}, "epoch": 3}, path)
    cfg = {k: v for k, v in REFERENCE_CONFIGS["v1"].items() if k != "num_classes"}
    features = timm.create_model("crossformer_tiny", features_only=True, out_indices=(1, 2), **cfg)
    crossformer.load_checkpoint(features, path)
    assert [f.shape[1] for f in features(torch.randn(1, 3, 64, 64))] == [64, 128]


@pytest.mark.parametrize("feature_cls", ["hook", "fx"])
@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1,)])
def test_official_file_into_timm_hook_and_fx_features(reference_dir, v1_state, feature_cls, out_indices) -> None:
    """timm's other features_only wrappers take the file as the default one does: same maps."""
    cfg = {k: v for k, v in REFERENCE_CONFIGS["v1"].items() if k != "num_classes"}
    features = timm.create_model("crossformer_tiny", features_only=True, feature_cls=feature_cls, out_indices=out_indices, **cfg)
    crossformer.load_checkpoint(features, reference_dir / "v1_cls.pth")
    classifier = CrossFormer(**REFERENCE_CONFIGS["v1"]).eval()
    classifier.load_state_dict(v1_state)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        expected = classifier.forward_intermediates(x, indices=list(out_indices), intermediates_only=True, output_fmt="NHWC")
        for ours, ref in zip(features.eval()(x), expected, strict=True):
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    if max(out_indices) >= 2:  # the pp file holds v1's stages 0 and 1 (no activation cooling there)
        with pytest.raises(CheckpointError, match="(?s)does not fit this model.*unexpected: layers.2.blocks.2.ex_conv"):
            crossformer.load_checkpoint(features, reference_dir / "pp_cls.pth")


@pytest.mark.parametrize("kept", [[1], [3]])
def test_official_file_into_pruned_model(reference_dir, v1_state, kept) -> None:
    """A model cut by timm's ``prune_intermediate_layers`` takes the file as a features model does."""
    pruned = CrossFormer(**REFERENCE_CONFIGS["v1"])
    pruned.prune_intermediate_layers(kept, prune_norm=True)
    crossformer.load_checkpoint(pruned, reference_dir / "v1_cls.pth")
    classifier = CrossFormer(**REFERENCE_CONFIGS["v1"]).eval()
    classifier.load_state_dict(v1_state)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = classifier.forward_intermediates(x, indices=kept, intermediates_only=True)
        assert torch.equal(pruned.eval().forward_intermediates(x, indices=kept, intermediates_only=True)[0], expected[0])
    if max(kept) >= 2:  # the pp file holds v1's stages 0 and 1 (no activation cooling there)
        with pytest.raises(CheckpointError, match="(?s)does not fit this model.*unexpected: layers.2.blocks.2.ex_conv"):
            crossformer.load_checkpoint(pruned, reference_dir / "pp_cls.pth")


def test_other_head_size_is_dropped_with_a_warning(reference_dir, v1_state) -> None:
    model = CrossFormer(**{**REFERENCE_CONFIGS["v1"], "num_classes": 7})
    fresh_head = model.head.weight.detach().clone()
    with pytest.warns(UserWarning, match="classifier head"):
        crossformer.load_checkpoint(model, reference_dir / "v1_cls.pth")
    assert torch.equal(model.head.weight, fresh_head)
    assert torch.equal(model.layers[0].blocks[0].attn.qkv.weight, v1_state["layers.0.blocks.0.attn.qkv.weight"])

    headless = CrossFormer(**{**REFERENCE_CONFIGS["v1"], "num_classes": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crossformer.load_checkpoint(headless, reference_dir / "v1_cls.pth")

    # a head of another width too (pooled otherwise) shows other settings, not another class count
    wider = CrossFormer(**{**REFERENCE_CONFIGS["v1"], "num_classes": 7, "global_pool": "catavgmax"})
    with pytest.raises(CheckpointError, match=r"head\.weight: file \(10, 256\) vs model \(7, 512\)"):
        crossformer.load_checkpoint(wider, reference_dir / "v1_cls.pth")


def test_mismatch_lists_missing_and_unexpected_keys(reference_dir) -> None:
    wrong = CrossFormer(**{**REFERENCE_CONFIGS["pp"], "num_classes": 10})  # pp model, v1 file
    with pytest.raises(CheckpointError) as info:
        crossformer.load_checkpoint(wrong, reference_dir / "v1_cls.pth")
    message = str(info.value)
    assert "missing: layers.2.blocks.2.ex_conv.bias, layers.2.blocks.2.ex_conv.weight" in message
    assert "unexpected" not in message
    narrower = CrossFormer(**{**REFERENCE_CONFIGS["v1"], "embed_dim": 16})
    with pytest.raises(CheckpointError, match=r"wrong shape: patch_embed\.projs\.0\.weight: file \(16, 3, 4, 4\) vs model \(8, 3, 4, 4\)"):
        crossformer.load_checkpoint(narrower, reference_dir / "v1_cls.pth")
    deeper = CrossFormer(**{**REFERENCE_CONFIGS["v1"], "depths": (2, 2, 6, 2)})
    with pytest.raises(CheckpointError, match=r"missing: layers\.2\.blocks\.4\."):
        crossformer.load_checkpoint(deeper, reference_dir / "v1_cls.pth")


def test_backbone_file_into_classifier_fails_clearly(tmp_path, v1_state) -> None:
    path = tmp_path / "backbone.pth"
    torch.save({k: v for k, v in v1_state.items() if not k.startswith(("head.", "norm."))}, path)
    with pytest.raises(CheckpointError, match=r"missing: head\.bias, head\.weight, norm\.bias, norm\.weight"):
        crossformer.load_checkpoint(CrossFormer(**REFERENCE_CONFIGS["v1"]), path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_unreadable_files(tmp_path, content) -> None:
    path = tmp_path / "broken.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pth"):
        read_checkpoint(path)


def test_truncated_official_file(tmp_path, reference_dir) -> None:
    data = (reference_dir / "v1_cls.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        read_checkpoint(path)


def test_safetensors_conversion_round_trip(tmp_path, reference_dir) -> None:
    out = crossformer.convert_to_safetensors(reference_dir / "pp_cls.pth", tmp_path / "pp.safetensors")
    a = CrossFormer(**REFERENCE_CONFIGS["pp"]).eval()
    b = CrossFormer(**REFERENCE_CONFIGS["pp"]).eval()
    crossformer.load_checkpoint(a, reference_dir / "pp_cls.pth")
    crossformer.load_checkpoint(b, out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_timm_pretrained_file_overlay(reference_dir) -> None:
    io = torch.load(reference_dir / "pp_cls_io.pt")
    cfg = REFERENCE_CONFIGS["pp"]
    model = timm.create_model(
        "crossformer_pp_small", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(reference_dir / "pp_cls.pth")), **cfg,
    ).eval()
    with torch.no_grad():
        assert (model(io["x"]) - io["logits"]).abs().max() <= 1e-4
    features = timm.create_model(
        "crossformer_pp_small", pretrained=True, features_only=True,
        pretrained_cfg_overlay=dict(file=str(reference_dir / "pp_cls.pth")),
        **{k: v for k, v in cfg.items() if k != "num_classes"},
    )
    assert torch.equal(features.model.layers[0].blocks[0].attn.qkv.weight, model.layers[0].blocks[0].attn.qkv.weight)


def test_pretrained_without_file_says_how() -> None:
    with pytest.raises(RuntimeError, match="pretrained_cfg_overlay=dict\\(file=PATH\\)"):
        timm.create_model("crossformer_tiny", pretrained=True)


def test_pickle_protocol_refusal_message_names_global(tmp_path) -> None:
    path = tmp_path / "legacy.pth"
    with open(path, "wb") as f:  # a non-zip legacy torch file holding a foreign global
        pickle.dump({"x": print}, f, protocol=2)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
