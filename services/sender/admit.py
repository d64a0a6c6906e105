"""Admission: email.requested records into the ledger, offsets committed only after.

The consumer runs in a worker thread (confluent-kafka blocks); the ledger
writes run on the event loop. A record that does not decode, or names an
account this sender does not know, goes to the dead-letter topic with the
reason, and consumption moves on: a bad record never stalls a partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from mailbus.accounts import Directory
from mailbus.codec import Registry
from mailbus.errors import DecodeError
from mailbus.producer import AsyncProducer
from mailbus.sender import handlers, metrics
from mailbus.sender.outbox import Ledger

log = logging.getLogger(__name__)
BATCH = 500


class Admission:
    """Consumes email.requested as the sender group; tracks which partitions are ours."""

    def __init__(self, *, config: dict[str, Any], group_id: str, topic: str, dlq_topic: str,
                 registry: Registry, directory: Directory, ledger: Ledger,
                 producer: AsyncProducer, on_change: Callable[[], None],
                 on_assign: Callable[[list[int]], Coroutine[Any, Any, None]]):
        self._consumer = Consumer({
            **config,
            "group.id": group_id,
            # Offsets are committed by hand, after the ledger holds the records.
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
        })
        self._topic, self._dlq = topic, dlq_topic
        self._registry, self._directory = registry, directory
        self._ledger, self._producer = ledger, producer
        self._on_change, self._on_assign = on_change, on_assign
        self.owned: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    def partitions(self) -> list[int]:
        """Partitions of email.requested this instance owns now."""
        return sorted(self.owned)

    # Rebalance callbacks run on the consumer's thread, inside consume(); the
    # event loop is free meanwhile (it awaits that thread), so they hand their
    # database work to it and wait.
    def _assigned(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        new = [p.partition for p in parts]
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._on_assign(new), self._loop).result(60)
        self.owned |= set(new)
        log.info("assigned partitions %s", sorted(self.owned))
        self._loop.call_soon_threadsafe(self._on_change)

    def _revoked(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self.owned -= {p.partition for p in parts}
        log.info("revoked partitions %s", [p.partition for p in parts])

    async def run(self) -> None:
        """Consume, admit, commit, until stopped."""
        self._loop = asyncio.get_running_loop()
        self._consumer.subscribe([self._topic], on_assign=self._assigned,
                                 on_revoke=self._revoked, on_lost=self._revoked)
        while not self._stopping:
            messages = await asyncio.to_thread(self._consumer.consume, BATCH, 0.5)
            if not messages:
                continue
            await self._admit(messages)
            # Commits the positions consume() advanced to: exactly what the
            # ledger now holds. A crash before this line redelivers them, and
            # the ledger's primary key makes the second admission a no-op.
            await asyncio.to_thread(self._consumer.commit, asynchronous=False)
            self._on_change()

    async def _admit(self, messages: list[Message]) -> None:
        now = handlers.utcnow()
        rows, dead = [], []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume: %s", err)
                continue
            value = msg.value() or b""  # a tombstone is as undecodable as garbage
            try:
                _, event = self._registry.decode(value, "mailbus.EmailRequested")
            except DecodeError as exc:
                dead.append((msg, f"undecodable: {exc}"))
                continue
            if event["account_id"] not in self._directory.by_id:
                dead.append((msg, f"unknown account {event['account_id']!r}"))
                continue
            rows.append(handlers.admission(event, value, msg.partition() or 0, now))
        await self._ledger.admit(rows)
        metrics.ADMITTED.inc(len(rows))
        await asyncio.gather(*(self._dead_letter(msg, reason) for msg, reason in dead))

    async def _dead_letter(self, msg: Message, reason: str) -> None:
        """Park an unusable record with why and where it came from; the caller moves on."""
        source = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
        log.error("dead-lettering %s: %s", source, reason)
        headers: list[tuple[str, str | bytes | None]] = [
            ("mailbus.reason", reason.encode()), ("mailbus.source", source.encode())]
        await self._producer.produce(self._dlq, msg.value() or b"", key=msg.key(),
                                     headers=headers)
        metrics.DEAD_LETTERED.labels("undecodable" if reason.startswith("undecodable")
                                     else "unknown_account").inc()

    def stop(self) -> None:
        """Ask the loop to end after the current batch."""
        self._stopping = True

    def close(self) -> None:
        """Leave the group (the partitions move to another instance at once)."""
        self._consumer.close()
