"""Recording and replaying topics against the real broker: bytes kept, each record once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Producer
from typer.testing import CliRunner

from mailbus import recording, replay, topics
from mailbus.cli import app
from mailbus.provision import provision
from mailbus.recording import Recorded
from mailbus.settings import ServiceSettings
from tests.support.kafka import drop_namespace, new_prefix, read_all

pytestmark = pytest.mark.integration
TOPICS = (topics.REQUESTED, topics.SENT, topics.SUPPRESSIONS)


@pytest.fixture
def target(admin: ServiceSettings, admin_kafka: dict[str, Any]) -> Iterator[str]:
    """A namespace name for a replay to write into; its topics are removed afterwards."""
    prefix = new_prefix()
    yield prefix[:-1]
    drop_namespace(admin_kafka, prefix)


def fill(config: dict[str, Any], prefix: str, count: int) -> list[tuple[str, bytes, bytes]]:
    """Records with keys, headers and arbitrary bytes on three topics, spread over time."""
    producer = Producer({**config, "enable.idempotence": True, "acks": "all"})
    sent = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        key = f"key-{i % 7}".encode()
        value = bytes([0xC3, 0x01, i % 256]) + f"value {i}".encode() + b"\x00\xff"
        producer.produce(prefix + topic, value, key, headers=[("h", f"{i}".encode()),
                                                               ("empty", None)])
        sent.append((topic, key, value))
        if i % 10 == 9:
            producer.flush(10)
            time.sleep(0.01)  # spread timestamps, so ordering across partitions matters
    assert producer.flush(30) == 0
    return sent


def record_namespace(config: dict[str, Any], prefix: str, path: Path,
                     names: tuple[str, ...] = TOPICS) -> list[Recorded]:
    with path.open("wb") as fh:
        recording.write(fh, recording.read_topics(config, prefix, names, since_ms=0),
                        {"mailbus.topics": ",".join(names)})
    return list(recording.read(path)[1])


def test_a_recording_keeps_every_record_byte_for_byte(namespace, admin_kafka, tmp_path):
    sent = fill(admin_kafka, namespace, 60)
    recorded = record_namespace(admin_kafka, namespace, tmp_path / "rec.avro")

    assert sorted((r.topic, r.key, r.value) for r in recorded) == sorted(sent)
    assert all(r.headers[1] == ("empty", None) and r.headers[0][0] == "h" for r in recorded)
    stamps = [r.timestamp_ms for r in recorded]
    assert stamps == sorted(stamps)  # merged across partitions in time order
    by_partition: dict[tuple[str, int], list[int]] = {}
    for r in recorded:
        by_partition.setdefault((r.topic, r.partition), []).append(r.offset)
    assert all(offsets == sorted(offsets) for offsets in by_partition.values())
    # Any Avro reader opens it: the container file is self-describing.
    with (tmp_path / "rec.avro").open("rb") as fh:
        rows = list(fastavro.reader(fh))
    assert len(rows) == 60 and rows[0]["topic"] in TOPICS


def test_a_time_range_records_only_what_happened_in_it(namespace, admin_kafka, tmp_path):
    fill(admin_kafka, namespace, 20)
    middle = int(time.time() * 1000)
    time.sleep(0.05)
    later = fill(admin_kafka, namespace, 20)
    path = tmp_path / "rec.avro"
    with path.open("wb") as fh:
        recording.write(fh, recording.read_topics(admin_kafka, namespace, TOPICS,
                                                  since_ms=middle), {})
    _, records = recording.read(path)
    assert sorted((r.topic, r.key, r.value) for r in records) == sorted(later)


def test_replay_into_a_namespace_gives_back_the_same_records(namespace, admin, admin_kafka,
                                                              target, tmp_path):
    fill(admin_kafka, namespace, 45)
    original = record_namespace(admin_kafka, namespace, tmp_path / "a.avro")
    prefix = replay.target_prefix(target, "")
    provision(admin_kafka, admin.var_dir / "secrets", prefix, users=False)

    outcome = replay.run(iter(original), admin_kafka, prefix, names=TOPICS, speed=None)
    assert sum(outcome.written.values()) == 45 and not outcome.skipped

    again = record_namespace(admin_kafka, prefix, tmp_path / "b.avro")
    key = lambda r: (r.topic, r.partition, r.key, r.value)  # noqa: E731
    assert sorted(map(key, again)) == sorted(map(key, original))
    for r in again:
        headers = dict(r.headers)
        source = replay.parse_source(headers[replay.SOURCE_HEADER])
        assert source is not None and source[:2] == (r.topic, r.partition)
        assert r.headers[:2] == next(o.headers for o in original
                                     if (o.topic, o.partition, o.offset) == source)


def test_an_interrupted_replay_resumes_without_writing_a_record_twice(
        namespace, admin, admin_kafka, target, tmp_path):
    fill(admin_kafka, namespace, 90)
    original = record_namespace(admin_kafka, namespace, tmp_path / "a.avro")
    prefix = replay.target_prefix(target, "")
    provision(admin_kafka, admin.var_dir / "secrets", prefix, users=False)

    def stops_after(n: int) -> Iterator[Recorded]:
        for i, r in enumerate(original):
            if i == n:
                raise KeyboardInterrupt  # the operator's Ctrl-C in the middle
            yield r

    with pytest.raises(KeyboardInterrupt):
        replay.run(stops_after(37), admin_kafka, prefix, names=TOPICS, speed=None)
    outcome = replay.run(iter(original), admin_kafka, prefix, names=TOPICS, speed=None)
    assert sum(outcome.skipped.values()) == 37
    assert sum(outcome.written.values()) + sum(outcome.skipped.values()) == 90

    replayed = [m for name in TOPICS for m in read_all(admin_kafka, prefix + name)]
    sources = [dict(m.headers())[replay.SOURCE_HEADER] for m in replayed]
    assert len(sources) == 90 and len(set(sources)) == 90
    third = replay.run(iter(original), admin_kafka, prefix, names=TOPICS, speed=None)
    assert not third.written and sum(third.skipped.values()) == 90


def test_dry_run_writes_nothing_and_the_live_namespace_is_refused(namespace, admin_kafka,
                                                                   tmp_path):
    fill(admin_kafka, namespace, 12)
    original = record_namespace(admin_kafka, namespace, tmp_path / "a.avro")
    outcome = replay.run(iter(original), admin_kafka, namespace, names=TOPICS, speed=None,
                         dry_run=True)
    assert sum(outcome.written.values()) == 12
    assert len(record_namespace(admin_kafka, namespace, tmp_path / "b.avro")) == 12

    with pytest.raises(replay.ReplayRefused):
        replay.target_prefix(namespace[:-1], namespace)
    with pytest.raises(replay.ReplayRefused):
        replay.run(iter(original), admin_kafka, namespace, names=("no.such.topic",),
                   speed=None)


def test_the_commands_record_and_replay(namespace, admin_kafka, target, tmp_path, monkeypatch):
    fill(admin_kafka, namespace, 30)
    path = tmp_path / "cli.avro"
    runner = CliRunner()
    monkeypatch.setenv("MAILBUS_KAFKA__TOPIC_PREFIX", namespace)

    done = runner.invoke(app, ["record", "--since", "1h", "--out", str(path),
                               "--topics", ",".join(TOPICS)])
    assert done.exit_code == 0, done.output
    assert "wrote 30 record(s)" in done.output
    assert len(list(recording.read(path)[1])) == 30

    refused = runner.invoke(app, ["replay", str(path), "--namespace", namespace[:-1]])
    assert refused.exit_code != 0 and "live" in str(refused.exception or refused.output)

    dry = runner.invoke(app, ["replay", str(path), "--namespace", target, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would write" in dry.output

    for _ in range(2):  # the second run finds everything there and writes nothing
        done = runner.invoke(app, ["replay", str(path), "--namespace", target,
                                   "--speed", "50x"])
        assert done.exit_code == 0, done.output
    replayed = [m for name in TOPICS for m in read_all(admin_kafka, f"{target}.{name}")]
    assert len(replayed) == 30
