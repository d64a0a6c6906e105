"""Replaying recorded records into a namespace: pacing, resuming, and the safety rules.

A replay writes each record to the same logical topic and partition under
another prefix, with its key, headers and value bytes unchanged, plus two
headers of its own: `mailbus.replay.source` (`topic/partition/offset` of the
original) and `mailbus.replay.timestamp` (the original's time, in ms). The
source header is what makes a replay resumable: before writing, the target
topics are read for the sources already there, and those records are skipped,
so an interrupted replay run again writes each record once.

The decisions (may this target be written, when is each record due, which
were written already) are pure; `run` does the I/O.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from mailbus import topics
from mailbus.errors import MailbusError
from mailbus.recording import Recorded

SOURCE_HEADER = "mailbus.replay.source"
TIMESTAMP_HEADER = "mailbus.replay.timestamp"
# A namespace becomes a topic prefix `NS.`: the same form tests and
# installations sharing a cluster use.
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Never sleep longer than this between two records, whatever the recording's
# gaps: a replay of a week at recorded speed still shows progress.
MAX_GAP_SECONDS = 60.0


class ReplayRefused(MailbusError):
    """A replay that would write where it must not, or with arguments that make no sense."""


def target_prefix(namespace: str, live_prefix: str, *, into_live: bool = False) -> str:
    """The topic prefix a replay writes under; refuses the live namespace unless asked.

    `live_prefix` is the installation's own (its services' `topic_prefix`):
    writing there would feed recorded requests to the real senders.
    """
    if into_live:
        return live_prefix
    if not _NAMESPACE.match(namespace):
        raise ReplayRefused(f"namespace {namespace!r}: 1-64 letters, digits, '_' or '-', "
                            "starting with a letter or digit")
    prefix = f"{namespace}."
    if prefix == live_prefix or live_prefix.startswith(prefix):
        raise ReplayRefused(f"namespace {namespace!r} is the live one; replaying into it "
                            "needs --into-live-namespace")
    return prefix


def parse_speed(text: str) -> float | None:
    """`recorded` is 1.0, `max` is None (no waiting), `N` or `Nx` is N times as fast."""
    text = text.strip().lower()
    if text == "recorded":
        return 1.0
    if text == "max":
        return None
    try:
        speed = float(text.removesuffix("x"))
    except ValueError as exc:
        raise ReplayRefused(f"speed {text!r}: recorded, max, or a factor such as 10x") from exc
    if not 0 < speed <= 1_000_000:
        raise ReplayRefused(f"speed {text!r}: a factor above 0")
    return speed


def paced(records: Iterable[Recorded], speed: float | None) -> Iterator[tuple[float, Recorded]]:
    """Each record with the seconds to wait before it, keeping recorded gaps / speed."""
    previous: int | None = None
    for record in records:
        if speed is None or previous is None:
            wait = 0.0
        else:
            wait = min(MAX_GAP_SECONDS, max(0, record.timestamp_ms - previous) / 1000 / speed)
        previous = record.timestamp_ms if previous is None else max(previous,
                                                                    record.timestamp_ms)
        yield wait, record


def source_of(record: Recorded) -> str:
    """The value of the source header for a recorded record."""
    return f"{record.topic}/{record.partition}/{record.offset}"


def parse_source(value: bytes | None) -> tuple[str, int, int] | None:
    """(topic, partition, offset) from a source header, None when it is not one."""
    if value is None:
        return None
    topic, _, rest = value.decode("ascii", "replace").rpartition("/")
    topic, _, partition = topic.rpartition("/")
    if not (topic and partition.isdigit() and rest.isdigit()):
        return None
    return topic, int(partition), int(rest)


def already_written(sources: Iterable[tuple[str, int, int]]) -> dict[tuple[str, int], int]:
    """Per source partition, the highest source offset a target holds.

    A replay writes each source partition into the same target partition in
    order, through an idempotent producer, so everything up to that offset is
    there and everything after it is not.
    """
    done: dict[tuple[str, int], int] = {}
    for topic, partition, offset in sources:
        key = (topic, partition)
        done[key] = max(offset, done.get(key, -1))
    return done


def is_written(record: Recorded, done: dict[tuple[str, int], int]) -> bool:
    """Whether a resumed replay must skip this record."""
    return record.offset <= done.get((record.topic, record.partition), -1)


@dataclass
class Outcome:
    """What a replay did, per logical topic."""

    written: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)


def scan_sources(config: dict[str, Any], prefix: str, names: Iterable[str],
                 timeout: float = 30.0) -> list[tuple[str, int, int]]:
    """Every source header already in the target topics (read to their end as of now)."""
    consumer = Consumer({**config, "group.id": f"{prefix}mailbus-replay",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    found: list[tuple[str, int, int]] = []
    try:
        meta = consumer.list_topics(timeout=10)
        assign = []
        for name in names:
            topic = meta.topics.get(prefix + name)
            if topic is None:
                continue
            for p in topic.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(prefix + name, p),
                                                           timeout=10, cached=False)
                if high > low:
                    assign.append(TopicPartition(prefix + name, p, low))
        consumer.assign(assign)
        pending = {(tp.topic, tp.partition) for tp in assign}
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise ReplayRefused("could not read the target topics to their end in time; "
                                    "nothing was written")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise ReplayRefused(f"reading {msg.topic()}: {error}")
                pending.discard((msg.topic() or "", msg.partition() or 0))
                continue
            # confluent-kafka hands headers back as a list of (key, bytes) pairs.
            for key, value in list(msg.headers() or []):
                if key == SOURCE_HEADER and isinstance(value, bytes):
                    parsed = parse_source(value)
                    if parsed is not None:
                        found.append(parsed)
    finally:
        consumer.close()
    return found


def run(records: Iterable[Recorded], config: dict[str, Any], prefix: str, *,
        names: Iterable[str], speed: float | None, dry_run: bool = False,
        progress: Callable[[Recorded, bool], None] | None = None,
        sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Replay the records of topics `names` under `prefix`, skipping what an earlier run wrote.

    Records stream through (a recording is never held in memory whole).
    """
    wanted = frozenset(names)
    unknown = sorted(wanted - {spec.name for spec in topics.TOPICS})
    if unknown:
        raise ReplayRefused(f"not topics of mailbus: {', '.join(unknown)}")
    outcome = Outcome()
    done = {} if dry_run else already_written(scan_sources(config, prefix, sorted(wanted)))
    producer = None if dry_run else Producer({
        **config, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
        "client.id": "mailbus-replay"})
    failures: list[str] = []

    def delivered(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    chosen = (r for r in records if r.topic in wanted)
    try:
        for wait, record in paced(chosen, speed):
            if is_written(record, done):
                outcome.skipped[record.topic] += 1
                if progress is not None:
                    progress(record, False)
                continue
            if producer is not None:
                if wait > 0:
                    producer.poll(0)
                    sleep(wait)
                headers: list[tuple[str, str | bytes | None]] = [
                    *record.headers, (SOURCE_HEADER, source_of(record).encode()),
                    (TIMESTAMP_HEADER, str(record.timestamp_ms).encode())]
                _produce(producer, prefix + record.topic, record, headers, delivered)
            outcome.written[record.topic] += 1
            if progress is not None:
                progress(record, True)
            if failures:
                break
    except BaseException:
        # Interrupted (Ctrl-C, a broken recording): what was handed to the
        # producer still goes out, so a resumed run skips it.
        if producer is not None:
            producer.flush(30)
        raise
    if producer is not None:
        left = producer.flush(60)
        if left or failures:
            raise ReplayRefused(f"the broker did not take every record ({left} unsent; "
                                f"{failures[:1]}); run the same replay again to resume")
    return outcome


def _produce(producer: Producer, topic: str, record: Recorded,
             headers: list[tuple[str, str | bytes | None]],
             on_delivery: Callable[[KafkaError | None, object], None]) -> None:
    while True:
        try:
            producer.produce(topic, record.value, record.key, partition=record.partition,
                             headers=headers, on_delivery=on_delivery)
            producer.poll(0)
            return
        except BufferError:  # the local queue is full: let deliveries drain, then go on
            producer.poll(0.5)
        except KafkaException as exc:
            raise ReplayRefused(f"producing to {topic}: {exc}") from exc
