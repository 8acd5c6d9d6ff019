"""The tests' process helpers: all that a test started is ended (out of time, or when the test
fails), and two ranks meet whatever else the machine runs meanwhile."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from processes import run_process, running, started_process, wait_for
from two_ranks import on_two_ranks

# A process that ignores SIGTERM (as a torchrun worker stuck in a gloo collective does) and has
# started another that does too, in a session of its own (as torchrun starts its workers); each writes its pid to a file of the folder argv[1] once it does.
_HUNG_TREE = """
import pathlib, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
folder = pathlib.Path(sys.argv[1])
if len(sys.argv) < 3:
    subprocess.Popen([sys.executable, "-c", __CODE__, sys.argv[1], "child"], start_new_session=True)  # as torchrun does
(folder / f"{len(sys.argv)}.pid").write_text(str(__import__("os").getpid()))
time.sleep(600)
"""
_COMMAND = [sys.executable, "-c", _HUNG_TREE.replace("__CODE__", repr(_HUNG_TREE))]


def _pids(folder: Path) -> list[int]:
    """The pids the hung tree wrote, once both have started."""
    assert wait_for(lambda: len(list(folder.glob("*.pid"))) == 2, 60), "the tree did not start"
    return [int(path.read_text()) for path in sorted(folder.glob("*.pid"))]


def _ended(pids: list[int]) -> bool:
    try:
        return not any(map(running, pids))
    finally:  # no sleeper left behind by a failing check
        for pid in filter(running, pids):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the processes")
def test_out_of_time_the_whole_tree_is_ended(tmp_path: Path) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        run_process([*_COMMAND, str(tmp_path)], timeout=6)
    assert _ended(_pids(tmp_path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the processes")
def test_a_failing_test_leaves_no_process_behind(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="the test failed"):
        with started_process([*_COMMAND, str(tmp_path)]):
            pids = _pids(tmp_path)
            raise AssertionError("the test failed")
    assert _ended(pids)


def test_two_ranks_meet_though_another_process_takes_a_port_that_was_free(monkeypatch) -> None:
    # a port found free, then let go, was what rank 0 listened on: another test's torchrun or gloo
    # connection (xdist runs two test files at once) could take it first. Here one is taken: any
    # port the harness finds is this listening one.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = taken.getsockname()
        monkeypatch.setattr(socket.socket, "getsockname", lambda self: address)
        assert on_two_ranks(dist.get_rank) == [0, 1]
