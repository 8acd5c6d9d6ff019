"""Running a command that must fail with one ``error:`` line (exit 2), no traceback."""

from __future__ import annotations

from crossformer.cli import main


def one_error_line(capsys, argv: list[str]) -> str:
    """Run ``crossformer ARGV``; assert exit status 2 and one stderr line; return that line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"crossformer {argv[0]}: error: "), lines[0]
    return lines[0]
