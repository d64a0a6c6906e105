"""The whole pipeline for 300 messages: API, Kafka, sender, SMTP server, confirm, projector.

Every service runs as its own process (`python -m mailbus ...`) except the API,
which runs in the test on a real socket; the check is `mailbus verify`'s own
code, through the public API only.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx

from mailbus import verify
from mailbus.ingest.settings import IngestSettings
from tests.integration.conftest import LiveServer
from tests.support.kafka import read_all
from tests.support.processes import Services
from tests.support.sender import smtp_account
from tests.support.smtp import SmtpServer

COUNT = 300


def test_300_messages_are_each_confirmed_exactly_once(namespace, tmp_path: Path, make_key,
                                                       admin_kafka, registry):
    _, token = make_key(scopes=("send", "read"))
    with SmtpServer() as smtp:
        accounts = tmp_path / "accounts.toml"
        accounts.write_text(smtp_account("dev", smtp.port, rate=500))
        env = {"MAILBUS_KAFKA__TOPIC_PREFIX": namespace, "MAILBUS_ACCOUNTS_FILE": str(accounts),
               "MAILBUS_METRICS_PORT": "0", "MAILBUS_LINK_KEYS_FILE": str(tmp_path / "keys"),
               "MAILBUS_POLL_SECONDS": "0.2", "MAILBUS_LOG_LEVEL": "WARNING"}
        settings = IngestSettings(accounts_file=accounts, kafka={"topic_prefix": namespace})
        with Services(env, tmp_path) as services, LiveServer(settings) as api:
            for name in ("sender", "confirm", "projector"):
                services.start(name)
            verifier = verify.Verifier(api.url, token)
            try:
                outcome = verify.run(verifier, count=COUNT, recipients=["verify@example.com"],
                                     deadline=180, poll=0.5,
                                     progress=lambda *_: services.check_alive())
                with httpx.Client(base_url=api.url, timeout=30,
                                  headers={"Authorization": f"Bearer {token}"}) as client:
                    today = datetime.now(UTC).date().isoformat()
                    report = client.get("/v1/reports/daily", params={"date": today}).json()
            finally:
                verifier.close()
            confirmed = [registry.decode(m.value())[1]
                         for m in read_all(admin_kafka, namespace + "email.confirmed",
                                           settle=2.0)]

    assert outcome.ok, (outcome.count(), services.tail("confirm"), services.tail("projector"))
    assert len(smtp.handler.received) == COUNT
    per_message = Counter(e["message_id"] for e in confirmed if e["outcome"] == "confirmed")
    assert set(per_message) == set(outcome.ids)
    assert set(per_message.values()) == {1}  # exactly once each
    assert len(outcome.latencies_ms) == COUNT
    [row] = [r for r in report["accounts"] if r["account"] == "dev"]
    assert (row["requested"], row["sent"], row["delivered"], row["confirmed"]) == (
        COUNT, COUNT, COUNT, COUNT)
    assert row["failed"] == row["bounced"] == row["unconfirmed"] == 0
