"""The projector: every pipeline event into PostgreSQL, for the API's status, timeline and reports.

One confluent-kafka consumer (group `<prefix>mailbus-projector`, principal
`confirm`) reads the per-message topics, email.requested and the
suppression list (into the `suppressions` table, latest state per address). Each batch is
written in one transaction (`project`), and only then are its offsets
committed. When the write fails (PostgreSQL down, a lock conflict) nothing
is committed: the consumer seeks back to the batch's first offsets, waits
(exponential backoff, capped) and reads the same records again, so it
catches up after an outage and loses nothing. Between retries it keeps
calling consume(), so it never overstays max.poll.interval.ms and keeps its
partitions.

A record that does not decode, or whose ids are not UUIDs, is logged with
topic/partition/offset and skipped: the `confirm` principal may not write
the dead-letter topic, so the log is where it goes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from functools import partial
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from psycopg.types.json import Jsonb
from pydantic import Field

from mailbus import queries, runtime, topics
from mailbus.codec import Registry
from mailbus.confirm import metrics
from mailbus.confirm.projection import (
    SUPPRESSION_SCHEMA,
    SuppressionRow,
    fold,
    increments,
    suppression_row,
)
from mailbus.errors import DecodeError
from mailbus.lag import LagReporter
from mailbus.search import Findable, SearchTerms, findable
from mailbus.settings import ServiceSettings
from mailbus.timeline import EventRow, InvalidEvent, event_row

log = logging.getLogger(__name__)
SQL = queries.load_resource(__package__, "projector.sql")
ERROR_LOG_SECONDS = 60.0
PROJECTED = (topics.REQUESTED, topics.SENT, topics.FAILED, topics.DELIVERED, topics.BOUNCED,
             topics.RESPONSES, topics.CONFIRMED, topics.SUPPRESSIONS, topics.SCHEDULE)


class ProjectorSettings(ServiceSettings):
    """The projector's settings: its own Kafka principal and mailbus_projector role."""

    service_name: str = "projector"
    group_id: str = "mailbus-projector"
    batch_size: int = Field(default=500, ge=1, le=10_000)
    poll_seconds: float = Field(default=0.5, gt=0)
    # Backoff while PostgreSQL refuses a batch: base * 2^n seconds, capped.
    retry_base_seconds: float = Field(default=0.5, gt=0)
    retry_cap_seconds: float = Field(default=10.0, gt=0)
    # Prometheus metrics on http://metrics_host:metrics_port/metrics; 0 disables.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9103, ge=0, le=65535)
    # How often the group's consumer lag is measured.
    lag_seconds: float = Field(default=10.0, gt=0)


def project(conn: psycopg.Connection[Any], namespace: str, rows: list[EventRow],
            suppressions: list[SuppressionRow] | None = None,
            findables: dict[str, Findable] | None = None) -> int:
    """Write one batch of events (and suppression states) in one transaction.

    `findables` are the search terms of the batch's email.requested events,
    by event id. Returns how many events were new.
    """
    findables = findables or {}
    unique: dict[str, EventRow] = {}
    for row in rows:
        unique.setdefault(row.event_id, row)
    if not unique and not suppressions:
        return 0
    ns = {"namespace": namespace}
    message_ids = sorted({r.message_id for r in unique.values()})
    with conn.transaction(), conn.cursor() as cur:
        if suppressions:
            # Sorted by key, as every lock taken here.
            cur.executemany(SQL["upsert_suppression"], [
                ns | vars(s) for s in sorted(suppressions,
                                             key=lambda s: (s.address_hash, s.scope))])
        if not unique:
            return 0
        cur.execute(SQL["ensure_status"], ns | {"ids": message_ids})
        cur.execute(SQL["lock_status"], ns | {"ids": message_ids})
        state = {mid: (kinds, account, (key, at)) for mid, kinds, account, key, at
                 in cur.fetchall()}
        cur.execute(SQL["known_events"], ns | {"ids": sorted(unique)})
        known = {eid for (eid,) in cur.fetchall()}
        per_message: dict[str, list[EventRow]] = defaultdict(list)
        for row in unique.values():
            if row.event_id not in known:
                per_message[row.message_id].append(row)
        events: list[dict[str, Any]] = []
        statuses: list[dict[str, Any]] = []
        counted: list[tuple[Any, ...]] = []
        terms = SearchTerms()
        for message_id, new in sorted(per_message.items()):
            kinds, account, scope = state[message_id]
            result = fold(kinds, account, new)
            scope = terms.add(message_id, scope, kinds, result.account_id, new, findables)
            statuses.append(ns | {"message_id": message_id, "kinds": sorted(result.kinds),
                                  "status": result.status, "account_id": result.account_id,
                                  "key_id": scope[0], "requested_at": scope[1]})
            for row in new:
                day, counted_account = result.counted.get(row.event_id, (None, None))
                if day is not None:
                    counted.append((row.kind, day, counted_account))
                events.append(ns | {
                    "event_id": row.event_id, "message_id": row.message_id, "kind": row.kind,
                    "occurred_at": row.occurred_at, "account_id": row.account_id,
                    "detail": Jsonb(row.detail), "counted_day": day,
                    "counted_account": counted_account})
        if events:
            # Sorted, as every lock taken here: concurrent batches cannot deadlock.
            events.sort(key=lambda e: str(e["event_id"]))
            # One statement each for the batch: per-row statements cost the
            # server a parse, bind and execute apiece, the bulk of its work here.
            cur.execute(SQL["insert_event"], ns | {
                "event_ids": [e["event_id"] for e in events],
                "message_ids": [e["message_id"] for e in events],
                "kinds": [e["kind"] for e in events],
                "occurred": [e["occurred_at"] for e in events],
                "accounts": [e["account_id"] for e in events],
                "details": [e["detail"] for e in events],
                "days": [e["counted_day"] for e in events],
                "counted_accounts": [e["counted_account"] for e in events]})
            columns = ns | {"ids": [s["message_id"] for s in statuses],
                            "statuses": [s["status"] for s in statuses]}
            cur.execute(SQL["update_status"], columns | {
                "kinds": [",".join(s["kinds"]) for s in statuses],
                "accounts": [s["account_id"] for s in statuses],
                "key_ids": [s["key_id"] for s in statuses],
                "requested": [s["requested_at"] for s in statuses]})
            cur.execute(SQL["update_message"], columns)
            if terms.rows:
                cur.execute(SQL["insert_search"], ns | terms.columns())
            if terms.sent_before:
                cur.execute(SQL["insert_sent_accounts"], ns | {"ids": sorted(terms.sent_before)})
        if counted:
            cur.executemany(SQL["count"], [ns | row for row in increments(counted)])
    for kind, n in Counter(e["kind"] for e in events).items():  # once committed
        metrics.PROJECTED.labels(kind).inc(n)
    return len(events)


class Projector:
    """The consumer loop: consume a batch, write it, commit its offsets; retry on failure."""

    def __init__(self, settings: ProjectorSettings, registry: Registry | None = None):
        self.settings = settings
        self.namespace = settings.kafka.topic_prefix
        self.registry = registry or Registry.load()
        self.topics = [settings.kafka.topic(t) for t in PROJECTED]
        self.group = runtime.group_id(settings, settings.group_id)
        # Offsets are committed by hand (CONSUMER_DEFAULTS), after the transaction committed.
        self.config = runtime.consumer_config(settings, settings.group_id)
        self.lag_config = runtime.consumer_config(settings, settings.group_id, "lag")
        self._consumer: Consumer  # made in run(): building the projector connects nothing
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._logged: dict[str, float] = {}
        self.projected = 0  # events newly written, since start
        self.failures = 0  # batches PostgreSQL refused, since start

    def run(self) -> None:
        """Project until stop(); leaves the group on the way out."""
        s = self.settings
        self._consumer = Consumer(self.config)
        self._consumer.subscribe(self.topics)
        log.info("projector: namespace %r, topics %s", self.namespace, self.topics)
        delay = s.retry_base_seconds
        try:
            while not self._stop.is_set():
                messages = self._consumer.consume(s.batch_size, s.poll_seconds)
                if not messages:
                    continue
                if self._apply(messages):
                    delay = s.retry_base_seconds
                    self._commit(messages)
                else:
                    self._rewind(messages)
                    self._stop.wait(delay)
                    delay = min(delay * 2, s.retry_cap_seconds)
        finally:
            self._consumer.close()
            self._disconnect()
            log.info("projector stopped")

    def stop(self) -> None:
        """Ask run() to return after the current batch (safe from any thread or signal)."""
        self._stop.set()

    def _apply(self, messages: list[Message]) -> bool:
        found: dict[str, Findable] = {}  # the search terms of email.requested, by event id
        decoded = [row for msg in messages if (row := self._row(msg, found)) is not None]
        rows = [r for r in decoded if isinstance(r, EventRow)]
        states = [r for r in decoded if isinstance(r, SuppressionRow)]
        try:
            self.projected += project(self._connection(), self.namespace, rows, states, found)
        except psycopg.Error as exc:
            self.failures += 1
            metrics.BATCH_ERRORS.inc()
            # Broken or not, start over on a fresh connection next time.
            self._disconnect()
            log.warning("projector: batch of %d not written, will retry: %s: %s",
                        len(messages), type(exc).__name__, str(exc).strip())
            return False
        return True

    def _row(self, msg: Message, found: dict[str, Findable]) -> EventRow | SuppressionRow | None:
        err = msg.error()
        if err is not None:
            self._consume_error(err)
            return None
        if msg.value() is None:  # a tombstone of the compacted suppressions topic
            return None
        where = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
        try:
            name, record = self.registry.decode(msg.value() or b"")
            if name == SUPPRESSION_SCHEMA:
                return suppression_row(record)
            row = event_row(name, record)
            if row.kind == "requested" and (terms := findable(row.message_id, record)):
                found[row.event_id] = terms
            return row
        except (DecodeError, InvalidEvent) as exc:
            # No DLQ: the confirm principal may not write one. Logged and skipped.
            log.error("projector: skipping %s: %s", where, exc)
            return None

    def _consume_error(self, err: KafkaError) -> None:
        # librdkafka repeats an error (e.g. no READ on a topic) on every fetch:
        # log each distinct one once a minute, not once a poll.
        if err.code() == KafkaError._PARTITION_EOF:
            return
        now = time.monotonic()
        text = str(err)
        if now - self._logged.get(text, -ERROR_LOG_SECONDS) >= ERROR_LOG_SECONDS:
            self._logged[text] = now
            log.warning("projector: consume: %s", text)

    def _commit(self, messages: list[Message]) -> None:
        offsets = _next_offsets(messages)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Partitions moved meanwhile: the new owner reads them again, and
            # the writes are idempotent.
            log.warning("projector: commit failed (records will be re-read): %s", exc)

    def _rewind(self, messages: list[Message]) -> None:
        first: dict[tuple[str, int], int] = {}
        for msg in messages:
            if msg.error() is None:
                key = (msg.topic() or "", msg.partition() or 0)
                first[key] = min(first.get(key, msg.offset() or 0), msg.offset() or 0)
        for (topic, partition), offset in first.items():
            try:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: its new owner re-reads it
                log.info("projector: not rewinding %s/%d: %s", topic, partition, exc)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.settings.postgres.conninfo(), autocommit=True,
                                         connect_timeout=5)
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """Per partition, the offset after the last record of the batch."""
    last: dict[tuple[str, int], int] = {}
    for msg in messages:
        if msg.error() is None:
            key = (msg.topic() or "", msg.partition() or 0)
            last[key] = max(last.get(key, -1), msg.offset() or 0)
    return [TopicPartition(t, p, o + 1) for (t, p), o in sorted(last.items())]


def build(settings: ProjectorSettings) -> runtime.Service:
    """The projector wired from its settings; its consumer connects when it runs."""
    projector = Projector(settings)
    return runtime.Service(settings, {"consumer": projector.config, "lag": projector.lag_config},
                           partial(_run, projector), {"projector": projector})


def _run(projector: Projector) -> None:
    settings = projector.settings
    runtime.on_stop(projector.stop)
    runtime.metrics_server(settings.metrics_host, settings.metrics_port)
    lag = LagReporter(projector.lag_config, projector.group,
                      projector.topics).start(settings.lag_seconds)
    try:
        projector.run()
    finally:
        lag.close()


def main(settings: ProjectorSettings | None = None) -> None:
    """`mailbus projector`: project events into PostgreSQL until SIGTERM or SIGINT."""
    runtime.start(ProjectorSettings, build, settings)
