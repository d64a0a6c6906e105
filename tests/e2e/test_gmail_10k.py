"""10,000 messages over five Gmail Workspace accounts (2,000 a day each), all confirmed.

Google is out of reach here: the Gmail API is the real google-api-python-client
against tests/support/gmail_emulator.py, which enforces Google's per-user rate
(250 quota units a second, 100 per send) and the rolling 24 h sending limit.

The emulator's clock runs SPEED times faster than real time (ScaledClock), so
Google's 2.5 sends a second per user becomes 2.5 * SPEED a second of real time;
the accounts' configured rate is scaled the same way, and the daily quota is
not scaled at all: the whole run takes far less than a day of emulator time, so
2,000 per account per rolling day is exactly what the emulator allows.

Delivery evidence is `mailbox`: the test plays the mailbox reader, seeing each
message arrive in the emulator and reporting it as email.delivered, as the
replies service does for real mailboxes.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from confluent_kafka import Producer

from mailbus.accounts import pick_account
from mailbus.ingest.settings import IngestSettings
from tests.integration.conftest import LiveServer
from tests.support.gmail_emulator import GmailEmulator
from tests.support.kafka import read_all
from tests.support.processes import Services

SPEED = 60
ACCOUNTS = [f"ws{i}" for i in range(5)]
PER_ACCOUNT = 2000
TOTAL = PER_ACCOUNT * len(ACCOUNTS)
SCOPES = ["https://www.googleapis.com/auth/gmail.send",
          "https://www.googleapis.com/auth/gmail.readonly"]


class ScaledClock:
    """Emulator time: starts now, runs SPEED times faster than the wall clock."""

    def __init__(self, speed: float):
        self.start, self.t0, self.speed = datetime.now(UTC), time.monotonic(), speed

    def __call__(self) -> datetime:
        return self.start + timedelta(seconds=(time.monotonic() - self.t0) * self.speed)


def address(account: str) -> str:
    return f"{account}@workspace.test"


def accounts_file(tmp_path: Path, emu: GmailEmulator) -> Path:
    tables = []
    for account in ACCOUNTS:
        token = tmp_path / f"{account}.json"
        token.write_text(json.dumps({
            "token": emu.issue_token(address(account)), "refresh_token": f"1//{account}",
            "client_id": "client-id", "client_secret": "client-secret",
            "token_uri": emu.token_uri, "scopes": SCOPES,
            "expiry": (datetime.now(UTC) + timedelta(hours=1)).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ")}))
        tables.append(f"""
[[accounts]]
id = "{account}"
kind = "gmail"
from_address = "{address(account)}"
daily_quota = {PER_ACCOUNT}
rate_per_second = {2.5 * SPEED}
pools = ["workspace"]
evidence = "mailbox"
[accounts.gmail]
token_file = "{token}"
""")
    path = tmp_path / "accounts.toml"
    path.write_text("".join(tables))
    return path


def mailbox_reader(emu: GmailEmulator, config: dict, topic: str, registry,
                   stop: threading.Event) -> None:
    """Report every message that reached the emulator as delivered (evidence: mailbox)."""
    producer = Producer(config)
    seen: set[str] = set()
    while not stop.is_set():
        for account in ACCOUNTS:
            for stored in emu.messages(address(account)):
                if stored.id in seen:
                    continue
                seen.add(stored.id)
                message_id = stored.message["X-Mailbus-Message-Id"]
                event = {"event_id": f"{stored.id}-{message_id}", "message_id": message_id,
                         "occurred_at": datetime.now(UTC), "account_id": account,
                         "recipient": stored.recipients[0], "evidence": "mailbox",
                         "detail": f"seen in the emulator as {stored.id}"}
                producer.produce(topic, registry.encode("email.delivered", event),
                                 key=message_id.encode())
        producer.poll(0)
        stop.wait(0.5)
    producer.flush(30)


def test_10000_messages_over_five_workspace_accounts(namespace, tmp_path, make_key,
                                                     admin_kafka, registry):
    _, token = make_key(scopes=("send", "read", "admin"))
    clock = ScaledClock(SPEED)
    with GmailEmulator(now=clock) as emu:
        for account in ACCOUNTS:
            emu.add_user(address(account), refresh_token=f"1//{account}",
                         daily_limit=PER_ACCOUNT)
        accounts = accounts_file(tmp_path, emu)
        env = {"MAILBUS_KAFKA__TOPIC_PREFIX": namespace, "MAILBUS_ACCOUNTS_FILE": str(accounts),
               "MAILBUS_METRICS_PORT": "0", "MAILBUS_LINK_KEYS_FILE": str(tmp_path / "keys"),
               "MAILBUS_POLL_SECONDS": "0.2", "MAILBUS_LOG_LEVEL": "WARNING",
               "MAILBUS_GMAIL_API_ENDPOINT": emu.api_endpoint,
               "MAILBUS_GMAIL_TOKEN_URI": emu.token_uri}
        settings = IngestSettings(accounts_file=accounts, kafka={"topic_prefix": namespace})
        stop = threading.Event()
        reader = threading.Thread(target=mailbox_reader, args=(
            emu, admin_kafka, namespace + "email.delivered", registry, stop), daemon=True)
        with Services(env, tmp_path) as services, LiveServer(settings) as api, httpx.Client(
                base_url=api.url, timeout=120,
                headers={"Authorization": f"Bearer {token}"}) as client:
            for name in ("sender", "confirm", "projector"):
                services.start(name)
            reader.start()
            recipients = [f"person{i}@example.com" for i in range(TOTAL)]
            routed = Counter(pick_account(ACCOUNTS, r) for r in recipients)
            for start in range(0, TOTAL, 1000):
                batch = [{"from": "pool:workspace", "to": [r], "subject": "Quarterly note",
                          "text": "Hello from the workspace pool."}
                         for r in recipients[start:start + 1000]]
                r = client.post("/v1/messages/batch", json={"messages": batch})
                assert r.status_code == 202 and r.json()["accepted"] == 1000, r.text[:500]
            confirmed = read_all(admin_kafka, namespace + "email.confirmed", expect=TOTAL,
                                 timeout=900)
            services.check_alive()
            today = clock.start.date().isoformat()
            deadline = time.monotonic() + 120
            while True:  # the projector may still be writing the last verdicts
                report = client.get("/v1/reports/daily", params={"date": today}).json()
                done = sum(r["confirmed"] for r in report["accounts"])
                if done >= TOTAL or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            stop.set()
            reader.join(30)
        per_user = {a: len(emu.messages(address(a))) for a in ACCOUNTS}

    events = [registry.decode(m.value())[1] for m in confirmed]
    assert len({e["message_id"] for e in events if e["outcome"] == "confirmed"}) == TOTAL
    # Rendezvous routing does not split 10,000 evenly; failover moved the surplus
    # of the fuller accounts to the others, and none sent more than its quota.
    assert max(routed.values()) > PER_ACCOUNT
    assert per_user == {a: PER_ACCOUNT for a in ACCOUNTS}
    rows = {r["account"]: r for r in report["accounts"]}
    assert sorted(rows) == ACCOUNTS
    assert sum(r["confirmed"] for r in rows.values()) == TOTAL
    assert all(r["sent"] == PER_ACCOUNT and r["failed"] == 0 for r in rows.values())
