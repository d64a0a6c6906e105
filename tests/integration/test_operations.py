"""Operating the services: the accounts file reloads under running services (on change and on
SIGHUP, atomically), and their logs say when a mailbox connects, fails and recovers, what
each mail was, and a periodic summary, as JSON on request. Real Kafka, PostgreSQL, Dovecot."""

from __future__ import annotations

import json
import logging
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import httpx
import pytest
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from tests.conftest import ACCOUNTS
from tests.integration.test_ingest_api import MESSAGE, auth
from tests.support import dovecot
from tests.support.processes import Services

NEW_ACCOUNT = """
[[accounts]]
id = "newcomer"
kind = "smtp"
from_address = "new@example.test"
pools = ["fresh"]
[accounts.smtp]
host = "127.0.0.1"
"""


def eventually(check: Callable[[], Any], seconds: float = 30) -> Any:
    return retry(stop=stop_after_delay(seconds), wait=wait_fixed(0.2), reraise=True,
                 retry=retry_if_exception_type(AssertionError))(check)()


def replace_file(path: Path, text: str) -> None:
    """Write a new version as an editor or a deploy tool would: a new file renamed over."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_ingest_takes_an_edited_accounts_file_and_keeps_it_when_the_next_edit_is_broken(
        api: httpx.Client, make_key: Callable[..., tuple[str, str]], accounts_file: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    _, token = make_key()

    def send(sender: str) -> httpx.Response:
        return api.post("/v1/messages", json=MESSAGE | {"from": sender}, headers=auth(token))

    assert send("newcomer").status_code == 422
    replace_file(accounts_file, ACCOUNTS + NEW_ACCOUNT)

    def accepted() -> None:
        assert send("newcomer").status_code == 202
    eventually(accepted)
    assert send("pool:fresh").status_code == 202

    with caplog.at_level(logging.INFO, logger="mailbus.reload"):
        # Appended in place: a duplicate id. The whole file is refused, the last good one stays.
        with accounts_file.open("a") as handle:
            handle.write(NEW_ACCOUNT)

        def refused() -> None:
            assert any("accounts file refused" in r.getMessage() for r in caplog.records)
        eventually(refused)
    record = next(r for r in caplog.records if "refused" in r.getMessage())
    assert record.levelno == logging.ERROR
    assert "appears twice" in record.fields["reason"]  # type: ignore[attr-defined]
    assert record.fields["accounts_in_force"] == 5  # type: ignore[attr-defined]
    assert send("newcomer").status_code == 202 and send("dev").status_code == 202

    replace_file(accounts_file, ACCOUNTS)  # removed again: refused again, as at the start

    def removed() -> None:
        assert send("newcomer").status_code == 422
    eventually(removed)


def mail(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "someone@else.test", "reader@example.test", subject
    msg["Message-ID"] = make_msgid(domain="else.test")
    msg.set_content("Not an answer to anything mailbus sent.\n")
    return msg.as_bytes()


class JsonLog:
    """The service's log: one JSON object per line (anything else fails the test)."""

    def __init__(self, path: Path):
        self.path = path

    def lines(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.startswith("%") or not line.strip():
                continue  # librdkafka's own stderr lines
            out.append(json.loads(line))
        return out

    def having(self, text: str, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in self.lines() if text in r["msg"]
                and all(r.get(k) == v for k, v in fields.items())]


@pytest.fixture
def replies_env(tmp_path: Path, namespace: str) -> Iterator[dict[str, str]]:
    yield {"MAILBUS_KAFKA__TOPIC_PREFIX": namespace,
           "MAILBUS_ACCOUNTS_FILE": str(tmp_path / "accounts.toml"),
           "MAILBUS_LINK_KEYS_FILE": str(tmp_path / "link-keys.json"),
           "MAILBUS_METRICS_PORT": "0", "MAILBUS_LOG_FORMAT": "json",
           "MAILBUS_LOG_SUMMARY_SECONDS": "1",
           # Only SIGHUP reloads here: the file is not looked at in the test's time.
           "MAILBUS_ACCOUNTS_POLL_SECONDS": "3600"}


def test_replies_reloads_on_sighup_and_logs_connect_fail_recover_and_a_summary_as_json(
        tmp_path: Path, replies_env: dict[str, str], dovecot_server: dovecot.Dovecot) -> None:
    dovecot_server.clear()
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(ACCOUNTS)  # no account reads a mailbox
    password = tmp_path / "imap.password"
    password.write_text("not-the-imap-password\n")
    reader = ACCOUNTS + f"""
[[accounts]]
id = "reader"
kind = "smtp"
from_address = "{dovecot_server.user}"
pools = []
[accounts.smtp]
host = "127.0.0.1"
""" + dovecot_server.accounts_table().replace(str(dovecot_server.password_file), str(password))
    log = JsonLog(tmp_path / "replies.log")
    with Services(replies_env, tmp_path) as services:
        proc = services.start("replies")

        def running() -> None:
            services.check_alive()
            assert log.having("replies running")
        eventually(running)

        replace_file(accounts, reader)
        proc.send_signal(signal.SIGHUP)

        def reloaded() -> None:
            assert log.having("accounts reloaded", trigger="SIGHUP", added="reader")
        eventually(reloaded)

        # The password is wrong: each attempt is one line with the reason, never the secret.
        def failing() -> None:
            assert len(log.having("mailbox failed", account="reader")) >= 2
        eventually(failing)
        failed = log.having("mailbox failed", account="reader")[0]
        assert failed["level"] == "ERROR" and "login refused" in failed["reason"]
        assert failed["host"] == dovecot_server.host and failed["port"] == dovecot_server.port

        password.write_text(dovecot_server.password + "\n")

        def recovered() -> None:
            assert log.having("mailbox recovered after", account="reader", tls="none",
                              user=dovecot_server.user)
        eventually(recovered)

        dovecot_server.append(mail("Special offer"))

        def handled() -> None:
            assert log.having("mail handled", account="reader", kind="unmatched")
            summaries = log.having("replies summary")
            assert any(s.get("handled_unmatched") == 1 for s in summaries)
        eventually(handled)

        # A broken edit: refused with the reason, the reader keeps reading.
        replace_file(accounts, reader.replace('kind = "smtp"', 'kind = "carrier-pigeon"', 1))
        proc.send_signal(signal.SIGHUP)

        def refused() -> None:
            assert log.having("accounts file refused", trigger="SIGHUP")
        eventually(refused)
        assert "kind" in log.having("accounts file refused")[0]["reason"]
        dovecot_server.append(mail("Another offer"))

        def still_reading() -> None:
            assert len(log.having("mail handled", account="reader")) == 2
        eventually(still_reading)
        services.check_alive()

    text = (tmp_path / "replies.log").read_text()
    assert "not-the-imap-password" not in text and dovecot_server.password not in text
    summary = log.having("replies summary")[-1]
    assert summary["mailboxes"] == 1 and summary["not_reading"] == "-"


@pytest.mark.serial  # a one-second deadline, waited on for 60 s: alone, not beside other tests
def test_confirm_takes_a_new_deadline_from_the_accounts_file_on_sighup(
        namespace: str, tmp_path: Path, admin_kafka: dict[str, Any], registry: Any) -> None:
    from tests.integration.test_confirm_stream import ACCOUNTS as CONFIRM_ACCOUNTS
    from tests.integration.test_confirm_stream import Events, Worker, verdicts

    events = Events(admin_kafka, namespace, registry)
    slow, sentinel = f"slow-{uuid.uuid4()}", f"sentinel-{uuid.uuid4()}"

    def unconfirmed() -> set[str]:
        return {r["message_id"] for r in verdicts(admin_kafka, namespace, registry)
                if r["outcome"] == "unconfirmed"}

    worker = Worker(namespace, tmp_path, MAILBUS_ACCOUNTS_POLL_SECONDS="3600")
    with worker.running():
        events.sent(slow, account="dev")  # dev: 3600 s to confirm
        events.sent(sentinel, account="fast")  # fast: 1 s, sent at the same instant
        events.flush()
        worker.wait_for(lambda: sentinel in unconfirmed(), 60)
        assert slow not in unconfirmed()
        replace_file(tmp_path / "accounts.toml", CONFIRM_ACCOUNTS.replace(
            'from_address = "dev@example.test"',
            'from_address = "dev@example.test"\nconfirm_within_seconds = 1'))
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGHUP)
        worker.wait_for(lambda: slow in unconfirmed(), 60)
        assert "accounts reloaded" in worker.text(worker.offset)
