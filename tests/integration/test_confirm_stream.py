"""The confirm stream against the real broker, as principal `confirm`, in a subprocess."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from mailbus.codec import Registry
from mailbus.confirm import join

SOURCES = ("email.sent", "email.delivered", "email.failed", "email.bounced")
RUN = "from mailbus.confirm.settings import ConfirmSettings as S;" \
      "from mailbus.confirm.stream import main; main(S())"
ACCOUNTS = """
[[accounts]]
id = "dev"
kind = "smtp"
from_address = "dev@example.test"
[accounts.smtp]
host = "127.0.0.1"

[[accounts]]
id = "fast"
kind = "smtp"
from_address = "fast@example.test"
confirm_within_seconds = 1
[accounts.smtp]
host = "127.0.0.1"
"""


@pytest.fixture(autouse=True)
def faust_leftovers(namespace: str, admin_kafka: dict[str, Any]) -> Iterator[None]:
    """Remove what Faust created (changelog and leader topics) and the group, after the test.

    The namespace fixture drops the pipeline's topics only.
    """
    yield
    admin = AdminClient(admin_kafka)
    owned = [t for t in admin.list_topics(timeout=10).topics
             if t.startswith(namespace + "mailbus-confirm-")]
    for future in [*admin.delete_topics(owned).values(),
                   *admin.delete_consumer_groups([namespace + "mailbus-confirm"]).values()]:
        with contextlib.suppress(KafkaException):  # gone already, or a member not expired
            future.result(30)


class Worker:
    """`mailbus confirm` in a subprocess; its output goes to a log printed on failure."""

    def __init__(self, namespace: str, tmp: Path, **env: str):
        accounts = tmp / "accounts.toml"
        accounts.write_text(ACCOUNTS)
        self.env = {**os.environ, "MAILBUS_KAFKA__TOPIC_PREFIX": namespace,
                    "MAILBUS_ACCOUNTS_FILE": str(accounts), "MAILBUS_TIMER_SECONDS": "0.5",
                    "MAILBUS_BATCH_SECONDS": "0.1", "MAILBUS_DATA_DIR": str(tmp / "faust"),
                    "MAILBUS_COMMIT_INTERVAL_SECONDS": "0.5", "MAILBUS_METRICS_PORT": "0",
                    # A killed worker's partitions are handed on after this.
                    "MAILBUS_SESSION_TIMEOUT_SECONDS": "6", **env}
        self.log = tmp / "confirm.log"
        self.offset = 0  # where the current run's output starts in the log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> Worker:
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", RUN], env={**self.env, **env},
                                         stdout=out, stderr=subprocess.STDOUT)
        self.wait_for(lambda: "Worker]: Ready" in self.text(self.offset), 60)
        return self

    def text(self, start: int = 0) -> str:
        return self.log.read_bytes()[start:].decode(errors="replace")

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Poll until predicate holds; fail at the deadline or if the worker died."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc is not None and self.proc.poll() is None, "the worker exited"
            if time.monotonic() > deadline:
                self.dump_tasks()
                raise AssertionError(f"timed out after {timeout} s")
            time.sleep(0.1)

    def dump_tasks(self) -> None:
        """Have the worker log its threads' and tasks' stacks (mode's SIGUSR1 handler)."""
        assert self.proc is not None
        size = self.log.stat().st_size
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while self.log.stat().st_size == size and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the dump is written in pieces; let it finish

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    @contextlib.contextmanager
    def running(self, **env: str) -> Iterator[Worker]:
        """Run the worker for a block; print its log if the block fails, stop it after."""
        try:
            yield self.start(**env)
        except BaseException:
            print(f"--- confirm worker log ({self.log}) ---\n{self.text()[-20000:]}")
            raise
        finally:
            self.stop()


class Events:
    """Produces sent/delivered/failed records as the sender and replies would."""

    def __init__(self, config: dict[str, Any], namespace: str, registry: Registry):
        # Keys must land where the Java client would put them (murmur2): the
        # join relies on a message's events sharing one partition number.
        self.producer = Producer({**config, "partitioner": "murmur2_random",
                                  "logger": logging.getLogger("tests.kafka")})
        self.namespace, self.registry = namespace, registry
        self.t0 = datetime.now(UTC).replace(microsecond=0)

    def _produce(self, topic: str, record: dict[str, Any]) -> None:
        self.producer.produce(self.namespace + topic, self.registry.encode(topic, record),
                              key=record["message_id"].encode())

    def sent(self, mid: str, account: str = "dev", at: float = 0) -> None:
        self._produce("email.sent", {
            "event_id": str(uuid.uuid4()), "message_id": mid, "account_id": account,
            "occurred_at": self.at(at), "transport": "smtp", "rfc822_message_id": f"<{mid}@x>",
            "recipients": ["ada@example.org"], "requested_at": self.at(at - 1)})

    def delivered(self, mid: str, at: float = 2, evidence: str = "smtp_final") -> None:
        self._produce("email.delivered", {
            "event_id": str(uuid.uuid4()), "message_id": mid, "occurred_at": self.at(at),
            "recipient": "ada@example.org", "evidence": evidence})

    def failed(self, mid: str) -> None:
        self._produce("email.failed", {
            "event_id": str(uuid.uuid4()), "message_id": mid, "occurred_at": self.at(1),
            "account_id": "dev", "reason": "550 no such user", "permanent": True})

    def at(self, seconds: float) -> datetime:
        return self.t0 + timedelta(seconds=seconds)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def _consumer(config: dict[str, Any], group: str | None = None) -> Consumer:
    # librdkafka complains on stderr when a short-lived consumer closes while
    # it still connects to the group coordinator; keep that in logging.
    return Consumer({**config, "group.id": group or f"test-{uuid.uuid4().hex}",
                     "enable.auto.commit": False, "auto.offset.reset": "earliest",
                     "logger": logging.getLogger("tests.kafka")})


def read_topic(config: dict[str, Any], topic: str) -> list[tuple[bytes, bytes | None]]:
    """Every (key, value) of a topic up to its current end: no waiting for silence."""
    consumer = _consumer(config)
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end > 0])
        out: list[tuple[bytes, bytes | None]] = []
        deadline = time.monotonic() + 30
        while sum(ends.values()) > 0 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            out.append((msg.key() or b"", msg.value()))
            if (msg.offset() or 0) + 1 >= ends[msg.partition() or 0]:
                ends[msg.partition() or 0] = 0
        assert sum(ends.values()) == 0, f"could not read {topic} to its end"
        return out
    finally:
        consumer.close()


def verdicts(config: dict[str, Any], namespace: str, registry: Registry) -> list[dict[str, Any]]:
    """Every email.confirmed record so far, decoded; checks each is keyed by its message id."""
    out = []
    for key, value in read_topic(config, namespace + "email.confirmed"):
        assert value is not None
        record = registry.decode(value, "email.confirmed")[1]
        assert key == record["message_id"].encode()
        out.append(record)
    return out


def caught_up(config: dict[str, Any], namespace: str) -> bool:
    """Whether the confirm group committed every source partition to its end.

    Faust commits an offset only after the events before it were processed and
    the producer flushed, so every verdict they caused is in email.confirmed.
    """
    consumer = _consumer(config, namespace + "mailbus-confirm")
    try:
        tps = [TopicPartition(namespace + t, p) for t in SOURCES for p in range(6)]
        committed = {(tp.topic, tp.partition): max(tp.offset, 0)
                     for tp in consumer.committed(tps, timeout=10)}
        return all(consumer.get_watermark_offsets(tp, 10)[1] == committed[tp.topic, tp.partition]
                   for tp in tps)
    finally:
        consumer.close()


def changelog(config: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The confirm table as its changelog holds it: key -> latest state."""
    table: dict[str, Any] = {}
    for key, value in read_topic(config, namespace + "mailbus-confirm-messages-changelog"):
        table[json.loads(key)] = None if value is None else json.loads(value)
    return table


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}-{uuid.uuid4()}" for i in range(n)]


def test_joins_in_either_order_and_confirms_once(namespace, tmp_path, admin_kafka, registry):
    events = Events(admin_kafka, namespace, registry)
    forward, backward, dupes, failed, alone = (ids(p, 4) for p in ("fwd", "bwd", "dup", "f", "s"))
    worker = Worker(namespace, tmp_path)
    with worker.running():
        for mid in forward + dupes:
            events.sent(mid)
        for mid in backward:
            events.delivered(mid, at=3, evidence="dsn")
        for mid in failed:
            events.failed(mid)
        for mid in alone:  # sent, never delivered; `dev` waits an hour before unconfirmed
            events.sent(mid)
        events.flush()
        for mid in forward + dupes:
            events.delivered(mid)
        for mid in backward:
            events.sent(mid)
        for mid in dupes:  # each half again, twice
            for _ in range(2):
                events.sent(mid)
                events.delivered(mid, at=9, evidence="mailbox")
        events.flush()
        worker.wait_for(lambda: caught_up(admin_kafka, namespace), 60)
        out = verdicts(admin_kafka, namespace, registry)

    assert worker.proc is not None and worker.proc.returncode == 0  # SIGTERM: a clean stop
    assert Counter(r["message_id"] for r in out) == Counter(forward + backward + dupes)
    for record in out:
        mid = record["message_id"]
        assert record["outcome"] == "confirmed" and record["account_id"] == "dev"
        assert record["event_id"] == join.verdict_id(mid, "confirmed")
        assert record["sent_at"] == events.at(0)
        assert record["requested_at"] == events.at(-1)
        if mid in backward:
            assert record["evidence"] == "dsn" and record["delivered_at"] == events.at(3)
            assert record["sent_to_delivered_us"] == 3_000_000
            assert record["requested_to_delivered_us"] == 4_000_000
        else:  # the first delivery's evidence counts, not the duplicates'
            assert record["evidence"] == "smtp_final" and record["delivered_at"] == events.at(2)
            assert record["sent_to_delivered_us"] == 2_000_000
    state = changelog(admin_kafka, namespace)
    assert all(state[m]["failed_at"] is not None and state[m]["verdict"] is None for m in failed)
    assert all(state[m]["verdict"] is None for m in alone)


@pytest.mark.serial  # one-second deadlines, waited on for 60 s: alone, not beside other tests
def test_unconfirmed_after_deadline_then_late_delivery_confirms(namespace, tmp_path,
                                                                admin_kafka, registry):
    events = Events(admin_kafka, namespace, registry)
    late, never = ids("late", 3), ids("never", 2)
    with Worker(namespace, tmp_path).running() as worker:
        for mid in late + never:
            events.sent(mid, account="fast")  # a one-second deadline
        events.flush()

        def unconfirmed() -> set[str]:
            return {r["message_id"] for r in verdicts(admin_kafka, namespace, registry)
                    if r["outcome"] == "unconfirmed"}

        worker.wait_for(lambda: unconfirmed() == set(late + never), 60)
        for mid in late:
            events.delivered(mid, at=30)
        # A later timer round's verdict: once it is out, any repeat of the
        # earlier verdicts (from this round or one before) would be too.
        sentinel = f"sentinel-{uuid.uuid4()}"
        events.sent(sentinel, account="fast")
        events.flush()
        worker.wait_for(lambda: sentinel in unconfirmed(), 60)
        worker.wait_for(lambda: caught_up(admin_kafka, namespace), 60)
        out = verdicts(admin_kafka, namespace, registry)

    by_message: dict[str, list[str]] = {}
    for record in out:
        by_message.setdefault(record["message_id"], []).append(record["outcome"])
        if record["outcome"] == "unconfirmed":
            assert record["delivered_at"] is None and record["sent_to_delivered_us"] is None
            assert record["evidence"] == "unknown" and record["account_id"] == "fast"
        else:
            assert record["sent_to_delivered_us"] == 30_000_000
    assert by_message == {**{m: ["unconfirmed", "confirmed"] for m in late},
                          **{m: ["unconfirmed"] for m in [*never, sentinel]}}


def committed_offsets(config: dict[str, Any], namespace: str) -> int:
    """How many source partitions the confirm group has committed an offset for."""
    consumer = _consumer(config, namespace + "mailbus-confirm")
    try:
        tps = [TopicPartition(namespace + t, p) for t in SOURCES for p in range(6)]
        return sum(tp.offset >= 0 for tp in consumer.committed(tps, timeout=10))
    finally:
        consumer.close()


def test_restart_recovers_the_table_and_confirms_each_pair_once(namespace, tmp_path,
                                                                admin_kafka, registry):
    """SIGKILL with pairs half-seen and nothing committed; the restart replays it all.

    The first worker commits no offsets (a 10-minute commit interval), so the
    second re-reads every phase-1 event: only the table recovered from the
    changelog stops it from confirming those pairs again, and only the
    recovered halves let the phase-2 halves complete their pairs. The kill
    comes once the changelog holds the phase-1 states, as it does a moment
    after each verdict's ack: a kill inside that moment re-emits the verdict
    with the same event_id (test_sigkill_mid_stream_loses_no_verdict).
    """
    events = Events(admin_kafka, namespace, registry)
    complete, sent_only, delivered_only = ids("c", 5), ids("s", 5), ids("d", 5)
    worker = Worker(namespace, tmp_path)
    with worker.running(MAILBUS_COMMIT_INTERVAL_SECONDS="600"):
        for mid in complete + sent_only:
            events.sent(mid)
        for mid in complete + delivered_only:
            events.delivered(mid)
        events.flush()

        def settled() -> bool:
            table = changelog(admin_kafka, namespace)
            return (all(table.get(m, {}).get("verdict") == "confirmed" for m in complete)
                    and all(m in table for m in sent_only + delivered_only))

        worker.wait_for(settled, 60)
        assert committed_offsets(admin_kafka, namespace) == 0
        worker.kill()
    assert Counter(r["message_id"] for r in verdicts(admin_kafka, namespace, registry)) \
        == Counter(complete)

    for mid in sent_only:
        events.delivered(mid, at=4)
    for mid in delivered_only:
        events.sent(mid)
    for mid in complete:  # duplicates of both halves
        events.sent(mid)
        events.delivered(mid)
    events.flush()
    with worker.running() as worker:
        worker.wait_for(lambda: caught_up(admin_kafka, namespace), 90)
        out = verdicts(admin_kafka, namespace, registry)
        assert "Restoring state from changelog topics" in worker.text(worker.offset)

    assert Counter(r["message_id"] for r in out) == Counter(complete + sent_only + delivered_only)
    assert {r["outcome"] for r in out} == {"confirmed"}
    late = {r["message_id"]: r for r in out if r["message_id"] in sent_only}
    assert all(r["sent_to_delivered_us"] == 4_000_000 for r in late.values())


def test_sigkill_mid_stream_loses_no_verdict(namespace, tmp_path, admin_kafka, registry):
    """SIGKILL while verdicts flow: every pair is confirmed after the restart.

    At-least-once: a verdict acked just before the kill whose state had not
    reached the changelog yet is emitted again, with the same event_id, so a
    reader deduplicating on event_id sees each pair once. The restart recovers
    a non-empty changelog while events wait, which is where faust-streaming
    #596 dropped fetched events (see MessageTable.on_recovery_completed).
    """
    events = Events(admin_kafka, namespace, registry)
    pairs = ids("p", 1500)
    batch = 50
    worker = Worker(namespace, tmp_path, MAILBUS_BATCH_SIZE=str(batch),
                    MAILBUS_COMMIT_INTERVAL_SECONDS="0.2")
    with worker.running():
        for mid in pairs:
            events.sent(mid)
            events.delivered(mid)
        events.flush()
        worker.wait_for(lambda: len(verdicts(admin_kafka, namespace, registry)) >= 100, 60)
        worker.kill()
    at_kill = len(verdicts(admin_kafka, namespace, registry))
    assert at_kill < len(pairs), "every pair was confirmed before the kill; nothing was tested"

    with worker.running():
        worker.wait_for(lambda: caught_up(admin_kafka, namespace), 90)
        out = verdicts(admin_kafka, namespace, registry)

    counts = Counter(r["message_id"] for r in out)
    assert set(counts) == set(pairs)
    assert {(r["message_id"], r["event_id"]) for r in out} \
        == {(m, join.verdict_id(m, "confirmed")) for m in pairs}
    duplicates = sum(n - 1 for n in counts.values())
    print(f"{at_kill} verdicts before the kill, {duplicates} re-emitted after it")
    # Only the batch in flight at the kill: its verdicts were acked, its
    # states not yet (each batch waits for both before the next begins).
    assert duplicates <= batch
