"""The projector against the real broker and PostgreSQL: rows, status, counts, replays, outages."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from mailbus.confirm.projector import ProjectorSettings, project
from mailbus.settings import ServiceSettings
from mailbus.timeline import event_row
from tests.support.projector import (
    READER,
    bounced,
    confirmed,
    daily,
    delivered,
    eventually,
    failed,
    lag,
    produce,
    projector_running,
    requested,
    responded,
    rows,
    sent,
    settings_for,
    snapshot,
    suppression,
)

# --- tests --------------------------------------------------------------------------------

NOW = datetime.now(UTC).replace(microsecond=0)


def scenario() -> tuple[dict[str, str], list[tuple[str, dict[str, Any]]]]:
    """Messages with every path through the status rules, events in a realistic order."""
    ids = {name: str(uuid.uuid4()) for name in
           ("confirmed", "partial", "failed", "bounced", "unconfirmed", "early")}
    t = [NOW + timedelta(seconds=i) for i in range(6)]
    m = ids
    events = [
        requested(m["confirmed"], t[0]), sent(m["confirmed"], t[1], recipients=["a@x", "b@x"]),
        delivered(m["confirmed"], t[2], "a@x"), delivered(m["confirmed"], t[3], "b@x"),
        confirmed(m["confirmed"], t[4]), responded(m["confirmed"], t[5]),
        # Sent to one recipient, refused for the other: sent, and counted failed once.
        requested(m["partial"], t[0]), sent(m["partial"], t[1]),
        failed(m["partial"], t[1], recipient="b@x"),
        requested(m["failed"], t[0], account="solo"), failed(m["failed"], t[2], account="solo"),
        requested(m["bounced"], t[0]), sent(m["bounced"], t[1]), delivered(m["bounced"], t[2]),
        bounced(m["bounced"], t[3]),
        requested(m["unconfirmed"], t[0]), sent(m["unconfirmed"], t[1]),
        confirmed(m["unconfirmed"], t[4], outcome="unconfirmed"),
        # Delivered may be projected before sent (another topic): order does not matter.
        delivered(m["early"], t[2], account="team-a"), sent(m["early"], t[1], account="team-a"),
    ]
    return ids, events


EXPECTED_STATUS = {"confirmed": "confirmed", "partial": "sent", "failed": "failed",
                   "bounced": "bounced", "unconfirmed": "unconfirmed", "early": "delivered"}
#              requested sent delivered confirmed failed bounced unconfirmed
EXPECTED_COUNTS = {"dev": (4, 4, 2, 1, 1, 1, 1), "solo": (1, 0, 0, 0, 1, 0, 0),
                   "team-a": (0, 1, 1, 0, 0, 0, 0)}


def test_projector_as_a_process_projects_every_event(namespace, admin_kafka, registry,
                                                     make_key, tmp_path):
    ids, events = scenario()
    # Two came through the API: their `messages` rows follow the status, and the bounce
    # (which names no account) is counted for the account of its row.
    key_id, _ = make_key()
    with psycopg.connect(READER.postgres.conninfo()) as conn:
        for name in ("confirmed", "bounced"):
            conn.execute("INSERT INTO messages (id, key_id, account_id, recipients,"
                         " requested_at) VALUES (%s, %s, 'dev', 1, %s)", (ids[name], key_id, NOW))
    produce(admin_kafka, namespace, registry, events, raw=[
        ("email.sent", b"not avro at all"),
        ("email.delivered", registry.encode("email.delivered",
                                            delivered("not-a-uuid", NOW)[1])),
    ])
    log = tmp_path / "projector.log"
    code = ("import logging; logging.basicConfig(level='INFO');"
            " from mailbus.confirm.projector import ProjectorSettings, main;"
            " main(ProjectorSettings())")
    env = {**os.environ, "MAILBUS_KAFKA__TOPIC_PREFIX": namespace}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        eventually(lambda: _assert(lag(admin_kafka, namespace) == 0, log.read_text()[-2000:]))
        eventually(lambda: _assert(rows("SELECT count(*) FROM message_events"
                                        " WHERE namespace = %s", namespace)[0][0] == len(events)))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    text = log.read_text()
    # Where (topic/partition/offset) and why.
    assert re.search(rf"skipping {re.escape(namespace)}email\.sent/\d+/\d+: not single-object",
                     text), text[-3000:]
    assert re.search(r"skipping \S+email\.delivered/\d+/\d+: message_id 'not-a-uuid'", text)

    status = dict(rows("SELECT message_id::text, status FROM message_status"
                       " WHERE namespace = %s", namespace))
    assert status == {ids[name]: want for name, want in EXPECTED_STATUS.items()}
    assert rows("SELECT id::text, status FROM messages WHERE id = ANY(%s::uuid[]) ORDER BY 2",
                [ids["bounced"], ids["confirmed"]]) == [(ids["bounced"], "bounced"),
                                                        (ids["confirmed"], "confirmed")]
    assert daily(namespace) == EXPECTED_COUNTS

    timeline = rows("SELECT kind, detail FROM message_events WHERE namespace = %s AND"
                    " message_id = %s ORDER BY occurred_at", namespace, ids["confirmed"])
    assert [k for k, _ in timeline] == ["requested", "sent", "delivered", "delivered",
                                        "confirmed", "response"]
    assert timeline[1][1]["smtp_response"] == "250 2.0.0 Ok: queued"
    assert timeline[1][1]["recipients"] == ["a@x", "b@x"]
    assert timeline[4][1]["sent_to_delivered_us"] == 2_000_000
    assert timeline[5][1]["response"] == "reply"
    # Counted once per kind: the second recipient's delivery is in the timeline only.
    counted = rows("SELECT kind, counted_day FROM message_events WHERE namespace = %s AND"
                   " message_id = %s AND counted_day IS NOT NULL", namespace,
                   ids["confirmed"])
    assert sorted(k for k, _ in counted) == ["confirmed", "delivered", "requested", "sent"]


def _assert(condition: bool, context: str = "") -> None:
    assert condition, context


def test_replaying_the_same_events_changes_nothing(namespace, admin_kafka, registry):
    _, events = scenario()
    produce(admin_kafka, namespace, registry, events)
    with projector_running(settings_for(namespace, batch_size=7)) as projector:
        eventually(lambda: _assert(lag(admin_kafka, namespace) == 0))
        before = snapshot(namespace)
        assert projector.projected == len(events)
        # Every record again (a producer retry, an outbox re-emit, a mirror replay).
        produce(admin_kafka, namespace, registry, events)
        eventually(lambda: _assert(lag(admin_kafka, namespace) == 0))
        assert projector.projected == len(events)
    assert snapshot(namespace) == before
    # Without `messages` rows, a bounce projected before its message's other events has
    # no account to go to; the totals do not depend on batching.
    totals = [sum(col) for col in zip(*daily(namespace).values(), strict=True)]
    assert totals == [sum(col) for col in zip(*EXPECTED_COUNTS.values(), strict=True)]


def test_suppressions_keep_the_latest_state_per_address_and_scope(namespace, admin_kafka,
                                                                   registry):
    message_id = str(uuid.uuid4())
    t = [NOW + timedelta(seconds=i) for i in range(4)]
    events = [
        suppression("Ada@Example.com", t[1], message_id=message_id),
        # Lifted later: the latest state wins...
        suppression("ada@example.com", t[2], active=False, reason="manual"),
        # ...also when an older record arrives after it (another producer, a replay).
        suppression("ada@example.com", t[0], reason="complaint"),
        # The same address for one account only is a state of its own.
        suppression("ada@example.com", t[3], reason="hard_bounce", scope="team-a"),
        suppression("bob@example.com", t[0], reason="hard_bounce"),
    ]
    produce(admin_kafka, namespace, registry, events,
            raw=[("email.suppressions", b"not avro")])
    with projector_running(settings_for(namespace)):
        eventually(lambda: _assert(lag(admin_kafka, namespace) == 0))
    found = rows("SELECT address, scope, reason, active, message_id::text FROM suppressions"
                 " WHERE namespace = %s ORDER BY address, scope", namespace)
    assert found == [("ada@example.com", "", "manual", False, None),
                     ("ada@example.com", "team-a", "hard_bounce", True, None),
                     ("bob@example.com", "", "hard_bounce", True, None)]
    # Suppressions are state, not message events: no timeline rows came of them.
    assert rows("SELECT count(*) FROM message_events WHERE namespace = %s", namespace) == [(0,)]


class FlakyProxy:
    """A TCP proxy in front of PostgreSQL the test can take down: down() cuts every open
    connection and refuses new ones until up(), as a restarting server would."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.is_up = threading.Event()
        self.is_up.set()
        self.refused = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.is_up.is_set():
                self.refused += 1
                client.close()
                continue
            server = socket.create_connection(self.target)
            with self._lock:
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for s in (source, sink):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        self.is_up.clear()
        with self._lock:
            for s in self._open:
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def up(self) -> None:
        self.is_up.set()

    def close(self) -> None:
        self.listener.close()
        self.down()


def test_catches_up_after_postgres_was_unreachable(namespace, admin_kafka, registry):
    pg = READER.postgres
    proxy = FlakyProxy((pg.host, pg.port))
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    before = [requested(first, NOW), sent(first, NOW + timedelta(seconds=1))]
    during = [delivered(first, NOW + timedelta(seconds=2)),
              confirmed(first, NOW + timedelta(seconds=3)),
              requested(second, NOW), sent(second, NOW + timedelta(seconds=1)),
              delivered(second, NOW + timedelta(seconds=2))]

    def projected() -> int:
        return int(rows("SELECT count(*) FROM message_events WHERE namespace = %s",
                        namespace)[0][0])

    try:
        with projector_running(settings_for(namespace, postgres={"port": proxy.port})) as p:
            produce(admin_kafka, namespace, registry, before)
            eventually(lambda: _assert(projected() == 2 and lag(admin_kafka, namespace) == 0))

            proxy.down()
            produce(admin_kafka, namespace, registry, during)
            # It tried, failed (the connection it held was cut, new ones are refused),
            # and retried: nothing written, nothing committed.
            eventually(lambda: _assert(p.failures >= 3 and proxy.refused >= 2))
            assert projected() == 2
            assert lag(admin_kafka, namespace) == len(during)

            proxy.up()
            eventually(lambda: _assert(projected() == 7 and lag(admin_kafka, namespace) == 0))
    finally:
        proxy.close()
    status = dict(rows("SELECT message_id::text, status FROM message_status"
                       " WHERE namespace = %s", namespace))
    assert status == {first: "confirmed", second: "delivered"}
    assert daily(namespace) == {"dev": (2, 2, 2, 1, 0, 0, 0)}


def test_concurrent_batches_on_one_message_count_it_once(namespace):
    """Two instances (e.g. mid-rebalance, or email.requested on another partition) writing
    events of the same messages at once: the row locks make each kind count once."""
    confirm = ProjectorSettings()
    rounds = 10
    for _ in range(rounds):
        message_id = str(uuid.uuid4())
        # Both see the delivered events, each in its own order, plus one of its own.
        shared = [delivered(message_id, NOW, r)[1] for r in ("a@x", "b@x")]
        batches = [
            [event_row("mailbus.EmailSent", sent(message_id, NOW)[1]),
             *(event_row("mailbus.EmailDelivered", e) for e in shared)],
            [event_row("mailbus.EmailRequested", requested(message_id, NOW)[1]),
             *(event_row("mailbus.EmailDelivered", e) for e in reversed(shared))],
        ]
        barrier = threading.Barrier(2)
        written: list[int] = []

        def write(batch: list[Any], barrier: threading.Barrier, written: list[int]) -> None:
            with psycopg.connect(confirm.postgres.conninfo(), autocommit=True) as conn:
                barrier.wait(10)
                written.append(project(conn, namespace, batch))

        threads = [threading.Thread(target=write, args=(b, barrier, written)) for b in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sum(written) == 4, written  # each event written once, by one of them
    assert daily(namespace) == {"dev": (rounds, rounds, rounds, 0, 0, 0, 0)}


@pytest.mark.parametrize(("role", "statement"), [
    ("ingest", "DELETE FROM message_events"),
    ("ingest", "UPDATE message_status SET status = 'sent'"),
    ("ingest", "INSERT INTO daily_counts (namespace, day, account_id) VALUES ('x', now(), 'x')"),
    # The projector appends history; it can neither rewrite nor delete it.
    ("confirm", "UPDATE message_events SET kind = 'sent'"),
    ("confirm", "DELETE FROM daily_counts"),
    ("confirm", "UPDATE messages SET subject = 'x'"),
    ("confirm", "DELETE FROM messages"),
    ("confirm", "DELETE FROM suppressions"),
    ("ingest", "UPDATE suppressions SET active = false"),
])
def test_roles_have_only_their_grants(role: str, statement: str) -> None:
    settings = ServiceSettings(service_name=role)
    with psycopg.connect(settings.postgres.conninfo()) as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)  # type: ignore[arg-type]
