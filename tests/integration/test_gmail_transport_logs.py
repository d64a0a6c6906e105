"""The Gmail transport's log lines: connected (its first call through), failed (why: Gmail
failing or the grant refused, not a refused message or a rate limit), recovered; no token.
Against the Gmail API emulator on loopback."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailbus.sender.gmail import GmailTransport
from mailbus.sender.transport import AccountExhausted, PermanentError, TransientError
from tests.integration.test_gmail_transport import (  # noqa: F401 - fixtures
    REFRESH,
    clock,
    connect,
    emu,
    loopback_only,
    outgoing,
    run,
    transport_for,
)
from tests.support.gmail_emulator import GmailEmulator


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, "fields", None) or {})


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_gmail_transport_logs_connect_failure_and_recovery_without_a_token(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport],  # noqa: F811
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mailbus.sender.gmail")
    transport = transport_for()
    run(transport.send(outgoing()))
    [connected] = lines(caplog, "account g1: Gmail transport connected")
    assert connected.levelno == logging.INFO
    assert fields(connected)["endpoint"] == emu.api_endpoint

    # A message refused and a rate limit say nothing about the way out.
    emu.fail_next(400, "invalidArgument")
    with pytest.raises(PermanentError):
        run(transport.send(outgoing()))
    emu.fail_next(429, "rateLimitExceeded")
    with pytest.raises(AccountExhausted):
        run(transport.send(outgoing()))
    assert lines(caplog, "Gmail transport failed") == []

    emu.fail_next(503, count=2)
    for _ in range(2):
        with pytest.raises(TransientError):
            run(transport.send(outgoing()))
    first, again = lines(caplog, "Gmail transport failed")
    assert first.levelno == logging.WARNING and "503" in fields(first)["reason"]
    assert again.levelno == logging.DEBUG  # the same failure again
    run(transport.send(outgoing()))
    [recovered] = lines(caplog, "Gmail transport recovered after 2 failure(s)")
    assert "503" in fields(recovered)["last_error"]

    emu.revoke(REFRESH)  # the grant withdrawn: a failure of another kind, WARNING again
    with pytest.raises(TransientError):
        run(transport.send(outgoing()))
    refused = lines(caplog, "Gmail transport failed")[-1]
    assert refused.levelno == logging.WARNING and "re-authorize" in refused.getMessage()

    token = json.loads((tmp_path / "token.json").read_text())
    text = caplog.text + "\n".join(str(getattr(r, "fields", "")) for r in caplog.records)
    for secret in (token["token"], REFRESH, token["client_secret"]):
        assert secret not in text
