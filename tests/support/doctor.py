"""Run `mailbus doctor` in-process and read its table back."""

from __future__ import annotations

from typer.testing import CliRunner

from mailbus.cli import app


def run_doctor(args: list[str]) -> tuple[int, dict[tuple[str, str], str], str]:
    """(exit code, {(check, subject): ok|warn|fail}, the whole output)."""
    result = CliRunner().invoke(app, ["doctor", *args], env={"COLUMNS": "400"})
    rows: dict[tuple[str, str], str] = {}
    for line in result.output.splitlines():
        cells = [c.strip() for c in line.strip().split("│")[1:-1]]
        if len(cells) == 5 and cells[2] in ("ok", "warn", "fail"):
            rows[(cells[0], cells[1])] = cells[2]
    return result.exit_code, rows, result.output
