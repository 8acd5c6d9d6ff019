"""The command answers --help and usage errors at once: without importing torch, timm or
torchvision (seconds), and with the same text as the command that has imported them."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from crossformer.cli import COMMANDS, main
from crossformer.errors import UserInputError
from processes import run_process

HEAVY = ("torch", "timm", "torchvision")
# usage errors: an unknown command, a misspelt flag, a shortened one, a bad choice
USAGE_ERRORS = [["trian"], ["train", "--epocs", "3"], ["flops", "--modle", "crossformer_tiny"], ["train", "--img", "64"],
                ["demo", "--task", "detect"]]
# the dense tasks' flags come from their configs (detection, segmentation): --help and a misspelt flag
DENSE_CONFIGS = ("mask_rcnn_shapes_demo", "upernet_crossformer_small")
DENSE_HELP = [[verb, "--config", config, "--help"] for verb in ("train", "evaluate", "predict") for config in DENSE_CONFIGS]
DENSE_USAGE_ERRORS = [["train", "--config", DENSE_CONFIGS[0], "--epocs", "3"],
                      ["evaluate", "--config", DENSE_CONFIGS[1], "--chekpoint", "x.pth"]]


# The command as its console script runs it, then, on its last stderr line, every module it had
# imported: sys.modules holds them whichever way they came, where Python's -X importtime log
# missed a module loaded with importlib.import_module (torch, so loaded on the --help path, passed).
_MODULES_AT_EXIT = "crossformer-test modules at exit:"
_RUN_COMMAND = f"""
import atexit, runpy, sys
atexit.register(lambda: print({_MODULES_AT_EXIT!r}, *sorted(sys.modules), file=sys.stderr))
sys.argv[0] = "crossformer"
runpy.run_module("crossformer", run_name="__main__")
"""


def _command(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``crossformer ARGV`` as a user runs it, and the modules it had imported when it ended."""
    proc = run_process([sys.executable, "-c", _RUN_COMMAND, *argv], timeout=120, env=env)
    lines = proc.stderr.splitlines()
    assert lines and lines[-1].startswith(_MODULES_AT_EXIT), proc.stderr[-2000:]
    proc.stderr = "".join(line + "\n" for line in lines[:-1])
    return proc, set(lines[-1].split()[len(_MODULES_AT_EXIT.split()):])


def _heavy(imported: set[str]) -> list[str]:
    """The modules of torch, timm and torchvision among ``imported``."""
    return sorted(name for name in imported if name.split(".")[0] in HEAVY)


def _in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` in this process (the package and torch already imported): status, out, err."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *([name, "--help"] for name in COMMANDS), *DENSE_HELP],
                         ids=lambda argv: " ".join(argv))
def test_help_imports_no_torch_and_says_what_it_said(argv: list[str], capsys) -> None:
    proc, imported = _command(argv)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert not _heavy(imported), _heavy(imported)
    assert (0, proc.stdout, "") == _in_process(argv, capsys)


@pytest.mark.parametrize("argv", [*USAGE_ERRORS, *DENSE_USAGE_ERRORS], ids=lambda argv: " ".join(argv))
def test_a_usage_error_imports_no_torch_and_says_what_it_said(argv: list[str], capsys) -> None:
    proc, imported = _command(argv)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and ": error: " in proc.stderr, proc.stderr
    assert not _heavy(imported), _heavy(imported)
    assert (2, "", proc.stderr) == _in_process(argv, capsys)


def test_a_one_process_command_under_torchrun_is_refused_without_torch(capsys, monkeypatch) -> None:
    # the refusal reads torchrun's WORLD_SIZE alone: it imported torch with engine.distributed
    argv, launched = ["flops", "--model", "crossformer_tiny"], {"WORLD_SIZE": "2", "RANK": "0"}
    proc, imported = _command(argv, env={**os.environ, **launched})
    assert proc.stderr == ("crossformer flops: error: it runs in one process, but torchrun started 2: run it without "
                           "torchrun\n") and proc.returncode == 2, proc.stderr[-2000:]
    assert not _heavy(imported), _heavy(imported)
    for name, value in launched.items():
        monkeypatch.setenv(name, value)
    assert (2, "", proc.stderr) == _in_process(argv, capsys)


TORCHRUN_VARIABLES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK")


@pytest.mark.parametrize("name", TORCHRUN_VARIABLES)
def test_a_torchrun_number_that_is_no_number_is_one_line_without_torch(name: str, capsys, monkeypatch) -> None:
    # RANK=abc was int()'s ValueError traceback, from the line that says an error (cli._say) too
    argv = ["flops", "--model", "crossformer_tiny"]
    proc, imported = _command(argv, env={**os.environ, name: "abc"})
    assert proc.stderr == (f"crossformer flops: error: {name}='abc' in the environment is not a whole number: torchrun "
                           f"sets it to one; unset it or correct it\n") and proc.returncode == 2, proc.stderr[-2000:]
    assert not _heavy(imported), _heavy(imported)
    monkeypatch.setenv(name, "abc")
    assert (2, "", proc.stderr) == _in_process(argv, capsys)


@pytest.mark.parametrize("launched, said", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' in the environment is below 1: torchrun never sets it so"),
    ({"LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' in the environment is below 1: torchrun never sets it so"),
    ({"RANK": "-1"}, "RANK='-1' in the environment is below 0: torchrun never sets it so"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' in the environment is below 0: torchrun never sets it so"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK='2' in the environment is not below WORLD_SIZE='2': torchrun numbers "
                                       "its processes from 0"),
    ({"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "3"}, "LOCAL_RANK='3' in the environment is not below "
                                                   "LOCAL_WORLD_SIZE='2': torchrun numbers its processes from 0"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "1"},
     "LOCAL_WORLD_SIZE='4' in the environment is above WORLD_SIZE='2': a node runs at most all of the job's processes"),
], ids=["world_size_0", "local_world_size_0", "negative_rank", "negative_local_rank", "rank_at_count", "local_rank_past_count",
        "node_above_job"])
def test_a_torchrun_number_torchrun_never_sets_is_one_line_without_torch(
    launched: dict[str, str], said: str, capsys, monkeypatch,
) -> None:
    # WORLD_SIZE=0, a negative rank or one beyond the count were accepted, to fail later (or never)
    argv = ["flops", "--model", "crossformer_tiny"]
    unset = {name: "" for name in TORCHRUN_VARIABLES}
    env = {k: v for k, v in {**os.environ, **unset, **launched}.items() if v != ""}
    proc, imported = _command(argv, env=env)
    assert proc.stderr.startswith(f"crossformer flops: error: {said}; unset") and proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) == 1 and not _heavy(imported), _heavy(imported)
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in launched.items():
        monkeypatch.setenv(name, value)
    assert (2, "", proc.stderr) == _in_process(argv, capsys)


def test_torchruns_variables_are_read_with_their_defaults(monkeypatch) -> None:
    from crossformer.engine import launch

    readers = (launch.launched_processes, launch.launched_node_processes, launch.launched_rank,
               launch.launched_local_rank)
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert [read() for read in readers] == [1, 1, 0, 0] and not launch.launched_by_torchrun()
    for name, value in zip(TORCHRUN_VARIABLES, ("8", "4", "5", "1")):
        monkeypatch.setenv(name, value)
    assert [read() for read in readers] == [8, 4, 5, 1] and launch.launched_by_torchrun()
    monkeypatch.setenv("RANK", "0")  # its rank 0 too (the resume hint names torchrun there)
    assert launch.launched_rank() == 0 and launch.launched_by_torchrun()
    monkeypatch.setenv("LOCAL_RANK", "1.5")  # the Python API's readers say it as the command does
    with pytest.raises(UserInputError, match=r"^LOCAL_RANK='1.5' in the environment is not a whole number"):
        launch.launched_local_rank()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not launch.launched_by_torchrun_agent()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun --standalone's
    assert launch.launched_by_torchrun_agent()


def test_only_engine_launch_reads_torchruns_variables() -> None:
    # RANK was read in four modules (LOCAL_WORLD_SIZE in two), each stating its default again
    import ast

    import crossformer

    package = Path(crossformer.__file__).parent
    read = (*TORCHRUN_VARIABLES, "TORCHELASTIC_RUN_ID")  # its launcher's, read in engine.distributed too
    elsewhere = [f"{path.relative_to(package)}:{node.lineno} {node.value}"
                 for path in sorted(package.rglob("*.py")) if path != package / "engine" / "launch.py"
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
                 and node.value in read]
    assert not elsewhere, f"read torchrun's variables through crossformer.engine.launch: {elsewhere}"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict[str, Path]:
    """``{"<task>.pth" / "<task>.safetensors": file}``: a training checkpoint of each task, written
    by the trainer and re-saved with the task's name and default config, and its weights export."""
    from crossformer.engine import config_to_dict, load_training_state, save_atomic, train
    from crossformer.engine.registry import TASKS, config_module
    from crossformer.models import convert_to_safetensors
    from engine_fixtures import FakeTask, fake_config

    folder = tmp_path_factory.mktemp("recorded")
    train(FakeTask, fake_config(folder / "run", epochs=1))
    state = load_training_state(folder / "run" / "last.pth")
    files = {}
    for task in TASKS:
        files[f"{task}.pth"] = save_atomic({**state, "task": task, "config": config_to_dict(config_module(task).CONFIG())},
                                           folder / f"{task}.pth")
        files[f"{task}.safetensors"] = convert_to_safetensors(files[f"{task}.pth"], folder / f"{task}.safetensors")
    return files


@pytest.fixture
def through_torch(monkeypatch) -> None:
    """Checkpoints peeked at as before: by torch's weights-only loader, the stand-ins refused."""
    from crossformer import checkpoint_files

    def refuse(path: str) -> None:
        raise pickle.UnpicklingError("stand-ins refused by the test")

    monkeypatch.setattr(checkpoint_files, "_unpickle_with_stubs", refuse)
    checkpoint_files._peek.cache_clear()
    yield
    checkpoint_files._peek.cache_clear()


def _peeked(path: Path) -> dict:
    from crossformer.checkpoint_files import _peek, peek_checkpoint

    _peek.cache_clear()
    return peek_checkpoint(path)


def test_a_checkpoint_is_peeked_at_without_torch_as_torch_reads_it(recorded, reference_dir: Path, request) -> None:
    from crossformer.checkpoint_files import _TensorStub, _unpickle_with_stubs

    files = [*recorded.values(), reference_dir / "pp_cls.pth"]  # the authors' file: a pickled yacs config
    fast = {path: _peeked(path) for path in files}
    request.getfixturevalue("through_torch")
    assert fast == {path: _peeked(path) for path in files}
    for name, path in recorded.items():
        assert fast[path]["task"] == name.split(".")[0] and "config" in fast[path] and "model" not in fast[path], name
    # the trainer's checkpoint is read by the stand-ins, its weights, optimizer and RNG states stand-ins too
    state = _unpickle_with_stubs(str(recorded["detection.pth"]))
    assert isinstance(state["model"]["1.weight"], _TensorStub) and isinstance(state["rank_state"][0]["rng"]["torch"],
                                                                              _TensorStub)
    assert fast[reference_dir / "pp_cls.pth"] == {}


def test_a_damaged_checkpoint_is_peeked_at_as_torch_peeks_at_it(recorded, tmp_path: Path, request) -> None:
    import zipfile

    whole = recorded["segmentation.pth"].read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    with zipfile.ZipFile(recorded["segmentation.pth"]) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    pickled = next(name for name in entries if name.endswith("/data.pkl"))
    data_record = next(name for name in entries if "/data/" in name)
    for name, damage in (("no_record.pth", {data_record: None}), ("bad_pickle.pth", {pickled: b"\x80\x02garbage"}),
                         ("no_pickle.pth", {pickled: None})):
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            for entry, data in {**entries, **damage}.items():
                if data is not None:
                    archive.writestr(entry, data)
    files = sorted(tmp_path.glob("*.pth"))
    fast = [_peeked(path) for path in files]
    request.getfixturevalue("through_torch")
    assert fast == [_peeked(path) for path in files] == [{}] * 4


def test_what_the_stand_ins_cannot_stand_for_is_read_by_torch(tmp_path: Path) -> None:
    import torch

    from crossformer.engine import save_atomic

    # weights-only torch reads a device and a size (the stand-ins do not know them): as before
    save_atomic({"task": "detection", "device": torch.device("cpu"), "size": torch.Size([2, 3]), "w": torch.ones(2)},
                tmp_path / "other.pth")
    assert _peeked(tmp_path / "other.pth") == {"task": "detection", "device": torch.device("cpu"),
                                               "size": torch.Size([2, 3])}


def test_a_pickle_calling_anything_else_is_refused_unrun(tmp_path: Path) -> None:
    import os
    import zipfile

    class Runs:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    with zipfile.ZipFile(tmp_path / "bad.pth", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"task": "detection", "x": Runs()}, protocol=2))
    assert _peeked(tmp_path / "bad.pth") == {} and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_help_for_a_checkpoint_imports_no_torch_and_says_what_torch_said(recorded, verb: str, capsys,
                                                                         request) -> None:
    # the task's flags, and for detection and segmentation the recorded config's values as defaults
    outputs = {}
    for name, path in recorded.items():
        argv = [verb, "--checkpoint", str(path), "--help"]
        proc, imported = _command(argv)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
        assert not _heavy(imported), (name, _heavy(imported))
        outputs[name] = proc.stdout
    request.getfixturevalue("through_torch")
    for name, path in recorded.items():
        assert (0, outputs[name], "") == _in_process([verb, "--checkpoint", str(path), "--help"], capsys), name
    assert "--kind" in outputs["detection.pth"] and "--kind" not in outputs["classification.pth"]


# files that are no checkpoint, told so from the path and first bytes alone: name -> how to make it
NOT_CHECKPOINTS = {"missing.pth": lambda path: None, "folder.pth": Path.mkdir,
                   "notes.pth": lambda path: path.write_text("hello\n")}
# the commands that read a checkpoint, "{}" standing for it (each with what it needs besides)
READS_A_CHECKPOINT = {
    "evaluate": ["evaluate", "--checkpoint", "{}"],
    "predict": ["predict", "a.png", "--checkpoint", "{}"],
    "convert": ["convert", "{}", "out.safetensors"],
    "export": ["export", "--format", "safetensors", "--model", "crossformer_tiny", "--checkpoint", "{}"],
    **{f"{verb} --config {config}": [verb, "--config", config, "--checkpoint", "{}", *(["a.png"] if verb == "predict" else [])]
       for verb in ("evaluate", "predict") for config in DENSE_CONFIGS},
    "export --config": ["export", "--config", DENSE_CONFIGS[1], "--format", "safetensors", "--checkpoint", "{}"],
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_a_checkpoint_that_cannot_be_read_is_said_without_torch_as_its_reader_says_it(name: str, tmp_path: Path) -> None:
    # "checkpoint not found" took the 6 s of importing torch first
    from crossformer.errors import CheckpointError
    from crossformer.models import read_checkpoint

    path = tmp_path / name
    NOT_CHECKPOINTS[name](path)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    for command, argv in READS_A_CHECKPOINT.items():
        argv = [arg.format(path) for arg in argv]
        proc, imported = _command(argv)
        assert (proc.returncode, proc.stderr) == (2, f"crossformer {argv[0]}: error: {caught.value}\n"), command
        assert not _heavy(imported), (command, _heavy(imported))


# train's flags and settings that name a checkpoint, "{}" standing for it: what its errors start with, and the command
TRAINS_FROM_A_CHECKPOINT = {
    **{f"--config {config} --resume": ("cannot resume", ["train", "--config", config, "--resume", "{}"])
       for config in ("digits", *DENSE_CONFIGS)},
    "--model --resume": ("cannot resume", ["train", "--model", "crossformer_tiny", "--resume", "{}"]),
    "--config digits model.pretrained": ("model.pretrained", ["train", "--config", "digits", "model.pretrained={}"]),
    "--model --pretrained": ("model.pretrained", ["train", "--model", "crossformer_tiny", "--pretrained", "{}"]),
    "dense model.init_from": ("model.init_from", ["train", "--config", DENSE_CONFIGS[0], "model.init_from={}"]),
    "dense --init-from": ("model.init_from", ["train", "--config", DENSE_CONFIGS[1], "--init-from", "{}"]),
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_a_training_checkpoint_that_cannot_be_read_is_said_without_torch_as_training_says_it(name: str,
                                                                                            tmp_path: Path) -> None:
    # train imported torch (4-6 s) before "cannot resume: checkpoint not found"
    from crossformer.engine import load_training_state, require_model_files
    from crossformer.errors import CheckpointError

    path = tmp_path / name
    NOT_CHECKPOINTS[name](path)
    with pytest.raises(CheckpointError) as resuming:
        load_training_state(path)
    with pytest.raises(CheckpointError) as starting:
        require_model_files("classification", pretrained=str(path))
    said = {"cannot resume": str(resuming.value), "model.pretrained": str(starting.value)}
    said["model.init_from"] = said["model.pretrained"].replace("model.pretrained", "model.init_from", 1)
    for command, (what, argv) in TRAINS_FROM_A_CHECKPOINT.items():
        argv = [arg.format(path) for arg in argv]
        proc, imported = _command(argv)
        assert (proc.returncode, proc.stderr) == (2, f"crossformer train: error: {said[what]}\n"), command
        assert said[what].startswith(f"{what}: ") and not _heavy(imported), (command, _heavy(imported))


@pytest.mark.parametrize("base, setting, what", [
    ("digits", "model:\n  pretrained: {}\n", "model.pretrained: checkpoint not found"),
    ("digits", "run:\n  resume: {}\n", "cannot resume: checkpoint not found"),
    (DENSE_CONFIGS[1], "model:\n  init_from: {}\n", "model.init_from: checkpoint not found"),
])
def test_a_config_files_missing_start_file_is_said_without_torch(base: str, setting: str, what: str,
                                                                 tmp_path: Path) -> None:
    # only the command line's were checked early: a config file's was said after its checks had
    # built the model (digits: model.kwargs), importing torch (5 s)
    missing = tmp_path / "gone.pth"
    config = tmp_path / "mine.yaml"
    config.write_text(f"base: {base}\n" + setting.format(missing))
    proc, imported = _command(["train", "--config", str(config), "--output", str(tmp_path / "run")])
    assert (proc.returncode, proc.stderr) == (2, f"crossformer train: error: {what}: {missing}\n"), proc.stderr
    assert not _heavy(imported), _heavy(imported)


@pytest.mark.parametrize("resume", ["auto", "last.pth"])
def test_a_resumed_run_is_not_refused_for_its_start_files(resume: str, tmp_path: Path, monkeypatch) -> None:
    # a resume takes every weight from its checkpoint: the files the run started from may be gone;
    # auto resumes only where the output folder holds last.pth, which training decides
    from crossformer.commands.train import refuse_unreadable_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "last.pth").write_bytes(b"PK\x03\x04")  # a zip file's start: a checkpoint as far as sniffing goes
    refuse_unreadable_files({"run.resume": resume, "model.pretrained": "missing.pth"})


# mistakes in a segmentation config's colour-coded label maps (settings), and what is said of them
COLOUR_MISTAKES = {
    "count": (["data.label_colours=[[1,2,3],[4,5,6]]"], "data.label_colours has 2 colours for 150 classes"),
    "value": (["data.label_colours=[[1,2,3],[1,2,300]]", "data.val_images=a", "data.val_labels=b", "data.classes=[a,b]"],
              "data.label_colours holds [1, 2, 300]: each colour is [R, G, B], three values 0-255"),
    "twice": (["data.label_colours=[[1,2,3],[1,2,3]]", "model.num_classes=2"],
              "data.label_colours gives classes 0 and 1 one colour, #010203"),
    "ignored": (["data.label_colours=[[1,2,3],[4,5,6]]", "data.ignore_colours=[[4,5,6]]", "model.num_classes=2"],
                "colour #040506 is listed as class 1's colour in data.label_colours and in data.ignore_colours"),
    "alone": (["data.ignore_colours=[[1,2,3]]"], "data.ignore_colours goes with data.label_colours"),
}


@pytest.mark.parametrize("mistake", sorted(COLOUR_MISTAKES))
def test_a_mistake_in_the_label_colours_is_said_without_torch(mistake: str, capsys) -> None:
    # the colours were checked with the data package's DataError, which imported torch
    settings, expected = COLOUR_MISTAKES[mistake]
    for verb in ("train", "flops"):
        argv = [verb, "--config", DENSE_CONFIGS[1], *settings]
        proc, imported = _command(argv)
        assert proc.returncode == 2 and proc.stderr.startswith(f"crossformer {verb}: error: {expected}"), proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and not _heavy(imported), (verb, _heavy(imported))
        assert (2, "", proc.stderr) == _in_process(argv, capsys)


@pytest.mark.parametrize("config, setting, expected", [
    (DENSE_CONFIGS[0], "model.channels=0", "model.channels must be at least 1, got 0"),
    (DENSE_CONFIGS[0], "model.backbone=crossformer_tinyy",
     "model.backbone: unknown model 'crossformer_tinyy'; did you mean crossformer_tiny"),
    # segmentation checked no name: timm's "Unknown model" traceback came from the build check
    (DENSE_CONFIGS[1], "model.backbone=crossformer_smal",
     "model.backbone: unknown model 'crossformer_smal'; did you mean crossformer_small"),
])
def test_a_dense_config_mistake_is_said_without_torch(config: str, setting: str, expected: str, capsys) -> None:
    # the backbone was checked against models.variants.VARIANTS, whose module imports torch and timm
    for verb in ("train", "flops"):
        argv = [verb, "--config", config, setting]
        proc, imported = _command(argv)
        assert proc.returncode == 2 and proc.stderr.startswith(f"crossformer {verb}: error: {expected}"), proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and not _heavy(imported), (verb, _heavy(imported))
        assert (2, "", proc.stderr) == _in_process(argv, capsys)


def test_the_variants_and_a_variants_name_are_known_without_torch() -> None:
    # models.variants held them, whose module imports torch and timm: a config checking a name imported both
    code = ("import sys; sys.argv[0] = 'crossformer'; "  # as the command: a program's import registers the variants
            "from crossformer.variant_table import VARIANTS, require_known_model; "
            "require_known_model('crossformer_pp_huge'); print(len(VARIANTS), *sorted(sys.modules))")
    proc = run_process([sys.executable, "-c", code], timeout=60)
    count, *imported = proc.stdout.split()
    assert proc.returncode == 0 and count == "8" and not _heavy(set(imported)), proc.stderr[-2000:]


@pytest.mark.parametrize("config, settings, expected", [
    ("digits", ["model.kwargs.embed_dim=64", "model.drop_path=2"], "model.drop_path must be in [0, 1), got 2"),
    (DENSE_CONFIGS[1], ["model.backbone_kwargs.embed_dim=64", "data.ignore_colours=[[1,2,3]]"],
     "data.ignore_colours goes with data.label_colours"),
])
def test_a_config_mistake_beside_model_settings_is_said_before_the_model_is_built(
        config: str, settings: list[str], expected: str) -> None:
    # model settings are checked by building the model (torch): that check came first and imported torch
    proc, imported = _command(["train", "--config", config, *settings])
    assert proc.returncode == 2 and proc.stderr.startswith(f"crossformer train: error: {expected}"), proc.stderr
    assert not _heavy(imported), _heavy(imported)


@pytest.mark.parametrize("name", ["pp_cls.pth", "v1_cls.pth"])
def test_help_for_the_authors_checkpoint_imports_no_torch_and_says_what_torch_said(name: str, reference_dir: Path,
                                                                                   capsys, request) -> None:
    # their pickled yacs config, which the stand-ins left to torch's weights-only loader, refuses it unread
    argv = ["predict", "--checkpoint", str(reference_dir / name), "--help"]
    proc, imported = _command(argv)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert not _heavy(imported), _heavy(imported)
    request.getfixturevalue("through_torch")
    assert (0, proc.stdout, "") == _in_process(argv, capsys)


def test_help_lists_every_command_and_train_help_every_flag_of_the_default_task() -> None:
    from crossformer.classification.config import ClassificationConfig
    from crossformer.commands.common import config_flags

    out = " ".join(_command(["--help"])[0].stdout.split())
    assert all(f"{name} {' '.join(text.split())}" in out for name, text in COMMANDS.items())
    train = _command(["train", "--help"])[0].stdout
    assert all(f"{flag} " in train for flag in config_flags(ClassificationConfig)), train


def test_the_model_names_help_gives_are_the_registered_variants(capsys) -> None:
    from crossformer.models import VARIANTS

    names = list(VARIANTS)
    for verb in ("benchmark", "flops", "export"):
        out = " ".join(_in_process([verb, "--help"], capsys)[1].split())
        assert f"({names[0]} ... {names[-1]}" in out
        assert set(re.findall(r"\bcrossformer_\w+", out)) <= set(VARIANTS)


@pytest.mark.parametrize("module", ["crossformer", "crossformer.models"])
def test_importing_the_package_registers_the_variants_with_timm(module: str) -> None:
    # a program (not the command): as the README shows, timm knows the variants after the import
    code = (f"import sys, {module}, timm; print(sorted(timm.list_models('crossformer_*'))); "
            "print(type(timm.create_model('crossformer_tiny', pretrained=False, num_classes=3)).__name__)")
    proc = run_process([sys.executable, "-c", code], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from crossformer.models import VARIANTS

    assert proc.stdout.splitlines() == [str(sorted(VARIANTS)), "CrossFormer"]


def test_the_package_api_resolves_lazily_to_the_same_objects() -> None:
    import crossformer
    import crossformer.classification.evaluate  # noqa: F401 (an import binds a module to its package's name)
    import crossformer.classification.predict  # noqa: F401
    from crossformer import engine, errors, models
    from crossformer.classification import evaluate, predict

    for name in set(crossformer.__all__) - {"CheckpointError", "__version__"}:
        assert getattr(crossformer, name) is getattr(models, name), name
    assert crossformer.CheckpointError is errors.CheckpointError is models.CheckpointError
    # the functions keep their names over the modules that define them, as with eager imports
    assert callable(evaluate) and callable(predict) and evaluate.__module__ == "crossformer.classification.evaluate"
    for name in engine.__all__:
        assert name in dir(engine) and getattr(engine, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        crossformer.nothing


def test_the_data_package_resolves_lazily_to_the_same_objects() -> None:
    from crossformer import data, errors
    from crossformer.data import class_list, digits, folder, loader, sampler, transforms

    modules = (errors, class_list, digits, folder, loader, sampler, transforms)
    for name in data.__all__:
        assert name in dir(data) and any(getattr(module, name, None) is getattr(data, name) for module in modules), name
    assert data.DataError is errors.DataError is folder.DataError


def test_the_dense_packages_resolve_lazily_to_the_same_objects() -> None:
    from crossformer import detection, segmentation
    from crossformer.detection import config as detection_config, detectors, flops as detection_flops, transforms
    from crossformer.segmentation import checkpoint, config as segmentation_config, flops, heads, segmentor
    from crossformer.segmentation import transforms as segmentation_transforms

    for package, modules in ((detection, (detectors, detection_flops)), (segmentation, (checkpoint, flops, heads, segmentor))):
        for name in package.__all__:
            assert name in dir(package) and any(getattr(module, name, None) is getattr(package, name) for module in modules)
    # the constants the configs need are defined there, without torch, and the pipelines use them
    assert transforms.DEFAULT_SCALE is detection_config.DEFAULT_SCALE
    for name in ("IGNORE_INDEX", "MMSEG_MEAN", "MMSEG_STD", "TrainPipelineConfig"):
        assert getattr(segmentation_transforms, name) is getattr(segmentation_config, name), name
    # both dense tasks normalise pixels by one definition of mmcv's img_norm_cfg
    assert (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD) == ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    assert transforms.IMAGENET_MEAN is segmentation_config.MMSEG_MEAN and transforms.IMAGENET_STD is segmentation_config.MMSEG_STD


def _weights_file(folder: Path) -> Path:
    """A checkpoint file the commands can peek at (a setting is refused before it is loaded)."""
    import torch

    path = folder / "weights.pth"
    torch.save({"model": {"head.weight": torch.zeros(3, 2)}}, path)
    return path


@pytest.mark.parametrize("verb, config, setting, key", [
    ("evaluate", "digits", "optimizer.lr=1e-3", "optimizer.lr"),
    ("predict", "digits", "epochs=3", "run.epochs"),
    ("evaluate", "digits", "augment.mixup=0", "augment.mixup"),
    ("evaluate", DENSE_CONFIGS[0], "rcnn_samples=64", "model.rcnn_samples"),
    ("predict", DENSE_CONFIGS[0], "data.recipe=3x", "data.recipe"),
    ("evaluate", DENSE_CONFIGS[1], "pipeline.ratio_range=[1,1]", "pipeline.ratio_range"),
    ("predict", DENSE_CONFIGS[1], "schedule.min_lr=0", "schedule.min_lr"),
    # refused before the config's checks: schedule.name=step asked for milestones first
    ("evaluate", "digits", "schedule.name=step", "schedule.name"),
    ("evaluate", "digits", "model.drop_path=0.3", "model.drop_path"),
    ("predict", DENSE_CONFIGS[0], "model.pretrained=/nonexistent.pth", "model.pretrained"),
    ("flops", "digits", "epochs=5", "run.epochs"),
    ("export", DENSE_CONFIGS[1], "optimizer.lr=1", "optimizer.lr"),
    ("export", DENSE_CONFIGS[1], "pipeline.crop_size=[64,64]", "pipeline.crop_size"),
    ("evaluate", DENSE_CONFIGS[1], "pipeline.crop_size=[64,64]", "pipeline.crop_size"),
])
def test_a_training_setting_given_to_a_verb_that_does_not_train_is_refused(verb: str, config: str, setting: str, key: str,
                                                                    tmp_path: Path, capsys) -> None:
    # taken without a word before, and without effect: a user's optimizer.lr or epochs changed nothing
    image, checkpoint = tmp_path / "x.png", _weights_file(tmp_path)
    argv = [verb, "--config", config, *(["--checkpoint", str(checkpoint)] if verb != "flops" else []), setting,
            *([str(image)] if verb == "predict" else []), *(["--format", "onnx"] if verb == "export" else [])]
    code, out, err = _in_process(argv, capsys)
    assert (code, out) == (2, "") and len(err.splitlines()) == 1, err
    assert err == f"crossformer {verb}: error: {key} is a training setting, which {verb} does not read: leave it out\n"


def test_evaluate_names_the_ema_flag_for_model_ema_and_takes_the_settings_it_reads(tmp_path: Path, capsys) -> None:
    from crossformer.classification.config import ClassificationConfig
    from crossformer.commands.common import _refuse_training_settings
    from crossformer.detection.config import DetectionConfig
    from crossformer.segmentation.config import SegmentationConfig

    argv = ["evaluate", "--config", "digits", "--checkpoint", str(_weights_file(tmp_path)), "model_ema=true"]
    code, _, err = _in_process(argv, capsys)
    assert code == 2 and err.endswith("leave it out (--ema evaluates with a checkpoint's EMA weights)\n"), err
    # what the inference verbs read passes (the segmentor's input normalisation is in the pipeline section)
    for config_cls, settings in ((ClassificationConfig, {"test.crop_pct": 0.9, "img_size": 64, "run.seed": 1}),
                                 (DetectionConfig, {"run.batch_size": 1, "data.val_ann": "a.json", "min_size": 600}),
                                 (SegmentationConfig, {"pipeline": {"mean": [1, 2, 3], "std": [1, 1, 1]}, "test.flip": True})):
        for verb in ("evaluate", "predict"):
            _refuse_training_settings(config_cls, settings, verb)
    # predict's drawing threshold, given to evaluate, changed nothing without a word (mmdet's
    # score_thr is the model's, which evaluation keeps, as it does here)
    _refuse_training_settings(DetectionConfig, {"test.score_threshold": 0.5}, "predict")
    argv = ["evaluate", "--config", DENSE_CONFIGS[0], "--checkpoint", str(_weights_file(tmp_path)),
            "test.score_threshold=0.5"]
    code, out, err = _in_process(argv, capsys)
    assert (code, out) == (2, "") and err == ("crossformer evaluate: error: test.score_threshold is a predict setting (what "
                                              "it draws), which evaluate does not read: leave it out\n"), err


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_a_help_of_the_default_tasks_flags_says_so(verb: str, capsys, tmp_path: Path) -> None:
    # `evaluate --help` listed classification's --split and --crop-pct, which segmentation then
    # refused, without saying whose flags they were or how to see another task's
    line = "The flags above are classification's (the default task)"
    code, out, _ = _in_process([verb, "--help"], capsys)
    assert code == 0 and line in " ".join(out.split())
    # a checkpoint that records no task (the authors' files) chooses none either
    code, out, _ = _in_process([verb, "--checkpoint", str(_weights_file(tmp_path)), "--help"], capsys)
    assert code == 0 and line in " ".join(out.split())
    code, out, _ = _in_process([verb, "--config", DENSE_CONFIGS[1], "--help"], capsys)
    assert code == 0 and "The flags above" not in out and "--slide-stride" in out
