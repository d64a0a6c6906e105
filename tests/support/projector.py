"""Projector test helpers: event builders, a projector in a thread, database probes."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from mailbus.codec import Registry
from mailbus.confirm.projector import PROJECTED, Projector, ProjectorSettings
from mailbus.settings import ServiceSettings

T = TypeVar("T")
READER = ServiceSettings(service_name="ingest")  # the role that may read the projection



def head(message_id: str, at: datetime) -> dict[str, Any]:
    """The fields every event has."""
    return {"event_id": str(uuid.uuid4()), "message_id": message_id, "occurred_at": at}


def requested(message_id: str, at: datetime, account: str = "dev") -> tuple[str, dict[str, Any]]:
    """An email.requested record, as a producer other than the API would write it."""
    return "email.requested", head(message_id, at) | {
        "account_id": account, "pool": None, "key_id": "other-producer", "idempotency_key": None,
        "to": [{"email": "ada@example.com", "name": None}], "cc": [], "bcc": [],
        "reply_to": None, "subject": "hi", "text": "body", "html": None, "template": None,
        "actions": [], "tags": [], "metadata": {}, "send_at": None, "requested_at": at}


def sent(message_id: str, at: datetime, account: str = "dev",
         recipients: Iterable[str] = ("ada@example.com",)) -> tuple[str, dict[str, Any]]:
    """An email.sent record."""
    return "email.sent", head(message_id, at) | {
        "account_id": account, "transport": "smtp", "recipients": list(recipients),
        "provider_message_id": None, "rfc822_message_id": f"<{message_id}@mailbus>",
        "smtp_response": "250 2.0.0 Ok: queued", "attempt": 1, "requested_at": None,
        "possible_duplicate": False, "send_latency_us": 1500}


def delivered(message_id: str, at: datetime, recipient: str = "ada@example.com",
              account: str | None = "dev") -> tuple[str, dict[str, Any]]:
    """An email.delivered record."""
    return "email.delivered", head(message_id, at) | {
        "account_id": account, "recipient": recipient, "evidence": "smtp_final",
        "detail": "250 2.0.0 Ok"}


def failed(message_id: str, at: datetime, recipient: str | None = None,
           account: str = "dev") -> tuple[str, dict[str, Any]]:
    """An email.failed record (for one recipient, or the whole message)."""
    return "email.failed", head(message_id, at) | {
        "account_id": account, "reason": "550 5.1.1 no such user", "code": 550,
        "enhanced_status": "5.1.1", "permanent": True, "recipient": recipient, "attempt": 1}


def bounced(message_id: str, at: datetime) -> tuple[str, dict[str, Any]]:
    """An email.bounced record."""
    return "email.bounced", head(message_id, at) | {
        "account_id": None, "recipient": "ada@example.com", "bounce_class": "hard",
        "status_code": "5.1.1", "diagnostic": "smtp; 550 5.1.1 user unknown"}


def responded(message_id: str, at: datetime, kind: str = "reply", **fields: Any
              ) -> tuple[str, dict[str, Any]]:
    """An email.responses record (a reply unless told otherwise)."""
    return "email.responses", head(message_id, at) | {
        "account_id": "dev", "kind": kind, "recipient": "ada@example.com",
        "action_id": None, "subject": "Re: hi", "text": "Yes!", "reliable": True,
        "source": "imap:dev"} | fields


def suppression(address: str, at: datetime, *, active: bool = True, reason: str = "unsubscribe",
                scope: str | None = None, message_id: str | None = None
                ) -> tuple[str, dict[str, Any]]:
    """An email.suppressions record (keyed by the address hash)."""
    address = address.lower()
    return "email.suppressions", {
        "event_id": str(uuid.uuid4()), "message_id": message_id, "occurred_at": at,
        "address": address, "address_hash": hashlib.sha256(address.encode()).hexdigest(),
        "reason": reason, "scope": scope, "active": active}


def confirmed(message_id: str, at: datetime, outcome: str = "confirmed",
              account: str = "dev") -> tuple[str, dict[str, Any]]:
    """An email.confirmed record (a confirmed or an unconfirmed verdict)."""
    ok = outcome == "confirmed"
    return "email.confirmed", head(message_id, at) | {
        "account_id": account, "outcome": outcome, "evidence": "smtp_final" if ok else "unknown",
        "requested_at": None, "sent_at": at - timedelta(seconds=2),
        "delivered_at": at if ok else None, "sent_to_delivered_us": 2_000_000 if ok else None,
        "requested_to_delivered_us": None}


def scheduled(message_id: str, at: datetime, change: str = "cancelled",
              send_at: datetime | None = None, account: str = "dev"
              ) -> tuple[str, dict[str, Any]]:
    """An email.schedule record: a cancel, or a reschedule to send_at."""
    return "email.schedule", head(message_id, at) | {
        "account_id": account, "key_id": "k1", "change": change, "send_at": send_at,
        "reason": "changed plans"}


def produce(config: dict[str, Any], namespace: str, registry: Registry,
            events: Iterable[tuple[str, dict[str, Any]]], raw: Iterable[tuple[str, bytes]] = (),
            partition: int | None = None) -> None:
    """Append events as their producers do: email.requested keyed by account, the rest by
    message id; `raw` values go as they are (for records that must not decode). With
    `partition`, every event goes to that partition of its topic, keyed all the same."""
    producer = Producer({**config, "enable.idempotence": True})
    # -1: librdkafka's "unassigned", the partitioner picks by key.
    where = -1 if partition is None else partition
    for topic, event in events:
        field = {"email.requested": "account_id",
                 "email.suppressions": "address_hash"}.get(topic, "message_id")
        key = event[field]
        producer.produce(namespace + topic, registry.encode(topic, event), key=key.encode(),
                         partition=where)
    for topic, value in raw:
        producer.produce(namespace + topic, value, key=b"junk")
    assert producer.flush(30) == 0


def lag(config: dict[str, Any], namespace: str, group: str = "mailbus-projector",
        topics: Iterable[str] = PROJECTED) -> int:
    """Records of the topics (the projected ones) the group has not committed yet."""
    consumer = Consumer({**config, "group.id": namespace + group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(namespace + t, p)
                 for t in topics
                 for p in consumer.list_topics(namespace + t, timeout=10)
                 .topics[namespace + t].partitions]
        committed = consumer.committed(parts, timeout=10)
        total = 0
        for tp in committed:
            high = consumer.get_watermark_offsets(tp, timeout=10)[1]
            total += high - max(tp.offset, 0)
        return total
    finally:
        consumer.close()


def eventually(check: Callable[[], T], timeout: float = 60.0) -> T:
    """Retry `check` until it stops raising AssertionError (or the deadline passes)."""
    for attempt in Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.1),
                            retry=retry_if_exception_type(AssertionError), reraise=True):
        with attempt:
            return check()
    raise AssertionError("unreachable")


def rows(query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the projection as the API's role does."""
    with psycopg.connect(READER.postgres.conninfo()) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def daily(namespace: str) -> dict[str, tuple[int, ...]]:
    """daily_counts of a namespace: account -> (requested, sent, delivered, confirmed,
    failed, bounced, unconfirmed), summed over days."""
    found = rows("SELECT account_id, sum(requested), sum(sent), sum(delivered), sum(confirmed),"
                 " sum(failed), sum(bounced), sum(unconfirmed) FROM daily_counts"
                 " WHERE namespace = %s GROUP BY account_id", namespace)
    return {r[0]: tuple(int(n) for n in r[1:]) for r in found}


def snapshot(namespace: str) -> tuple[Any, ...]:
    """Everything the projector wrote for a namespace."""
    return (
        rows("SELECT event_id, message_id, kind, occurred_at, account_id, detail, counted_day,"
             " counted_account FROM message_events WHERE namespace = %s ORDER BY event_id",
             namespace),
        rows("SELECT message_id, account_id, kinds, status, updated_at FROM message_status"
             " WHERE namespace = %s ORDER BY message_id", namespace),
        rows("SELECT day, account_id, requested, sent, delivered, confirmed, failed, bounced,"
             " unconfirmed FROM daily_counts WHERE namespace = %s ORDER BY 1, 2", namespace),
    )


def settings_for(namespace: str, **overrides: Any) -> ProjectorSettings:
    """Fast-retrying projector settings on a namespace."""
    return ProjectorSettings(kafka={"topic_prefix": namespace}, poll_seconds=0.2,
                             retry_base_seconds=0.1, retry_cap_seconds=0.5, **overrides)


@contextmanager
def projector_running(settings: ProjectorSettings) -> Iterator[Projector]:
    """The projector consuming in a thread until the block ends."""
    projector = Projector(settings)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            projector.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield projector
    finally:
        projector.stop()
        thread.join(30)
    assert not thread.is_alive(), "projector did not stop"
    assert not errors, errors
