"""Operating the sender: its accounts file reloads under it (added, changed, removed accounts,
refused edits), and its log says when a transport connects, fails and recovers, and what each
account handled. Real Kafka, PostgreSQL and SMTP servers."""

from __future__ import annotations

import json
import logging
import re
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailbus.sender.settings import SenderSettings
from tests.integration.test_operations import eventually, replace_file
from tests.support.kafka import read_all
from tests.support.processes import Services
from tests.support.sender import SenderThread, produce, request, smtp_account
from tests.support.smtp import ScriptedHandler, SmtpServer, free_port

SECRET = "relay-password-never-logged"


@pytest.fixture
def servers() -> Iterator[tuple[SmtpServer, SmtpServer]]:
    with SmtpServer() as first, SmtpServer() as second:
        yield first, second


@pytest.fixture
def env(namespace: str, tmp_path: Path, admin_kafka: dict[str, Any], registry: Any) -> Any:
    class Env:
        accounts = tmp_path / "accounts.toml"

        def settings(self, accounts: str, **overrides: Any) -> SenderSettings:
            self.accounts.write_text(accounts)
            return SenderSettings(
                accounts_file=self.accounts, kafka={"topic_prefix": namespace}, metrics_port=0,
                retry_base_seconds=0.2, retry_cap_seconds=1.0, poll_seconds=0.2,
                accounts_poll_seconds=0.2, link_keys_file=tmp_path / "link-keys.json",
                **overrides)

        def send(self, account: str, n: int, tag: str) -> list[str]:
            events = [request(account, to=f"{tag}{i}@example.com", subject=f"{tag} {i}")
                      for i in range(n)]
            produce(admin_kafka, namespace + "email.requested", registry, events)
            return [e["message_id"] for e in events]

        def events(self, topic: str, **kw: Any) -> list[dict[str, Any]]:
            return [registry.decode(m.value())[1]
                    for m in read_all(admin_kafka, namespace + topic, **kw)]

    return Env()


def ids_at(server: SmtpServer | AuthServer) -> Counter[str]:
    """Each message id the server accepted, with how many times (from the Message-ID)."""
    return Counter(re.sub(r"^<|@.*$", "", str(m["Message-ID"]))
                   for m in server.handler.messages())


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, "fields", None) or {})


def logged(caplog: pytest.LogCaptureFixture, text: str, **fields: Any) -> bool:
    return any(text in r.getMessage() and all(
        fields_of(r).get(k) == v for k, v in fields.items())
        for r in caplog.records)


def wait_logged(caplog: pytest.LogCaptureFixture, text: str, seconds: float = 30,
                **fields: Any) -> None:
    def check() -> None:
        assert logged(caplog, text, **fields), (text, fields)
    eventually(check, seconds)


def test_accounts_added_changed_and_removed_under_a_running_sender(
        env: Any, servers: tuple[SmtpServer, SmtpServer],
        caplog: pytest.LogCaptureFixture) -> None:
    first, second = servers
    # alpha sends slowly, so that its change lands while it has messages queued and in flight.
    before = (smtp_account("alpha", first.port, rate=40.0, connections=2)
              + smtp_account("gone", first.port))
    settings = env.settings(before)
    caplog.set_level(logging.INFO)
    with SenderThread(settings):
        early = env.send("alpha", 5, "early") + env.send("gone", 5, "gone")
        env.events("email.sent", expect=10, timeout=60)
        assert sum(ids_at(first).values()) == 10 and not second.handler.received

        # A burst for alpha, then its server changes under it.
        burst = env.send("alpha", 120, "burst")

        def under_way() -> None:
            assert len(first.handler.received) >= 30
        eventually(under_way, 60)
        replace_file(env.accounts, smtp_account("alpha", second.port, rate=400.0)
                     + smtp_account("beta", second.port))

        def switched() -> None:
            assert logged(caplog, "accounts reloaded", service="sender", added="beta",
                          changed="alpha", removed="gone")
            assert logged(caplog, "worker started", account="alpha")
            assert logged(caplog, "worker started", account="beta")
            assert logged(caplog, "worker stopped", account="gone")
        eventually(switched)
        later = env.send("alpha", 5, "later") + env.send("beta", 5, "beta")
        orphan = env.send("gone", 2, "orphan")
        sent = env.events("email.sent", expect=140, timeout=90)
        dead = env.events("email.requested.dlq", expect=2, timeout=30)

        # An edit that does not parse, and one the sender cannot build (a DKIM key
        # file that is not there): each refused, the accounts in force stay.
        good = env.accounts.read_text()
        replace_file(env.accounts, good + "\n[[accounts]\nid = ")
        wait_logged(caplog, "accounts file refused", service="sender")
        replace_file(env.accounts, good.replace(
            'tls = "none"', f'tls = "none"\ndkim_selector = "s1"\n'
                            f'dkim_key_file = "{env.accounts.parent / "no-such.pem"}"', 1))

        def refused_whole() -> None:
            assert any("accounts file refused" in r.getMessage()
                       and "no-such.pem" in fields_of(r)["reason"] for r in caplog.records)
        eventually(refused_whole)
        kept = env.send("alpha", 3, "kept") + env.send("beta", 2, "kept-beta")
        env.events("email.sent", expect=145, timeout=60)

    at_first, at_second = ids_at(first), ids_at(second)
    # Nothing twice, nothing lost, across both servers.
    assert max((at_first + at_second).values()) == 1
    assert set(at_first) | set(at_second) == set(early) | set(burst) | set(later) | set(kept)
    assert len({e["message_id"] for e in sent}) == len(sent)
    # Before the change everything went to the first server; after it, to the second.
    assert set(early) <= set(at_first) and set(later) | set(kept) <= set(at_second)
    assert set(at_first) & set(burst) and set(at_second) & set(burst), "the change landed mid-burst"
    # The removed account's requests are dead-lettered, its queue gone with it.
    assert {d["message_id"] for d in dead} == set(orphan)
    assert not set(orphan) & (set(at_first) | set(at_second))


class AuthServer:
    """An SMTP server taking AUTH PLAIN/LOGIN (over plain text, on loopback): refusing every
    login while `refusing`, then accepting the one user and password."""

    def __init__(self, password: str = SECRET) -> None:
        self.handler = ScriptedHandler()
        self.port = free_port()
        self.refusing = True
        self.password = password
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     authenticator=self._authenticate, auth_require_tls=False)

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (not self.refusing and isinstance(auth_data, LoginPassword)
              and auth_data.password == self.password.encode())
        return AuthResult(success=ok, handled=False)

    def __enter__(self) -> AuthServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


def test_the_transport_logs_its_failure_and_recovery_and_a_summary_without_the_password(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "relay.password").write_text(SECRET + "\n")
    caplog.set_level(logging.DEBUG, logger="mailbus")
    with AuthServer() as server:
        account = smtp_account("relay", server.port).replace(
            'tls = "none"', f'tls = "none"\nusername = "relay-user"\n'
                            f'password_file = "{tmp_path / "relay.password"}"')
        # Retried as long as the test needs: credentials refused are never the message's fault.
        settings = env.settings(account, log_summary_seconds=1.0, max_attempts=100)
        with SenderThread(settings):
            ids = env.send("relay", 3, "auth")

            def refused() -> None:
                assert logged(caplog, "SMTP connection failed", account="relay",
                              host="127.0.0.1", port=server.port, user="relay-user")
                assert logged(caplog, "transport failing", account="relay",
                              transport="failing")
            eventually(refused, 60)
            server.refusing = False
            sent = env.events("email.sent", expect=3, timeout=60)
            wait_logged(caplog, "SMTP connection recovered", account="relay")

            def summed() -> None:  # the summaries count the three sends, whichever line
                assert sum(fields_of(r)["sent"] for r in caplog.records
                           if r.getMessage().startswith("account relay:")
                           and "to retry in the last" in r.getMessage()) == 3
            eventually(summed, 30)
    assert {e["message_id"] for e in sent} == set(ids)
    failure = next(r for r in caplog.records if "SMTP connection failed" in r.getMessage())
    assert failure.levelno == logging.WARNING
    reason = fields_of(failure)["reason"]
    assert "535" in reason and "authentication failed" in reason
    recovery = next(r for r in caplog.records if "SMTP connection recovered" in r.getMessage())
    assert fields_of(recovery)["failures"] >= 1 and "535" in fields_of(recovery)["last_error"]
    # The same refusal again is not a WARNING line per message tried.
    warnings = [r for r in caplog.records if "SMTP connection failed" in r.getMessage()
                and r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    summaries = [r for r in caplog.records if r.getMessage().startswith("account relay:")
                 and "to retry in the last" in r.getMessage()]
    assert sum(fields_of(r)["sent"] for r in summaries) == 3
    assert sum(fields_of(r)["retried"] for r in summaries) >= 1
    everything = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}"
                           for r in caplog.records) + caplog.text
    assert SECRET not in everything


def test_a_rotated_smtp_password_is_taken_on_sighup(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rotated = "the-new-relay-password"
    password = tmp_path / "relay.password"
    password.write_text(SECRET + "\n")
    caplog.set_level(logging.INFO, logger="mailbus")
    with AuthServer(password=rotated) as server:
        server.refusing = False
        account = smtp_account("relay", server.port).replace(
            'tls = "none"', f'tls = "none"\nusername = "relay-user"\npassword_file = "{password}"')
        with SenderThread(env.settings(account, max_attempts=100)) as thread:
            ids = env.send("relay", 2, "rotated")
            wait_logged(caplog, "SMTP connection failed", 60, account="relay")
            # The accounts file is as it was; only the password file changed.
            password.write_text(rotated + "\n")
            assert thread.sender is not None and thread._loop is not None
            thread._loop.call_soon_threadsafe(thread.sender.reloader.reload, "SIGHUP")
            wait_logged(caplog, "password file changed", account="relay")
            sent = env.events("email.sent", expect=2, timeout=60)
    assert {e["message_id"] for e in sent} == set(ids) == set(ids_at(server))
    assert logged(caplog, "worker stopped", account="relay")
    text = caplog.text + "\n".join(str(fields_of(r)) for r in caplog.records)
    assert SECRET not in text and rotated not in text


def test_the_sender_process_reloads_on_sighup_and_logs_json(
        env: Any, servers: tuple[SmtpServer, SmtpServer], namespace: str,
        tmp_path: Path) -> None:
    first, second = servers
    env.accounts.write_text(smtp_account("alpha", first.port))
    logs = tmp_path / "logs"
    logs.mkdir()
    with Services({"MAILBUS_KAFKA__TOPIC_PREFIX": namespace,
                   "MAILBUS_ACCOUNTS_FILE": str(env.accounts), "MAILBUS_METRICS_PORT": "0",
                   "MAILBUS_LINK_KEYS_FILE": str(tmp_path / "link-keys.json"),
                   "MAILBUS_POLL_SECONDS": "0.2", "MAILBUS_LOG_FORMAT": "json",
                   # Only SIGHUP reloads here: the file is not looked at in the test's time.
                   "MAILBUS_ACCOUNTS_POLL_SECONDS": "3600"}, logs) as services:
        proc = services.start("sender")

        def records() -> list[dict[str, Any]]:
            text = (logs / "sender.log").read_text(errors="replace")
            # librdkafka writes its own lines to stderr; every line of ours is an object.
            return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

        def having(msg: str, **fields: Any) -> None:
            services.check_alive()
            assert any(msg in r["msg"] and all(r.get(k) == v for k, v in fields.items())
                       for r in records()), (msg, fields)

        eventually(lambda: having("sender ready"), 60)
        replace_file(env.accounts, smtp_account("alpha", first.port)
                     + smtp_account("beta", second.port))
        proc.send_signal(signal.SIGHUP)
        eventually(lambda: having("accounts reloaded", service="sender", trigger="SIGHUP",
                                  added="beta", changed="-", removed="-"))
        eventually(lambda: having("worker started", account="beta"))
        ids = env.send("beta", 2, "hup")
        env.events("email.sent", expect=2, timeout=60)
        services.check_alive()
    assert set(ids_at(second)) == set(ids) and not first.handler.received
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records())
