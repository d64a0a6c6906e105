"""Run `mailbus doctor` in-process and read its table back."""

from __future__ import annotations

from typer.testing import CliRunner

from mailbus import cli
from mailbus.cli import app

# Wide enough that no row wraps. rich reads COLUMNS when a console is made,
# and mailbus.cli makes its own at import (before any invoke), so the width
# is set on that console too: under pytest-xdist the temporary paths in the
# rows (…/popen-gwN/…) are longer and wrapped at the 160 columns it had.
COLUMNS = 400


def run_doctor(args: list[str]) -> tuple[int, dict[tuple[str, str], str], str]:
    """(exit code, {(check, subject): ok|warn|fail}, the whole output)."""
    width = cli.console.width
    cli.console.width = COLUMNS
    try:
        result = CliRunner().invoke(app, ["doctor", *args], env={"COLUMNS": str(COLUMNS)})
    finally:
        cli.console.width = width
    rows: dict[tuple[str, str], str] = {}
    for line in result.output.splitlines():
        cells = [c.strip() for c in line.strip().split("│")[1:-1]]
        if len(cells) == 5 and cells[2] in ("ok", "warn", "fail"):
            rows[(cells[0], cells[1])] = cells[2]
    return result.exit_code, rows, result.output
