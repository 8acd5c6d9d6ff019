"""Keeping freed memory in the process (``crossformer.engine.memory``) and the commands that do it."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from crossformer import cli
from crossformer.engine import memory
from processes import run_process

# One process measures malloc's default, then keeps freed memory and measures again: the
# setting is process-wide, so never this one's, and one process spares a second torch import.
# It counts 4 KB pages: where transparent huge pages back malloc's blocks (a machine set to
# "always", or glibc.malloc.hugetlb), a fresh 64 MB block faults in 32 pages or 16K, whichever
# the kernel has free at the time, and the default's count said nothing.
FAULTS = textwrap.dedent("""
    import ctypes
    import resource
    import torch
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
    from crossformer.engine.memory import keep_freed_memory
    def faults_of_one_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(16 << 20)  # 64 MB: above glibc's largest mmap threshold
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    def fewest_faults():
        faults_of_one_step()
        return min(faults_of_one_step() for _ in range(3))
    default = fewest_faults()
    kept = keep_freed_memory()
    print(default, kept, fewest_faults())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("tunables", ["", "glibc.malloc.hugetlb=1"])  # the second: huge pages where THP is "madvise"
def test_a_freed_tensor_is_reused_without_page_faults(tunables: str) -> None:
    """By default every 64 MB tensor is mapped afresh (16K page faults); once freed memory is
    kept, the second one reuses the first's pages."""
    proc = run_process([sys.executable, "-c", FAULTS], timeout=300, env={**os.environ, "GLIBC_TUNABLES": tunables})
    assert proc.returncode == 0, proc.stderr[-3000:]
    default_faults, kept, kept_faults = proc.stdout.split()
    assert int(default_faults) > 8000, default_faults
    assert kept == "True" and int(kept_faults) < 100, kept_faults


@pytest.mark.parametrize("argv,applies", [
    (["evaluate", "--checkpoint", "missing.pth"], True),
    (["predict", "image.png", "--checkpoint", "missing.pth"], True),
    (["train", "--config", "missing.yaml"], False),  # a config that cannot be read stops the parse first
    (["train", "--model", "crossformer_tiny", "--data", "missing-folder"], True),
    (["flops", "--model", "not_a_model"], False),
    (["benchmark", "--model", "not_a_model"], False),
])
def test_the_commands_that_run_models_over_data_keep_freed_memory_when_asked(monkeypatch, tmp_path, argv, applies) -> None:
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(memory.ENV_SWITCH, "1")
    assert cli.main(argv) != 0  # each stops on its missing input, after the setting
    assert bool(calls) == applies
    for off in (None, "0"):  # opt-in: unset or "0" leaves malloc as it is
        calls.clear()
        if off is None:
            monkeypatch.delenv(memory.ENV_SWITCH)
        else:
            monkeypatch.setenv(memory.ENV_SWITCH, off)
        assert cli.main(argv) != 0
        assert not calls


@pytest.mark.parametrize("flag", [False, True])
def test_benchmark_keeps_freed_memory_when_asked_and_says_so(monkeypatch, capsys, flag) -> None:
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    argv = ["benchmark", "--model", "crossformer_tiny", "--img-size", "64", "--batch-size", "1", "--rounds", "1",
            "--warmup", "0", "--no-memory"] + (["--keep-freed-memory"] if flag else [])
    assert cli.main(argv) == 0
    assert bool(calls) == flag
    header = capsys.readouterr().out.splitlines()[1]
    assert ("freed memory kept" in header) == flag, header
