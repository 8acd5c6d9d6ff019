"""What a checkpoint file is, told from its first bytes, and its plain entries (everything but its
tensors), read without torch: the command line takes the task of ``--checkpoint`` from them to
build its ``--help``, and torch takes seconds to import.

A ``torch.save`` zip file holds its structure in a pickle (``<archive>/data.pkl``) whose tensors
point at the archive's data records by persistent id. :func:`peek_checkpoint` unpickles it with
stand-ins for the tensors, admitting only what a checkpoint of plain values and tensors needs
(nothing is imported or called by name); a file with anything else is read by torch's weights-only
loader instead, as it was before, with the same result; one naming what that loader refuses as
well (the authors' pickled yacs config) has nothing to peek at, which is said without torch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import pickle
import stat
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import CheckpointError

__all__ = ["DESCRIPTION_KEY", "START_FILES", "checkpoint_file", "decode_description", "errors_said_as",
           "peek_checkpoint", "readable_checkpoint", "readable_start_file", "safetensors_header", "sniff"]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # older torch.save files
_SAFETENSORS_MAX_HEADER = 100 << 20  # the format's own limit
_SNIFF_BYTES = 4096

# The ``__metadata__`` entry of our safetensors files that holds, as JSON, what the checkpoint
# recorded besides its weights (:func:`crossformer.models.weights.checkpoint_description`), so that a weights file names
# its model, settings, classes and input size as the checkpoint did.
DESCRIPTION_KEY = "crossformer"

# the model settings that name the weights a training run starts from
START_FILES = ("pretrained", "init_from")


def checkpoint_file(path: str | Path) -> Path:
    """``path`` as a file to read, ``~`` at its start the home folder (no shell expands it in
    ``--checkpoint=~/...``); a one-line :class:`CheckpointError` where it is a folder, a link to
    nothing, a named pipe or device, or not there."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = _checkpoints_in(path)
        hint = f": give the file, e.g. {inside[0]}" if inside else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{path} is a link to {os.readlink(path)}, which is not there: "
                              f"give the checkpoint file itself or mend the link")
    if path.exists() and not path.is_file():  # reading a named pipe would wait for a writer
        raise CheckpointError(f"{path} is {_special_file_kind(path)}, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoint files directly in ``folder``, a run's best.pth and last.pth first."""
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".pt", ".safetensors") and p.is_file())
    except OSError:
        return []
    return sorted(files, key=lambda p: (p.name != "best.pth", p.name != "last.pth"))


def _special_file_kind(path: Path) -> str:
    """What a path that is neither a file nor a folder is: ``"a named pipe"``, ..."""
    mode = path.stat().st_mode
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def readable_checkpoint(path: str | Path) -> tuple[Path, str, str]:
    """``path`` as a checkpoint file to read, its kind and description (:func:`sniff`); a one-line
    :class:`CheckpointError` where it is not there, a folder, cannot be opened, or is no checkpoint
    (text, an HTML page, an empty file, an ONNX model ...). Told from its first bytes, without torch."""
    path = checkpoint_file(path)
    kind, description = sniff(path)
    if kind == "other":
        what = "a safetensors file" if path.suffix == ".safetensors" else "a PyTorch checkpoint"
        raise CheckpointError(f"{path} is not {what} ({description})")
    return path, kind, description


@contextlib.contextmanager
def errors_said_as(what: str) -> Iterator[None]:
    """A :class:`CheckpointError` raised inside, said as ``"<what>: <its message>"`` (which file it was)."""
    try:
        yield
    except CheckpointError as err:
        raise CheckpointError(f"{what}: {err}") from None


def readable_start_file(setting: str, path: str | Path) -> Path:
    """``model.<setting>`` (:data:`START_FILES`) as a checkpoint file to read (:func:`readable_checkpoint`),
    its one-line error naming the setting."""
    with errors_said_as(f"model.{setting}"):
        return readable_checkpoint(path)[0]


def safetensors_header(head: bytes) -> int | None:
    """The header length a safetensors file starting with ``head`` declares (None: not one)."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    length = int.from_bytes(head[:8], "little")
    return length if 2 <= length <= _SAFETENSORS_MAX_HEADER else None


def _describe_text(head: bytes) -> str | None:
    """What a file starting with ``head`` is, if it is text (None: binary)."""
    if b"\0" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the end of the sample
            return None
        text = head[: err.start].decode("utf-8")
    stripped = text.lstrip()
    if stripped.startswith("version https://git-lfs"):
        return "it is a Git LFS pointer: fetch the real file with git lfs pull"
    if stripped[:15].lower().startswith(("<!doctype html", "<html")):
        return "it is an HTML page: a failed download?"
    first = stripped.splitlines()[0] if stripped else ""
    first = first if len(first) <= 40 else first[:37] + "..."
    return f"it is text, starting {first!r}"


def sniff(path: Path) -> tuple[str, str]:
    """``(kind, description)`` of a file from its first bytes.

    ``kind`` is ``"zip"``, ``"pickle"`` (the two ``torch.save`` formats), ``"safetensors"``,
    or ``"other"``, whose description says what the file is instead.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if head.startswith(_ZIP_MAGIC):
        if _is_torchscript(path):  # torch.load's own error on one talks of weights_only
            return "other", ("a TorchScript module: run it with torch.jit.load, and give commands the training "
                             "checkpoint or its safetensors export")
        return "zip", "a PyTorch checkpoint"
    if head.startswith(_PICKLE_PROTOCOLS):
        return "pickle", "a PyTorch checkpoint"
    if safetensors_header(head) is not None:
        return "safetensors", "a safetensors file"
    if not head:
        return "other", "it is empty: 0 bytes"
    if _looks_like_onnx(head):  # before text: a small model's first bytes are printable but for the tags
        return "other", ("an ONNX model: run it with onnxruntime, and give commands the training checkpoint or its "
                         "safetensors export")
    text = _describe_text(head)
    if text is not None:
        return "other", text
    return "other", f"unknown binary data, starting {head[:8].hex(' ')}"


# the protobuf tags of an ONNX ModelProto's fields 2-8 (producer_name ... graph, opset_import)
_ONNX_NEXT_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42})


def _looks_like_onnx(head: bytes) -> bool:
    """Whether ``head`` starts as an ONNX file does (``crossformer export --format onnx`` writes
    one): the ``ir_version`` field (tag 0x08, a small version number), then another model field."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 32 and head[2] in _ONNX_NEXT_TAGS


def _is_torchscript(path: Path) -> bool:
    """Whether a zip file is a ``torch.jit.save`` archive (which, unlike ``torch.save``'s,
    holds a ``constants.pkl``); a damaged zip file is left for the reader to report."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def decode_description(text: str) -> dict[str, Any] | None:
    """The description a safetensors file stores under :data:`DESCRIPTION_KEY` (None: not a JSON object)."""
    try:
        description = json.loads(text)
    except (TypeError, ValueError):
        return None
    return description if isinstance(description, dict) else None


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """The plain entries of a checkpoint file (everything but its tensors), read without
    loading the weights: a ``torch.save`` zip file's structure, or a safetensors file's
    description (:data:`DESCRIPTION_KEY`). ``{}`` for anything else (older formats, the
    authors' files, unreadable files: ``crossformer.models.read_checkpoint`` says why).

    A command line asks several times (its task while parsing, its config when it runs): the
    file is read once per version (size and modification time), and each caller gets a copy.
    """
    path = Path(path).expanduser()  # as read_checkpoint reads it
    try:
        stat = path.stat()
    except OSError:
        return {}
    return copy.deepcopy(_peek(str(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _peek(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """:func:`peek_checkpoint` for one version of a file (``size`` and ``mtime_ns`` key the cache)."""
    try:
        if not Path(path).is_file():
            return {}
        kind, _ = sniff(Path(path))
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(path, "numpy") as f:  # the header alone: "pt" would import torch
                text = (f.metadata() or {}).get(DESCRIPTION_KEY)
            return (decode_description(text) or {}) if text else {}
        if kind != "zip":
            return {}
        checkpoint, tensor_type = _structure(path)
    except Exception:  # noqa: BLE001 - a file that cannot be peeked at is read (and reported) in full later
        return {}
    if not isinstance(checkpoint, Mapping):
        return {}
    return {key: value for key, value in checkpoint.items() if not _holds(value, tensor_type)}


def _structure(path: str) -> tuple[Any, type]:
    """A ``torch.save`` zip file unpickled with its tensors left in the file, and the type that
    stands for them: :class:`_TensorStub` where :class:`_StubUnpickler` reads all of it, else
    ``torch.Tensor`` (torch's weights-only loader, its tensors memory-mapped)."""
    try:
        return _unpickle_with_stubs(path), _TensorStub
    except _RefusedByTorch:  # torch would refuse it too: nothing to peek at, and no torch to import
        raise
    except Exception:  # noqa: BLE001 - not what the stubs stand for, or damaged: torch decides, as before
        import torch

        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), torch.Tensor


def _holds(value: Any, tensor_type: type) -> bool:
    """Whether ``value`` is, or contains in its dicts, lists and tuples, a ``tensor_type``."""
    if isinstance(value, tensor_type):
        return True
    if isinstance(value, Mapping):
        return any(_holds(v, tensor_type) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds(v, tensor_type) for v in value)
    return False


class _TensorStub:
    """Stands for a tensor of the file, whose data is never read. It takes no state: a pickle
    that sets some on a tensor is left to torch."""

    __slots__ = ()


class _StorageType(str):
    """Stands for a ``torch.<Name>Storage`` class: a name, nothing to call."""


class _StorageStub:
    """Stands for a storage of the file (a data record the archive holds)."""

    __slots__ = ()


def _rebuilt_from(source_type: type) -> Callable[..., _TensorStub]:
    """A stand-in for torch's function that rebuilds a tensor from a ``source_type`` stand-in."""

    def rebuild(source: Any, *args: Any) -> _TensorStub:
        if not isinstance(source, source_type):
            raise pickle.UnpicklingError(f"a tensor rebuilt from a {type(source).__name__}")
        return _TensorStub()

    return rebuild


# The globals a checkpoint of tensors and plain values names: tensors (torch.save's protocol-2
# pickle) and state dicts (OrderedDict, with their ``_metadata``). torch.<Name>Storage apart.
_STUB_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuilt_from(_StorageStub),  # (storage, offset, size, ...)
    ("torch._utils", "_rebuild_parameter"): _rebuilt_from(_TensorStub),  # (tensor, requires_grad, hooks)
}


# Globals that torch's weights-only loader refuses as well, which files we are given name: the
# yacs config of the authors' releases (their classifiers). Torch would leave nothing to peek at.
_TORCH_REFUSES = frozenset({("yacs.config", "CfgNode")})


class _RefusedByTorch(pickle.UnpicklingError):
    """A pickle naming one of :data:`_TORCH_REFUSES`: refused unread, as torch's weights-only loader refuses it."""


class _StubUnpickler(pickle.Unpickler):
    """Reads a ``torch.save`` pickle whose archive's records are ``records``, with stand-ins
    for its tensors; any other global, or a storage the archive does not hold, raises."""

    def __init__(self, file: io.BytesIO, data_prefix: str, records: set[str]) -> None:
        super().__init__(file)
        self.data_prefix, self.records = data_prefix, records

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage") and name.isidentifier():
            return _StorageType(name)
        if (module, name) in _TORCH_REFUSES:
            raise _RefusedByTorch(f"{module}.{name}: torch's weights-only loader refuses it too")
        try:
            return _STUB_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not a tensor's or a plain value's") from None

    def persistent_load(self, pid: Any) -> _StorageStub:
        # torch.save's storages: ("storage", torch.<Name>Storage, key, location, numel)
        if (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and f"{self.data_prefix}{pid[2]}" in self.records):
            return _StorageStub()
        raise pickle.UnpicklingError(f"an unknown persistent id {pid!r:.80}")


def _unpickle_with_stubs(path: str) -> Any:
    """The object a ``torch.save`` zip file holds, its tensors stand-ins (:class:`_StubUnpickler`)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        archive_name = names[0].split("/", 1)[0]  # torch reads its records under the first entry's folder
        pickled = archive.read(f"{archive_name}/data.pkl")
    return _StubUnpickler(io.BytesIO(pickled), f"{archive_name}/data/", set(names)).load()
