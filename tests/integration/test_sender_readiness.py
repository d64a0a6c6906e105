"""The sender sends nothing until its suppression list is loaded, and stops when a part dies.

Real broker (its ACLs are the faults: a reader that is not authorised), real
PostgreSQL (a row lock and pg_terminate_backend are the faults), a real SMTP
server, and the sender's /readyz over a real socket.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)
from prometheus_client import REGISTRY

from mailbus.sender.settings import SenderSettings
from mailbus.settings import ServiceSettings
from tests.support.kafka import read_all
from tests.support.sender import SenderThread, produce, request, smtp_account
from tests.support.smtp import SmtpServer, free_port

SUPPRESSED = "blocked.person@example.com"


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = 60.0) -> None:
    """Poll with a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def suppression(address: str) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "message_id": None, "occurred_at": datetime.now(UTC),
            "address": address, "address_hash": hashlib.sha256(address.encode()).hexdigest(),
            "reason": "unsubscribe", "scope": None, "active": True}


def read_acl(topic: str) -> AclBinding:
    """The sender principal's READ on one topic, as provisioning grants it."""
    return AclBinding(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, "User:sender",
                      "*", AclOperation.READ, AclPermissionType.ALLOW)


def revoke(admin_kafka: dict[str, Any], binding: AclBinding) -> None:
    flt = AclBindingFilter(binding.restype, binding.name, binding.resource_pattern_type,
                           binding.principal, binding.host, binding.operation,
                           binding.permission_type)
    client = AdminClient(admin_kafka)  # held until the futures resolved
    for future in client.delete_acls([flt]).values():
        assert future.result(30), "no such ACL: the fault was not injected"


def grant(admin_kafka: dict[str, Any], binding: AclBinding) -> None:
    client = AdminClient(admin_kafka)
    for future in client.create_acls([binding]).values():
        future.result(30)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
def env(namespace: str, tmp_path: Path, smtp: SmtpServer, admin_kafka, registry):
    class Env:
        port = free_port()

        def settings(self, **overrides: Any) -> SenderSettings:
            path = tmp_path / "accounts.toml"
            path.write_text(smtp_account("dev", smtp.port, connections=2))
            return SenderSettings(
                accounts_file=path, kafka={"topic_prefix": namespace},
                metrics_host="127.0.0.1", metrics_port=self.port, retry_base_seconds=0.2,
                retry_cap_seconds=1.0, poll_seconds=0.2,
                link_keys_file=tmp_path / "link-keys.json", **overrides)

        def readyz(self) -> tuple[int, dict[str, Any]]:
            r = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5)
            return r.status_code, r.json()

        def produce(self, events: list[dict[str, Any]]) -> None:
            produce(admin_kafka, namespace + "email.requested", registry, events)

        def suppress(self, addresses: list[str]) -> None:
            producer = Producer({**admin_kafka, "linger.ms": 50})
            for address in addresses:
                record = suppression(address)
                producer.produce(namespace + "email.suppressions",
                                 registry.encode("email.suppressions", record),
                                 key=record["address_hash"].encode())
                producer.poll(0)
            assert producer.flush(30) == 0

        def events(self, topic: str, **kw: Any) -> list[dict[str, Any]]:
            return [registry.decode(m.value())[1]
                    for m in read_all(admin_kafka, namespace + topic, **kw)]

    return Env()


def ledger(message_ids: list[str], admin: ServiceSettings) -> dict[str, str]:
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        return dict(conn.execute("SELECT message_id::text, state FROM send_ledger"
                                 " WHERE message_id = ANY(%s::uuid[])", (message_ids,)).fetchall())


def test_a_suppression_on_the_topic_before_start_holds_for_the_very_first_send(env, smtp):
    # 5,000 suppressions, the one that matters among the last: loading takes a moment.
    others = [f"someone{i}@example.org" for i in range(5000)]
    env.suppress([*others[:4000], SUPPRESSED, *others[4000:]])
    # The requests wait on the topic already: the sender could send at once.
    blocked = request(to=SUPPRESSED)
    allowed = request(to="welcome@example.com")
    env.produce([blocked, allowed])
    with SenderThread(env.settings()):
        [failed] = env.events("email.failed", expect=1, timeout=60)
        [sent] = env.events("email.sent", expect=1, timeout=60)
        wait_until("ready", lambda: env.readyz()[0] == 200)
        assert env.readyz()[1] == {"status": "ok", "suppressions": True, "admission": True,
                                   "workers": True}
    assert failed["message_id"] == blocked["message_id"]
    assert failed["reason"].startswith("suppressed")
    assert sent["message_id"] == allowed["message_id"]
    assert [r.rcpt_tos for r in smtp.handler.received] == [["welcome@example.com"]]


def test_a_sender_that_may_not_read_the_suppression_topic_is_not_ready_and_sends_nothing(
        env, smtp, admin_kafka, namespace, admin):
    # The list holds who must not be mailed, but this sender may not read it
    # (its READ ACL on the topic is gone) when it starts.
    env.suppress([f"someone{i}@example.org" for i in range(5000)] + [SUPPRESSED])
    acl = read_acl(namespace + "email.suppressions")
    revoke(admin_kafka, acl)
    blocked, allowed = request(to=SUPPRESSED), request(to="welcome@example.com")
    ids = [blocked["message_id"], allowed["message_id"]]
    restarts = counter("mailbus_sender_suppression_reader_restarts_total")
    with SenderThread(env.settings()):
        env.produce([blocked, allowed])
        # Admission works meanwhile: the requests wait in the ledger...
        wait_until("admitted", lambda: len(ledger(ids, admin)) == 2)
        # ...while the reader is refused, dies, and its replacement is refused too.
        wait_until("two readers refused", lambda: counter(
            "mailbus_sender_suppression_reader_restarts_total") >= restarts + 2)
        status, body = env.readyz()
        assert (status, body["suppressions"], body["admission"]) == (503, False, True)
        assert smtp.handler.transactions == 0
        assert set(ledger(ids, admin).values()) == {"queued"}
        # Allowed again: the next reader loads the list before anything goes.
        grant(admin_kafka, acl)
        [failed] = env.events("email.failed", expect=1, timeout=90)
        [sent] = env.events("email.sent", expect=1, timeout=30)
        assert env.readyz()[0] == 200
    assert (failed["message_id"], sent["message_id"]) == tuple(ids)
    assert failed["reason"].startswith("suppressed")
    assert [r.rcpt_tos for r in smtp.handler.received] == [["welcome@example.com"]]


def test_a_reader_that_dies_while_following_pauses_sending_until_a_new_one_caught_up(
        env, smtp, admin_kafka, namespace, admin):
    acl = read_acl(namespace + "email.suppressions")
    first = request(to="first@example.com")
    with SenderThread(env.settings()) as running:
        env.produce([first])
        env.events("email.sent", expect=1, timeout=60)
        assert running.sender is not None
        reader = running.sender.feed.reader
        assert reader is not None and reader.running()
        revoke(admin_kafka, acl)
        wait_until("the reader died", lambda: not reader.running())
        wait_until("not ready", lambda: env.readyz()[0] == 503)
        later = request(to="later@example.com")
        env.produce([later])
        wait_until("admitted", lambda: ledger([later["message_id"]], admin))
        # Replacements keep being refused; the admitted message stays queued.
        restarts = counter("mailbus_sender_suppression_reader_restarts_total")
        wait_until("a replacement refused", lambda: counter(
            "mailbus_sender_suppression_reader_restarts_total") >= restarts + 1)
        assert ledger([later["message_id"]], admin) == {later["message_id"]: "queued"}
        assert [r.rcpt_tos for r in smtp.handler.received] == [["first@example.com"]]
        grant(admin_kafka, acl)
        sent = env.events("email.sent", expect=2, timeout=90)
        assert env.readyz()[0] == 200
    assert {e["message_id"] for e in sent} == {first["message_id"], later["message_id"]}


def test_admission_survives_a_postgresql_error_and_admits_every_message_once(
        env, smtp, admin, namespace):
    owner = ServiceSettings(service_name="owner")
    sender_role = SenderSettings().postgres
    events = [request(to=f"r{i}@example.com", subject=f"n{i}") for i in range(40)]
    held = events[20]
    errors = counter("mailbus_sender_admission_errors_total")
    with SenderThread(env.settings()) as running, \
            psycopg.connect(owner.postgres.conninfo()) as blocker, \
            psycopg.connect(sender_role.conninfo(), autocommit=True) as killer:
        wait_until("ready", lambda: env.readyz()[0] == 200)
        # An uncommitted row with the same message id: admission's insert of
        # the batch waits on it...
        blocker.execute(
            "INSERT INTO send_ledger (message_id, namespace, account_id, source_partition,"
            " due_at, payload) VALUES (%s, %s, 'dev', 0, now(), '')",
            (held["message_id"], namespace))
        blocker_pid = blocker.info.backend_pid
        env.produce(events)

        def waiting() -> list[int]:
            return [r[0] for r in killer.execute(
                "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                (blocker_pid,)).fetchall()]

        wait_until("admission blocked", waiting)
        # ...and its connection is killed under it, as a server restart would.
        for pid in waiting():
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_until("the error counted",
                   lambda: counter("mailbus_sender_admission_errors_total") > errors)
        # The retry waits on the same row: admission is down, and says so.
        wait_until("admission blocked again", waiting)
        assert running.sender is not None
        assert running.sender.readiness()["admission"] is False
        assert env.readyz()[0] == 503
        blocker.rollback()
        sent = env.events("email.sent", expect=len(events), timeout=90)
        wait_until("ready again", lambda: env.readyz()[0] == 200)
    wanted = {e["message_id"] for e in events}
    assert Counter(e["message_id"] for e in sent) == Counter(wanted)
    received = Counter(m["X-Mailbus-Message-Id"] for m in smtp.handler.messages())
    assert received == Counter(wanted)  # every message admitted, each sent once
    assert set(ledger(list(wanted), admin).values()) == {"sent"}


def test_admission_survives_a_kafka_error_and_loses_nothing(env, smtp, admin_kafka, namespace,
                                                            admin):
    acl = read_acl(namespace + "email.requested")
    errors = counter("mailbus_sender_admission_errors_total")
    first = request(to="first@example.com")
    with SenderThread(env.settings()) as running:
        env.produce([first])
        env.events("email.sent", expect=1, timeout=60)
        revoke(admin_kafka, acl)
        wait_until("the error counted",
                   lambda: counter("mailbus_sender_admission_errors_total") > errors)
        events = [request(to=f"k{i}@example.com") for i in range(20)]
        env.produce(events)
        # Records wait that admission cannot read (librdkafka now retries the
        # fetch quietly): the stall is seen, and admission is down until it reads.
        stalls = counter("mailbus_sender_admission_errors_total")
        wait_until("the stall counted",
                   lambda: counter("mailbus_sender_admission_errors_total") > stalls)
        assert running.sender is not None and running.sender.admission.healthy is False
        status, body = env.readyz()
        assert (status, body["admission"]) == (503, False)
        assert len(smtp.handler.received) == 1
        grant(admin_kafka, acl)
        sent = env.events("email.sent", expect=21, timeout=120)
        wait_until("ready again", lambda: env.readyz()[0] == 200)
    wanted = {e["message_id"] for e in [first, *events]}
    assert Counter(e["message_id"] for e in sent) == Counter(wanted)
    assert Counter(m["X-Mailbus-Message-Id"] for m in smtp.handler.messages()) == Counter(wanted)
    assert set(ledger(list(wanted), admin).values()) == {"sent"}


def test_an_account_worker_that_ends_is_restarted_and_its_mail_still_goes(env, smtp):
    with SenderThread(env.settings()) as running:
        wait_until("ready", lambda: env.readyz()[0] == 200)
        sender = running.sender
        assert sender is not None and running._loop is not None
        dead = sender._worker_tasks["dev"]
        running._loop.call_soon_threadsafe(dead.cancel)  # the task ends, as a crash would
        wait_until("a new worker", lambda: sender._worker_tasks["dev"] is not dead)
        assert dead.done()
        event = request(to="after@example.com")
        env.produce([event])
        [sent] = env.events("email.sent", expect=1, timeout=60)
        assert env.readyz()[0] == 200
    assert sent["message_id"] == event["message_id"]
