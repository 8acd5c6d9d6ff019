"""Export: ONNX with dynamic height/width (onnxruntime vs PyTorch at several sizes, for both
LDA semantics), TorchScript, safetensors, and the command's error messages.

ONNX exports are slow (about 30 s of CPU each, mostly torch.export's symbolic shape work),
so each semantics is exported once per module, on tiny models (3 blocks) that still
contain every size-dependent decision.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import timm
import torch

import crossformer
from crossformer.cli import main
from crossformer.export import (
    SizeRange,
    compare_onnx,
    dynamic_size_range,
    export_onnx,
    export_safetensors,
    export_torchscript,
)
from crossformer.models import CheckpointError, CrossFormer

from spec_reference import reference_forward

# v1: stage 2 has SDA (G=7, padded at most sizes) and LDA with the size-dependent group shape
# (ceil(h/2) x ceil(w/2)); stage 3 is under the small-map rule (G' = min(h, w), non-square
# sizes give several tiles). Sizes 128..255 keep that pattern.
V1_TINY = dict(embed_dim=16, depths=(0, 0, 2, 1), num_heads=(1, 1, 2, 2), group_size=(7, 7, 7, 7),
               interval=(8, 4, 2, 1), use_acl=False, long_distance="fixed_interval", num_classes=10)
# CrossFormer++: stage 1 has SDA and fixed-group LDA (G=4, I=2: span 8, padded at most sizes);
# stage 3 is under the small-map rule (G' = max(h, w), the short side padded) below 256 pixels.
# (Stage 2, G=14, has no block here, so it sets no bound.)
PP_TINY = dict(embed_dim=16, depths=(0, 2, 0, 1), num_heads=(1, 1, 2, 2), group_size=(4, 4, 14, 7),
               interval=(4, 2, 1, 1), use_acl=True, long_distance="fixed_group")
PP_CFG = dict(PP_TINY, num_classes=0)


def _ort_session(path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def v1_onnx(tmp_path_factory):
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = CrossFormer(**V1_TINY).eval()
    path = tmp_path_factory.mktemp("onnx") / "v1.onnx"
    valid = export_onnx(model, path, (224, 224))
    return model, path, valid


@pytest.fixture(scope="module")
def pp_features_onnx(tmp_path_factory):
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = timm.create_model("crossformer_pp_small", features_only=True, **PP_TINY).eval()
    path = tmp_path_factory.mktemp("onnx") / "pp_features.onnx"
    valid = export_onnx(model, path, (224, 224))
    return model, path, valid


def test_size_ranges_follow_the_small_map_thresholds():
    v1 = CrossFormer(**V1_TINY)
    assert dynamic_size_range(v1, 224, 224) == SizeRange(128, 255, 128, 255)
    assert dynamic_size_range(v1, 384, 384) == SizeRange(256, None, 256, None)
    # non-square: the small-map stage bounds only the short side
    assert dynamic_size_range(v1, 224, 320) == SizeRange(128, 255, 128, None)
    # the table in docs/export.md, for the official group sizes
    with torch.device("meta"):
        official_v1 = timm.create_model("crossformer_tiny")
        official_pp = timm.create_model("crossformer_pp_small", features_only=True)
    for size, expected in [(48, (32, 63)), (96, (64, 127)), (224, (128, 255)), (800, (256, None))]:
        assert dynamic_size_range(official_v1, size, size) == SizeRange(*expected, *expected)
    for size, expected in [(36, (32, 39)), (224, (40, 239)), (248, (240, 255)), (512, (256, None))]:
        assert dynamic_size_range(official_pp, size, size) == SizeRange(*expected, *expected)


@pytest.mark.slow
def test_onnx_of_a_small_non_square_example_exports_and_matches_pytorch(tmp_path):
    # a 64x48 example (last map 2x1) stopped with torch.export's traceback: its range took in
    # heights whose last map is 1 pixel high, which the small-map groups specialise; now the
    # export keeps the last map's sides on their sides of 1 (48: 12, 6, 3, 1; 64: 16, 8, 4, 2)
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = CrossFormer(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=3).eval()
    assert dynamic_size_range(model, 64, 48) == SizeRange(32, None, 32, 63)
    valid = export_onnx(model, tmp_path / "small.onnx", (64, 48))
    assert valid == SizeRange(64, None, 32, 63)
    errors = compare_onnx(model, tmp_path / "small.onnx", [(64, 48), (130, 63), (64, 32)], batch=2)
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.slow
def test_onnx_v1_matches_pytorch_at_three_sizes(v1_onnx):
    model, path, valid = v1_onnx
    assert valid == SizeRange(128, 255, 128, 255)
    errors = compare_onnx(model, path, [(224, 224), (160, 200), (255, 129)], batch=2)
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.slow
def test_onnx_v1_matches_the_spec_transcription(v1_onnx):
    model, path, _ = v1_onnx
    x = torch.randn(1, 3, 131, 250)
    logits, _ = reference_forward(model.state_dict(), V1_TINY, x)
    got = _ort_session(path).run(None, {"images": x.numpy()})[0]
    assert np.abs(got - logits.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_onnx_outside_the_range_gives_nan_not_numbers(v1_onnx):
    _, path, _ = v1_onnx
    session = _ort_session(path)
    for size in [(96, 96), (256, 300), (300, 200)]:
        out = session.run(None, {"images": np.zeros((1, 3, *size), np.float32)})[0]
        assert np.isnan(out).all(), size


@pytest.mark.slow
def test_onnx_pp_features_match_pytorch_at_three_sizes(pp_features_onnx):
    model, path, valid = pp_features_onnx
    assert valid == SizeRange(40, 255, 40, 255)
    session = _ort_session(path)
    assert [o.name for o in session.get_outputs()] == [f"features_{i}" for i in range(4)]
    errors = compare_onnx(model, path, [(224, 224), (97, 45), (64, 200)], batch=2)
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.slow
def test_onnx_pp_features_match_the_spec_transcription(pp_features_onnx):
    model, path, _ = pp_features_onnx
    x = torch.randn(1, 3, 150, 77)
    state = dict(model.model.state_dict())  # the features model has no final norm and head
    state.update({"norm.weight": torch.ones(128), "norm.bias": torch.zeros(128),
                  "head.weight": torch.zeros(1, 128), "head.bias": torch.zeros(1)})
    _, features = reference_forward(state, PP_CFG, x)
    got = _ort_session(path).run(None, {"images": x.numpy()})
    for g, f in zip(got, features):
        assert g.shape == tuple(f.shape)
        assert np.abs(g - f.numpy()).max() <= 1e-4


def test_torchscript_equals_eager_and_refuses_other_sizes(tmp_path):
    model = CrossFormer(**dict(PP_TINY, depths=(1, 1, 4, 1), num_classes=5)).train()  # with an ACL
    path = export_torchscript(model, tmp_path / "pp.pt", (96, 80))
    assert model.training  # traced in eval mode, then left as it was
    model.eval()
    loaded = torch.jit.load(str(path))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 96, 80)
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=1e-5, rtol=0)
    for size in [(96, 96), (112, 80)]:
        with pytest.raises(Exception, match="traced for"):
            loaded(torch.randn(1, 3, *size))


def test_the_size_guard_makes_every_output_nan_outside_the_range():
    """What the ONNX graph computes, run eagerly: each bound of the range is checked on its own."""
    from crossformer.export import _SizeGuard

    model = CrossFormer(**V1_TINY).eval()
    guarded = _SizeGuard(model, SizeRange(128, 255, 128, 255))
    with torch.no_grad():
        x = torch.randn(1, 3, 128, 255)
        assert torch.equal(guarded(x), model(x))
        for size in [(96, 160), (160, 96), (256, 160), (160, 256)]:
            assert guarded(torch.randn(1, 3, *size)).isnan().all(), size
        unbounded = _SizeGuard(model, SizeRange(128, None, 128, None))
        assert not unbounded(torch.randn(1, 3, 128, 300)).isnan().any()


def test_the_onnx_check_covers_the_example_and_the_corners_of_the_range():
    from crossformer.commands.export import _check_points

    assert _check_points(SizeRange(40, 239, 40, 239), 224, 224) == [(224, 224), (40, 239), (239, 40)]
    # an open end is checked at 1.5x the example
    assert _check_points(SizeRange(256, None, 256, None), 512, 640) == [(512, 640), (256, 960), (768, 256)]
    assert _check_points(SizeRange(64, 64, 64, 64), 64, 64) == [(64, 64)]


@pytest.mark.parametrize("error, status", [(5e-5, 0), (2e-4, 1)])
def test_cli_onnx_passes_its_options_and_fails_when_onnxruntime_disagrees(tmp_path, capsys, monkeypatch, error, status):
    from crossformer import export as exporting

    exported, compared = {}, {}

    def fake_export(model, path, img_size, **options):
        exported.update(options, img_size=img_size)
        return SizeRange(64, 127, 64, 127)

    def fake_compare(model, path, sizes, batch=1, counts=None):
        compared.update(sizes=sizes, batch=batch)
        return {tuple(size): error for size in sizes}

    monkeypatch.setattr(exporting, "require_onnx", lambda: None)
    monkeypatch.setattr(exporting, "export_onnx", fake_export)
    monkeypatch.setattr(exporting, "compare_onnx", fake_compare)
    out = tmp_path / "tiny.onnx"
    assert main(["export", "--model", "crossformer_tiny", "--num-classes", "3", "--format", "onnx", "--img-size", "64",
                 "--opset", "19", "--static", "-o", str(out)]) == status
    assert (exported["img_size"], exported["dynamic"], exported["opset"]) == ((64, 64), False, 19)
    assert compared == {"sizes": [(64, 64), (64, 127), (127, 64)], "batch": 1}
    printed = capsys.readouterr().out
    assert f"{error:.1e} at 64x64, {error:.1e} at 64x127, {error:.1e} at 127x64" in printed
    assert ("error: onnxruntime and PyTorch disagree by more than 1e-4" in printed) == bool(status)


def test_cli_onnx_of_a_classifier_records_its_classes_and_preprocessing(tmp_path, capsys, monkeypatch):
    # the segmentor's and detector's files recorded them; a classifier's held its size ranges only
    import json

    from crossformer import export as exporting

    exported = {}
    monkeypatch.setattr(exporting, "require_onnx", lambda: None)
    monkeypatch.setattr(exporting, "export_onnx", lambda model, path, img_size, **options: exported.update(options)
                        or SizeRange(32, 63, 32, 63))
    monkeypatch.setattr(exporting, "compare_onnx", lambda model, path, sizes, batch=1, counts=None: {s: 0.0 for s in sizes})
    kwargs = dict(V1_TINY, num_classes=3)
    torch.save({"model_name": "crossformer_tiny", "model_kwargs": {k: v for k, v in kwargs.items() if k != "num_classes"},
                "class_names": ["cat", "dog", "eel"], "img_size": 48, "crop_pct": 0.9, "interpolation": "bilinear",
                "model": CrossFormer(**kwargs).state_dict()}, tmp_path / "ours.pth")
    assert main(["export", "--checkpoint", str(tmp_path / "ours.pth"), "--format", "onnx", "-o", str(tmp_path / "c.onnx")]) == 0
    metadata = exported["metadata"]
    assert json.loads(metadata["crossformer.classes"]) == ["cat", "dog", "eel"]
    assert metadata["crossformer.input"].startswith("RGB, resized (bilinear) to img_size / crop_pct and centre-cropped "
                                                    "to img_size (img_size 48, crop_pct 0.9), then (x / 255 - mean) / std")
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "ours.pth"), "--features", "--format", "onnx",
                 "-o", str(tmp_path / "f.onnx")]) == 0
    assert exported["metadata"] is None  # features: no classes, and the input is the caller's to prepare


def test_safetensors_round_trip(tmp_path):
    model = CrossFormer(**V1_TINY).eval()
    x = torch.randn(1, 3, 100, 70)
    # from a model
    path = export_safetensors(model, tmp_path / "m.safetensors")
    again = crossformer.load_checkpoint(CrossFormer(**V1_TINY).eval(), path)
    # from a training-style checkpoint file
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    path2 = export_safetensors(tmp_path / "ckpt.pth", tmp_path / "c.safetensors")
    again2 = crossformer.load_checkpoint(CrossFormer(**V1_TINY).eval(), path2)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
        assert torch.equal(again2(x), model(x))


def _cli_error(capsys, *argv):
    code = main(["export", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out.onnx")
    assert "unknown model" in _cli_error(capsys, "--model", "resnet9000", "--format", "onnx", "-o", out)
    assert "at least 32" in _cli_error(capsys, "--model", "crossformer_tiny", "--format", "onnx",
                                       "--img-size", "16", "-o", out)
    assert "not found" in _cli_error(capsys, "--model", "crossformer_tiny", "--format", "torchscript",
                                     "--checkpoint", str(tmp_path / "missing.pth"), "-o", str(tmp_path / "out.pt"))
    # a checkpoint of another variant
    small = CrossFormer(**V1_TINY)
    torch.save({"model": small.state_dict()}, tmp_path / "small.pth")
    err = _cli_error(capsys, "--model", "crossformer_tiny", "--format", "safetensors",
                     "--checkpoint", str(tmp_path / "small.pth"), "-o", str(tmp_path / "out.safetensors"))
    assert "does not fit" in err
    # the settings the weights show, as evaluate and predict name them (cut off after 400 characters of keys before)
    # (num_heads unseen: stages of no block hold no position bias to show theirs)
    assert err.endswith("its weights show other settings: add --model-arg embed_dim=16 --model-arg depths=[0,0,2,1]"), err
    # onnx / onnxscript missing
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    err = _cli_error(capsys, "--model", "crossformer_tiny", "--format", "onnx", "-o", out)
    assert "pip install 'crossformer[export]'" in err


def test_cli_options_no_export_can_use_are_one_line(tmp_path, capsys):
    assert "--opset must be at least 18" in _cli_error(capsys, "--model", "crossformer_tiny", "--format", "onnx",
                                                       "--opset", "17", "-o", str(tmp_path / "out"))
    # a TorchScript file named .onnx was written without a word
    out = tmp_path / "model.onnx"
    assert (f"-o {out} ends in .onnx, the onnx ending, but --format is torchscript: name it .pt, or pass --format onnx"
            in _cli_error(capsys, "--model", "crossformer_tiny", "--format", "torchscript", "-o", str(out)))
    assert not out.exists()


@pytest.mark.parametrize("command", ["export", "flops", "benchmark"])
def test_a_negative_class_count_is_refused_by_every_command_that_takes_one(capsys, command):
    # flops printed "num_classes": -5 beside a parameter count; benchmark timed the model
    with pytest.raises(SystemExit) as stop:  # argparse's error: exit 2 after its line
        main([command, "--model", "crossformer_tiny", "--num-classes", "-5"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err == (f"crossformer {command}: error: argument --num-classes: must be 0 or more, "
                                            f"got -5 (see crossformer {command} --help)")


def test_cli_a_headless_checkpoint_exports_pooled_features(tmp_path, capsys):
    # a checkpoint without a classifier (num_classes=0) is exported as it is, not with a fresh 1000-class head
    model = CrossFormer(**dict(V1_TINY, num_classes=0)).eval()
    torch.save({"model": model.state_dict(), "model_name": "crossformer_tiny",
                "model_kwargs": {k: v for k, v in V1_TINY.items() if k != "num_classes"}}, tmp_path / "headless.pth")
    out = tmp_path / "headless.pt"
    assert main(["export", "--checkpoint", str(tmp_path / "headless.pth"), "--format", "torchscript", "-o", str(out),
                 "--img-size", "128"]) == 0
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(out))(x), model(x), atol=1e-5, rtol=0)


def test_cli_safetensors_of_the_ema_weights_says_so(tmp_path, capsys):
    """Exported with --ema, the file's one set of weights is the average: predict / evaluate
    --ema take it (they said "trained without --model-ema"), and the file records which it holds."""
    from classification_fixtures import TINY_MODEL
    from crossformer.classification.model import load_classifier

    plain, average = (CrossFormer(**TINY_MODEL, num_classes=3).state_dict() for _ in range(2))
    torch.save({"model": plain, "model_ema": average, "model_name": "crossformer_tiny", "model_kwargs": TINY_MODEL,
                "class_names": ["a", "b", "c"], "img_size": 32}, tmp_path / "run.pth")
    for ema in (True, False):
        out = tmp_path / f"ema{ema}.safetensors"
        assert main(["export", "--checkpoint", str(tmp_path / "run.pth"), "--format", "safetensors", "-o", str(out),
                     *(["--ema"] if ema else [])]) == 0
        assert crossformer.read_checkpoint(out).get("ema_weights", False) is ema
    expected = load_classifier(tmp_path / "run.pth", use_ema=True).model.state_dict()
    for use_ema in (True, False):
        got = load_classifier(tmp_path / "emaTrue.safetensors", use_ema=use_ema).model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items())
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        load_classifier(tmp_path / "emaFalse.safetensors", use_ema=True)


def test_cli_safetensors(tmp_path, capsys):
    from safetensors.torch import load_file

    state = timm.create_model("crossformer_tiny", num_classes=7).state_dict()
    torch.save({"model": state, "epoch": 1}, tmp_path / "tiny.pth")
    out = tmp_path / "tiny.safetensors"
    # the head size (7) is read from the checkpoint, which then fits and is converted as it is
    assert main(["export", "--model", "crossformer_tiny", "--format", "safetensors",
                 "--checkpoint", str(tmp_path / "tiny.pth"), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    written = load_file(str(out))
    assert written.keys() == state.keys()
    assert all(torch.equal(written[k], v) for k, v in state.items())


def test_cli_safetensors_of_a_features_backbone_loads_back(tmp_path, capsys):
    # its keys carried the features wrapper's "model." prefix: load_checkpoint, timm's pretrained
    # path and export itself refused the file, saying to build what had been built
    settings = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])
    classifier = timm.create_model("crossformer_tiny", num_classes=3, **settings).eval()
    torch.save({"model": classifier.state_dict(), "model_name": "crossformer_tiny", "model_kwargs": settings},
               tmp_path / "run.pth")
    out = tmp_path / "features.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path / "run.pth"), "--format", "safetensors", "--features",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = classifier.forward_intermediates(x, intermediates_only=True)
        for features in (crossformer.load_checkpoint(timm.create_model("crossformer_tiny", features_only=True, **settings),
                                                     out),
                         timm.create_model("crossformer_tiny", features_only=True, pretrained=True,
                                           pretrained_cfg_overlay=dict(file=str(out)), **settings)):
            assert all(torch.equal(a, b) for a, b in zip(features.eval()(x), expected, strict=True))
    with pytest.raises(CheckpointError, match="the weights are a features backbone of crossformer_tiny: create "
                                              "crossformer_tiny with features_only=True, embed_dim=16"):
        crossformer.load_checkpoint(timm.create_model("crossformer_tiny", num_classes=3, **settings), out)
    assert main(["export", "--checkpoint", str(out), "--format", "torchscript", "--features",
                 "-o", str(tmp_path / "features.pt")]) == 0
    err = _cli_error(capsys, "--checkpoint", str(out), "--format", "safetensors", "-o", str(tmp_path / "whole.safetensors"))
    assert err.endswith("it holds a features backbone (no head or final norm): add --features"), err
