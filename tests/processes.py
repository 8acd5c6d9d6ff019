"""The tests' child processes (torchrun and its workers, scripts, the command itself), each started
in a session of its own and ended as a whole: a test that fails or runs out of time leaves no
process behind.

``subprocess.run(timeout=...)`` ends only the process it started: a torchrun worker stuck in a gloo
collective ignores SIGTERM, and outlived its test by minutes. Ending the process group is not
enough either, since torchrun starts each worker in a session of its own; every process a test
starts therefore inherits a tag in its environment (:data:`TREE_VARIABLE`), by which all of them
are found (``/proc``), wherever they were moved.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

__all__ = ["run_process", "started_process", "end_processes", "running", "wait_for", "GRACE_S", "TREE_VARIABLE"]

GRACE_S = 3.0  # how long SIGTERM has to end the processes before SIGKILL does
_SETTLE_S = 1.0  # how long after SIGKILL a process started at that moment is looked for
TREE_VARIABLE = "CROSSFORMER_TEST_PROCESS_TREE"  # its value tags the processes one start began
_PROC = Path("/proc")


def _state_and_group(pid: int) -> tuple[str, int] | None:
    """Process ``pid``'s state letter (``Z``: a zombie) and process group; None when it is gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    state, _, group = stat[stat.rindex(")") + 2:].split()[:3]  # after "pid (name) "
    return state, int(group)


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    found = _state_and_group(pid)
    return found is not None and found[0] not in "ZX"


def _members(tag: str | None, groups: Collection[int]) -> set[int]:
    """The live processes tagged ``tag`` or in one of the process ``groups`` (none where there is
    no ``/proc`` to read)."""
    needle = f"{TREE_VARIABLE}={tag}".encode()
    members = set()
    for pid in (int(entry.name) for entry in _PROC.glob("[0-9]*")):
        found = _state_and_group(pid)
        if pid == os.getpid() or found is None or found[0] in "ZX":
            continue
        try:
            if found[1] in groups or (tag and needle in (_PROC / str(pid) / "environ").read_bytes().split(b"\0")):
                members.add(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return members


def end_processes(tag: str | None = None, groups: Collection[int] = (), grace_s: float = GRACE_S) -> None:
    """End every process tagged ``tag`` (:data:`TREE_VARIABLE`) or in one of the process ``groups``:
    SIGTERM, then SIGKILL to what is left ``grace_s`` later (and to any that appears in the
    :data:`_SETTLE_S` after it)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        _signal_members(tag, groups, signum)
        if wait_for(lambda: not _members(tag, groups), grace_s, every=0.05):
            break
    if signum == signal.SIGKILL:
        # a process that ignored SIGTERM may have been starting another as it was killed: one
        # forked or exec'ing then can be missed (its environment unreadable for that moment) and
        # show up after the check (a flaky test under load); whatever appears meanwhile is killed
        deadline = time.monotonic() + _SETTLE_S
        while time.monotonic() < deadline:
            _signal_members(tag, groups, signal.SIGKILL)
            time.sleep(0.05)


def _signal_members(tag: str | None, groups: Collection[int], signum: int) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)
    for pid in _members(tag, groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


@contextlib.contextmanager
def started_process(command: Sequence[str], env: dict[str, str] | None = None,
                    **popen: Any) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(command, env=env, **popen)`` in a session of its own; on leaving (the
    test done, failed or out of time) every process it started that is left is ended
    (:func:`end_processes`). A test may signal the command itself (SIGINT, SIGTERM) meanwhile,
    to check how it stops."""
    tag = uuid.uuid4().hex
    env = {**(os.environ if env is None else env), TREE_VARIABLE: tag}
    with subprocess.Popen(command, start_new_session=True, env=env, **popen) as process:
        try:
            yield process
        finally:
            end_processes(tag, [process.pid])


def run_process(command: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)``, but
    out of time (``subprocess.TimeoutExpired``) every process it started is ended too."""
    with started_process(command, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def wait_for(condition: Callable[[], bool], seconds: float, every: float = 0.1) -> bool:
    """Poll ``condition`` every ``every`` seconds for up to ``seconds``; whether it came true."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()
