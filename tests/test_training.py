"""Training behaviour: gradients everywhere, drop path, gradient checkpointing, compile."""

from __future__ import annotations

import pytest
import timm
import torch

import crossformer  # noqa: F401
from crossformer.models import CrossFormer

# Stage maps at 72x88: 18x22, 9x11, 4x5, 2x2 -> padding and LDA in the first stages.
TINY_V1 = dict(embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 4), group_size=(4, 4, 3, 3),
               interval=(4, 2, 1, 1), num_classes=5)


@pytest.mark.parametrize("long_distance, use_acl", [("fixed_interval", False), ("fixed_group", True)])
def test_every_parameter_gets_a_gradient(long_distance: str, use_acl: bool) -> None:
    # embed_dim 64: the DPB width C // 16 must exceed 1, else its LayerNorm is constant.
    depths = (4, 2, 2, 1) if use_acl else TINY_V1["depths"]
    model = CrossFormer(**{**TINY_V1, "depths": depths, "embed_dim": 64}, long_distance=long_distance,
                        use_acl=use_acl)
    model(torch.randn(2, 3, 72, 88)).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        # The DPB's last bias shifts every score of a head equally: softmax ignores it.
        if not name.endswith("pos.pos3.2.bias"):
            assert param.grad.abs().sum() > 0, name
    if use_acl:
        assert model.layers[0].blocks[2].ex_conv is not None


def test_drop_path_is_active_in_training_only() -> None:
    model = CrossFormer(**TINY_V1, drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x = torch.randn(2, 3, 72, 88)
    plain = CrossFormer(**TINY_V1, drop_path_rate=0.0)
    checkpointed = CrossFormer(**TINY_V1, drop_path_rate=0.0)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing()
    assert all(stage.grad_checkpointing for stage in checkpointed.layers)
    for model in (plain, checkpointed):
        model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_timm_grad_checkpointing_api() -> None:
    model = timm.create_model("crossformer_pp_small", embed_dim=16, depths=(1, 1, 2, 1),
                              num_heads=(1, 2, 2, 4), num_classes=3)
    model.set_grad_checkpointing(True)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert model.patch_embed.projs[0].weight.grad is not None


@pytest.mark.slow
def test_torch_compile_captures_one_graph_and_matches_eager() -> None:
    # fullgraph=True fails on any graph break; the aot_eager backend checks capture and
    # autograd tracing without the minutes Inductor's C++ code generation takes on CPU.
    # A fresh dynamo: guards and caches left by earlier compiled tests make it retrace for minutes.
    torch._dynamo.reset()
    model = CrossFormer(**TINY_V1, drop_path_rate=0.0)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 72, 88)
    compiled(x).sum().backward()
    expected = model.patch_embed.projs[0].weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    assert torch.allclose(model.patch_embed.projs[0].weight.grad, expected, atol=1e-5)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_training_takes_a_new_input_size() -> None:
    # Once a second size made the sizes symbolic, Inductor failed on the convolutions' NCHW
    # views of channels-last maps saved for backward (the merge, activation cooling):
    # "cannot determine truth value of Relational: 16*((s0//4)) < 16" (see layers.conv_input).
    # The stem, an activation cooling layer and a merge, without the attention that would
    # make Inductor's code generation take minutes.
    from crossformer.models.crossformer import CrossFormerBlock, PatchEmbed, PatchMerging

    torch._dynamo.reset()
    embed, merge = PatchEmbed(3, 16), PatchMerging(16, 32)
    block = CrossFormerBlock(16, 1, 7, 1, False, "fixed_interval", activation_cooling=True)
    parts = torch.nn.ModuleList([embed, block, merge])

    def step(x: torch.Tensor) -> torch.Tensor:
        return merge(block.activation_cooling(embed(x)))

    compiled = torch.compile(step, dynamic=True)  # symbolic from the start: one compilation
    x = torch.randn(2, 3, 72, 88)
    compiled(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in parts.named_parameters() if p.grad is not None}
    parts.zero_grad()
    step(x).square().sum().backward()
    assert grads.keys() == {name for name, p in parts.named_parameters() if p.grad is not None}
    for name, p in parts.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.heavy  # Inductor compiles the whole model's forward and backward twice: minutes
def test_inductor_compiled_model_trains_at_two_input_sizes() -> None:
    # The whole model compiled once with symbolic sizes, one training step at each of two
    # sizes: the stage maps (16x20, 8x10, 4x5, 2x2 then 24x16, ...) pad to group size 7
    # and take the small-map rule. Inductor failed on the grouped attention's output saved
    # for the projection's backward, a view of the padded map ("cannot determine truth
    # value of Relational", see layers.saved_copy).
    torch._dynamo.reset()
    model = timm.create_model("crossformer_tiny", embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                              num_classes=5, drop_path_rate=0.0)
    compiled = torch.compile(model, dynamic=True)
    for size in ((64, 80), (96, 64)):
        x = torch.randn(2, 3, *size)
        loss = compiled(x).logsumexp(-1).sum()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        expected = model(x).logsumexp(-1).sum()
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        model.zero_grad()


def test_residual_drop_path_equals_timm_drop_path() -> None:
    """Same images dropped (same generator calls), same scaling, same gradients."""
    from timm.layers import DropPath

    from crossformer.models.layers import ResidualDropPath

    x = torch.randn(64, 5, 6, 8, requires_grad=True)
    branch = torch.randn(64, 5, 6, 8, requires_grad=True)
    fused, reference = ResidualDropPath(0.3), DropPath(0.3)
    torch.manual_seed(1)
    out = fused(x, branch)
    grads = torch.autograd.grad(out.square().sum(), (x, branch))
    torch.manual_seed(1)
    ref = x + reference(branch)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, branch))
    dropped = (out - x).flatten(1).abs().sum(1) == 0
    assert 0 < dropped.sum() < 64, "some images dropped, not all"
    assert (out - ref).abs().max().item() <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max().item() <= 1e-5
    fused.eval()
    assert torch.equal(fused(x, branch), x + branch)
