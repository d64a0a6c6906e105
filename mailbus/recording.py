"""Recordings of topics: Kafka records kept byte for byte in an Avro object container file.

A recording is what `mailbus record` writes and `mailbus replay` reads. Each
entry keeps a record's topic (its logical name, without the installation's
prefix), partition, offset, timestamp, key, headers and value bytes exactly
as the broker served them; the values stay in their own single-object
encoding, so a recording holds whatever schema versions were on the wire.
The container format is Avro's own, so any Avro library (Java's
`DataFileReader`, `fastavro`, `avro-tools tojson`) reads a recording without
mailbus.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import fastavro
from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from mailbus.errors import MailbusError

FORMAT = "mailbus.recording.v1"
RECORDED_EVENT = {
    "type": "record",
    "name": "RecordedEvent",
    "namespace": "mailbus.recording",
    "doc": "One Kafka record as the broker served it.",
    "fields": [
        {"name": "topic", "type": "string", "doc": "logical name, without the prefix"},
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "key", "type": ["null", "bytes"], "default": None},
        {"name": "headers", "type": {"type": "array", "items": {
            "type": "record", "name": "Header", "fields": [
                {"name": "key", "type": "string"},
                {"name": "value", "type": ["null", "bytes"], "default": None}]}},
         "default": []},
        {"name": "value", "type": ["null", "bytes"], "default": None},
    ],
}
_PARSED = fastavro.parse_schema(RECORDED_EVENT)
POLL_SECONDS = 0.5
# Records are merged across partitions by timestamp, so a partition that is
# far ahead of another waits in memory; past this many it is paused.
BUFFER_PER_PARTITION = 2000


class RecordingError(MailbusError):
    """A recording could not be read or written."""


@dataclass(frozen=True)
class Recorded:
    """One record of a recording."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    value: bytes | None

    def to_avro(self) -> dict[str, Any]:
        """The container file's form of this record."""
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                "timestamp": datetime.fromtimestamp(self.timestamp_ms / 1000, UTC),
                "key": self.key, "headers": [{"key": k, "value": v} for k, v in self.headers],
                "value": self.value}

    @classmethod
    def from_avro(cls, row: dict[str, Any]) -> Recorded:
        """A record read back from a container file."""
        stamp = row["timestamp"]
        millis = stamp if isinstance(stamp, int) else round(stamp.timestamp() * 1000)
        return cls(row["topic"], row["partition"], row["offset"], millis, row["key"],
                   tuple((h["key"], h["value"]) for h in row["headers"]), row["value"])


def write(out: BinaryIO, records: Iterable[Recorded], meta: dict[str, str]) -> int:
    """Write a recording; returns how many records it holds."""
    count = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal count
        for record in records:
            count += 1
            yield record.to_avro()

    fastavro.writer(out, _PARSED, rows(), codec="deflate",
                    metadata={"mailbus.format": FORMAT, **meta})
    return count


def read(path: Path) -> tuple[dict[str, str], Iterator[Recorded]]:
    """The metadata of a recording and an iterator over its records, in file order."""
    try:
        handle = path.open("rb")
        reader = fastavro.reader(handle)
    except (OSError, ValueError) as exc:
        raise RecordingError(f"{path}: not a readable recording ({exc})") from exc
    meta = {k: v.decode() if isinstance(v, bytes) else v for k, v in reader.metadata.items()}
    if meta.get("mailbus.format") != FORMAT:
        handle.close()
        raise RecordingError(f"{path}: not a mailbus recording (format "
                             f"{meta.get('mailbus.format')!r})")

    def records() -> Iterator[Recorded]:
        with handle:
            for row in reader:
                yield Recorded.from_avro(row)  # type: ignore[arg-type]

    return meta, records()


def read_topics(config: dict[str, Any], prefix: str, topics: Iterable[str], *,
                since_ms: int, until_ms: int | None = None,
                progress: Callable[[int], None] | None = None) -> Iterator[Recorded]:
    """Every record of these topics from `since_ms` up to `until_ms`, or to their end now.

    Records come in timestamp order across partitions (each partition in offset
    order), which is the order a replay at recorded speed needs. The end is
    fixed when reading starts: records produced meanwhile are not waited for.
    """
    consumer = Consumer({**config, "group.id": f"{prefix}mailbus-record",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "auto.offset.reset": "earliest"})
    try:
        wanted = _start_positions(consumer, prefix, list(topics), since_ms)
        buffered: dict[tuple[str, int], deque[Recorded]] = {}
        ends = {key: high for key, (_, high) in wanted.items()}
        live = {key for key, (start, high) in wanted.items() if start < high}
        consumer.assign([TopicPartition(prefix + t, p, wanted[(t, p)][0]) for t, p in live])
        for key in live:
            buffered[key] = deque()
        done: set[tuple[str, int]] = set()
        paused: set[tuple[str, int]] = set()
        while live - done or any(buffered.values()):
            while live - done and not all(buffered[k] for k in live - done):
                msg = consumer.poll(POLL_SECONDS)
                if msg is None:
                    continue
                error = msg.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    raise RecordingError(f"reading {msg.topic()}: {error}")
                record = _recorded(msg, prefix)
                key = (record.topic, record.partition)
                if key in done:
                    continue
                if (error is not None or record.offset >= ends[key]
                        or (until_ms is not None and record.timestamp_ms > until_ms)):
                    done.add(key)
                    continue
                buffered[key].append(record)
                if record.offset + 1 >= ends[key]:
                    done.add(key)
                if len(buffered[key]) == BUFFER_PER_PARTITION:
                    consumer.pause([TopicPartition(prefix + key[0], key[1])])
                    paused.add(key)
            ready = [k for k, rows in buffered.items() if rows]
            if not ready:
                continue
            first = min(ready, key=lambda k: (buffered[k][0].timestamp_ms, k))
            out = buffered[first].popleft()
            if first in paused and len(buffered[first]) < BUFFER_PER_PARTITION // 2:
                consumer.resume([TopicPartition(prefix + first[0], first[1])])
                paused.discard(first)
            if progress is not None:
                progress(1)
            yield out
    finally:
        consumer.close()


def _recorded(msg: Message, prefix: str) -> Recorded:
    """A consumed record as a recording keeps it (an EOF event gives offset -1 fields)."""
    headers = msg.headers() or []
    return Recorded(
        (msg.topic() or "")[len(prefix):], msg.partition() or 0,
        -1 if msg.offset() is None else int(msg.offset() or 0), msg.timestamp()[1],
        msg.key(), tuple((k, v if v is None or isinstance(v, bytes) else v.encode())
                         for k, v in (headers.items() if isinstance(headers, dict)
                                      else headers)),
        msg.value())


def _start_positions(consumer: Consumer, prefix: str, topics: list[str],
                     since_ms: int) -> dict[tuple[str, int], tuple[int, int]]:
    """Per partition: the first offset at or after `since_ms`, and the end as of now."""
    parts: list[TopicPartition] = []
    try:
        meta = consumer.list_topics(timeout=10)
    except KafkaException as exc:
        raise RecordingError(f"cannot list topics: {exc}") from exc
    for topic in topics:
        found = meta.topics.get(prefix + topic)
        if found is None or found.error is not None:
            raise RecordingError(f"topic {prefix + topic} does not exist or is not readable")
        parts += [TopicPartition(prefix + topic, p, since_ms) for p in sorted(found.partitions)]
    starts = consumer.offsets_for_times(parts, timeout=10)
    positions: dict[tuple[str, int], tuple[int, int]] = {}
    for tp in starts:
        _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                 timeout=10, cached=False)
        start = high if tp.offset in (OFFSET_END, -1) else tp.offset
        positions[(tp.topic[len(prefix):], tp.partition)] = (start, high)
    return positions


def since_from(text: str, *, now: float | None = None) -> int:
    """Milliseconds since the epoch from an ISO 8601 time or a relative `30m`, `2h`, `7d`."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if text and text[-1] in units and text[:-1].isdigit():
        base = time.time() if now is None else now
        return int((base - int(text[:-1]) * units[text[-1]]) * 1000)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise RecordingError(f"not a time: {text!r} (ISO 8601, or 30m, 2h, 7d)") from exc
    if when.tzinfo is None:
        raise RecordingError(f"time {text!r} has no zone (add Z or +00:00)")
    return int(when.timestamp() * 1000)
