"""The fast paths compute what the plain path computes, in eval and in training.

The plain path is tests/spec_reference.py (pads before qkv, recomputes the position bias on
every call, explicit softmax) and the model itself with its fast paths switched off
(``fused_attn = False``; grad enabled, which takes ``F.linear`` and skips the bias cache).
"""

from __future__ import annotations

import json

import pytest
import torch

from crossformer.cli import main as cli_main
from crossformer.models import CrossFormer, group_layout
from crossformer.models import crossformer as crossformer_module
from crossformer.models.crossformer import CrossFormerBlock, GroupAttention
from spec_reference import reference_forward

TOL = 1e-4
# Tiny models: both LDA semantics, every block kind (SDA, LDA, small-map, ACL).
CONFIGS = {
    "v1": dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), group_size=(7, 7, 7, 7),
               interval=(8, 4, 2, 1), use_acl=False, long_distance="fixed_interval"),
    "pp": dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), group_size=(4, 4, 14, 7),
               interval=(4, 2, 1, 1), use_acl=True, long_distance="fixed_group"),
}
# Square multiples of 32, non-multiples, non-square; several pad every stage.
SIZES = [(64, 64), (70, 94), (120, 40)]


def _model(tag: str, **overrides) -> CrossFormer:
    """A tiny model with every parameter moved off its init (so biases and norms matter)."""
    model = CrossFormer(**{**CONFIGS[tag], "num_classes": 10, "drop_path_rate": 0.0, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _spec_cfg(tag: str) -> dict:
    keys = ("depths", "num_heads", "group_size", "interval", "use_acl", "long_distance")
    return {k: CONFIGS[tag][k] for k in keys}


def _set_fused(model: CrossFormer, fused: bool) -> None:
    for m in model.modules():
        if isinstance(m, GroupAttention):
            m.fused_attn = fused


def _grads(model: CrossFormer, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("tag", ["v1", "pp"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_eval_matches_plain_paths(tag: str, size: tuple[int, int]) -> None:
    model = _model(tag).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref, _ = reference_forward(model.state_dict(), _spec_cfg(tag), x)
        fast = model(x)  # SDPA, oneDNN linears (CPU), position bias computed and cached
        cached = model(x)  # position bias from the cache
        _set_fused(model, False)
        explicit = model(x)  # explicit softmax
    with torch.inference_mode():
        _set_fused(model, True)
        inference = model(x)
    autograd = model(x).detach()  # grad enabled: F.linear, no cache, explicit softmax on CPU
    for out in (fast, cached, explicit, inference, autograd):
        assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("tag", ["v1", "pp"])
@pytest.mark.parametrize("size", [(64, 64), (70, 94)], ids=["64x64", "70x94"])
def test_training_gradients_match_plain_paths(tag: str, size: tuple[int, int]) -> None:
    model = _model(tag).train()
    x = torch.randn(2, 3, *size)
    target = torch.tensor([1, 7])

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, target)

    fast_logits = model(x)
    fast = _grads(model, loss_of(fast_logits))
    # The reference runs on the model's own parameters, so autograd reaches them.
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    ref_logits, _ = reference_forward(state, _spec_cfg(tag), x)
    ref = _grads(model, loss_of(ref_logits))
    _set_fused(model, False)
    plain = _grads(model, loss_of(model(x)))
    model.set_grad_checkpointing(True)
    _set_fused(model, True)
    checkpointed = _grads(model, loss_of(model(x)))

    assert (fast_logits - ref_logits).abs().max().item() <= TOL
    assert _max_diff(fast, ref) <= TOL
    assert _max_diff(plain, ref) <= TOL
    assert _max_diff(checkpointed, ref) <= TOL


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_inference_mlp_row_chunks_equal_the_whole_map(monkeypatch, tag: str) -> None:
    """Where one image's MLP activations exceed the stage budget (dense sizes), a block's MLP
    residual runs a few rows at a time; the output is unchanged and hooks still see maps."""
    model = _model(tag).eval()
    x = torch.randn(2, 3, 70, 94)
    with torch.inference_mode():
        whole = model.forward_intermediates(x, intermediates_only=True)
    seen: list[tuple[int, ...]] = []
    forward = crossformer_module.GeluMlp.forward
    monkeypatch.setattr(crossformer_module.GeluMlp, "forward", lambda self, t: seen.append(tuple(t.shape)) or forward(self, t))
    # stage 0: 17x23 tokens x 128 hidden x 4 bytes = 200 KB an image, over a 100 KB budget: one
    # image a time, and its 391 rows 100 at a time (51 KB chunks)
    monkeypatch.setattr(crossformer_module, "INFERENCE_CHUNK_BYTES", 100_000)
    monkeypatch.setattr(crossformer_module, "MLP_CHUNK_BYTES", 100 * 128 * 4)
    with torch.inference_mode():
        chunked = model.forward_intermediates(x, intermediates_only=True)
    assert seen[:4] == [(100, 32), (100, 32), (100, 32), (91, 32)], seen[:5]
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a hook on a block's MLP: it sees the whole map (its stage runs unchunked too)
    hooked_shapes = []
    block = model.layers[0].blocks[0]
    handle = block.mlp.register_forward_hook(lambda m, args, out: hooked_shapes.append(tuple(args[0].shape)))
    with torch.inference_mode():
        model(x)
    handle.remove()
    assert hooked_shapes == [(2, 17, 23, 32)]
    # training (and any pass with gradients) keeps the map whole
    seen.clear()
    model(x[:1])
    assert seen[0] == (1, 17, 23, 32)
    # so does a training-mode pass without gradients whose drop path draws per image
    seen.clear()
    dropping = _model(tag).train()
    for block in dropping.modules():
        if isinstance(block, CrossFormerBlock):
            block.drop_path.drop_prob = 0.2  # the first block too (the rate grows from 0 with depth)
    with torch.no_grad():
        dropping(x[:1])
    assert seen[0] == (1, 17, 23, 32), seen[:2]


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_inference_chunks_equal_whole_batch(monkeypatch, tag: str) -> None:
    """CPU inference runs stages a few images at a time; each image's output is unchanged."""
    model = _model(tag).eval()
    x = torch.randn(5, 3, 70, 94)
    stage_batches = []
    # a hook would keep the stage whole: the first blocks' calls are counted by their class's forward
    firsts, forward = {id(stage.blocks[0]) for stage in model.layers}, CrossFormerBlock.forward
    monkeypatch.setattr(CrossFormerBlock, "forward",
                        lambda self, t: (id(self) in firsts and stage_batches.append(t.shape[0])) or forward(self, t))
    with torch.inference_mode():
        whole = model(x)
        assert stage_batches == [5] * 4, "tiny tensors: no chunking"
        stage_batches.clear()
        # stage 0 of this model: 17x23 tokens x 128 hidden x 4 bytes = 200 KB per image
        monkeypatch.setattr(crossformer_module, "INFERENCE_CHUNK_BYTES", 2 * 17 * 23 * 128 * 4)
        chunked = model(x)
        features = model.forward_intermediates(x, intermediates_only=True)
    assert stage_batches[:3] == [2, 2, 1], stage_batches
    # even chunks: 5 images at 4 at most run as 3 and 2 (they ran as 4 and 1)
    stage_batches.clear()
    monkeypatch.setattr(crossformer_module, "INFERENCE_CHUNK_BYTES", 4 * 17 * 23 * 128 * 4)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), whole, rtol=1e-5, atol=1e-5)
    assert stage_batches[:2] == [3, 2], stage_batches
    # equal to float32 rounding: a chunk's linears have fewer rows, a shape class whose
    # backend (MKL or oneDNN) was measured apart from the whole batch's
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    # the chunks are put back in order: each image's features match it alone
    with torch.inference_mode():
        alone = model.forward_intermediates(x[3:4], intermediates_only=True)
    for got, want in zip(features, alone):
        torch.testing.assert_close(got[3:4], want, rtol=1e-5, atol=1e-5)
    # with gradients (training, export) a stage always sees the whole batch
    stage_batches.clear()
    model(x)
    assert stage_batches == [5] * 4


@pytest.mark.parametrize("row_chunks", (False, True))
def test_stage_chunks_land_in_one_output(monkeypatch, row_chunks: bool) -> None:
    """A stage's chunks after the first are written by its last block straight into their rows
    of the stage's output (no concatenation), with the MLP's row chunks too; each image's output
    is unchanged. A hook on the last block sees the whole batch: the stage then runs it whole."""
    model = _model("pp").eval()
    x = torch.randn(5, 3, 70, 94)
    with torch.inference_mode():
        whole = model.forward_intermediates(x, intermediates_only=True)
    written: list[tuple[int, ...]] = []
    forward_into = CrossFormerBlock.forward_into
    monkeypatch.setattr(
        CrossFormerBlock, "forward_into", lambda self, t, out: written.append(tuple(out.shape)) or forward_into(self, t, out)
    )
    monkeypatch.setattr(crossformer_module, "INFERENCE_CHUNK_BYTES", 2 * 17 * 23 * 128 * 4)  # stage 0: 2, 2, 1 images
    if row_chunks:
        monkeypatch.setattr(crossformer_module, "MLP_CHUNK_BYTES", 100 * 128 * 4)
        monkeypatch.setattr(crossformer_module, "mlp_rows_per_chunk", lambda t, hidden: 100)
    with torch.inference_mode():
        chunked = model.forward_intermediates(x, intermediates_only=True)
    assert written[:2] == [(2, 17, 23, 32), (1, 17, 23, 32)], written  # the first chunk is the last block's own
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    written.clear()
    seen = []
    handle = model.layers[0].blocks[-1].register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[0], whole[0], rtol=1e-5, atol=1e-5)
    handle.remove()
    assert seen == [5] and all(shape[1:] != (17, 23, 32) for shape in written)
    # a block of another class in its place, or a forward set on the block, runs as called
    last = model.layers[0].blocks[-1]

    class Halved(CrossFormerBlock):
        def forward(self, x):
            return super().forward(x) * 0.5

    last.__class__ = Halved
    with torch.inference_mode():
        halved = model.layers[0](model.patch_embed(x))
    last.__class__ = CrossFormerBlock
    last.forward = lambda t: CrossFormerBlock.forward(last, t) * 0.5
    with torch.inference_mode():
        set_on_block = model.layers[0](model.patch_embed(x))
    del last.forward
    monkeypatch.setattr(crossformer_module, "INFERENCE_CHUNK_BYTES", 1 << 30)  # whole batches
    with torch.inference_mode():
        want = model.layers[0](model.patch_embed(x)) * 0.5
    torch.testing.assert_close(halved, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(set_on_block, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_group_order_residual_matches_map_order(monkeypatch, tag: str) -> None:
    """Unpadded layouts add the attention's output in group order (``forward_groups``);
    padded ones, GPUs and graph capture take the map-order path. Both compute the same thing."""
    model = _model(tag)
    x = torch.randn(2, 3, 224, 224)  # v1: no stage pads; pp: its LDA blocks of stages 0-1 pad
    target = torch.tensor([1, 7])
    grouped_calls = []
    forward_groups = GroupAttention.forward_groups

    def counting(self, *args):
        grouped_calls.append(self)
        return forward_groups(self, *args)

    monkeypatch.setattr(GroupAttention, "forward_groups", counting)

    def run() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            evaluated = model.eval()(x)
        logits = model.train()(x)
        return evaluated, logits, _grads(model, torch.nn.functional.cross_entropy(logits, target))

    grouped = run()
    blocks = [b for stage in model.layers for b in stage.blocks]
    unpadded = sum(b.layout(56 >> s, 56 >> s)[3:] == (56 >> s, 56 >> s)
                   for s, stage in enumerate(model.layers) for b in stage.blocks)
    assert len(grouped_calls) == 2 * unpadded and 0 < unpadded <= len(blocks)
    assert unpadded == len(blocks) if tag == "v1" else unpadded < len(blocks)
    grouped_calls.clear()
    monkeypatch.setattr(crossformer_module, "groups_tile_map", lambda x, layout: False)
    in_map = run()
    assert not grouped_calls
    assert (grouped[0] - in_map[0]).abs().max().item() <= 1e-5
    assert (grouped[1] - in_map[1]).abs().max().item() <= 1e-5
    assert _max_diff(grouped[2], in_map[2]) <= TOL


@pytest.mark.parametrize("path", ["forward", "forward_groups"])
def test_attention_dropout_applies_in_training_only(path: str) -> None:
    """``attn_drop`` drops attention weights in training only, on both residual paths (map
    order and group order): in eval the attention computes what it does without dropout."""
    attention = GroupAttention(32, 2)
    layout = group_layout(14, 14, 7, 2, True, "fixed_interval")
    x = torch.randn(2, 14, 14, 32)
    run = getattr(attention, path)
    for training in (False, True):
        attention.train(training)
        with torch.no_grad():
            attention.attn_drop = 0.0
            expected = run(x, layout)
            attention.attn_drop = 0.5
            dropped = run(x, layout)
        assert ((dropped - expected).abs().max().item() > 1e-3) == training


def test_residual_drop_path_is_timms_drop_path_added() -> None:
    """In training each image's branch is dropped, or kept and scaled by 1 / keep, as timm's
    ``DropPath`` does with the same random numbers; in eval the branch is added as it is."""
    from timm.layers import DropPath

    from crossformer.models.layers import ResidualDropPath

    x, branch = torch.randn(64, 3, 5), torch.randn(64, 3, 5)
    for rate in (0.0, 0.3, 1.0):
        torch.manual_seed(1)
        ours = ResidualDropPath(rate).train()(x, branch)
        torch.manual_seed(1)
        assert torch.allclose(ours, x + DropPath(rate).train()(branch), atol=1e-6)
        assert torch.equal(ResidualDropPath(rate).eval()(x, branch), x + branch)


@pytest.mark.parametrize("size", [(14, 14), (10, 17)], ids=["groups-tile-the-map", "padded"])
def test_stochastic_depth_drops_the_branches_not_the_residual(size: tuple[int, int]) -> None:
    """A training block that drops every path (rate 1) adds nothing to its input: both
    residual paths (group order for maps the groups tile, map order for padded ones)."""
    block = CrossFormerBlock(32, 2, 7, 2, False, "fixed_interval", drop_path=1.0).train()
    x = torch.randn(2, *size, 32)
    assert torch.equal(block(x), x)


def _bias_cache_sizes(model: CrossFormer) -> list[int]:
    return [len(m._bias_cache) for m in model.modules() if isinstance(m, GroupAttention)]


def test_position_bias_cache_lifecycle(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("pp").eval()
    x = torch.randn(2, 3, 70, 94)
    with torch.no_grad():
        first = model(x)
    assert all(n >= 1 for n in _bias_cache_sizes(model)), "eval forward must fill the cache"

    # The cache is really used: a second call runs no position-bias MLP (counted by its class's
    # forward: a hook would turn the cache off).
    calls = []
    forward = crossformer_module.DynamicPositionBias.forward
    with monkeypatch.context() as patch:
        patch.setattr(crossformer_module.DynamicPositionBias, "forward", lambda self, t: calls.append(1) or forward(self, t))
        with torch.no_grad():
            assert torch.equal(model(x), first)
    assert not calls

    # An optimizer step changes the weights: the stale entries are not used.
    model.train()
    assert sum(_bias_cache_sizes(model)) == 0, "train() must clear the cache"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        model(x)  # fills the cache with the new weights
        stepped = model(x)
        expected, _ = reference_forward(model.state_dict(), _spec_cfg("pp"), x)
    assert (stepped - expected).abs().max().item() <= TOL
    assert (stepped - first).abs().max().item() > 1e-3

    # In-place edits and load_state_dict without a mode switch also invalidate it.
    other = _model("pp").eval()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = model(x)
        expected = other(x)
    assert (loaded - expected).abs().max().item() <= TOL
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GroupAttention):
                m.pos.pos_proj.bias.add_(0.5)
        edited = model(x)
        expected, _ = reference_forward(model.state_dict(), _spec_cfg("pp"), x)
    assert (edited - expected).abs().max().item() <= TOL


def test_position_bias_cache_keeps_autocast_and_float32_apart() -> None:
    # autocast computes the bias in bf16: once cached, float32 calls used that rounded bias
    # (1e-4 off in these logits) until the next eval(), and autocast calls float32's
    model = _model("pp").eval()
    x = torch.randn(2, 3, 70, 94)
    with torch.no_grad():
        expected = model(x)
        model.eval()  # empties the caches
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected_bf16 = model(x)
        assert torch.equal(model(x), expected)
        model.eval()
        model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(x), expected_bf16)


def test_no_cache_while_gradients_flow() -> None:
    model = _model("v1").eval()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert sum(_bias_cache_sizes(model)) == 0
    assert all(p.grad is not None for n, p in model.named_parameters() if ".pos." in n)


def test_compiled_model_matches_eager() -> None:
    model = CrossFormer(embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 1, 2, 2), group_size=(4, 4, 14, 7),
                        interval=(4, 2, 1, 1), use_acl=False, long_distance="fixed_group", num_classes=3).eval()
    x = torch.randn(2, 3, 70, 94)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        eager = model(x)
        assert (compiled(x) - eager).abs().max().item() <= TOL
        assert (compiled(x) - eager).abs().max().item() <= TOL  # second call (cache path)


def test_benchmark_command_json(capsys) -> None:
    code = cli_main([
        "benchmark", "--model", "crossformer_tiny", "--compare", "test_vit", "--img-size", "32",
        "--batch-size", "1", "--rounds", "1", "--warmup", "0", "--num-classes", "10", "--json",
    ])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("infer_ratio", "train_ratio", "infer_images_per_s", "train_images_per_s", "infer_peak_mem_mb"):
        assert key in out
    assert out["infer_ratio"] > 0 and out["train_ratio"] > 0


def test_benchmark_gives_the_input_size_only_to_timm_models_built_for_one(capsys) -> None:
    """``--img-size 32`` gave every model but a CrossFormer ``img_size=``: resnet18 and the other
    convolutional timm models stopped with "unexpected keyword argument 'img_size'"."""
    from crossformer.benchmark import BenchConfig, build_model

    config = BenchConfig(img_size=(32, 32), num_classes=10, memory=False)
    assert build_model("test_resnet", config).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert tuple(build_model("test_vit", config).patch_embed.img_size) == (32, 32)  # built for one size
    assert cli_main(["benchmark", "--model", "test_resnet", "--img-size", "32", "--batch-size", "2", "--rounds", "1",
                     "--warmup", "0", "--num-classes", "10", "--no-memory", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["infer_images_per_s"] > 0


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_model_built_under_inference_mode(tag: str) -> None:
    """Inference tensors keep no version counter: the weight caches step aside for them, and
    an in-place change of a weight shows in the next output."""
    torch.manual_seed(0)
    reference = _model(tag).eval()
    x = torch.randn(2, 3, 70, 94)
    with torch.inference_mode():
        model = CrossFormer(**{**CONFIGS[tag], "num_classes": 10, "drop_path_rate": 0.0}).eval()
        model.load_state_dict(reference.state_dict())
        assert model.head.weight.is_inference()
        torch.testing.assert_close(model(x), reference(x), atol=TOL, rtol=0)
        model.layers[0].blocks[0].attn.pos.pos_proj.weight.mul_(2)
        model.layers[0].blocks[0].attn.qkv.weight.mul_(2)
    with torch.no_grad():
        reference.layers[0].blocks[0].attn.pos.pos_proj.weight.mul_(2)
        reference.layers[0].blocks[0].attn.qkv.weight.mul_(2)
        expected = reference(x)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, atol=TOL, rtol=0)


def test_benchmark_summary_keeps_three_figures_of_slow_rates() -> None:
    from crossformer.benchmark import _rate

    assert [_rate(v) for v in (0.04234, 1.234, 37.21, 1234.56)] == ["0.0423", "1.23", "37.2", "1234.6"]


@pytest.mark.parametrize("backend", ("onednn", "mkl", "measured"))
def test_inference_linear_matches_plain(backend: str) -> None:
    """CPU inference linears, on either backend or the one measured faster, compute F.linear (and GELU)."""
    import contextlib

    from crossformer.models.layers import GeluMlp, force_gemm_backend, linear

    layer = torch.nn.Linear(32, 96)
    mlp = GeluMlp(32, 128).eval()
    x = torch.randn(2, 9, 11, 32)[:, :7, :5]  # non-contiguous, as after a crop
    plain = torch.nn.functional.gelu(layer(x)).detach()
    plain_no_gelu = layer(x).detach()
    plain_mlp = mlp(x).detach()
    with torch.no_grad(), contextlib.nullcontext() if backend == "measured" else force_gemm_backend(backend):
        assert (linear(x, layer.weight, layer.bias, gelu=True) - plain).abs().max().item() <= 1e-5
        assert (linear(x, layer.weight, None) - (plain_no_gelu - layer.bias)).abs().max().item() <= 1e-5
        assert (mlp(x) - plain_mlp).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kernel, size", [(32, (224, 224)), (16, (70, 94)), (32, (33, 47)), (16, (61, 32))])
def test_large_kernel_conv_gradients_match_conv2d(kernel: int, size: tuple[int, int]) -> None:
    """The space-to-depth weight gradient equals oneDNN's, at sizes that do not divide by 4."""
    from crossformer.models.layers import LargeKernelConv2d

    torch.manual_seed(0)
    conv = LargeKernelConv2d(3, 8, kernel, stride=4, padding=(kernel - 4) // 2)
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = conv(x)
    assert "LargeKernelConv" in type(out.grad_fn).__name__
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad_out)
    plain = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=4, padding=(kernel - 4) // 2)
    want = torch.autograd.grad(plain, (x, conv.weight, conv.bias), grad_out)
    assert torch.equal(out, plain)
    for g, w in zip(got, want):
        # sums of ~6000 products of unit normals, in another order
        assert (g - w).abs().max().item() <= 1e-5 * max(1.0, w.abs().max().item())


def test_large_kernel_conv_under_bf16_autocast() -> None:
    """bf16 autocast training takes the space-to-depth weight gradient too (oneDNN's own is as slow
    in bf16): the output is autocast's conv's, the gradients float32 and within bf16's steps."""
    from crossformer.models.layers import LargeKernelConv2d

    torch.manual_seed(0)
    conv = LargeKernelConv2d(3, 8, 16, stride=4, padding=6)
    x = torch.randn(2, 3, 61, 70, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        plain = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=4, padding=6)
    assert "LargeKernelConv" in type(out.grad_fn).__name__ and out.dtype == torch.bfloat16
    assert torch.equal(out, plain)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad_out)
    want = torch.autograd.grad(plain, (x, conv.weight, conv.bias), grad_out)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        assert (g - w).abs().max().item() <= 2e-2 * w.abs().max().item()


@pytest.mark.parametrize("family", [{}, {"use_acl": True, "long_distance": "fixed_group"}])
def test_backward_inside_the_autocast_block_equals_backward_after_it(family: dict) -> None:
    # loss.backward() inside `with torch.autocast("cpu", dtype=torch.bfloat16):` (common in user
    # code; fine for timm's Swin) raised "Input dtypes must be the same" in the attention's backward
    torch.manual_seed(0)
    model = CrossFormer(embed_dim=32, depths=(1, 1, 4, 1), num_heads=(1, 2, 4, 8), num_classes=5, **family).train()
    x = torch.randn(2, 3, 64, 64)

    def gradients(inside: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)  # the same stochastic depth draws
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    after, inside = gradients(False), gradients(True)
    assert all(inside[name].dtype == torch.float32 and torch.equal(inside[name], after[name]) for name in after)


def test_packed_weights_follow_the_weights() -> None:
    """Inference reuses oneDNN-packed weights, repacks after any change, frees them in training."""
    from crossformer.models import layers

    if layers._REORDER_LINEAR_WEIGHT is None:
        pytest.skip("this PyTorch build has no oneDNN weight packing")
    mlp = layers.GeluMlp(32, 128).eval()
    x = torch.randn(3, 5, 7, 32)
    onednn = layers.force_gemm_backend("onednn")  # packing is oneDNN's; a timing may pick MKL here
    with torch.inference_mode(), onednn:
        first = mlp(x)
        packed = layers._PACKED_WEIGHTS[mlp.fc1.weight][1]
        assert torch.equal(mlp(x), first)
        assert layers._PACKED_WEIGHTS[mlp.fc1.weight][1] is packed, "packed once, then reused"
    with torch.no_grad():
        plain = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))  # nn.Linear itself: the plain path
    assert (first - plain).abs().max().item() <= 1e-5
    # an in-place change (optimizer step, load_state_dict) is seen
    with torch.no_grad():
        mlp.fc1.weight.mul_(2.0)
    with torch.inference_mode(), layers.force_gemm_backend("onednn"):
        changed = mlp(x)
        assert layers._PACKED_WEIGHTS[mlp.fc1.weight][1] is not packed
    expected = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))).detach()
    assert (changed - expected).abs().max().item() <= 1e-5
    mlp.train()
    assert mlp.fc1.weight not in layers._PACKED_WEIGHTS and mlp.fc2.weight not in layers._PACKED_WEIGHTS


def test_caches_after_a_precision_round_trip() -> None:
    """``.to(bfloat16).to(float32)`` (or ``.half().float()``) puts new storage under the same
    parameters through ``.data``; where it took the freed address (always, at this size: its
    own mapping), the packed copy of the old weights was used, 1e-2 off."""
    from crossformer.models import layers

    if layers._REORDER_LINEAR_WEIGHT is None:
        pytest.skip("this PyTorch build has no oneDNN weight packing")
    layer = torch.nn.Linear(4096, 4096)  # 64 MB: mapped and unmapped on its own by malloc
    x = torch.randn(8, 4096)
    with torch.no_grad(), layers.force_gemm_backend("onednn"):
        layers.linear(x, layer.weight, layer.bias)
        layer.to(torch.bfloat16).to(torch.float32)
        torch.testing.assert_close(layers.linear(x, layer.weight, layer.bias),
                                   torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-4, atol=1e-4)
    # a module holding such caches drops them when converted or moved: they held the old weights' copies
    mlp = layers.GeluMlp(32, 64).eval()
    with torch.no_grad(), layers.force_gemm_backend("onednn"):
        mlp(torch.randn(4, 32))
    assert mlp.fc1.weight in layers._PACKED_WEIGHTS
    mlp.to(torch.bfloat16)
    assert mlp.fc1.weight not in layers._PACKED_WEIGHTS and mlp.fc2.weight not in layers._PACKED_WEIGHTS


def test_eval_drops_caches_an_edit_through_data_bypasses() -> None:
    """``p.data`` edits keep the version the caches check; ``model.eval()`` makes them seen."""
    from crossformer.models.winograd import Conv3x3

    model = _model("pp").eval()
    conv = Conv3x3(384, 256).eval()
    x, maps = torch.randn(2, 3, 70, 94), torch.randn(1, 384, 6, 5)
    with torch.no_grad():
        model(x), conv(maps)  # fill the position-bias, packed-weight and Winograd caches
        for p in [*model.parameters(), *conv.parameters()]:
            p.data.mul_(1.5)
        model.eval(), conv.eval()
        expected, _ = reference_forward(model.state_dict(), _spec_cfg("pp"), x)
        plain = torch.nn.functional.conv2d(maps, conv.weight, conv.bias, padding=1)
        assert (model(x) - expected).abs().max().item() <= TOL
        assert (conv(maps) - plain).abs().max().item() <= 1e-4


# Linear layers are modules as in timm's models: hooks on them fire, and a layer put in
# their place (an adapter, a quantized layer) is what runs. The fast paths read the weights
# of plain, unhooked nn.Linear layers only.

_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.act", "mlp.fc2")


@pytest.mark.parametrize("mode, hooked", [("eval", _LINEARS), ("train", _LINEARS), ("eval", ("attn.proj",))],
                         ids=["eval", "train", "eval-proj-only"])
def test_hooks_on_the_linear_layers_fire(mode: str, hooked: tuple[str, ...]) -> None:
    model = _model("pp").train(mode == "train")
    x = torch.randn(2, 3, 64, 64)  # every stage has groups that tile the map and padded ones
    with torch.no_grad():
        expected = model(x)
    calls, shapes = [], set()

    def hook(layer, args, output, name):
        calls.append(name)
        shapes.add((name, args[0].ndim))  # a map (B, H, W, C) in every block, as it is without hooks

    blocks = [block for stage in model.layers for block in stage.blocks]
    handles = [block.get_submodule(name).register_forward_hook(lambda *args, name=name: hook(*args, name))
               for block in blocks for name in hooked]
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= TOL
    for handle in handles:
        handle.remove()
    assert sorted(calls) == sorted(hooked * len(blocks))
    assert shapes == {(name, 4) for name in hooked}


@pytest.mark.parametrize("kind", ["forward_pre", "forward"])
def test_global_hooks_fire_on_the_linear_layers(kind: str) -> None:
    """A hook registered for every module (``register_module_forward_hook`` or its pre-hook,
    as FLOP counters and profilers do) fires on each block's linear layers too."""
    model = _model("pp").eval()
    linears = {id(block.get_submodule(name)) for stage in model.layers for block in stage.blocks
               for name in _LINEARS if name != "mlp.act"}
    called = set()
    register = getattr(torch.nn.modules.module, f"register_module_{kind}_hook")
    handle = register(lambda module, *args: called.add(id(module)))
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 64, 64))
    finally:
        handle.remove()
    assert linears <= called


class _NoAttention(torch.nn.Module):
    """Put in place of a block's attention: its residual adds nothing."""

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        return torch.zeros_like(x)


class _SilencedAttention(GroupAttention):
    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        return torch.zeros_like(x)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_the_attention_modules_hooks_subclasses_and_replacements_run(grad: bool) -> None:
    # where the groups tiled the map, the block ran the attention's forward_groups itself: a hook
    # on block.attn never fired, a subclass's forward was not called, a replacement raised
    # "'_NoAttention' object has no attribute 'qkv'"
    model = _model("pp").eval()
    x = torch.randn(2, 3, 64, 64)  # every stage has groups that tile the map and padded ones
    blocks = [block for stage in model.layers for block in stage.blocks]
    calls = []
    with torch.set_grad_enabled(grad):
        expected = model(x)
        handles = [block.attn.register_forward_hook(lambda m, args, out: calls.append(1) or torch.zeros_like(out))
                   for block in blocks]
        zeroed = model(x)
        for handle in handles:
            handle.remove()
        silenced = _model("pp").eval()
        silenced.load_state_dict(model.state_dict())
        replaced = _model("pp").eval()
        replaced.load_state_dict(model.state_dict())
        pairs = [(a, b) for a, b in zip(silenced.modules(), replaced.modules()) if isinstance(a, CrossFormerBlock)]
        for block, other in pairs:
            attention = _SilencedAttention(block.norm1.normalized_shape[0], block.attn.num_heads)
            attention.load_state_dict(block.attn.state_dict())
            block.attn, other.attn = attention, _NoAttention()
        assert len(calls) == len(blocks)
        assert (zeroed - expected).abs().max().item() > 1e-3  # the hook's zeros were added
        assert (silenced(x) - zeroed).abs().max().item() <= TOL
        assert (replaced(x) - zeroed).abs().max().item() <= TOL


def test_hooks_inside_a_stage_see_the_whole_batch_in_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU inference ran a stage on parts of the batch and a large map's MLP a few rows at a time:
    # a hook on a block saw half the batch twice, a hook on fc1 (8192, 64) rows instead of the map
    monkeypatch.setattr(crossformer_module, "INFERENCE_CHUNK_BYTES", 1)  # every image its own chunk
    monkeypatch.setattr(crossformer_module, "MLP_CHUNK_BYTES", 64 * 128 * 4)  # 64 rows at a time
    model = _model("pp").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    seen = []
    stage = model.layers[0]
    for name in ("blocks.0", "blocks.1.mlp.fc1", "blocks.1.attn.qkv"):
        stage.get_submodule(name).register_forward_hook(lambda m, args, out, name=name: seen.append((name, out.shape)))
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= TOL
    assert seen == [("blocks.0", (2, 16, 16, 32)), ("blocks.1.attn.qkv", (2, 16, 16, 96)),
                    ("blocks.1.mlp.fc1", (2, 16, 16, 128))]


def test_hooks_on_the_position_bias_are_seen_and_their_removal_too() -> None:
    # in no_grad inference the bias was computed once and cached: hooks added afterwards never
    # fired, and a hooked first call's bias stayed after the hooks were removed
    model = _model("pp").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)  # fills the bias cache
    handles = [block.attn.pos.pos3.register_forward_hook(lambda m, args, out: out * 0)
               for stage in model.layers for block in stage.blocks]
    with torch.no_grad():
        ablated = model(x)
    assert (ablated - model(x)).abs().max().item() <= TOL  # grad mode: nothing cached
    assert (ablated - expected).abs().max().item() > 1e-3
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("tag", ["v1", "pp"])
def test_gradients_of_gradients_and_forward_mode_as_in_float64(tag: str) -> None:
    # a gradient penalty raised "trying to differentiate twice a function that was marked with
    # @once_differentiable", forward-mode AD "You must implement the jvp function", torch.func.grad
    # with respect to the image "not differentiable with respect to argument 'attn_mask'"
    import copy

    import torch.autograd.forward_ad as forward_ad

    model = _model(tag).train()
    reference = copy.deepcopy(model).double()  # float64: no fast path applies
    x = torch.randn(2, 3, 64, 64)

    def penalty_gradients(m: CrossFormer, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = image.clone().requires_grad_()
        (grad,) = torch.autograd.grad(m(image).square().sum(), image, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), list(m.parameters()))

    ours, expected = penalty_gradients(model, x), penalty_gradients(reference, x.double())
    largest = max(g.abs().max().item() for g in expected)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * largest)
    model.eval(), reference.eval()
    tangent = torch.randn_like(x)

    def directional(m: CrossFormer, image: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(m(forward_ad.make_dual(image, direction))).tangent

    torch.testing.assert_close(directional(model, x, tangent).double(),
                               directional(reference, x.double(), tangent.double()), rtol=1e-4, atol=1e-5)
    saliency = torch.func.grad(lambda image: model(image)[:, 3].sum())(x)
    image = x.double().requires_grad_()
    reference(image)[:, 3].sum().backward()
    torch.testing.assert_close(saliency.double(), image.grad, rtol=1e-4, atol=1e-6)


class _LowRankAdapted(torch.nn.Linear):
    """``x W^T + b + x A^T B^T`` (LoRA): what ``W + B A`` computes, as a separate layer."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.up = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.down.t() @ self.up.t()


class _LowRankWrapper(torch.nn.Module):
    """The same as a module holding the linear (most LoRA libraries): no ``weight``, no ``out_features``."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.up = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.down.t() @ self.up.t()


@pytest.mark.parametrize("adapter", [_LowRankAdapted, _LowRankWrapper], ids=["subclass", "wrapper"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_layer_put_in_place_of_a_linear_is_what_runs(mode: str, adapter: type) -> None:
    # a wrapper raised "'_LowRankWrapper' object has no attribute 'weight'" in model.train() and
    # model.eval(), and "... no attribute 'out_features'" in every forward where it was fc1
    adapted = _model("pp").train(mode == "train")
    merged = _model("pp").train(mode == "train")
    merged.load_state_dict(adapted.state_dict())
    for stage_a, stage_m in zip(adapted.layers, merged.layers):
        for block_a, block_m in zip(stage_a.blocks, stage_m.blocks):
            for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                parent, attribute = name.split(".")
                layer = adapter(block_a.get_submodule(name))
                setattr(block_a.get_submodule(parent), attribute, layer)
                with torch.no_grad():
                    block_m.get_submodule(name).weight.add_(layer.up @ layer.down)
    adapted.train(mode != "train").train(mode == "train")
    from crossformer.models.flops import analytic_macs  # (it read fc1.out_features)

    assert analytic_macs(adapted, 64, 64) == analytic_macs(merged, 64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (adapted(x) - merged(x)).abs().max().item() <= TOL
    adapted(x).sum().backward()
    assert all(p.grad is not None for n, p in adapted.named_parameters() if n.endswith((".down", ".up")))


def test_pruned_linear_layers_train() -> None:
    from torch.nn.utils import prune

    model = _model("v1").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    fc1 = model.layers[0].blocks[0].mlp.fc1
    prune.l1_unstructured(fc1, "weight", amount=0.5)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):  # the mask's forward pre-hook recomputes the weight at every call
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    assert torch.equal(fc1.weight == 0, fc1.weight_mask == 0)


def test_an_activation_put_in_place_of_the_exact_gelu_is_what_runs() -> None:
    from crossformer.models.layers import GeluMlp

    mlp = GeluMlp(32, 128).eval()
    mlp.act = torch.nn.GELU(approximate="tanh")  # was fused into fc1 as the exact GELU
    x = torch.randn(3, 5, 7, 32)
    with torch.no_grad():
        expected = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh"))
        assert (mlp(x) - expected).abs().max().item() <= 1e-5


def test_a_dynamically_quantized_model_runs_its_quantized_layers() -> None:
    # quantize_dynamic swaps every nn.Linear for an int8 layer whose ``weight`` is a method:
    # the position bias read its device there and failed with AttributeError
    model = _model("pp").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    int8_layers = [m for m in quantized.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    called = set()
    for layer in int8_layers:
        layer.register_forward_hook(lambda layer, args, output: called.add(id(layer)))
    with torch.no_grad():
        out = quantized(x)
    assert len(called) == len(int8_layers) > 0  # each int8 layer ran, none was read as a float weight
    assert 0 < (out - expected).abs().max().item() <= 0.1 * expected.abs().max().item()
