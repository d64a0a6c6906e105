"""The sender through the Gmail API: the real google-api-python-client against the local
emulator of Google's Gmail REST API (tests/support/gmail_emulator.py), since Google is not
reachable here. Quota refusals park the account or move its pool messages; none fails."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from mailbus.sender.settings import SenderSettings
from tests.support.gmail_emulator import GmailEmulator
from tests.support.kafka import read_all
from tests.support.sender import SenderThread, produce, request, smtp_account
from tests.support.smtp import SmtpServer

ME, REFRESH = "me@example.test", "1//refresh-me"
SCOPES = ["https://www.googleapis.com/auth/gmail.send",
          "https://www.googleapis.com/auth/gmail.readonly"]


def gmail_account(token_file: Path, pools: str = '"mixed"') -> str:
    # The local quota is generous: what is tested is Google refusing.
    return f"""
[[accounts]]
id = "g1"
kind = "gmail"
from_address = "{ME}"
daily_quota = 2000
rate_per_second = 50
pools = [{pools}]
[accounts.gmail]
token_file = "{token_file}"
"""


def token_file(path: Path, emu: GmailEmulator) -> Path:
    path.write_text(json.dumps({
        "token": emu.issue_token(ME), "refresh_token": REFRESH, "client_id": "client-id",
        "client_secret": "client-secret", "token_uri": emu.token_uri, "scopes": SCOPES,
        "expiry": (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}))
    path.chmod(0o600)
    return path


def run_sender(tmp_path: Path, namespace: str, accounts: str, emu: GmailEmulator
               ) -> SenderThread:
    path = tmp_path / "accounts.toml"
    path.write_text(accounts)
    return SenderThread(SenderSettings(
        accounts_file=path, kafka={"topic_prefix": namespace}, metrics_port=0,
        retry_base_seconds=0.2, retry_cap_seconds=1.0, poll_seconds=0.2,
        link_keys_file=tmp_path / "keys.json", gmail_api_endpoint=emu.api_endpoint,
        gmail_token_uri=emu.token_uri))


def decoded(registry, admin_kafka, topic: str, **kw):
    return [registry.decode(m.value())[1] for m in read_all(admin_kafka, topic, **kw)]


def test_gmail_daily_limit_parks_the_account_and_fails_nothing(
        namespace, tmp_path, admin_kafka, registry, admin):
    with GmailEmulator() as emu:
        emu.add_user(ME, refresh_token=REFRESH, daily_limit=3)
        accounts = gmail_account(token_file(tmp_path / "token.json", emu), pools="")
        events = [request("g1", to=f"r{i}@example.test") for i in range(5)]
        with run_sender(tmp_path, namespace, accounts, emu):
            produce(admin_kafka, namespace + "email.requested", registry, events)
            sent = decoded(registry, admin_kafka, namespace + "email.sent", expect=3)
            assert len(decoded(registry, admin_kafka, namespace + "email.sent",
                               settle=2.0)) == 3
        assert len(emu.sent(ME)) == 3
        assert {e["transport"] for e in sent} == {"gmail"}
        assert all(e["provider_message_id"] for e in sent)
    assert decoded(registry, admin_kafka, namespace + "email.failed", settle=0.5) == []
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        states = conn.execute(
            "SELECT state, count(*) FROM send_ledger WHERE message_id = ANY(%s::uuid[])"
            " GROUP BY state", ([e["message_id"] for e in events],)).fetchall()
    assert dict(states) == {"sent": 3, "queued": 2}  # waiting for the quota, not failed


def test_pool_messages_move_to_smtp_when_gmail_is_exhausted(
        namespace, tmp_path, admin_kafka, registry):
    with GmailEmulator() as emu, SmtpServer() as smtp:
        emu.add_user(ME, refresh_token=REFRESH, daily_limit=2)
        accounts = (gmail_account(token_file(tmp_path / "token.json", emu))
                    + smtp_account("relay", smtp.port, pools=("mixed",)))
        events = [request("g1", to=f"p{i}@example.test", pool="mixed") for i in range(4)]
        with run_sender(tmp_path, namespace, accounts, emu):
            produce(admin_kafka, namespace + "email.requested", registry, events)
            sent = decoded(registry, admin_kafka, namespace + "email.sent", expect=4,
                           timeout=30)
        assert sorted(e["account_id"] for e in sent) == ["g1", "g1", "relay", "relay"]
        assert {e["message_id"] for e in sent} == {e["message_id"] for e in events}
        assert len(emu.sent(ME)) == 2 and len(smtp.handler.received) == 2
