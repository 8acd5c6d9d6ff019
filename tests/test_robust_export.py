"""Issue 16, item 10: ``crossformer export`` rebuilds the model our training checkpoints
record (name, settings, example size), as evaluate and predict do."""

from __future__ import annotations

import json
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
    assert "does not fit crossformer_tiny with " in line and line.endswith("add --model-arg embed_dim=16"), line
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


def test_safetensors_carry_the_checkpoints_description(tmp_path, capsys, trained):
    """A weights file records what the checkpoint said about its model (not the training
    progress, nor the training config with its local paths); read back, it reads as the checkpoint."""
    from safetensors import safe_open

    from crossformer.classification.model import load_classifier
    from crossformer.models import DESCRIPTION_KEY, convert_to_safetensors, read_checkpoint

    path, model = trained
    out = convert_to_safetensors(path, tmp_path / "w.safetensors")
    with safe_open(str(out), "pt") as f:
        recorded = json.loads(f.metadata()[DESCRIPTION_KEY])
    assert recorded == {"model_name": "crossformer_tiny", "model_kwargs": TINY_MODEL,
                        "class_names": ["cat", "dog", "eel"], "img_size": 32}  # no "epoch"
    checkpoint = read_checkpoint(out)
    assert checkpoint.keys() == {"model", *recorded} and checkpoint["model"].keys() == model.state_dict().keys()
    loaded = load_classifier(out)  # no model name: the file names it
    assert loaded.class_names == ["cat", "dog", "eel"] and loaded.img_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))

    # export from the options: the model as built is what the file names
    fresh = tmp_path / "fresh.safetensors"
    assert main(["export", "--model", "crossformer_tiny", "--format", "safetensors", "--num-classes", "5",
                 "--model-arg", "embed_dim=16", "--model-arg", "depths=[1,1,1,1]", "-o", str(fresh)]) == 0
    assert recorded_model(read_checkpoint(fresh)) == ("crossformer_tiny", {"embed_dim": 16, "depths": [1, 1, 1, 1]})
    assert load_classifier(fresh).num_classes == 5
    # a new head: the checkpoint's three class names and its scores no longer fit it, and are left out
    scored = tmp_path / "scored.pth"
    torch.save({**torch.load(path), "metrics": {"val/acc1": 94.4}}, scored)
    resized = tmp_path / "resized.safetensors"
    assert main(["export", "--checkpoint", str(scored), "--format", "safetensors", "--num-classes", "4", "-o",
                 str(resized)]) == 0
    again = read_checkpoint(resized)
    assert "class_names" not in again and again["img_size"] == 32 and again["model"]["head.weight"].shape[0] == 4
    assert "metrics" not in again  # (the file said val/acc1 94.4 of a random head)
    assert main(["export", "--checkpoint", str(scored), "--format", "safetensors", "-o", str(resized)]) == 0
    assert read_checkpoint(resized)["metrics"] == {"val/acc1": 94.4}  # the head as trained: its scores


def test_a_damaged_description_is_one_line(tmp_path, capsys, trained):
    from safetensors.torch import save_file

    from crossformer.models import DESCRIPTION_KEY

    path, model = trained
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bad), metadata={DESCRIPTION_KEY: "{cut"})
    line = one_error_line(capsys, ["export", "--checkpoint", str(bad), "--format", "torchscript", "-o", str(tmp_path / "x.pt")])
    assert f"{bad} is a damaged or truncated safetensors file (its 'crossformer' metadata is not a JSON object)" in line
    # other tools' metadata, and none at all: the tensors alone, as before
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain), metadata={"format": "pt"})
    from crossformer.models import read_checkpoint

    assert read_checkpoint(plain).keys() == model.state_dict().keys()


def test_ema_of_a_checkpoint_without_ema_weights_names_the_file(tmp_path, capsys, trained):
    # export --ema said "checkpoint holds no EMA weights", naming no file
    path, _ = trained
    for fmt in ("safetensors", "torchscript"):
        line = one_error_line(capsys, ["export", "--checkpoint", str(path), "--ema", "--format", fmt,
                                       "-o", str(tmp_path / f"x.{fmt}")])
        assert line.endswith(f"error: {path} holds no EMA weights (no 'model_ema' entry: trained without --model-ema); "
                             "drop --ema"), line
    line = one_error_line(capsys, ["convert", "--ema", str(path), str(tmp_path / "y.safetensors")])
    assert f"error: {path} holds no EMA weights" in line
