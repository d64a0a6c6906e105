"""Log lines: fields as key=value in text, one JSON object per line in json."""

from __future__ import annotations

import io
import json
import logging

from mailbus.logs import JsonFormatter, TextFormatter, event


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    log = logging.getLogger(f"test-logs-{id(formatter)}")
    log.handlers, log.propagate = [handler], False
    log.setLevel(logging.INFO)
    return log, out


def test_text_lines_carry_the_fields_quoted_when_needed() -> None:
    log, out = capture(TextFormatter())
    event(log, logging.WARNING, "mailbox failed", account="a1", reason="login refused",
          port=993, empty="")
    line = out.getvalue().strip()
    assert line.endswith('mailbox failed account=a1 reason="login refused" port=993 empty=""')
    assert " WARNING test-logs-" in line


def test_json_lines_are_one_object_each_with_the_fields() -> None:
    log, out = capture(JsonFormatter())
    event(log, logging.INFO, "mail handled", account="a1", events=2)
    log.info("plain line, no fields")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "mail handled" and first["level"] == "INFO"
    assert (first["account"], first["events"]) == ("a1", 2) and "ts" in first
    assert second["msg"] == "plain line, no fields"


def test_a_field_never_overwrites_the_line_itself() -> None:
    log, out = capture(JsonFormatter())
    event(log, logging.INFO, "real message", msg="forged", logger="other", ts="then")
    record = json.loads(out.getvalue())
    assert (record["msg"], record["logger"]) == ("real message", log.name)
    assert record["ts"] != "then"
