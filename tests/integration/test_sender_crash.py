"""A sender killed with SIGKILL mid-batch and restarted: nothing lost, duplicates flagged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from mailbus.sender.settings import SenderSettings
from tests.support.kafka import read_all
from tests.support.sender import produce, request, smtp_account
from tests.support.smtp import SmtpServer

COUNT = 1000
CONNECTIONS = 3
CLAIM_DEPTH = 16  # the default MAILBUS_CLAIM_DEPTH: rows claimed ahead per connection
# The default MAILBUS_SETTLING_PER_CONNECTION: sent, awaiting their settle, per connection.
SETTLING = SenderSettings.model_fields["settling_per_connection"].default


def start_sender(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "mailbus", "sender"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_sigkill_mid_batch_loses_nothing(namespace, tmp_path, admin_kafka, registry):
    with SmtpServer() as smtp:
        accounts = tmp_path / "accounts.toml"
        accounts.write_text(smtp_account("dev", smtp.port, rate=400, connections=CONNECTIONS))
        env = {**os.environ, "MAILBUS_KAFKA__TOPIC_PREFIX": namespace,
               "MAILBUS_ACCOUNTS_FILE": str(accounts), "MAILBUS_METRICS_PORT": "0",
               "MAILBUS_LINK_KEYS_FILE": str(tmp_path / "keys.json"),
               "MAILBUS_POLL_SECONDS": "0.2", "MAILBUS_LOG_LEVEL": "WARNING"}
        log = tmp_path / "sender.log"
        events = [request(to=f"r{i}@example.com", subject=f"n{i}") for i in range(COUNT)]
        wanted = {e["message_id"] for e in events}

        def received_ids() -> list[str]:
            return [m["X-Mailbus-Message-Id"] for m in smtp.handler.messages()]

        first = start_sender(env, log)
        produce(admin_kafka, namespace + "email.requested", registry, events)
        wait_for(lambda: len(smtp.handler.received) >= COUNT // 4, 120, first, log)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        at_kill = len(smtp.handler.received)
        assert at_kill < COUNT, "the batch finished before the kill; nothing was tested"

        second = start_sender(env, log)
        try:
            wait_for(lambda: wanted <= set(received_ids()), 180, second, log)
            # Events the killed sender decided but never emitted come from its outbox.
            sent = [registry.decode(m.value())[1]
                    for m in read_all(admin_kafka, namespace + "email.sent", settle=3.0,
                                      timeout=60)]
        finally:
            second.terminate()
            second.wait(30)

    counts = Counter(received_ids())
    assert set(counts) == wanted  # every accepted message reached the SMTP server
    duplicates = {m for m, n in counts.items() if n > 1}
    # Only what was in flight at the kill can have gone twice: what each connection
    # was sending, and what the server took but the ledger did not know yet.
    assert len(duplicates) <= CONNECTIONS * (1 + SETTLING)
    assert {e["message_id"] for e in sent} == wanted
    flagged = {e["message_id"] for e in sent if e["possible_duplicate"]}
    assert duplicates <= flagged  # every real duplicate is flagged in its event
    # Flagged: every row the killed sender held `sending`, claimed ahead or not.
    assert len(flagged) <= CONNECTIONS * CLAIM_DEPTH
