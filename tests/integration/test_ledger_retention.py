"""The sender's ledger stays bounded: settled rows pruned, payloads cleared, nothing else.

Rows are written with the owner role (their timestamps set in the past) and
pruned by the sender's own role and statements on the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import ValidationError

from mailbus.db import open_pool
from mailbus.sender.outbox import SQL, Ledger
from mailbus.sender.settings import SenderSettings
from mailbus.settings import ServiceSettings
from tests.support.kafka import new_prefix, read_all
from tests.support.sender import SenderThread, produce, request, smtp_account
from tests.support.smtp import SmtpServer

DAY = 86400.0
KEEP, PAYLOAD = 8 * DAY, 1 * DAY  # 192 h (the default is 912 h) and 24 h (the default)

# name: (state, settled ago, sent ago, admitted ago, pending recipients); ages in hours.
ROWS: dict[str, tuple[str, float | None, float | None, float, list[str] | None]] = {
    "old_sent": ("sent", 240, 240, 240, None),
    "old_failed": ("failed", 240, None, 240, None),
    "old_rerouted": ("rerouted", 240, None, 240, None),
    "week_sent": ("sent", 72, 72, 72, None),          # kept, payload cleared
    "day_failed": ("failed", 30, None, 30, None),     # kept, payload cleared
    "recent_sent": ("sent", 2, 2, 2, None),           # kept whole; the quota counts it
    "edge_sent": ("sent", 23, 23, 23, None),          # kept whole; the quota counts it
    "old_queued": ("queued", None, None, 720, None),  # waiting a month (send_at): kept
    "old_sending": ("sending", None, None, 720, None),  # in flight: kept
    "partly_sent": ("queued", None, 240, 240, ["grey@example.com"]),  # still owed: kept
}
PRUNED = {"old_sent", "old_failed", "old_rerouted"}
CLEARED = {"week_sent", "day_failed"}


def owner() -> psycopg.Connection[Any]:
    return psycopg.connect(ServiceSettings(service_name="owner").postgres.conninfo())


def insert(conn: psycopg.Connection[Any], namespace: str, account: str = "dev",
           rows: dict[str, tuple[str, float | None, float | None, float, list[str] | None]]
           = ROWS) -> dict[str, str]:
    """The rows, as the sender would have left them that long ago; name -> message id."""
    ids = {}
    for name, (state, settled, sent, admitted, pending) in rows.items():
        ids[name] = str(uuid.uuid4())
        conn.execute(
            "INSERT INTO send_ledger (message_id, namespace, account_id, source_partition,"
            " state, due_at, payload, admitted_at, sent_at, settled_at, pending_recipients)"
            " VALUES (%s, %s, %s, 0, %s, now() - %s::interval, %s, now() - %s::interval,"
            " now() - %s::interval, now() - %s::interval, %s)",
            (ids[name], namespace, account, state, timedelta(hours=admitted),
             f"request {name}".encode(), timedelta(hours=admitted),
             None if sent is None else timedelta(hours=sent),
             None if settled is None else timedelta(hours=settled), pending))
    conn.commit()
    return ids


def payloads(conn: psycopg.Connection[Any], ids: dict[str, str]) -> dict[str, bytes | None]:
    """name -> payload of the rows still there."""
    by_id = {v: k for k, v in ids.items()}
    rows = conn.execute("SELECT message_id::text, payload FROM send_ledger"
                        " WHERE message_id = ANY(%s::uuid[])", (list(ids.values()),)).fetchall()
    return {by_id[m]: None if p is None else bytes(p) for m, p in rows}


@pytest.fixture
def namespace() -> Iterator[str]:
    """A ledger namespace of its own (no Kafka topics needed); its rows removed after."""
    prefix = new_prefix()
    yield prefix
    with owner() as conn:
        conn.execute("DELETE FROM send_ledger WHERE namespace = %s", (prefix,))


async def prune_all(namespace: str, *, keep: float, payload: float, batch: int
                    ) -> tuple[list[tuple[int, int]], list[int]]:
    """Prune as the sender does (its role, its statements) until a batch comes back short."""
    pool = open_pool(SenderSettings().postgres)
    await pool.open(wait=True, timeout=30)
    try:
        ledger = Ledger(pool, namespace)
        before = len(await ledger.sent_in_window("dev"))
        rounds = [await ledger.prune(keep_seconds=keep, payload_seconds=payload, batch=batch)]
        while max(rounds[-1]) >= batch:
            rounds.append(await ledger.prune(keep_seconds=keep, payload_seconds=payload,
                                             batch=batch))
        return rounds, [before, len(await ledger.sent_in_window("dev"))]
    finally:
        await pool.close()


def test_prune_removes_only_settled_rows_past_retention_and_clears_old_payloads(namespace):
    other = new_prefix()  # another installation sharing the database
    with owner() as conn:
        ids = insert(conn, namespace)
        theirs = insert(conn, other)
    try:
        rounds, quota = asyncio.run(prune_all(namespace, keep=KEEP, payload=PAYLOAD, batch=2))
        with owner() as conn:
            left = payloads(conn, ids)
            assert payloads(conn, theirs) == {n: f"request {n}".encode() for n in ROWS}
    finally:
        with owner() as conn:
            conn.execute("DELETE FROM send_ledger WHERE namespace = %s", (other,))
    assert set(left) == set(ROWS) - PRUNED
    assert {n for n, p in left.items() if p is None} == CLEARED
    assert all(left[n] == f"request {n}".encode() for n in set(left) - CLEARED)
    # In batches of two: three rows took two rounds (a row still waiting for its
    # delete may have its payload cleared first).
    assert sum(r for r, _ in rounds) == 3 and len(rounds) >= 2
    assert 2 <= sum(p for _, p in rounds) <= 3
    # The rolling quota still counts the sends of the last 24 h (2 h and 23 h ago),
    # and the partly sent row's first hand-over (10 days ago) is outside it anyway.
    assert quota == [2, 2]


def test_a_retention_below_a_day_still_keeps_what_the_quota_counts(namespace):
    with pytest.raises(ValidationError):
        SenderSettings(ledger_retention_hours=12)
    with owner() as conn:
        ids = insert(conn, namespace)
    # Past the settings' check (an operator's SQL, a bug): the statement's own guard.
    _, quota = asyncio.run(prune_all(namespace, keep=0, payload=0, batch=100))
    with owner() as conn:
        left = payloads(conn, ids)
    assert set(left) == set(ROWS) - PRUNED - {"week_sent", "day_failed"}
    assert {"recent_sent", "edge_sent"} <= set(left) and quota == [2, 2]
    # Settled payloads all cleared; queued and in-flight rows keep theirs.
    assert {n for n, p in left.items() if p is None} == {"recent_sent", "edge_sent"}


def test_the_prune_walks_an_index_not_the_table():
    with owner() as conn:
        conn.execute("SET enable_seqscan = off")
        for name in ("prune_settled", "clear_payloads"):
            plan = "\n".join(r[0] for r in conn.execute(
                "EXPLAIN " + SQL[name],  # type: ignore[operator]
                {"namespace": "x", "keep_seconds": 1.0, "batch": 10}).fetchall())
            assert "send_ledger_settled" in plan, plan
        conn.rollback()


def test_a_running_sender_prunes_periodically_and_keeps_what_it_just_sent(
        tmp_path: Path, admin_kafka, registry, admin):
    from mailbus.provision import provision
    from tests.support.kafka import drop_namespace

    prefix = new_prefix()
    provision(admin_kafka, admin.var_dir / "secrets", prefix, users=False)
    try:
        with SmtpServer() as smtp, owner() as conn:
            # Rows of an account this sender does not have: no worker touches them.
            ids = insert(conn, prefix, account="elsewhere")
            accounts = tmp_path / "accounts.toml"
            accounts.write_text(smtp_account("dev", smtp.port))
            settings = SenderSettings(
                accounts_file=accounts, kafka={"topic_prefix": prefix}, metrics_port=0,
                poll_seconds=0.2, link_keys_file=tmp_path / "keys.json",
                ledger_prune_seconds=0.2, ledger_prune_batch=2,
                ledger_retention_hours=KEEP / 3600)
            event = request(to="ada@example.com")
            with SenderThread(settings):
                produce(admin_kafka, prefix + "email.requested", registry, [event])
                read_all(admin_kafka, prefix + "email.sent", expect=1, timeout=60)
                deadline = time.monotonic() + 60
                while set(payloads(conn, ids)) & PRUNED:
                    assert time.monotonic() < deadline, "the sender never pruned"
                    time.sleep(0.1)
            left = payloads(conn, ids)
            assert set(left) == set(ROWS) - PRUNED
            assert {n for n, p in left.items() if p is None} == CLEARED
            row = conn.execute("SELECT state, payload IS NOT NULL, settled_at IS NOT NULL"
                               " FROM send_ledger WHERE message_id = %s",
                               (event["message_id"],)).fetchone()
            assert row == ("sent", True, True)  # settled now: kept whole
            conn.execute("DELETE FROM send_ledger WHERE namespace = %s", (prefix,))
            conn.commit()
    finally:
        drop_namespace(admin_kafka, prefix)
