"""Issue 16, item 5: an unreadable checkpoint is one ``CheckpointError`` line naming the file
and what it is instead, from ``read_checkpoint`` and so from every command that reads one."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import crossformer
from crossformer.models import CheckpointError, CrossFormer

from cli_errors import one_error_line
from classification_fixtures import TINY_MODEL, make_image_folder

TINY = dict(TINY_MODEL, num_classes=3)


def _half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_zip(path: Path) -> Path:
    torch.save({"model": CrossFormer(**TINY).state_dict()}, path)
    return _half(path)


def _truncated_legacy(path: Path) -> Path:
    torch.save({"model": CrossFormer(**TINY).state_dict()}, path, _use_new_zipfile_serialization=False)
    return _half(path)


def _truncated_safetensors(path: Path) -> Path:
    save_file({"weight": torch.randn(64, 64)}, str(path))
    return _half(path)


def _changed_bytes(path: Path) -> Path:
    torch.save({"model": {"weight": torch.randn(512, 512)}, "epoch": 1}, path)
    with open(path, "r+b") as file:  # torch.load read the changed weights without a word
        file.seek(path.stat().st_size // 2)
        file.write(b"\xff" * 8)
    return path


def _random_bytes(path: Path) -> Path:
    path.write_bytes(b"\x13\x37" + random.Random(0).randbytes(4094))
    return path


def _torchscript(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.randn(1, 2)), str(path))
    return path


def _onnx(path: Path) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path.write_bytes(helper.make_model(graph, producer_name="pytorch").SerializeToString())
    return path


# file name -> (how to make it, what the message must say)
BAD_FILES = {
    "notes.pth": (lambda p: p.write_text("hello world\nsecond line\n"), "is not a PyTorch checkpoint (it is text, starting 'hello world')"),
    "noise.pth": (_random_bytes, "is not a PyTorch checkpoint (unknown binary data, starting 13 37"),
    "empty.pth": (lambda p: p.write_bytes(b""), "is not a PyTorch checkpoint (it is empty: 0 bytes)"),
    "cut.pth": (_truncated_zip, "is a damaged or truncated PyTorch checkpoint (the zip archive ends early)"),
    "cut_legacy.pth": (_truncated_legacy, "is a damaged or truncated PyTorch checkpoint ("),
    "changed.pth": (_changed_bytes, "is a damaged or truncated PyTorch checkpoint (its entry changed/data/0 fails its "
                                    "checksum)"),
    "cut.safetensors": (_truncated_safetensors, "is a damaged or truncated safetensors file (the file ends early"),
    "noise.safetensors": (_random_bytes, "is not a safetensors file (unknown binary data"),
    "notes.safetensors": (lambda p: p.write_text("{not json"), "is not a safetensors file (it is text"),
    "page.pth": (lambda p: p.write_text("<!DOCTYPE html>\n<html>404</html>"), "it is an HTML page"),
    "pointer.pth": (
        lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n"),
        "it is a Git LFS pointer: fetch the real file with git lfs pull",
    ),
    "folder.pth": (lambda p: p.mkdir(), "is a folder, not a checkpoint file"),
    # crossformer export --format torchscript writes these: torch.load's own error said "weights_only"
    "traced.pt": (_torchscript, "is not a PyTorch checkpoint (a TorchScript module: run it with torch.jit.load"),
    # and --format onnx these: "unknown binary data, starting 08 0e 12 07 ..."
    "model.onnx": (_onnx, "is not a PyTorch checkpoint (an ONNX model: run it with onnxruntime"),
}


def _make(tmp_path: Path, name: str) -> tuple[Path, str]:
    make, expected = BAD_FILES[name]
    path = tmp_path / name
    make(path)
    return path, expected


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_checkpoint_names_the_file_and_what_it_is(tmp_path, name):
    path, expected = _make(tmp_path, name)
    with pytest.raises(CheckpointError) as caught:
        crossformer.load_checkpoint(CrossFormer(**TINY), path)
    message = str(caught.value)
    assert message.startswith(str(path)) or message.startswith(f"cannot read {path}"), message
    assert expected in message
    assert "\n" not in message


def test_readable_files_still_read(tmp_path):
    model = CrossFormer(**TINY).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "zip.pth")
    torch.save(model.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    # the format is told by content: a safetensors file under a .pth name reads too
    (tmp_path / "w.safetensors").rename(tmp_path / "renamed.pth")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for name in ("zip.pth", "legacy.pth", "renamed.pth"):
            loaded = crossformer.load_checkpoint(CrossFormer(**TINY).eval(), tmp_path / name)
            assert torch.equal(loaded(x), expected), name


def _commands(path: Path, tmp_path: Path, data: Path) -> dict[str, list[str]]:
    out = tmp_path / "out"
    return {
        "convert": ["convert", str(path), str(out / "w.safetensors")],
        "export": ["export", "--model", "crossformer_tiny", "--checkpoint", str(path), "--format", "safetensors",
                   "-o", str(out / "e.safetensors")],
        "evaluate": ["evaluate", "--checkpoint", str(path), "--data", str(data), "--device", "cpu"],
        "predict": ["predict", str(data / "val" / "cat"), "--checkpoint", str(path), "--device", "cpu"],
        "train --pretrained": [
            "train", "--data", str(data), "--output", str(out / "run"), "--epochs", "1", "--device", "cpu",
            "--model", "crossformer_tiny", "--pretrained", str(path), "--batch-size", "4", "--img-size", "32",
            "--num-workers", "0",
            *[f"model.kwargs.{k}={v}" for k, v in TINY_MODEL.items()],
        ],
    }


@pytest.mark.parametrize("name", ["notes.pth", "cut.safetensors", "cut.pth", "traced.pt"])
def test_every_command_gives_one_line(tmp_path, capsys, name):
    data = make_image_folder(tmp_path / "data", {"train": 2, "val": 1})
    path, expected = _make(tmp_path, name)
    for command, argv in _commands(path, tmp_path, data).items():
        line = one_error_line(capsys, argv)
        assert line.startswith(f"crossformer {argv[0]}: error: "), (command, line)
        assert str(path) in line and expected in line, (command, line)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_kind_through_the_cli(tmp_path, capsys, name):
    path, expected = _make(tmp_path, name)
    line = one_error_line(capsys, ["convert", str(path), str(tmp_path / "w.safetensors")])
    assert str(path) in line and expected in line, line
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("kind", ["broken link", "named pipe"])
def test_a_link_to_nothing_or_a_pipe_is_said_as_what_it_is(tmp_path, capsys, kind):
    """Both were "checkpoint not found", though the path was there (a link whose run folder was
    removed; a named pipe, which reading would block on until something wrote to it)."""
    import os

    data = make_image_folder(tmp_path / "data", {"train": 2, "val": 1})
    path = tmp_path / "last.pth"
    if kind == "broken link":
        path.symlink_to(tmp_path / "removed" / "last.pth")
        expected = f"{path} is a link to {tmp_path / 'removed' / 'last.pth'}, which is not there"
    else:
        os.mkfifo(path)
        expected = f"{path} is a named pipe, not a checkpoint file"
    for command, argv in _commands(path, tmp_path, data).items():
        line = one_error_line(capsys, argv)
        assert line.startswith(f"crossformer {argv[0]}: error: ") and expected in line, (command, line)


def test_convert_takes_its_output_as_an_argument_an_option_or_beside_the_checkpoint(tmp_path, capsys):
    """``convert A B`` as cp takes it, ``convert A --output B`` as export and predict take it,
    and ``convert A.pth`` writes ``A.safetensors`` beside it; the weights are the same each way."""
    from safetensors.torch import load_file

    from crossformer.cli import main

    model = CrossFormer(**TINY)
    source = tmp_path / "run" / "tiny.pth"
    source.parent.mkdir()
    torch.save({"model": model.state_dict()}, source)
    written = {
        "positional": (["convert", str(source), str(tmp_path / "a.safetensors")], tmp_path / "a.safetensors"),
        "option": (["convert", str(source), "--output", str(tmp_path / "b.safetensors")], tmp_path / "b.safetensors"),
        "short option": (["convert", "-o", str(tmp_path / "c.safetensors"), str(source)], tmp_path / "c.safetensors"),
        "beside": (["convert", str(source)], tmp_path / "run" / "tiny.safetensors"),
    }
    for way, (argv, path) in written.items():
        assert main(argv) == 0, way
        assert capsys.readouterr().out.strip() == f"wrote {path}", way
        weights = load_file(str(path))
        assert weights.keys() == model.state_dict().keys(), way
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items()), way

    line = one_error_line(capsys, ["convert", str(source), str(tmp_path / "d.safetensors"),
                                   "--output", str(tmp_path / "e.safetensors")])
    assert "two outputs given" in line and "give one" in line, line
    converted = tmp_path / "run" / "tiny.safetensors"
    line = one_error_line(capsys, ["convert", str(converted)])
    assert f"{converted} is already a .safetensors file" in line and "--output FILE" in line, line
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "e.safetensors").exists()


def test_convert_warns_of_a_file_without_a_crossformer(tmp_path, capsys):
    # a file of tensors that is no model (a reference's inputs and logits) was converted without a word
    from crossformer.cli import main

    for name, weights in (("tensors", {"x": torch.zeros(2, 3), "logits": torch.ones(2)}),
                          ("classifier", CrossFormer(**TINY).state_dict()),
                          ("dense", {f"backbone.{k}": v for k, v in CrossFormer(**TINY).state_dict().items()})):
        torch.save(weights, tmp_path / f"{name}.pt")
        assert main(["convert", str(tmp_path / f"{name}.pt")]) == 0
        err = capsys.readouterr().err
        if name == "tensors":
            assert err == (f"warning: {tmp_path / 'tensors.pt'} holds no CrossFormer weights (its tensors: x, logits); "
                           "written as they are\n"), err
        else:
            assert err == "", (name, err)
        assert (tmp_path / f"{name}.safetensors").is_file()


def test_another_dense_tasks_file_is_named_as_such_by_a_classifier_and_a_detector(tmp_path: Path) -> None:
    # the authors' mmseg file under a detection config was "an ImageNet or backbone checkpoint: pass
    # it to crossformer train --pretrained", and under a classification config "backbone-only"
    from crossformer.classification.model import load_classifier
    from crossformer.detection.checkpoint import load_detector
    from crossformer.engine.registry import resolve_config
    from crossformer.errors import UserInputError

    backbone = {f"backbone.{k}": v for k, v in CrossFormer(**TINY_MODEL, num_classes=0).state_dict().items()}
    segmentor = tmp_path / "upernet.pth"
    torch.save({"state_dict": {**backbone, "decode_head.conv_seg.weight": torch.zeros(3, 8, 1, 1)}}, segmentor)
    config = resolve_config("mask_rcnn_shapes_demo").config
    with pytest.raises(UserInputError, match=r"upernet.pth holds a segmentation model \(its heads' weights say so\), "
                                             r"not a detector: pass a detection checkpoint here"):
        load_detector(config, segmentor, torch.device("cpu"))
    with pytest.raises(UserInputError, match=r"upernet.pth holds a segmentation model \(its heads' weights say so\), "
                                             r"not a classifier: pass its segmentation config with --config"):
        load_classifier(segmentor, "crossformer_tiny", model_kwargs=TINY_MODEL)
    # and the authors' mmdet file into a segmentor: "a backbone (ImageNet) checkpoint: give it as
    # pretrained_backbone", which then refused it as a whole detector
    from crossformer import load_checkpoint
    from crossformer.errors import CheckpointError
    from crossformer.segmentation import build_segmentor

    detector = tmp_path / "mask_rcnn.pth"
    torch.save({"state_dict": {**backbone, "rpn_head.rpn_cls.weight": torch.zeros(3, 8, 1, 1)}}, detector)
    built = build_segmentor("upernet", "crossformer_tiny", 3, TINY_MODEL, channels=8, aux_channels=8)
    with pytest.raises(CheckpointError, match=r"^.*mask_rcnn.pth holds a detection model \(its heads' weights say so\), "
                                              r"not a segmentor: give a segmentation model$"):
        load_checkpoint(built, detector)


def test_weights_of_other_settings_without_a_record_name_the_settings(tmp_path: Path) -> None:
    # the authors' files record no model (only their yacs config): load_checkpoint and timm's
    # pretrained path listed the keys by the hundred, leaving the settings to be worked out
    import timm

    path = tmp_path / "official.pth"
    settings = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))
    torch.save({"model": CrossFormer(**settings).state_dict()}, path)
    with pytest.raises(CheckpointError) as caught:
        crossformer.load_checkpoint(timm.create_model("crossformer_tiny"), path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path} does not fit this model (missing: "), message
    assert message.endswith("its weights show other settings: build the model with embed_dim=16, "
                            "depths=[1,1,2,1], num_heads=[1,2,2,4]"), message
    with pytest.raises(CheckpointError, match=r"^the weights show other settings: create crossformer_tiny with "
                                              r"embed_dim=16, depths=\[1,1,2,1\], num_heads=\[1,2,2,4\] \("):
        timm.create_model("crossformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    fitting = timm.create_model("crossformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                **settings)
    assert fitting.patch_embed.norm.weight.shape == (16,)


def test_weights_of_another_model_name_it_in_one_line(tmp_path: Path) -> None:
    # load_checkpoint listed every missing, unexpected and mis-shaped key (3,000 characters on four
    # lines) and never said which model the weights are, which timm's pretrained path says
    from crossformer import load_checkpoint

    path = tmp_path / "run.pth"
    torch.save({"model": CrossFormer(**TINY).state_dict(), "model_name": "crossformer_tiny", "model_kwargs": TINY}, path)
    other = CrossFormer(**{**TINY, "embed_dim": 2 * TINY["embed_dim"]})
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(other, path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path} does not fit this model (wrong shape: ")
    arguments = ", ".join(f"{key}={value!r}" for key, value in TINY.items())
    assert message.endswith(f"the weights are crossformer_tiny with {arguments}: create crossformer_tiny with those "
                            "settings"), message
