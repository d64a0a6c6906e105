"""The producer's batch path against the real broker: every record acknowledged or refused."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer

from mailbus import topics
from mailbus.errors import UnavailableError
from mailbus.producer import AsyncProducer

pytestmark = pytest.mark.integration


def _read(config: dict[str, Any], topic: str, count: int) -> list[tuple[bytes, bytes]]:
    consumer = Consumer({**config, "group.id": f"test-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    got: list[tuple[bytes, bytes]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return got


def _produce_many(config: dict[str, Any], records: list[Any]) -> list[UnavailableError | None]:
    async def run() -> list[UnavailableError | None]:
        producer = AsyncProducer(config)
        try:
            return await producer.produce_many(records)
        finally:
            producer.close()

    return asyncio.run(run())


def test_produce_many_acknowledges_each_record(admin_kafka: dict[str, Any],
                                               namespace: str) -> None:
    topic = namespace + topics.SENT
    records = [(topic, f"value-{i}".encode(), f"key-{i}".encode(), [("n", str(i))])
               for i in range(300)]
    assert _produce_many(admin_kafka, records) == [None] * 300
    got = _read(admin_kafka, topic, 300)
    assert sorted(got) == sorted((key, value) for _, value, key, _ in records)


def test_produce_many_reports_a_refused_record_and_delivers_the_rest(
        admin_kafka: dict[str, Any], namespace: str) -> None:
    topic = namespace + topics.SENT
    too_big = b"x" * 2_000_000  # past message.max.bytes: refused before it leaves
    records = [(topic, b"first", b"k1", None), (topic, too_big, b"k2", None),
               (topic, b"third", b"k3", None)]
    results = _produce_many(admin_kafka, records)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], UnavailableError)
    assert sorted(_read(admin_kafka, topic, 2)) == [(b"k1", b"first"), (b"k3", b"third")]


def test_produce_many_of_nothing_returns_at_once(admin_kafka: dict[str, Any]) -> None:
    assert _produce_many(admin_kafka, []) == []
