"""The 8 official variants: registry, parameter counts, state-dict keys and shapes, MACs."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch

import crossformer
from crossformer.classification.model import create_classifier
from crossformer.errors import UserInputError
from crossformer.models import VARIANTS, analytic_macs, count_params

# Spec section 7, copied by hand: name -> (params, official GMACs at 224).
SPEC_TABLE = {
    "crossformer_tiny": (27_776_794, 2.858),
    "crossformer_small": (30_657_394, 4.910),
    "crossformer_base": (51_971_554, 9.165),
    "crossformer_large": (91_971_184, 16.116),
    "crossformer_pp_small": (23_325_340, 4.389),
    "crossformer_pp_base": (51_994_594, 9.504),
    "crossformer_pp_large": (92_001_904, 16.567),
    "crossformer_pp_huge": (95_962_944, 21.586),
}
# Spec section 7 too: name -> (G per stage, I per stage, drop path); the CrossFormer++ rows
# also have ACL and fixed-group LDA (spec section 5).
_V1_GROUPS, _PP_GROUPS = ((7, 7, 7, 7), (8, 4, 2, 1)), ((4, 4, 14, 7), (4, 2, 1, 1))
SPEC_SETTINGS = {
    "crossformer_tiny": (*_V1_GROUPS, 0.1),
    "crossformer_small": (*_V1_GROUPS, 0.2),
    "crossformer_base": (*_V1_GROUPS, 0.3),
    "crossformer_large": (*_V1_GROUPS, 0.5),
    "crossformer_pp_small": (*_PP_GROUPS, 0.2),
    "crossformer_pp_base": (*_PP_GROUPS, 0.3),
    "crossformer_pp_large": (*_PP_GROUPS, 0.5),
    "crossformer_pp_huge": (*_PP_GROUPS, 0.5),
}
RECOMPUTABLE = (".attn.biases", ".attn.relative_position_index")


def _meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def test_all_variants_registered() -> None:
    assert sorted(timm.list_models("crossformer*")) == sorted(SPEC_TABLE)
    assert set(VARIANTS) == set(SPEC_TABLE)


@pytest.fixture(scope="module")
def official(reference_dir):
    return json.loads((reference_dir / "official_variants.json").read_text())


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_params_keys_shapes_and_macs(name: str, official: dict) -> None:
    model = _meta_model(name)
    params, gmacs = SPEC_TABLE[name]
    assert count_params(model) == params == official[name]["params"]

    expected = {}
    for entry in official[name]["state_dict"]:
        key, _, shape = entry.partition(" ")
        if not key.endswith(RECOMPUTABLE):
            expected[key] = tuple(int(d) for d in shape.split("x")) if shape else ()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected

    macs = analytic_macs(model, 224, 224)
    assert macs == official[name]["macs_224"]
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.01


def test_groups_intervals_and_drop_path_follow_the_spec_table() -> None:
    """The settings no parameter count or MAC figure shows: intervals, LDA semantics, drop path."""
    for name, (groups, intervals, drop_path) in SPEC_SETTINGS.items():
        arch, pp = VARIANTS[name].arch, name.startswith("crossformer_pp")
        assert (tuple(arch["group_size"]), tuple(arch["interval"]), arch["drop_path_rate"]) == (groups, intervals, drop_path)
        assert (arch["long_distance"], arch["use_acl"]) == (("fixed_group", True) if pp else ("fixed_interval", False))


def test_pretrained_cfg() -> None:
    model = _meta_model("crossformer_small", num_classes=10, drop_path_rate=0.1)
    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["classifier"] == "head"
    assert cfg["first_conv"][0] == "patch_embed.projs.0"
    assert model.head.out_features == 10
    # stochastic depth rises linearly to the given rate over all blocks
    blocks = [b for stage in model.layers for b in stage.blocks]
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert blocks[0].drop_path.drop_prob == 0.0


def test_custom_sizes_through_timm() -> None:
    model = timm.create_model(
        "crossformer_pp_small", embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), num_classes=10
    )
    assert model.num_features == 256
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 10)
    # CrossFormer++ defaults: fixed-group LDA, ACL, progressive group sizes
    assert model.long_distance == "fixed_group"
    assert [s.blocks[0].group_size for s in model.layers] == [4, 4, 14, 7]
    assert model.layers[2].blocks[2].ex_conv is not None and model.layers[2].blocks[3].ex_conv is None
    assert timm.create_model("crossformer_tiny", pretrained=False).long_distance == "fixed_interval"


def test_a_setting_the_model_lacks_names_the_ones_meant() -> None:
    """A misspelt setting, or a timm habit from fixed-size models (img_size for Swin), was
    Python's bare "__init__() got an unexpected keyword argument", in the API and the commands."""
    with pytest.raises(TypeError, match=r"crossformer_tiny takes no setting 'group_sizes' \(did you mean group_size\?\); "
                                        r"its settings: in_chans, .*, interval, .*, drop_path_rate"):
        timm.create_model("crossformer_tiny", group_sizes=(7, 7, 7, 7))
    with pytest.raises(TypeError, match="no setting 'drop_path' \\(did you mean drop_path_rate or drop_rate\\?\\)"):
        timm.create_model("crossformer_tiny", drop_path=0.2)
    with pytest.raises(TypeError, match="no setting 'img_size': CrossFormer runs on any input size"):
        timm.create_model("crossformer_pp_small", img_size=384)
    with pytest.raises(UserInputError, match="cannot build crossformer_tiny with img_size=64: crossformer_tiny takes no "
                                             "setting 'img_size': CrossFormer runs on any input size"):
        create_classifier("crossformer_tiny", 10, model_kwargs={"img_size": 64})
    # the builder's own arguments still pass (features_only, out_indices)
    features = timm.create_model("crossformer_tiny", features_only=True, out_indices=(1,))
    assert [tuple(t.shape) for t in features(torch.randn(1, 3, 64, 64))] == [(1, 128, 8, 8)]


def test_acl_placement_follows_spec() -> None:
    model = _meta_model("crossformer_pp_huge")
    for stage, depth in zip(model.layers, (6, 6, 18, 2)):
        with_acl = [j for j, b in enumerate(stage.blocks) if b.ex_conv is not None]
        assert with_acl == [j for j in range(depth) if (j + 1) % 3 == 0 and j < depth - 1]


def test_flops_command_json(capsys) -> None:
    from crossformer.cli import main

    assert main(["flops", "--model", "crossformer_pp_small", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"] == SPEC_TABLE["crossformer_pp_small"][0]
    assert result["macs"] == 4_388_547_456


def test_flops_command_other_size_and_bad_input(capsys) -> None:
    from crossformer.cli import main

    assert main(["flops", "--model", "crossformer_tiny", "--img-size", "256", "320", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["img_size"] == [256, 320] and result["macs"] > 2_858_292_352
    assert main(["flops", "--model", "crossformer_tiny", "--img-size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(0.231G, official analytic counter)" in lines[2]
    assert lines[3].endswith("/ 2.9G FLOPs at 224x224")  # beside 0.231G: the paper's size, not this one
    assert main(["flops", "--model", "crossformer_tiny", "--img-size", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at least 32" in err
    assert main(["flops", "--model", "crossformer_tiny", "--img-size", "64", "64", "64"]) == 2
    assert "--img-size takes N or H W, got 64 64 64" in capsys.readouterr().err
    assert main(["flops", "--model", "crossformer_nope"]) == 2
    assert re.search(r"unknown model", capsys.readouterr().err)
    # a near miss names the model meant, in every command (one helper: models.require_known_model)
    assert main(["flops", "--model", "crossformer-tiny"]) == 2
    assert "unknown model 'crossformer-tiny'; did you mean crossformer_tiny or" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="did you mean crossformer_pp_small or"):
        create_classifier("crossformerpp_small", num_classes=3)


def test_package_exports() -> None:
    assert callable(crossformer.load_checkpoint) and crossformer.CrossFormer is not None


def test_a_variant_is_identified_by_its_weights() -> None:
    """Files that do not name their model (the authors' releases, bare state dicts) are
    recognised by every weight name and shape but the classifier's."""
    from crossformer.models import identify_variant, recorded_model

    for name in VARIANTS:
        with torch.device("meta"):
            state = timm.create_model(name, num_classes=7).state_dict()
        assert identify_variant(state) == name
        assert recorded_model({"model": state}) == (name, {})
        assert recorded_model({"model": state}, "crossformer_base") == ("crossformer_base", {})  # --model wins
    with torch.device("meta"):
        state = timm.create_model("crossformer_small").state_dict()
        other = timm.create_model("crossformer_small", embed_dim=48, num_heads=(3, 6, 12, 24)).state_dict()
    del state["layers.2.blocks.5.mlp.fc2.bias"]
    assert identify_variant(state) is None  # a weight missing
    assert identify_variant(other) is None  # not a registered size


def test_the_settings_that_weights_show() -> None:
    """``architecture_of`` reads each setting from the weights' names and shapes alone (the
    hint naming the --model-arg values a file needs)."""
    from crossformer.models.variants import architecture_of

    settings = dict(embed_dim=16, depths=[1, 2, 4, 1], num_heads=[1, 2, 2, 4], mlp_ratio=2.0, use_acl=True,
                    patch_kernel_sizes=[4, 8])
    with torch.device("meta"):
        state = crossformer.CrossFormer(**settings, num_classes=0).state_dict()
    assert architecture_of(state) == settings


def test_the_official_reference_files_are_no_registered_variant(reference_dir) -> None:
    """The spec's reference files are official-format test models of their own size."""
    from crossformer.models import extract_state_dict, identify_variant, read_checkpoint

    for name in ("v1_cls.pth", "pp_cls.pth"):
        assert identify_variant(extract_state_dict(read_checkpoint(reference_dir / name))) is None
