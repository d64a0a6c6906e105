"""From the event topics into the deliveries table: live, and rewinds.

Live: one consumer in the group `<prefix>mailbus-webhooks` reads every
outcome topic; each batch's deliveries are written in one transaction, and
only then are its offsets committed (as the projector does). A crash
between the two reads the batch again, and `enqueue` ignores what it
already holds, so nothing is lost and nothing queued twice.

Rewind: for a replay asked through the API, a second consumer outside the
group (assign(), nothing committed) reads every outcome topic from the
replay's `since` up to where each partition ended when the replay started,
and queues that endpoint's matching events in the replay's own lane. Live
deliveries go on meanwhile in theirs. A crash during a replay starts it
over; what it already queued is not queued twice.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from mailbus import queries, runtime, topics
from mailbus.codec import Registry
from mailbus.errors import DecodeError
from mailbus.timeline import InvalidEvent, event_row
from mailbus.webhook_events import Event, event_of
from mailbus.webhooks import metrics
from mailbus.webhooks.rules import LIVE_LANE
from mailbus.webhooks.settings import WebhooksSettings

log = logging.getLogger(__name__)
SQL = queries.load_resource(__package__, "queries.sql")
# Every outcome of a message; email.requested is the client's own request.
READ = (topics.SENT, topics.FAILED, topics.DELIVERED, topics.BOUNCED, topics.RESPONSES,
        topics.CONFIRMED, topics.SCHEDULE)
REPLAY_CHECK_SECONDS = 1.0
# How long the group waits for a member that stopped heartbeating (a killed
# instance) before its partitions move: librdkafka's 45 s default would hold
# a restarted instance's deliveries back that long. Heartbeats come from
# librdkafka's own thread, so a busy Python loop does not miss them.
SESSION_TIMEOUT_MS = 10_000


def decode(registry: Registry, msg: Message) -> Event | None:
    """The webhook event of a record; None (logged) for what no endpoint receives."""
    if msg.error() is not None or msg.value() is None:
        return None
    try:
        name, record = registry.decode(msg.value() or b"")
        return event_of(event_row(name, record))
    except (DecodeError, InvalidEvent) as exc:
        metrics.SKIPPED.inc()
        log.error("webhooks: skipping %s/%s/%s: %s", msg.topic(), msg.partition(),
                  msg.offset(), exc)
        return None


def enqueue(conn: psycopg.Connection[Any], namespace: str, events: list[Event],
            lane: str = LIVE_LANE, endpoint_id: str | None = None) -> int:
    """Queue the deliveries of these events, in one transaction; how many rows were new."""
    if not events:
        return 0
    with conn.transaction(), conn.cursor() as cur:
        # Pipelined by psycopg: one round trip for the batch; rowcount is
        # the sum over every statement.
        cur.executemany(SQL["enqueue"], [{
            "lane": lane, "endpoint_id": endpoint_id, "namespace": namespace,
            "event_id": event.event_id, "message_id": event.message_id,
            "event_type": event.event_type, "occurred_at": event.occurred_at,
            "body": event.body} for event in events])
        queued = max(cur.rowcount, 0)
    metrics.QUEUED.labels("live" if lane == LIVE_LANE else "replay").inc(queued)
    return queued


class Intake:
    """The live consumer loop: consume, queue, commit; on a database error, read again."""

    def __init__(self, settings: WebhooksSettings, registry: Registry, stop: threading.Event):
        self.settings = settings
        self.namespace = settings.kafka.topic_prefix
        self.registry = registry
        self.topics = [settings.kafka.topic(t) for t in READ]
        self.group = runtime.group_id(settings, settings.group_id)
        # Committed by hand (CONSUMER_DEFAULTS), once the deliveries are in PostgreSQL.
        self.config = runtime.consumer_config(
            settings, settings.group_id, overrides={"session.timeout.ms": SESSION_TIMEOUT_MS})
        self._stop = stop
        self._conn: psycopg.Connection[Any] | None = None

    def run(self) -> None:
        """Queue deliveries until the stop event is set."""
        s = self.settings
        consumer = Consumer(self.config)
        consumer.subscribe(self.topics)
        delay = 0.5
        try:
            while not self._stop.is_set():
                messages = consumer.consume(s.batch_size, s.poll_seconds)
                if not messages:
                    continue
                events = [e for m in messages if (e := decode(self.registry, m)) is not None]
                try:
                    enqueue(self._connection(), self.namespace, events)
                except psycopg.Error as exc:
                    log.warning("webhooks: batch of %d not queued, will retry: %s",
                                len(messages), exc)
                    self._disconnect()
                    _rewind(consumer, messages)
                    self._stop.wait(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                delay = 0.5
                _commit(consumer, messages)
        finally:
            consumer.close()
            self._disconnect()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.settings.postgres.conninfo(), autocommit=True,
                                         connect_timeout=5)
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Rewinds:
    """Works off replays asked through the API, one at a time, beside the live intake."""

    def __init__(self, settings: WebhooksSettings, registry: Registry, stop: threading.Event):
        self.settings = settings
        self.namespace = settings.kafka.topic_prefix
        self.registry = registry
        # The service's own group id: librdkafka looks its coordinator up even
        # for assign(); nothing is committed, so the group's live offsets are
        # not touched.
        self.config = runtime.consumer_config(settings, settings.group_id, "replay")
        self._stop = stop

    def run(self) -> None:
        """Look for pending replays until the stop event is set."""
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.wait(REPLAY_CHECK_SECONDS):
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.settings.postgres.conninfo(),
                                               autocommit=True, connect_timeout=5)
                    self.run_pending(conn)
                except (psycopg.Error, KafkaException) as exc:
                    log.warning("webhooks: replays paused: %s", exc)
                    if conn is not None:
                        conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    def run_pending(self, conn: psycopg.Connection[Any]) -> None:
        """Work off every pending replay of the namespace, oldest first."""
        for replay_id, endpoint_id, since in conn.execute(
                SQL["pending_replays"], {"namespace": self.namespace}).fetchall():
            if self._stop.is_set():
                return
            queued = self.replay(conn, str(replay_id), str(endpoint_id), since)
            if self._stop.is_set():
                return  # cut short: still pending, started over next time
            conn.execute(SQL["finish_replay"], {"id": replay_id, "queued": queued})
            log.info("webhooks: replay %s queued %d deliveries", replay_id, queued)

    def replay(self, conn: psycopg.Connection[Any], replay_id: str, endpoint_id: str,
               since: Any) -> int:
        """Queue the endpoint's events since `since` into the replay's lane."""
        s = self.settings
        consumer = Consumer(self.config)
        try:
            ends = self._positions(consumer, int(since.timestamp() * 1000))
            consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in ends.items()
                             if start < ends[(t, p)][1]])
            left = {tp for tp, (start, end) in ends.items() if start < end}
            queued = 0
            while left and not self._stop.is_set():
                batch = [m for m in consumer.consume(s.batch_size, s.poll_seconds)
                         if m.error() is None
                         and (m.topic() or "", m.partition() or 0) in left]
                batch = [m for m in batch
                         if (m.offset() or 0) < ends[(m.topic() or "", m.partition() or 0)][1]]
                events = [e for m in batch if (e := decode(self.registry, m)) is not None]
                queued += enqueue(conn, self.namespace, events, replay_id, endpoint_id)
                # Done with a partition once its position passed the end, also
                # when the last offsets hold no record to return.
                for tp in consumer.position([TopicPartition(t, p) for t, p in left]):
                    if tp.offset >= ends[(tp.topic, tp.partition)][1]:
                        left.discard((tp.topic, tp.partition))
            return queued
        finally:
            consumer.close()

    def _positions(self, consumer: Consumer, since_ms: int
                   ) -> dict[tuple[str, int], tuple[int, int]]:
        """Per partition: the first offset at or after `since`, and the end now."""
        wanted = []
        for logical in READ:
            topic = self.settings.kafka.topic(logical)
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            wanted += [TopicPartition(topic, p, since_ms) for p in meta.partitions]
        out: dict[tuple[str, int], tuple[int, int]] = {}
        for tp in consumer.offsets_for_times(wanted, timeout=10):
            _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                     timeout=10)
            # -1: no record at or after `since` in this partition.
            start = tp.offset if tp.offset >= 0 else high
            out[(tp.topic, tp.partition)] = (start, high)
        return out


def _commit(consumer: Consumer, messages: list[Message]) -> None:
    last: dict[tuple[str, int], int] = {}
    for msg in messages:
        if msg.error() is None:
            key = (msg.topic() or "", msg.partition() or 0)
            last[key] = max(last.get(key, -1), msg.offset() or 0)
    offsets = [TopicPartition(t, p, o + 1) for (t, p), o in sorted(last.items())]
    if not offsets:
        return
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as exc:
        # Partitions moved meanwhile: the new owner reads them again; enqueue
        # is idempotent.
        log.warning("webhooks: commit failed (records will be re-read): %s", exc)


def _rewind(consumer: Consumer, messages: list[Message]) -> None:
    first: dict[tuple[str, int], int] = {}
    for msg in messages:
        if msg.error() is None:
            key = (msg.topic() or "", msg.partition() or 0)
            first[key] = min(first.get(key, msg.offset() or 0), msg.offset() or 0)
    for (topic, partition), offset in first.items():
        try:
            consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:
            log.info("webhooks: not rewinding %s/%d: %s", topic, partition, exc)

