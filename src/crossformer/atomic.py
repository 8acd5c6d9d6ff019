"""Writing output files atomically: readers see the previous file or the new one, never half.

The files the package writes for keeping (training checkpoints, exports, converted weights,
results JSON) go through :func:`write_atomic`: the bytes go to a hidden temporary file in the
target's folder, are flushed to disk, and replace the target with one ``os.replace`` (atomic on
POSIX and Windows). Whatever fails (a full disk, a permission, an interrupt, the writer
itself) the temporary file is removed and the previous file stays as it was. Failures
of the destination itself become a one-line :class:`OutputError` that says so.

The writer is a callback that writes to an open binary file, which ``torch.save``,
``torch.jit.save``, safetensors (``f.write(safetensors.torch.save(state))``) and ONNX
(``f.write(proto.SerializeToString())``) all do; Python's file object then reports a full
disk as ``OSError(ENOSPC)`` (``torch.save`` to a path reports only "file write failed").
Images (predictions' PNGs, ``make-data``'s JPEGs and label maps) go through
:func:`save_image_atomic`, text (results JSON, annotation files, marks) through
:func:`write_text_atomic`: a cut file would otherwise pass for a whole one to a later reader.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Sequence

from .errors import UserInputError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["OutputError", "output_error", "check_output_path", "check_output_folder", "make_folder",
           "stale_temporaries", "write_atomic", "write_text_atomic", "save_image_atomic"]

# errno -> what it means for the file being written
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "the file is too large for the file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.EISDIR: "it is a folder",
    errno.ENOTDIR: "a folder on its path is a file",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ENOENT: "its folder takes no new files",  # creating a file in a folder that refuses them (/proc)
    errno.EEXIST: "a file of that name is in the way",  # a folder to create where a file is
}


def _read_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: setting it later could race with other threads


class OutputError(UserInputError):
    """An output file that cannot be written (the previous file, if any, is untouched)."""


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` a writer's exception was raised from (writers wrap them), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in _REASONS:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def output_error(path: str | Path, err: BaseException) -> OutputError | None:
    """``cannot write PATH: reason`` when ``err`` is (or was raised from) a failure of the
    destination (a full disk, a quota, permissions, a folder in the way); None otherwise."""
    cause = _os_error(err)
    return None if cause is None else OutputError(f"cannot write {path}: {_REASONS[cause.errno]}")


def check_output_path(path: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
    """Fail early, with one line, if ``path`` cannot become a file; returns it as a ``Path``.

    Checks what can be known before writing (call it before a long export): ``path`` is not
    a folder, nor one of ``inputs`` (the files the output is made from, e.g. the checkpoint it
    converts, which writing would replace), no folder on its way is a file, and the nearest
    existing folder is writable. Missing folders are not created here. A leading ``~`` is the
    home folder (no shell expands it in ``--output=~/x``).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name")
    for source in inputs:
        if _same_file(path, Path(source).expanduser()):
            raise OutputError(f"cannot write {path}: it is the input {source}, which it would replace; "
                              f"give another output file")
    _check_folder(path.parent, path)
    return path


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: links seen through, and ``..`` taken as written
    (``new/../x`` is ``x`` once the writer has made ``new``)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing: no file to replace
        return False


def check_output_folder(folder: str | Path) -> Path:
    """Fail early, with one line, if files cannot be written into ``folder`` (created later if
    missing): it is a file, a folder on its way is a file, or the nearest existing folder is
    not writable. Returns it as a ``Path``, a leading ``~`` made the home folder."""
    folder = Path(folder).expanduser()
    _check_folder(folder, folder)
    return folder


def make_folder(folder: str | Path) -> Path:
    """Create ``folder`` and its parents where missing; a folder that cannot be made (permissions,
    a read-only file system, a file in the way) is an :class:`OutputError` naming it."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(folder, err) or err from None
    return folder


def _check_folder(folder: Path, target: Path) -> None:
    """Raise :class:`OutputError` about ``target`` if ``folder`` cannot hold new files."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: permission denied in {existing}")


def _fail_message(path: Path, reason: str, existed: bool) -> str:
    kept = "the previous file was kept" if existed else "nothing was written"
    return f"cannot write {path}: {reason}; {kept}"


def _temporary(path: Path, pid: str) -> Path:
    """The hidden file that :func:`write_atomic` writes before renaming it to ``path``."""
    return path.with_name(f".{path.name}.{pid}.tmp")


def stale_temporaries(path: str | Path) -> list[Path]:
    """Temporaries of ``path`` left by a process killed (SIGKILL, power loss) inside
    :func:`write_atomic`: never a whole file, and as large as one. Call only where no other
    process may be writing ``path`` now."""
    path = Path(path)
    prefix, suffix = _temporary(path, "\0").name.split("\0")
    return sorted(path.parent.glob(glob.escape(prefix) + "*" + glob.escape(suffix)))


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Create or replace the file ``path`` with what ``write(file)`` writes, atomically.

    Args:
        path: The file to write; missing parent folders are created.
        write: Writes the content to the open binary file it is given, e.g.
            ``lambda f: torch.save(state, f)``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputError: ``path`` is a folder or under a file, or writing failed for a full
            disk, a quota, permissions or a read-only file system. The message says that
            the previous file was kept (or that nothing was written).
        Anything else ``write`` raises, after the temporary file is removed.
    """
    path = check_output_path(path)
    existed = path.is_file()
    mode = stat.S_IMODE(path.stat().st_mode) if existed else 0o666 & ~_UMASK
    tmp = _temporary(path, str(os.getpid()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, mode)  # the previous file's, else a new file's (not a private temp's 0600)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder became unwritable; the error below matters more
        cause = _os_error(err)
        if cause is None:
            raise
        raise OutputError(_fail_message(path, _REASONS[cause.errno], existed)) from None
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_atomic` for a UTF-8 text file (a results JSON, say); returns ``path`` as a ``Path``."""
    return write_atomic(path, lambda file: file.write(text.encode("utf-8")))


def save_image_atomic(image: Image.Image, path: str | Path, **params: Any) -> Path:
    """:func:`write_atomic` for a Pillow image, in the format its suffix names (``.png``,
    ``.jpg``); ``params`` go to ``Image.save`` (``quality=92``). Returns ``path`` as a ``Path``."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    image_format = Image.registered_extensions().get(suffix)  # a file object carries no name to guess it from
    if image_format is None:
        raise ValueError(f"no image format for {path}'s suffix {suffix!r}")
    return write_atomic(path, lambda file: image.save(file, format=image_format, **params))
