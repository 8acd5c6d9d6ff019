"""Issue 16, item 10: ``crossformer export`` rebuilds the model our training checkpoints
record (name, settings, example size), as evaluate and predict do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crossformer.cli import main
from crossformer.models import CrossFormer, recorded_model

from cli_errors import one_error_line
from classification_fixtures import TINY_MODEL

TINY = dict(TINY_MODEL, num_classes=3)


@pytest.fixture
def trained(tmp_path) -> tuple[Path, CrossFormer]:
    """A file laid out as the trainer writes it, for a non-standard crossformer_tiny."""
    model = CrossFormer(**TINY).eval()
    with torch.no_grad():  # not the fresh initialisation, so a load that did nothing shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "best.pth"
    torch.save({"model": model.state_dict(), "model_name": "crossformer_tiny", "model_kwargs": TINY_MODEL,
                "class_names": ["cat", "dog", "eel"], "img_size": 32, "epoch": 2}, path)
    return path, model


def test_torchscript_from_our_checkpoint_needs_no_model_args(tmp_path, capsys, trained):
    path, model = trained
    out = tmp_path / "tiny.pt"
    assert main(["export", "--checkpoint", str(path), "--format", "torchscript", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the checkpoint's settings: embed_dim=16, depths=[1, 1, 1, 1]" in printed
    assert "traced at 32x32" in printed  # the size it was trained at
    loaded = torch.jit.load(str(out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5, rtol=0)


def test_safetensors_from_our_checkpoint(tmp_path, trained):
    path, model = trained
    out = tmp_path / "tiny.safetensors"
    assert main(["export", "--model", "crossformer_tiny", "--checkpoint", str(path), "--format", "safetensors",
                 "-o", str(out)]) == 0
    written = load_file(str(out))
    assert written.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in written.items())


def test_options_override_or_refuse(tmp_path, capsys, trained):
    path, _ = trained
    out = str(tmp_path / "x.pt")
    # --model-arg overrides the recorded settings (and then the weights do not fit)
    line = one_error_line(capsys, ["export", "--checkpoint", str(path), "--format", "torchscript",
                                "--model-arg", "embed_dim=32", "-o", out])
    assert "does not fit this model" in line
    # a file that names no model, and no --model
    torch.save(CrossFormer(**TINY).state_dict(), tmp_path / "bare.pth")
    line = one_error_line(capsys, ["export", "--checkpoint", str(tmp_path / "bare.pth"), "--format", "torchscript", "-o", out])
    assert "--model is needed: " in line and "bare.pth does not name its model" in line
    line = one_error_line(capsys, ["export", "--format", "torchscript", "-o", out])
    assert "--model is needed: no --checkpoint to read it from" in line
    assert not Path(out).exists()


def test_recorded_model():
    ours = {"model_name": "crossformer_tiny", "model_kwargs": {"embed_dim": 16}, "model": {}}
    assert recorded_model(ours) == ("crossformer_tiny", {"embed_dim": 16})
    assert recorded_model(ours, "crossformer_tiny") == ("crossformer_tiny", {"embed_dim": 16})
    assert recorded_model(ours, "crossformer_small") == ("crossformer_small", {})  # settings of another model
    assert recorded_model({"model": {}}, "crossformer_small") == ("crossformer_small", {})
    assert recorded_model({"model": {}}) == (None, {})
