"""Two live senders in one group while rebalances move partitions between them.

A sender that loses a partition learns it between two polls, and may still be
sending that partition's rows when the new owner takes it over. Ownership is
fenced (sender_partitions, an epoch per take-over): the old owner's settles
match nothing, the new owner sends the rows it found `sending` again flagged
as possible duplicates. Whatever the interleaving: nothing is lost, every row
ends `sent`, and a message that reached the server twice says so in email.sent.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from mailbus.sender.settings import SenderSettings
from tests.support.kafka import read_all
from tests.support.sender import SenderThread, produce, request, smtp_account
from tests.support.smtp import SmtpServer

# Messages per run: CI keeps the default; MAILBUS_TEST_FENCING_MESSAGES=5000 for a
# longer run (about three minutes on two busy cores).
# The third member must join while mail is going out: alone, not beside other tests.
pytestmark = pytest.mark.serial

COUNT = int(os.environ.get("MAILBUS_TEST_FENCING_MESSAGES", "1500"))
REBALANCES = 3
ACCOUNTS = ("f0", "f1", "f2", "f3")  # keyed by account: spread over several partitions


def settings(namespace: str, tmp_path: Path, port: int) -> SenderSettings:
    path = tmp_path / "accounts.toml"
    # 4 x 40 messages/s: the run lasts several seconds, long enough for rebalances mid-send.
    path.write_text("".join(smtp_account(a, port, rate=40, quota=100_000, connections=2)
                            for a in ACCOUNTS))
    return SenderSettings(accounts_file=path, kafka={"topic_prefix": namespace},
                          metrics_port=0, poll_seconds=0.2, retry_base_seconds=0.2,
                          retry_cap_seconds=1.0, link_keys_file=tmp_path / "keys.json",
                          log_level="WARNING")


def sent_states(namespace: str, admin) -> Counter[str]:
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        return Counter(dict(conn.execute(
            "SELECT state, count(*) FROM send_ledger WHERE namespace = %s GROUP BY state",
            (namespace,)).fetchall()))


def test_rebalances_between_live_senders_lose_nothing_and_flag_duplicates(
        namespace, tmp_path, admin_kafka, registry, admin):
    events = [request(ACCOUNTS[i % len(ACCOUNTS)], to=f"r{i}@example.com", subject=f"n{i}")
              for i in range(COUNT)]
    wanted = {e["message_id"] for e in events}
    with SmtpServer() as smtp:
        config = settings(namespace, tmp_path, smtp.port)
        rebalanced_mid_send = 0
        with SenderThread(config) as first, SenderThread(config) as second:
            produce(admin_kafka, namespace + "email.requested", registry, events)
            deadline = time.monotonic() + 240
            # A third member joins and leaves, again and again: each time the
            # partitions move while the two others are sending.
            for _ in range(REBALANCES):
                assert time.monotonic() < deadline, "the senders stalled"
                before = len(smtp.handler.received)
                with SenderThread(config):
                    time.sleep(1.0)
                if 0 < before and len(smtp.handler.received) < COUNT:
                    rebalanced_mid_send += 1
            while sent_states(namespace, admin)["sent"] < COUNT:
                assert time.monotonic() < deadline, sent_states(namespace, admin)
                time.sleep(0.2)
            epochs = [e for t in (first, second) if t.sender
                      for e in t.sender.epochs.values()]
        sent = [registry.decode(m.value())[1]
                for m in read_all(admin_kafka, namespace + "email.sent", settle=3.0,
                                  timeout=60)]
        received = Counter(m["X-Mailbus-Message-Id"] for m in smtp.handler.messages())

    # The run did what it is about: partitions changed hands while mail was going out.
    assert rebalanced_mid_send >= 1
    assert max(epochs) > 1
    # Nothing lost: every message reached the server, every row ended sent.
    assert set(received) == wanted
    assert sent_states(namespace, admin) == Counter({"sent": COUNT})
    assert {e["message_id"] for e in sent} == wanted
    # A message that reached the server more than once says so in email.sent.
    flagged = {e["message_id"] for e in sent if e["possible_duplicate"]}
    duplicates = {m for m, n in received.items() if n > 1}
    assert duplicates <= flagged
