"""The model as a timm user meets it: TorchScript, FX, default config, timm's pretrained path.

The checks of timm's own ``tests/test_models.py`` that apply to this model, on the small
reference configurations (timm's suite itself runs on the full-size variants, outside the
repository): scripted and FX-traced models against eager outputs, the default config's
shapes and names, and ``pretrained=True`` with ``num_classes`` / ``in_chans`` adaptation
against the shared official-format checkpoints.
"""

from __future__ import annotations

import inspect
import io
import os

import pytest
import timm
import timm.optim
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor

import crossformer
from conftest import REFERENCE_CONFIGS
from crossformer.models import VARIANTS, CheckpointError, variants

# one CrossFormer and one CrossFormer++ entrypoint, built at the reference sizes
ENTRYPOINTS = {"v1": "crossformer_tiny", "pp": "crossformer_pp_small"}
SIZES = [(224, 224), (100, 60)]
TRACER_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def _arch(tag: str) -> dict:
    """The reference architecture, without its class count (the checkpoint's business)."""
    return {k: v for k, v in REFERENCE_CONFIGS[tag].items() if k != "num_classes"}


def _model(tag: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(ENTRYPOINTS[tag], **{**_arch(tag), **kwargs})


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_one_register_model_function_per_variant(name: str) -> None:
    entrypoint = getattr(variants, name)
    assert entrypoint.__name__ == name
    assert inspect.getsource(entrypoint).startswith(f"@register_model\ndef {name}(")
    assert timm.models.model_entrypoint(name) is entrypoint
    assert timm.get_pretrained_cfg_value(name, "first_conv") == tuple(f"patch_embed.projs.{i}" for i in range(4))


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_default_cfg_shapes(tag: str) -> None:
    """timm's ``test_model_default_cfgs``: unpooled features match ``pool_size`` in ``output_fmt``."""
    model = _model(tag).eval()
    cfg = model.pretrained_cfg
    spatial, channel = get_spatial_dim(model.output_fmt), get_channel_dim(model.output_fmt)
    assert (spatial, channel) == ((1, 2), 3)  # NHWC, as the tensor below really is
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert features.shape == (1, 7, 7, model.num_features)
        assert tuple(features.shape[d] for d in spatial) == cfg["pool_size"]
        assert pooled.shape == (1, model.head_hidden_size)
        torch.testing.assert_close(pooled, features.mean((1, 2)))
        model.reset_classifier(0, "")
        assert model(x).shape == features.shape
    state = model.state_dict()
    assert all(f"{name}.weight" in state for name in cfg["first_conv"])
    assert f"{cfg['classifier']}.weight" in _model(tag).state_dict()


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_torchscript_matches_eager(tag: str) -> None:
    model = _model(tag, num_classes=7).eval()
    inputs = [torch.randn(1, 3, *size) for size in SIZES]
    with torch.no_grad():
        expected = [model(x) for x in inputs]  # eager first: its caches must not stop scripting
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)  # fully compiled: nothing left to call back into Python
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        for x, logits in zip(inputs, expected):
            torch.testing.assert_close(loaded(x), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("global_pool", ["avg", ""])
def test_a_whole_model_pickled_before_the_pool_layer_unpickles_and_runs(global_pool: str) -> None:
    # torch.save(model) files from before the pooling became timm's layer hold no ``pool``:
    # unpickled, their forward failed with "'CrossFormer' object has no attribute 'pool'"
    model = timm.create_model("crossformer_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                              num_classes=3, global_pool=global_pool).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    del model.pool  # as the old class built it
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=False)
    assert old.pool.pool_type == global_pool
    with torch.no_grad():
        torch.testing.assert_close(old(x), expected, rtol=0, atol=0)


def test_jit_trace_passes_its_own_check() -> None:
    """``torch.jit.trace(model, x)`` as users call it (grad mode on): its check traces again
    under ``no_grad`` and must meet the same graph."""
    model = _model("pp", num_classes=7).eval()
    x = torch.randn(1, 3, 64, 96)
    with pytest.warns(torch.jit.TracerWarning):  # sizes become constants: one input size
        traced = torch.jit.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_fx_matches_eager(tag: str) -> None:
    """torchvision's extractor with timm's tracer settings, and timm's ``feature_cls='fx'``."""
    model = _model(tag, num_classes=7).eval()
    stage_nodes = [info["module"] for info in model.feature_info]
    traced = create_feature_extractor(model, return_nodes=[*stage_nodes, "head"], tracer_kwargs=TRACER_KWARGS)
    weights = dict(state_dict=model.state_dict())  # timm's in-memory pretrained source
    fx_features = _model(tag, features_only=True, feature_cls="fx", pretrained=True, pretrained_cfg_overlay=weights)
    fx_features.eval()
    with torch.no_grad():
        for size in SIZES:
            x = torch.randn(1, 3, *size)
            out = traced(x)
            assert torch.equal(out["head"], model(x))  # eager fast paths run inside the leaves
            maps = model.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
            for node, expected in zip(stage_nodes, maps):
                torch.testing.assert_close(out[node], expected, rtol=0, atol=1e-5)
            for got, expected in zip(fx_features(x), maps):
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_plain_fx_tracing_points_to_the_tracers_that_work() -> None:
    # "takes images as a torch.Tensor ... got Proxy: convert it first (torch.from_numpy ...)"
    with pytest.raises(TypeError, match=r"^plain torch.fx.symbolic_trace cannot trace CrossFormer, whose grouping "
                                        r"depends on the input size: use timm's feature extractor"):
        torch.fx.symbolic_trace(_model("v1", num_classes=7))


def test_fx_backward_reaches_every_parameter() -> None:
    """timm's ``test_model_backward_fx``, with stochastic depth on."""
    model = _model("pp", num_classes=7, drop_path_rate=0.2).train()
    traced = create_feature_extractor(model, return_nodes=["head"], tracer_kwargs=TRACER_KWARGS)
    traced(torch.randn(2, 3, 64, 96))["head"].mean().backward()
    assert all(p.grad is not None for p in traced.parameters())
    assert sum(p.numel() for p in traced.parameters()) == sum(p.numel() for p in model.parameters())


def _pretrained(tag: str, reference_dir, **kwargs) -> torch.nn.Module:
    overlay = dict(file=str(reference_dir / f"{tag}_cls.pth"))
    return _model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_pretrained_official_file(tag: str, reference_dir) -> None:
    """The official-format file through timm's builder gives the official logits."""
    model = _pretrained(tag, reference_dir)
    assert model.num_classes == 10  # taken from the file, as its config describes it
    assert "state_dict" not in model.pretrained_cfg  # the weights are not kept twice
    reference = torch.load(reference_dir / f"{tag}_cls_io.pt")
    with torch.no_grad():
        assert (model(reference["x"]) - reference["logits"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_pretrained_adapts_classes_and_channels(tag: str, reference_dir) -> None:
    full = _pretrained(tag, reference_dir)
    gray = _pretrained(tag, reference_dir, num_classes=5, in_chans=1)
    assert gray.head.weight.shape == (5, full.num_features)
    for name in gray.pretrained_cfg["first_conv"]:
        adapted, original = gray.get_submodule(name).weight, full.get_submodule(name).weight
        assert adapted.shape[1] == 1
        torch.testing.assert_close(adapted[:, 0], original.sum(1))
    # summed first kernels: a gray image gives what the original gives on its 3-channel copy
    image = torch.rand(1, 1, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(
            gray.forward_features(image), full.forward_features(image.expand(-1, 3, -1, -1)), rtol=0, atol=1e-5
        )
    features = _pretrained(tag, reference_dir, features_only=True)
    assert "state_dict" not in features.pretrained_cfg
    with torch.no_grad():
        maps = full.forward_intermediates(image.expand(-1, 3, -1, -1), intermediates_only=True)
        for got, expected in zip(features(image.expand(-1, 3, -1, -1)), maps):
            torch.testing.assert_close(got, expected)


def test_pretrained_state_dict_in_memory_is_described_as_a_file_is() -> None:
    """``pretrained_cfg_overlay=dict(state_dict=...)``: its head is kept when the class counts
    agree (given or not), and its channels are where ``in_chans`` adapts from."""
    source = _model("v1", num_classes=10).eval()
    overlay = dict(state_dict=source.state_dict())
    image = torch.rand(1, 3, 64, 96)
    for kwargs in ({}, dict(num_classes=10)):
        model = _model("v1", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
        with torch.no_grad():
            assert torch.equal(model(image), source(image))  # the trained head, not a fresh one
    gray = _model("v1", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1, num_classes=3)
    torch.testing.assert_close(gray.patch_embed.projs[0].weight[:, 0], source.patch_embed.projs[0].weight.sum(1))
    assert "state_dict" not in gray.pretrained_cfg


def test_pretrained_wrong_variant_is_one_clear_error(reference_dir) -> None:
    overlay = dict(file=str(reference_dir / "pp_cls.pth"))
    with pytest.raises(CheckpointError, match="do not fit this model.*unexpected: layers.2.blocks.2.ex_conv"):
        _model("v1", pretrained=True, pretrained_cfg_overlay=overlay)


def test_pretrained_head_of_the_same_classes_but_another_width_is_one_clear_error(reference_dir) -> None:
    # timm keeps a classifier of the file's class count: global_pool="catavgmax" doubles its
    # input, which torch's load_state_dict reported as a multi-line RuntimeError
    with pytest.raises(CheckpointError, match=r"do not fit this model.*head\.weight: file \(10, 256\) vs model \(10, 512\)"):
        _pretrained("v1", reference_dir, global_pool="catavgmax")
    # another class count: timm drops the file's head, whatever its width
    assert _pretrained("v1", reference_dir, global_pool="catavgmax", num_classes=3).head.weight.shape == (3, 512)
    _pretrained("v1", reference_dir, global_pool="catavgmax", features_only=True)  # dropped as well: no head needed


def _our_checkpoint(path, **arch) -> torch.nn.Module:
    """A training checkpoint as ``crossformer train`` writes one (its settings recorded), and its model."""
    model = timm.create_model("crossformer_tiny", num_classes=5, **arch).eval()
    torch.save({"model": model.state_dict(), "model_name": "crossformer_tiny", "model_kwargs": arch,
                "class_names": list("abcde"), "img_size": 64, "epoch": 3}, path)
    return model


def test_pretrained_training_checkpoint_builds_the_architecture_it_records(tmp_path) -> None:
    # the recorded embed_dim / depths were ignored: every weight failed to fit crossformer_tiny's defaults
    arch = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
    trained = _our_checkpoint(tmp_path / "best.pth", **arch)
    crossformer.convert_to_safetensors(tmp_path / "best.pth", tmp_path / "best.safetensors")
    image = torch.rand(1, 3, 64, 64)
    for file in ("best.pth", "best.safetensors"):
        model = timm.create_model("crossformer_tiny", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / file))).eval()
        with torch.no_grad():
            assert torch.equal(model(image), trained(image))
    # settings given win, as for num_classes: only the stochastic depth differs here
    model = timm.create_model("crossformer_tiny", pretrained=True, drop_path_rate=0.0, num_classes=2,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "best.pth")))
    assert model.patch_embed.norm.weight.shape == (16,) and model.num_classes == 2


def test_a_model_built_from_a_training_checkpoint_round_trips_through_save_for_hf(tmp_path) -> None:
    # timm rebuilds a local-dir: folder from the factory's arguments, where the settings read
    # from the checkpoint were missing: the folder built crossformer_tiny's defaults, which no weight fit
    trained = _our_checkpoint(tmp_path / "best.pth", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
    model = timm.create_model("crossformer_tiny", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "best.pth")))
    timm.models.save_for_hf(model, tmp_path / "hf")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(image), trained(image))


def test_pretrained_training_checkpoint_of_other_settings_names_what_it_holds(tmp_path) -> None:
    _our_checkpoint(tmp_path / "best.pth", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
    overlay = dict(file=str(tmp_path / "best.pth"))
    settings = r"crossformer_tiny with embed_dim=16, depths=\[1, 1, 1, 1\], num_heads=\[1, 2, 4, 8\]"
    for name, kwargs in (("crossformer_tiny", dict(embed_dim=32)), ("crossformer_small", {})):
        with pytest.raises(CheckpointError, match=f"^the weights are {settings}: create crossformer_tiny with "
                                                  f"those settings \\(pretrained weights do not fit this model"):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def test_pretrained_file_never_unpickles_code(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": crossformer.models.CrossFormer(**REFERENCE_CONFIGS["v1"]).state_dict(), "hook": os.system}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        _model("v1", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_layer_decay_follows_the_order_layers_run() -> None:
    """timm's layer-wise lr decay: a stage's merge runs after its blocks, so it shares the
    last block's lr scale, and scales never fall from the stem to the head."""
    model = _model("v1", num_classes=7)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    by_name = {name: scale[id(p)] for name, p in model.named_parameters()}
    for s, stage in enumerate(model.layers):
        if stage.downsample is not None:
            last = len(stage.blocks) - 1
            assert by_name[f"layers.{s}.downsample.norm.weight"] == by_name[f"layers.{s}.blocks.{last}.norm1.weight"]
    in_run_order = [by_name[name] for name, _ in model.named_parameters()]  # registration = run order
    assert in_run_order == sorted(in_run_order)
    assert by_name["head.weight"] == 1.0 and by_name["patch_embed.norm.weight"] < by_name["layers.0.blocks.0.norm1.weight"]


def test_device_and_dtype_arguments(reference_dir) -> None:
    """timm's factory arguments ``device`` / ``dtype``: placed and cast as timm's own models are."""
    meta = _model("v1", device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {("meta", torch.bfloat16)}
    double = _pretrained("v1", reference_dir, dtype=torch.float64)
    assert {p.dtype for p in double.parameters()} == {torch.float64}
    image = torch.rand(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(double(image), _pretrained("v1", reference_dir).double()(image), rtol=0, atol=0)


@pytest.mark.parametrize("safe", [False, True])
def test_timm_local_dir_round_trip(tmp_path, safe: bool) -> None:
    """A folder written by timm's ``save_for_hf`` loads back with ``local-dir:``, as timm's models do."""
    model = _model("pp", num_classes=7).eval()
    timm.models.save_for_hf(model, tmp_path, safe_serialization=safe)
    image = torch.rand(2, 3, 64, 96)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    gray = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=3, in_chans=1).eval()
    with torch.no_grad():
        assert torch.equal(loaded(image), model(image))
        torch.testing.assert_close(
            gray.forward_features(image[:, :1]), model.forward_features(image[:, :1].expand(-1, 3, -1, -1)), rtol=0, atol=1e-5
        )
    assert gray.head.out_features == 3


def test_reset_classifier_keeps_the_model_device_and_dtype() -> None:
    """A new head is made where the model now is (timm's models do so), not on CPU in float32."""
    model = _model("v1").double().eval()
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.float64
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 5)
    meta = _model("v1", device="meta")
    meta.reset_classifier(3, "avg")
    assert meta.head.weight.device.type == "meta"


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_torch_func_per_sample_gradients(tag: str) -> None:
    """``torch.func`` transforms (per-sample gradients: ``vmap`` over ``grad`` of a
    ``functional_call``), as they run on timm's Swin: equal to one backward per image."""
    model = _model(tag, num_classes=7, drop_path_rate=0.0).train()
    params = {name: p.detach() for name, p in model.named_parameters()}
    images, labels = torch.randn(2, 3, 64, 96), torch.tensor([1, 5])

    def loss(weights: dict, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, weights, (image[None],))
        return torch.nn.functional.cross_entropy(logits, label[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, images, labels)
    for i in range(len(images)):
        model.zero_grad()
        loss(dict(model.named_parameters()), images[i], labels[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(torch.func.vmap(lambda image: model(image[None])[0])(images), model(images))


@pytest.mark.parametrize("pool", ["max", "avgmax", "catavgmax"])
def test_global_pool_choices_of_timm(pool: str) -> None:
    """timm's ``global_pool`` choices, as timm's Swin takes them, at creation and in
    ``reset_classifier``: the head sees the pooled features, whatever their width."""
    x = torch.randn(2, 3, 64, 96)
    model = _model("v1", num_classes=7, global_pool=pool).eval()
    rebuilt = _model("v1", num_classes=7).eval()
    rebuilt.reset_classifier(3, pool)
    with torch.no_grad():
        features = model.forward_features(x)
        mean, peak = features.mean((1, 2)), features.amax((1, 2))
        expected = {"max": peak, "avgmax": 0.5 * (mean + peak), "catavgmax": torch.cat([mean, peak], 1)}[pool]
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), expected)
        assert model.head_hidden_size == model.head.in_features == expected.shape[1]
        assert model(x).shape == (2, 7) and rebuilt(x).shape == (2, 3)
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=1e-5)
    assert rebuilt.head_hidden_size == rebuilt.head.in_features == expected.shape[1]


def test_unknown_global_pool_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="global_pool must be one of .*'catavgmax'.*got 'median'"):
        _model("v1", global_pool="median")
    with pytest.raises(ValueError, match="global_pool must be one of .*got 'median'"):
        _model("v1").reset_classifier(3, "median")


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_empty_batch(tag: str) -> None:
    """A batch of no images (zero crops to classify, an empty shard) gives empty outputs, in
    inference and in training, at a size that pads groups and one that does not."""
    model = _model(tag, num_classes=7)
    features = _model(tag, features_only=True).eval()
    for size in [(64, 96), (70, 45)]:
        empty = torch.zeros(0, 3, *size)
        with torch.no_grad():
            assert model.eval()(empty).shape == (0, 7)
            assert [m.shape[:2] for m in features(empty)] == [(0, c) for c in features.feature_info.channels()]
        logits = model.train()(empty)
        logits.sum().backward()
        assert logits.shape == (0, 7) and all(not p.grad.any() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("setting, given", [
    ({"group_size": 2.5}, "2.5"),  # a TypeError: 'float' object is not iterable
    ({"interval": [8, 4, 2.5, 1]}, r"\[8, 4, 2.5, 1\]"),  # silently truncated to 2
])
def test_a_per_stage_setting_that_is_not_whole_is_refused_at_construction(setting: dict, given: str) -> None:
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"^{name} needs a whole number or one per stage, got {given}$"):
        timm.create_model("crossformer_tiny", embed_dim=16, depths=(1, 1, 1, 1), **setting)


@pytest.mark.parametrize("setting", [{"group_size": 0}, {"interval": [2, 2, 0, 1]}, {"num_heads": [1, 0, 4, 8]}])
def test_a_per_stage_setting_under_one_is_refused_at_construction(setting: dict) -> None:
    # group_size 0 divided by zero in the first forward; interval 0 was accepted and grouped nothing
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"^{name} must be at least 1 in every stage, got "):
        timm.create_model("crossformer_tiny", embed_dim=16, depths=(1, 1, 1, 1), **setting)


@pytest.mark.parametrize("setting, message", [
    # built, then failed only in training, deep inside: "bernoulli_ expects p to be in [0, 1], but got p=-0.5"
    ({"drop_path_rate": 1.5}, r"^drop_path_rate must be in \[0, 1\], got 1.5$"),
    ({"drop_path_rate": -0.1}, r"^drop_path_rate must be in \[0, 1\], got -0.1$"),
    # built, then "dropout probability has to be between 0 and 1" at the first training step
    ({"attn_drop_rate": 2.0}, r"^attn_drop_rate must be in \[0, 1\], got 2.0$"),
    # an IndexError while building
    ({"depths": (-1, 1, 1, 1)}, r"^depths must be at least 0 in every stage, got \(-1, 1, 1, 1\)$"),
    ({"depths": ()}, r"^depths needs at least one stage, got \(\)$"),
    # --model-arg depths=2,2,4,2 (YAML text, not a list): "'<' not supported between 'str' and 'int'"
    ({"depths": "2,2,4,2"}, r"^depths needs a list of whole numbers, one per stage \(e.g. \[2, 2, 6, 2\]\), got '2,2,4,2'$"),
    ({"depths": (1, 1.5, 1, 1)}, r"^depths needs a list of whole numbers, .*got \(1, 1.5, 1, 1\)$"),
    ({"depths": 4}, r"^depths needs a list of whole numbers, .*got 4$"),
    # torch's "negative dimension" RuntimeError while building; a ZeroDivisionError in CPU inference
    ({"mlp_ratio": -1}, r"^mlp_ratio must be a number above 0 that leaves the MLP at least one hidden channel "
                        r"\(embed_dim 16 x mlp_ratio >= 1\), got -1$"),
    ({"mlp_ratio": 0.05}, r"^mlp_ratio must be a number above 0 .*, got 0.05$"),  # 16 x 0.05: no hidden channel
    ({"mlp_ratio": float("nan")}, r"^mlp_ratio must be a number above 0 .*, got nan$"),
    ({"mlp_ratio": "4"}, r"^mlp_ratio must be a number above 0 .*, got '4'$"),
    # built, then "Given normalized_shape=[16], expected input with shape [*, 16]" at the first forward
    ({"in_chans": 0}, r"^in_chans must be a whole number of at least 1 \(3 for RGB images\), got 0$"),
    ({"in_chans": "3"}, r"^in_chans must be a whole number of at least 1 .*, got '3'$"),
])
def test_rates_and_depths_out_of_range_are_refused_at_construction(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        timm.create_model("crossformer_tiny", **{"embed_dim": 16, "depths": (1, 1, 1, 1), **setting})


@pytest.mark.parametrize("setting, message", [
    ({"patch_kernel_sizes": (4, 7)}, r"^patch_kernel_sizes \(4, 7\): kernel 7 does not fit stride 4; "),
    ({"patch_kernel_sizes": (2, 4, 8)}, r"^patch_kernel_sizes \(2, 4, 8\): kernel 2 does not fit stride 4; "),
    ({"merge_kernel_sizes": (2, 3, 5)}, r"^merge_kernel_sizes \(2, 3, 5\): kernel 3, 5 does not fit stride 2; "),
    ({"merge_kernel_sizes": (1, 2)}, r"^merge_kernel_sizes \(1, 2\): kernel 1 does not fit stride 2; "),
    ({"patch_kernel_sizes": ()}, r"^patch_kernel_sizes needs at least one kernel"),
    ({"patch_kernel_sizes": (4, 8, 12, 16, 20, 24)}, r"^patch_kernel_sizes .*: 6 kernels leave a branch of the 16 channels empty"),
    # 4 kernels split 20 channels as 10 + 5 + 2 + 2: a 19-channel map reached a LayerNorm(20)
    ({"embed_dim": 20}, r"^patch_kernel_sizes \(4, 8, 16, 32\): 4 kernels split the 20 channels as 10 \+ 5 \+ 2 \+ 2 = 19; "
                        r"the channels must be a multiple of 8: change embed_dim or use fewer kernels$"),
    ({"embed_dim": 17, "num_heads": (1, 1, 1, 1), "patch_kernel_sizes": (4,), "merge_kernel_sizes": (2, 4, 6)},
     r"^merge_kernel_sizes \(2, 4, 6\): 3 kernels split the 34 channels as 17 \+ 8 \+ 8 = 33; "),
])
def test_cross_scale_kernels_that_give_other_output_sizes_are_refused_at_construction(setting, message) -> None:
    # kernel 7 at stride 4 padded 1 gave one row fewer than kernel 4: a shape error inside torch.cat
    # at the first forward; kernels under the stride, negative padding; no kernel, an empty cat
    with pytest.raises(ValueError, match=message):
        timm.create_model("crossformer_tiny", **{"embed_dim": 16, "depths": (1, 1, 1, 1), **setting})


def test_cross_scale_kernels_of_even_difference_from_the_stride_all_give_one_size() -> None:
    model = timm.create_model(
        "crossformer_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), num_classes=3,
        patch_kernel_sizes=(6, 4, 10), merge_kernel_sizes=(2, 6),
    ).eval()
    # in any order given, the smallest kernel is projs.0 and takes the most channels (official keys)
    assert [(conv.kernel_size[0], conv.out_channels) for conv in model.patch_embed.projs] == [(4, 8), (6, 4), (10, 4)]
    with torch.no_grad():
        for size in [(64, 64), (67, 93)]:
            expected = [tuple((side - 4) // 4 + 1 for side in size)]  # the spec's floor((H - s) / s) + 1
            for _ in range(3):
                expected.append(tuple((side - 2) // 2 + 1 for side in expected[-1]))
            maps = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
            assert [tuple(m.shape[2:]) for m in maps] == expected
            assert model(torch.randn(1, 3, *size)).shape == (1, 3)
