"""Admission: email.requested records into the ledger, offsets committed only after.

The consumer runs in a worker thread (confluent-kafka blocks); the ledger
writes run on the event loop. A record that does not decode, or names an
account this sender does not know, goes to the dead-letter topic with the
reason, and consumption moves on: a bad record never stalls a partition.

A PostgreSQL or Kafka error does not end admission: the batch that was not
admitted is sought back (its offsets are not committed, so nothing is lost),
the error is logged, and the round is retried with backoff. Until a round
succeeds again `healthy` is false, and the sender is not ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from mailbus.accounts import Directory
from mailbus.codec import Registry
from mailbus.errors import DecodeError
from mailbus.producer import AsyncProducer
from mailbus.replay import SOURCE_HEADER as REPLAY_SOURCE_HEADER
from mailbus.sender import decisions, metrics
from mailbus.sender.outbox import Ledger
from mailbus.sender.quota import backoff

log = logging.getLogger(__name__)
BATCH = 500
# Retry delays after a failed round: 0.5 s doubling to 30 s (jittered), well
# inside max.poll.interval.ms (5 min), so the group keeps the partitions.
RETRY_BASE, RETRY_CAP = 0.5, 30.0
STALL_SECONDS = 5.0


def is_replayed(msg: Message) -> bool:
    """Whether a record was written by `mailbus replay` (it names its source)."""
    return any(key == REPLAY_SOURCE_HEADER for key, _ in list(msg.headers() or []))


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
        # Replaced, never changed in place: the consumer's thread writes them
        # while the event loop reads them.
        self.owned: frozenset[int] = frozenset()
        self._unsettled: frozenset[int] = frozenset()  # assigned, take-over still to run
        self.healthy = False
        self._stall_checked = 0.0
        self._was_behind = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = asyncio.Event()

    def partitions(self) -> list[int]:
        """Partitions of email.requested this instance owns now."""
        return sorted(self.owned)

    # Rebalance callbacks run on the consumer's thread, inside consume(); the
    # event loop is free meanwhile (it awaits that thread), so they hand their
    # database work to it and wait. A partition whose take-over failed is
    # assigned but not owned (no worker claims its rows) until a later round
    # takes it over.
    def _assigned(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        new = [p.partition for p in parts]
        assert self._loop is not None
        if self._stopping.is_set():
            # Leaving the group: close() runs on the event loop, which cannot take the
            # partitions over meanwhile (waiting for it would hang the close a minute).
            return
        self._unsettled |= set(new)
        try:
            asyncio.run_coroutine_threadsafe(self._on_assign(new), self._loop).result(60)
        except Exception as exc:  # noqa: BLE001 - retried by the next round
            log.error("partitions %s: take-over failed, retrying: %s", new, exc)
            return
        self._settled(new)

    def _settled(self, parts: list[int]) -> None:
        self._unsettled -= set(parts)
        self.owned |= set(parts)
        log.info("assigned partitions %s", sorted(self.owned))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_change)

    def _revoked(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        gone = {p.partition for p in parts}
        self.owned -= gone
        self._unsettled -= gone
        log.info("revoked partitions %s", sorted(gone))

    async def run(self) -> None:
        """Consume, admit, commit, until stopped; a failed round is retried, never fatal."""
        self._loop = asyncio.get_running_loop()
        self._consumer.subscribe([self._topic], on_assign=self._assigned,
                                 on_revoke=self._revoked, on_lost=self._revoked)
        failures = 0
        while not self._stopping.is_set():
            try:
                if not await self._round() and await self._stalled():
                    self.healthy = False
                    continue
            except Exception as exc:  # noqa: BLE001 - logged, retried with backoff
                failures += 1
                self.healthy = False
                metrics.ADMISSION_ERRORS.inc()
                delay = backoff(failures, base=RETRY_BASE, cap=RETRY_CAP)
                log.error("admission failed (%s: %s); retrying in %.1f s",
                          type(exc).__name__, exc, delay)
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                continue
            if failures:
                log.info("admission resumed after %d failed round(s)", failures)
            failures, self.healthy = 0, True

    async def _round(self) -> bool:
        """One batch admitted and committed; True when it held records."""
        unsettled = sorted(self._unsettled)
        if unsettled:
            await self._on_assign(unsettled)
            self._settled(unsettled)
        messages = await asyncio.to_thread(self._consumer.consume, BATCH, 0.5)
        records = [m for m in messages if m.error() is None]
        errors = [e for m in messages if (e := m.error()) is not None
                  and e.code() != KafkaError._PARTITION_EOF]
        if records:
            self._was_behind = False
            try:
                await self._admit(records)
            except Exception:
                # Not admitted: consume them again next round. Their offsets
                # were never committed, so a crash now loses nothing either.
                await asyncio.to_thread(self._rewind, records)
                raise
            # Commits the positions consume() advanced to: exactly what the
            # ledger now holds. A crash before this line redelivers them, and
            # the ledger's primary key makes the second admission a no-op.
            await asyncio.to_thread(self._commit)
            self._on_change()
        if errors:
            raise KafkaException(errors[0])
        return bool(records)

    async def _stalled(self) -> bool:
        """After an empty round: records have waited unread since the last look.

        librdkafka reports a fetch that fails (no READ on the topic any more)
        once, then retries quietly and consume() just returns nothing. So every
        STALL_SECONDS an idle consumer compares its positions with the ends of
        its partitions; behind twice in a row, with nothing read in between,
        is a stall.
        """
        now = time.monotonic()
        if now - self._stall_checked < STALL_SECONDS:
            return not self.healthy and self._was_behind
        self._stall_checked = now
        was, self._was_behind = self._was_behind, await asyncio.to_thread(self._behind)
        if was and self._was_behind and self.healthy:
            self.healthy = False
            metrics.ADMISSION_ERRORS.inc()
            log.error("admission stalled: records wait that consume() does not return")
        return was and self._was_behind

    def _behind(self) -> bool:
        """Records wait in a partition this consumer holds and has not read."""
        parts = self._consumer.assignment()
        if not parts:
            return False
        positions = self._consumer.position(parts)
        committed = self._consumer.committed(parts, timeout=10)
        for pos, done in zip(positions, committed, strict=True):
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(self._topic, pos.partition), timeout=10)
            at = max(pos.offset, done.offset)  # negative: nothing read or committed yet
            if high > (at if at >= 0 else low):
                return True
        return False

    def _rewind(self, records: list[Message]) -> None:
        first: dict[int, int] = {}
        for msg in records:
            part, offset = msg.partition() or 0, msg.offset() or 0
            first[part] = min(offset, first.get(part, offset))
        for part, offset in first.items():
            try:
                self._consumer.seek(TopicPartition(self._topic, part, offset))
            except KafkaException as exc:
                # No longer ours: its next owner starts at the committed offset.
                log.info("partition %d not rewound (%s)", part, exc)

    def _commit(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:  # nothing new to commit
                raise

    async def _admit(self, messages: list[Message]) -> None:
        now = decisions.utcnow()
        rows, dead = [], []
        for msg in messages:
            value = msg.value() or b""  # a tombstone is as undecodable as garbage
            try:
                _, event = self._registry.decode(value, "mailbus.EmailRequested")
            except DecodeError as exc:
                dead.append((msg, f"undecodable: {exc}"))
                continue
            if event["account_id"] not in self._directory.by_id:
                dead.append((msg, f"unknown account {event['account_id']!r}"))
                continue
            if not decisions.is_message_id(event["message_id"]):
                # The ledger's key is a uuid: such a row would fail the whole batch's
                # insert, again and again, and stop admission for everyone.
                dead.append((msg, f"invalid: message id {event['message_id'][:64]!r} is not"
                                  " a UUID"))
                continue
            rows.append(decisions.admission(event, value, msg.partition() or 0, now,
                                            replayed=is_replayed(msg)))
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
        metrics.DEAD_LETTERED.labels(reason.partition(":")[0] if reason.startswith(
            ("undecodable", "invalid")) else "unknown_account").inc()

    def stop(self) -> None:
        """Ask the loop to end after the current batch (call on the event loop)."""
        self._stopping.set()

    def close(self) -> None:
        """Leave the group (the partitions move to another instance at once)."""
        self._consumer.close()
