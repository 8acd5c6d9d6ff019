"""Running a command that must fail with one ``error:`` line (exit 2), no traceback; in one
process, or in several under ``torchrun`` (CPU, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

from crossformer.cli import main
from processes import run_process


def one_error_line(capsys, argv: list[str]) -> str:
    """Run ``crossformer ARGV``; assert exit status 2 and one stderr line; return that line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"crossformer {argv[0]}: error: "), lines[0]
    return lines[0]


def torchrun(argv: list[str], processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node PROCESSES -m crossformer ARGV`` on the CPU, one thread each."""
    return run_process(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
         "-m", "crossformer", *argv],
        timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def one_torchrun_error_line(argv: list[str], processes: int = 2) -> str:
    """Run ``crossformer ARGV`` under torchrun; assert that it failed with one ``error:`` line (printed
    once, by rank 0) and no rank's traceback (torchrun's own failure summary follows); return that line."""
    proc = torchrun(argv, processes)
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"crossformer {argv[0]}: error: ")]
    assert len(lines) == 1 and "[rank" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]
