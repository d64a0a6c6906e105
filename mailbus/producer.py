"""One long-lived, idempotent Kafka producer per process, awaitable from asyncio."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from mailbus.errors import UnavailableError

log = logging.getLogger(__name__)

PRODUCER_DEFAULTS: dict[str, Any] = {
    # Exactly-once per partition from the producer's side: retries after a
    # lost ack never duplicate or reorder. Implies acks=all.
    "enable.idempotence": True,
    "acks": "all",
    # Requests arriving together share one produce request; 5 ms is below
    # what a client notices and lifts throughput several-fold under load.
    "linger.ms": 5,
    "compression.type": "lz4",
    # The Java client's partitioner (murmur2 of the key). email.requested is
    # keyed by account so that one sender instance owns each account; that
    # only holds if every producer, in any language, maps a key to the same
    # partition, and murmur2 is what Kafka's own clients use by default.
    "partitioner": "murmur2_random",
    # How long one event may wait for the broker before it fails. The API
    # answers 503 when it does, so this bounds a request's worst latency.
    "message.timeout.ms": 8000,
    "socket.connection.setup.timeout.ms": 3000,
    # Kafka's default limit is 1 MB per record; the API caps content below it.
    "message.max.bytes": 1_000_000,
}


class AsyncProducer:
    """Wraps confluent-kafka's Producer: a poll thread serves delivery reports to asyncio."""

    def __init__(self, config: dict[str, Any], **overrides: Any):
        conf = {**PRODUCER_DEFAULTS, **config, **overrides, "error_cb": self._on_error}
        self._producer = Producer(conf)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="kafka-poll", daemon=True)
        self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    @staticmethod
    def _on_error(err: KafkaError) -> None:
        # Transient connection errors are retried by librdkafka itself;
        # they are logged so an operator sees a broker going away.
        log.warning("kafka: %s", err)

    async def produce(
        self, topic: str, value: bytes, key: bytes | None = None,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> Message:
        """Append one record and wait until the broker acknowledged it (acks=all)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()

        def delivered(err: KafkaError | None, msg: Message) -> None:
            loop.call_soon_threadsafe(_settle, future, err, msg)

        try:
            self._producer.produce(
                topic, value=value, key=key, headers=headers, on_delivery=delivered
            )
        except (BufferError, KafkaException) as exc:
            raise _refused(exc) from exc
        return await future

    async def produce_many(
        self, records: Sequence[tuple[str, bytes, bytes | None,
                                      list[tuple[str, str | bytes | None]] | None]],
    ) -> list[UnavailableError | None]:
        """Append (topic, value, key, headers) records; wait until the broker acknowledged
        or refused each. Per record: None once acknowledged, else why it was not.

        The loop is woken once for the batch, not once a record: at thousands of
        records a second, a wake-up and a future each cost more than the produce.
        """
        results: list[UnavailableError | None] = [None] * len(records)
        if not records:
            return results
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        lock = threading.Lock()
        remaining = len(records)

        def one_done(index: int, err: KafkaError | None, _msg: Message | None) -> None:
            # Delivery reports run on the poll thread (or on close()'s flush).
            nonlocal remaining
            if err is not None:
                results[index] = UnavailableError(f"kafka: {err.str()}")
            with lock:
                remaining -= 1
                last = remaining == 0
            if last:
                loop.call_soon_threadsafe(_finish, future)

        for index, (topic, value, key, headers) in enumerate(records):
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers,
                                       on_delivery=partial(one_done, index))
            except (BufferError, KafkaException) as exc:
                results[index] = _refused(exc)
                one_done(index, None, None)
        await future
        return results

    def reachable(self, timeout: float = 2.0) -> bool:
        """True when the cluster answers a metadata request within the timeout."""
        try:
            self._producer.list_topics(timeout=timeout)
        except KafkaException:
            return False
        return True

    def close(self, timeout: float = 10.0) -> int:
        """Flush what is queued, stop the poll thread; returns records left undelivered."""
        left = self._producer.flush(timeout)
        self._stop.set()
        self._thread.join(timeout=1.0)
        return left


def _refused(exc: BufferError | KafkaException) -> UnavailableError:
    """Why librdkafka refused a record before it was queued."""
    if isinstance(exc, BufferError):
        return UnavailableError("kafka: local produce queue is full")
    return UnavailableError(f"kafka: {exc.args[0]}")


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settle(future: asyncio.Future[Message], err: KafkaError | None, msg: Message) -> None:
    if future.done():
        return
    if err is not None:
        future.set_exception(UnavailableError(f"kafka: {err.str()}"))
    else:
        future.set_result(msg)
