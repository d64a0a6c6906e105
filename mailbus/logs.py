"""Log lines an operator can read: `key=value` fields in text, one JSON object per line on request.

Services log events with `event(log, level, what, **fields)`: the message
says what happened in words, the fields say to what (account, mailbox, host,
reason), and never carry a secret. `MAILBUS_LOG_FORMAT=json` writes each
line as a JSON object (`ts`, `level`, `logger`, `msg`, then the fields), for
a log collector; `text` (the default) appends the fields as `key=value`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, "fields", None) or {})


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


class TextFormatter(logging.Formatter):
    """The usual line, then the event's fields as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        head, nl, trace = line.partition("\n")
        return head + " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items()) + nl + trace


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key, value in _fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: str, fmt: str = "text") -> None:
    """Configure the root logger once, for a service's process."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def event(log: logging.Logger, level: int, what: str, exc_info: Any = None,
          **fields: Any) -> None:
    """Log `what` with structured fields (never a secret: callers pass none)."""
    log.log(level, what, exc_info=exc_info, extra={"fields": fields})


class Health:
    """A connection's ups and downs as log lines: connected, failed (and why), recovered.

    The first failure in a row, and each new reason, is a WARNING line; the
    same failure again is DEBUG (a server down would otherwise log a line per
    message tried), and the line of the recovery says how many there were.
    `where` names the connection (account, host, ...), never a secret.
    """

    def __init__(self, log: logging.Logger, what: str, **where: Any):
        self.log, self.what, self.where = log, what, where
        self.connected = False
        self.failing = 0  # failures since the last success
        self.last_error = ""

    def up(self, **fields: Any) -> None:
        """A connection was made (or a call went through)."""
        if self.failing:
            event(self.log, logging.INFO,
                  f"{self.what} recovered after {self.failing} failure(s)", **self.where,
                  **fields, failures=self.failing, last_error=self.last_error)
        else:
            event(self.log, logging.INFO, f"{self.what} connected", **self.where, **fields)
        self.connected, self.failing = True, 0

    def down(self, reason: str, **fields: Any) -> None:
        """Connecting (or a call) failed for `reason`."""
        self.failing += 1
        repeated = reason == self.last_error and self.failing > 1
        self.connected, self.last_error = False, reason
        event(self.log, logging.DEBUG if repeated else logging.WARNING,
              f"{self.what} failed: {reason}", **self.where, **fields, reason=reason,
              failures_in_a_row=self.failing)
