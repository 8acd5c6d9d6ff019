"""Issue 16, item 8: output files are written atomically (``crossformer.atomic``): a failure
leaves the previous file as it was and no temporary file, and says so in one line."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import crossformer.atomic as atomic
from crossformer.atomic import OutputError, write_atomic
from crossformer.cli import main
from crossformer.errors import listing, one_line
from crossformer.models import CrossFormer

from cli_errors import one_error_line
from classification_fixtures import TINY_MODEL

TINY = dict(TINY_MODEL, num_classes=3)
PREVIOUS = b"the previous file\n"


def _write_then_fail(error: BaseException):
    """A writer that writes some bytes, then fails with ``error``."""

    def write(file) -> None:
        file.write(b"half of a new file")
        raise error

    return write


def _only(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def test_writes_and_replaces(tmp_path):
    path = write_atomic(tmp_path / "new" / "deeper" / "x.bin", lambda f: f.write(b"abc"))
    assert path.read_bytes() == b"abc"
    write_atomic(path, lambda f: torch.save({"w": torch.ones(2)}, f))
    assert torch.equal(torch.load(path)["w"], torch.ones(2))
    _only(path.parent, "x.bin")


@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
    ],
)
def test_a_failed_write_keeps_the_previous_file_and_says_so(tmp_path, error, reason):
    path = tmp_path / "model.pth"
    path.write_bytes(PREVIOUS)
    with pytest.raises(OutputError) as caught:
        write_atomic(path, _write_then_fail(error))
    assert str(caught.value) == f"cannot write {path}: {reason}; the previous file was kept"
    assert path.read_bytes() == PREVIOUS
    _only(tmp_path, "model.pth")
    # without a previous file
    with pytest.raises(OutputError, match="nothing was written"):
        write_atomic(tmp_path / "other.pth", _write_then_fail(error))
    _only(tmp_path, "model.pth")


def test_a_disk_full_wrapped_by_the_writer_is_still_recognised(tmp_path):
    def write(file) -> None:  # as torch.save does: a RuntimeError raised while handling the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    path = tmp_path / "ckpt.pth"
    path.write_bytes(PREVIOUS)
    with pytest.raises(OutputError, match="no space left on the device; the previous file was kept"):
        write_atomic(path, write)
    assert path.read_bytes() == PREVIOUS
    _only(tmp_path, "ckpt.pth")


def test_a_real_full_device_through_torch_save(tmp_path, monkeypatch):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    path = tmp_path / "ckpt.pth"
    path.write_bytes(PREVIOUS)
    real_open = open

    def open_full(file, mode="r", *args, **kwargs):  # the temporary file lands on a full device
        return real_open("/dev/full" if str(file).endswith(".tmp") else file, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", open_full, raising=False)
    with pytest.raises(OutputError, match="no space left on the device; the previous file was kept"):
        write_atomic(path, lambda f: torch.save({"w": torch.zeros(1000, 1000)}, f))
    assert path.read_bytes() == PREVIOUS


@pytest.mark.parametrize("error", [ValueError("not writable data"), KeyboardInterrupt()])
def test_other_failures_propagate_and_clean_up(tmp_path, error):
    path = tmp_path / "x.bin"
    path.write_bytes(PREVIOUS)
    with pytest.raises(type(error)):
        write_atomic(path, _write_then_fail(error))
    assert path.read_bytes() == PREVIOUS
    _only(tmp_path, "x.bin")


def test_bad_destinations_are_one_line(tmp_path):
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_bytes(PREVIOUS)
    with pytest.raises(OutputError, match="a_folder: it is a folder; give a file name"):
        write_atomic(tmp_path / "a_folder", lambda f: f.write(b"x"))
    with pytest.raises(OutputError, match="a_file is a file, not a folder"):
        write_atomic(tmp_path / "a_file" / "deeper" / "x.bin", lambda f: f.write(b"x"))
    assert (tmp_path / "a_file").read_bytes() == PREVIOUS
    _only(tmp_path, "a_folder", "a_file")
    _only(tmp_path / "a_folder")


@pytest.mark.parametrize("error, reason", [(errno.EPERM, "permission denied"), (errno.EROFS, "the file system is read-only")])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch, error, reason):
    # predict --output /sys/foo (root in a container: EPERM) was mkdir's traceback in segmentation
    # predict; the training log's folder too
    from PIL import Image

    from crossformer.detection.predict import predict_detections
    from crossformer.engine.logging import RunLogger
    from crossformer.segmentation.inference import InferenceConfig
    from crossformer.segmentation.predict import predict_images
    from test_segmentation_eval import ConstantSegmentor

    Image.new("RGB", (64, 48)).save(tmp_path / "photo.png")
    real = Path.mkdir

    def refused(self, *args, **kwargs):
        if self.name == "out":
            raise OSError(error, os.strerror(error), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    out = tmp_path / "out"
    for run in (lambda: predict_detections(_NoDetections(), tmp_path / "photo.png", out, ["a"]),
                lambda: predict_images(ConstantSegmentor(3, target=1), tmp_path / "photo.png", out, ["a", "b", "c"],
                                       inference=InferenceConfig(scale=(64, 48))),
                lambda: RunLogger(out)):
        with pytest.raises(OutputError, match=f"^cannot write {re.escape(str(out))}: {reason}$"):
            run()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_new_files_is_one_line(tmp_path):
    # export -o /proc/c.onnx: FileNotFoundError's traceback (ENOENT from creating the file)
    with pytest.raises(OutputError, match="^cannot write /proc/c.bin: its folder takes no new files; nothing was written$"):
        write_atomic("/proc/c.bin", lambda f: f.write(b"x"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions (root ignores them)")
def test_an_unwritable_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            write_atomic(folder / "x.bin", lambda f: f.write(b"x"))
    finally:
        folder.chmod(0o700)
    _only(folder)


def test_file_modes(tmp_path):
    fresh = write_atomic(tmp_path / "fresh.bin", lambda f: f.write(b"x"))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~atomic._UMASK  # not a temporary file's 0600
    kept = tmp_path / "kept.bin"
    kept.write_bytes(PREVIOUS)
    kept.chmod(0o640)
    write_atomic(kept, lambda f: f.write(b"x"))
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640


def test_the_file_is_on_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    # without fsync a power cut after the rename could leave an empty file where the old one was
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append("replace"), real_replace(src, dst))[1])
    write_atomic(tmp_path / "x.bin", lambda f: f.write(b"x"))
    assert events == ["fsync", "replace"]


def test_a_leading_tilde_is_the_home_folder(tmp_path, monkeypatch):
    # no shell expands it in --output=~/x: written under a folder named "~" it would be lost from view
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert write_atomic("~/x.bin", lambda f: f.write(b"x")) == tmp_path / "x.bin"
    assert atomic.check_output_folder("~/runs") == tmp_path / "runs"
    _only(tmp_path, "x.bin")


def test_library_messages_become_one_line_and_listings_count_the_rest():
    assert one_line("missing keys:\n  head.weight \n\n  head.bias") == "missing keys: head.weight head.bias"
    assert one_line("x" * 600) == "x" * 600
    assert one_line("x" * 601) == "x" * 597 + "..."
    assert listing(["a", "b", "c", "d"]) == "a, b, c, d"
    assert listing(["a", "b", "c", "d", "e", "f"]) == "a, b, c, d and 2 more"
    assert listing(["a", "b"], limit=1) == "a and 1 more"


# --- through the commands -------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": CrossFormer(**TINY).state_dict(), "model_name": "crossformer_tiny",
                "model_kwargs": TINY_MODEL, "img_size": 32}, path)
    return path


def _disk_full(monkeypatch) -> None:
    """Every write through the atomic writer fails half-way on a full disk."""
    real = atomic.write_atomic

    def full(path, write):
        return real(path, _write_then_fail(OSError(errno.ENOSPC, "No space left on device")))

    # crossformer.export imported it by name: patched first, so that a first import of it here binds the
    # real function (which the undo then restores) rather than the already patched one, for every later test
    for module in ("crossformer.export", "crossformer.atomic"):
        monkeypatch.setattr(f"{module}.write_atomic", full)


@pytest.mark.parametrize("command", ["convert", "safetensors", "torchscript"])
def test_commands_on_a_full_disk_keep_the_previous_file(tmp_path, capsys, monkeypatch, checkpoint, command):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "model.bin"
    target.write_bytes(PREVIOUS)
    argv = (
        ["convert", str(checkpoint), str(target)] if command == "convert"
        else ["export", "--checkpoint", str(checkpoint), "--format", command, "-o", str(target)]
    )
    _disk_full(monkeypatch)
    line = one_error_line(capsys, argv)
    assert line.endswith(f"cannot write {target}: no space left on the device; the previous file was kept"), line
    assert target.read_bytes() == PREVIOUS
    _only(out, "model.bin")


@pytest.mark.parametrize("command", ["convert", "safetensors", "torchscript", "onnx"])
def test_commands_refuse_a_folder_or_a_path_under_a_file(tmp_path, capsys, checkpoint, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plain_file").write_bytes(PREVIOUS)
    for target, message in ((out, "it is a folder"), (out / "plain_file" / "x.bin", "is a file, not a folder")):
        argv = (
            ["convert", str(checkpoint), str(target)] if command == "convert"
            else ["export", "--checkpoint", str(checkpoint), "--format", command, "-o", str(target)]
        )
        line = one_error_line(capsys, argv)
        assert f"cannot write {target}" in line and message in line, line
    _only(out, "plain_file")
    assert (out / "plain_file").read_bytes() == PREVIOUS


class _NoDetections(torch.nn.Module):
    def forward(self, images, metas):
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in metas]


def test_detection_results_on_a_full_disk_keep_the_previous_file(tmp_path, monkeypatch):
    """predict's detections.json and evaluate's results JSON: a traceback and a cut file, before."""
    from PIL import Image

    from crossformer.detection.data import CocoDetection, coco_paths
    from crossformer.detection.evaluate import evaluate_detector
    from crossformer.detection.predict import predict_detections
    from detection_fixtures import GroundTruthDetector, make_small_coco

    Image.new("RGB", (64, 48)).save(tmp_path / "photo.png")
    out = tmp_path / "predicted"
    out.mkdir()
    (out / "detections.json").write_bytes(PREVIOUS)
    root = make_small_coco(tmp_path / "coco", images=4)
    results = tmp_path / "results.json"
    results.write_bytes(PREVIOUS)
    _cut_off(monkeypatch, "*.json*")  # the JSON files alone: predict's PNG is written atomically too
    for target, run in ((out / "detections.json", lambda: predict_detections(_NoDetections(), tmp_path / "photo.png", out, ["a"])),
                        (results, lambda: evaluate_detector(GroundTruthDetector(root), CocoDetection(*coco_paths(root, "val")),
                                                            results_file=results))):
        with pytest.raises(OutputError, match=f"cannot write {target}: no space left on the device; the previous file was kept"):
            run()
        assert target.read_bytes() == PREVIOUS
        assert not atomic.stale_temporaries(target)


def test_no_output_replaces_the_checkpoint_it_is_made_from(tmp_path, capsys, checkpoint):
    # convert c.pth -o c.pth and export ... -o c.pth wrote the weights over the training
    # checkpoint (its optimizer, RNG and EMA state gone) and said "wrote c.pth"
    before = checkpoint.read_bytes()
    (tmp_path / "link.pth").symlink_to(checkpoint)
    for argv in (["convert", str(checkpoint), "-o", str(checkpoint)],
                 ["convert", str(checkpoint), str(tmp_path / "sub" / ".." / "ckpt.pth")],
                 ["convert", str(tmp_path / "link.pth"), "-o", str(checkpoint)],
                 ["export", "--checkpoint", str(checkpoint), "--format", "safetensors", "-o", str(checkpoint)],
                 ["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "-o", str(checkpoint)]):
        line = one_error_line(capsys, argv)
        assert f"it is the input {argv[1] if argv[0] == 'convert' else checkpoint}, which it would replace; give " \
               "another output file" in line, line
    assert checkpoint.read_bytes() == before
    (tmp_path / "sub").mkdir()
    assert main(["convert", str(checkpoint), str(tmp_path / "sub" / ".." / "ckpt.pth")]) == 2  # the same file
    assert checkpoint.read_bytes() == before


def test_convert_writes_the_weights(tmp_path, capsys, checkpoint):
    target = tmp_path / "w.safetensors"
    assert main(["convert", str(checkpoint), str(target)]) == 0
    written = load_file(str(target))
    state = torch.load(checkpoint)["model"]
    assert written.keys() == {k for k in state if not k.endswith((".attn.biases", ".attn.relative_position_index"))}
    assert all(torch.equal(v, state[k]) for k, v in written.items())
    _only(tmp_path, "ckpt.pth", "w.safetensors")
    # issue 16 item 12: safetensors' own writer creates 0600 files; ours are like any new file
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~atomic._UMASK



# ---------------------------------------------------------------- images, data sets and marks, whole or not at all


class _CutFile:
    """A file open for writing whose first write stores half its bytes, then fails as ``error``."""

    def __init__(self, file, error: BaseException) -> None:
        self._file, self._error = file, error

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        raise self._error

    def fileno(self) -> int:
        import io

        raise io.UnsupportedOperation("fileno")  # Pillow writes JPEGs to a file's descriptor where it has one

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def _cut_off(monkeypatch, name_pattern: str, error: BaseException | None = None) -> None:
    """Files whose name matches ``name_pattern`` (their temporaries too: ``*x.png*``) are cut off
    half-way through their first write (a full disk, or ``error``: Ctrl-C), whoever opens them:
    ``open``, ``Path.write_text`` or Pillow's save to a path."""
    import builtins
    import fnmatch
    import io

    real = builtins.open
    error = error or OSError(errno.ENOSPC, "No space left on device")

    def cutting_open(file, mode="r", *args, **kwargs):
        opened = real(file, mode, *args, **kwargs)
        writing = any(m in mode for m in "wax+")
        named = isinstance(file, (str, os.PathLike)) and fnmatch.fnmatch(Path(file).name, name_pattern)
        return _CutFile(opened, error) if writing and named else opened

    monkeypatch.setattr(builtins, "open", cutting_open)
    monkeypatch.setattr(io, "open", cutting_open)


def _files(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden temporaries included, relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_save_image_atomic_writes_the_format_its_suffix_names(tmp_path):
    from PIL import Image

    from crossformer.atomic import save_image_atomic

    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    save_image_atomic(Image.fromarray(pixels), tmp_path / "a" / "x.PNG")
    save_image_atomic(Image.fromarray(pixels), tmp_path / "y.jpg", quality=95)
    with Image.open(tmp_path / "a" / "x.PNG") as png, Image.open(tmp_path / "y.jpg") as jpeg:
        assert png.format == "PNG" and np.array_equal(np.asarray(png), pixels) and jpeg.format == "JPEG"
    with pytest.raises(ValueError, match="no image format"):
        save_image_atomic(Image.fromarray(pixels), tmp_path / "z.unknown")


@pytest.mark.parametrize("task, name", [("segmentation", "photo_overlay.png"), ("segmentation", "photo_labels.png"),
                                        ("detection", "photo.png")])
def test_a_prediction_image_cut_off_keeps_the_previous_file(tmp_path, monkeypatch, task, name):
    """predict's PNGs were saved in place: a full disk left a cut PNG that passed for a prediction."""
    from PIL import Image

    Image.new("RGB", (64, 48), (40, 90, 200)).save(tmp_path / "photo.jpg")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(PREVIOUS)
    if task == "segmentation":
        from crossformer.segmentation.inference import InferenceConfig
        from crossformer.segmentation.predict import predict_images
        from test_segmentation_eval import ConstantSegmentor

        def run():
            predict_images(ConstantSegmentor(3, target=1), tmp_path / "photo.jpg", out, ["a", "b", "c"],
                           inference=InferenceConfig(scale=(64, 48)))
    else:
        from crossformer.detection.predict import predict_detections

        def run():
            predict_detections(_NoDetections(), tmp_path / "photo.jpg", out, ["a"])
    _cut_off(monkeypatch, f"*{name}*")
    with pytest.raises(OutputError, match=f"cannot write {out / name}: no space left on the device; the previous"):
        run()
    assert (out / name).read_bytes() == PREVIOUS and not atomic.stale_temporaries(out / name)


@pytest.mark.parametrize("kind, name", [("coco", "000000000002.jpg"), ("coco", "instances_train2017.json"),
                                        ("ade", "ADE_train_00000002.png"), ("ade", "classes.txt")])
def test_make_data_cut_off_leaves_no_cut_file(tmp_path, capsys, monkeypatch, kind, name):
    """make-data's images, annotation JSON and classes.txt were written in place: a cut JPEG, JSON
    or class list stayed, and the segmentation demo took a set with a classes.txt for complete."""
    from PIL import Image

    root = tmp_path / "data"
    _cut_off(monkeypatch, f"*{name}*")
    line = one_error_line(capsys, ["make-data", kind, str(root), "--images", "4"])
    assert line.endswith("no space left on the device; nothing was written"), line
    written = _files(root)
    assert written and not any(Path(file).name == name or Path(file).name.startswith(".") for file in written), written
    for file in written:  # every file left is whole
        if file.endswith(".json"):
            json.loads((root / file).read_text())
        elif file.endswith(".txt"):  # make-data's mark, written first
            assert (root / file).read_text() == f"{kind}\n"
        else:
            Image.open(root / file).load()


@pytest.mark.parametrize("kind, name, marks", [
    ("coco", "000000000002.jpg", ["annotations/instances_train2017.json", "annotations/instances_val2017.json"]),
    ("ade", "ADE_train_00000002.png", ["ADEChallengeData2016/classes.txt"])])
def test_make_data_cut_off_over_an_earlier_set_leaves_it_incomplete(tmp_path, capsys, monkeypatch, kind, name, marks):
    """An earlier set's annotation JSON or classes.txt stayed beside a rewrite cut short (another
    --seed, say): its old annotations then described new images, as a whole set."""
    root = tmp_path / "data"
    assert main(["make-data", kind, str(root), "--images", "4"]) == 0
    assert all((root / mark).is_file() for mark in marks)
    _cut_off(monkeypatch, f"*{name}*")
    one_error_line(capsys, ["make-data", kind, str(root), "--images", "4", "--seed", "1"])
    assert not any((root / mark).exists() for mark in marks)


def test_make_data_replaces_only_a_set_it_wrote(tmp_path, capsys):
    # make-data coco over one's own COCO folder replaced its annotation JSON and the images of
    # matching names, leaving the others listed nowhere
    own = tmp_path / "own"
    (own / "annotations").mkdir(parents=True)
    (own / "annotations" / "instances_train2017.json").write_text('{"images": []}')
    before = _files(own)
    line = one_error_line(capsys, ["make-data", "coco", str(own), "--images", "4"])
    assert line.endswith(f"{own} already holds annotations, not what `make-data coco` wrote there: it replaces the "
                         "files of its set, so pass a new or empty folder"), line
    assert _files(own) == before and (own / "annotations" / "instances_train2017.json").read_text() == '{"images": []}'
    # its own set, rewritten with another seed or image count; not as another kind
    made = tmp_path / "made"
    assert main(["make-data", "coco", str(made), "--images", "4"]) == 0
    assert main(["make-data", "coco", str(made), "--images", "6", "--seed", "1"]) == 0
    assert "4 train / 2 val images" in capsys.readouterr().out.splitlines()[-1]
    assert "not what `make-data ade` wrote there" in one_error_line(capsys, ["make-data", "ade", str(made)])
    # a smaller set replaces the earlier one whole: its other images stayed, and the ADE layout,
    # listed from the folders, read 8 images of two seeds after --images 4
    from crossformer.segmentation.data import ade20k_dataset

    scenes = tmp_path / "scenes"
    assert main(["make-data", "ade", str(scenes), "--images", "10"]) == 0
    assert main(["make-data", "ade", str(scenes), "--images", "4", "--seed", "1"]) == 0
    assert "3 training / 1 validation images" in capsys.readouterr().out.splitlines()[-1]
    assert len(ade20k_dataset(scenes, "training")) == 3 and len(ade20k_dataset(scenes, "validation")) == 1
    assert sorted(p.name for p in (made / "train2017").iterdir()) == [f"{i:012d}.jpg" for i in range(1, 5)]


def test_a_demo_mark_cut_off_keeps_the_previous_mark(tmp_path, monkeypatch):
    """The demo's mark was written in place: Ctrl-C there left a cut mark naming no task, and the
    next demo refused its own folder."""
    from crossformer.engine.output import DEMO_MARK, claim_demo_output

    folder = tmp_path / "demo"
    claim_demo_output(folder, "segmentation", ("train",), tmp_path / "default")
    (folder / "train").mkdir()
    with monkeypatch.context() as patch:
        _cut_off(patch, f"*{DEMO_MARK}*", KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            claim_demo_output(folder, "segmentation", ("train",), tmp_path / "default")
    assert (folder / DEMO_MARK).read_text() == "segmentation\n"
    claim_demo_output(folder, "segmentation", ("train",), tmp_path / "default")  # refused, before
    assert _files(folder) == [DEMO_MARK]
