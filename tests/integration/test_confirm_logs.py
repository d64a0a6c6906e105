"""`mailbus confirm` with MAILBUS_LOG_FORMAT=json: every line it writes is one JSON object,
Faust's and aiokafka's as well as ours, from start to a clean stop. Real Kafka."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.integration.test_confirm_stream import ACCOUNTS, faust_leftovers  # noqa: F401


def test_every_line_the_confirm_service_writes_is_json(namespace: str, tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(ACCOUNTS)
    env = {**os.environ, "MAILBUS_KAFKA__TOPIC_PREFIX": namespace,
           "MAILBUS_ACCOUNTS_FILE": str(accounts), "MAILBUS_DATA_DIR": str(tmp_path / "faust"),
           "MAILBUS_METRICS_PORT": "0", "MAILBUS_LOG_FORMAT": "json",
           "MAILBUS_LOG_LEVEL": "INFO"}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "mailbus", "confirm"], env=env,
                                stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + 90
            # Faust says it is ready once it joined the group and recovered its table.
            while "Ready" not in err.read_text(errors="replace"):
                assert proc.poll() is None, err.read_text(errors="replace")[-4000:]
                assert time.monotonic() < deadline, err.read_text(errors="replace")[-4000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGHUP)  # a reload line, too
            while "accounts reloaded" not in err.read_text(errors="replace"):
                assert proc.poll() is None, err.read_text(errors="replace")[-4000:]
                assert time.monotonic() < deadline + 30, "no reload line after SIGHUP"
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    assert proc.returncode == 0, err.read_text(errors="replace")[-4000:]
    lines = [line for stream in (out, err)
             for line in stream.read_text(errors="replace").splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    loggers = {r["logger"] for r in records}
    # Faust's own lines and ours, in one format.
    assert any(name.startswith("faust") for name in loggers), loggers
    assert any(r["msg"] == "accounts reloaded" and r.get("service") == "confirm"
               for r in records)
    assert any("Ready" in r["msg"] for r in records)
