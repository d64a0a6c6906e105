"""Who must not be mailed: the compacted email.suppressions topic, held in memory.

Nothing may be sent before the list is read to the end of every partition as
it stood when reading began, nor while nobody follows the topic: a reader
that dies is replaced (with backoff), and until its successor has caught up
again the sender is not ready and its workers claim nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from mailbus.codec import Registry
from mailbus.errors import DecodeError
from mailbus.sender import metrics
from mailbus.sender.quota import backoff
from mailbus.topics import address_hash

log = logging.getLogger(__name__)


class Suppressions:
    """The suppression list, by address hash: scope None means every account."""

    def __init__(self) -> None:
        self._entries: dict[str, set[str | None]] = {}
        self._lock = threading.Lock()

    def apply(self, record: dict[str, Any]) -> None:
        """Fold one Suppression event into the list (active adds, inactive lifts)."""
        key, scope = record["address_hash"], record.get("scope")
        with self._lock:
            scopes = self._entries.setdefault(key, set())
            if record.get("active", True):
                scopes.add(scope)
            else:
                scopes.discard(scope)
                if not scopes:
                    del self._entries[key]

    def blocked(self, address: str, account_id: str) -> bool:
        """True when the address may not receive mail from this account.

        An international domain may have been suppressed in its Unicode or its
        ASCII (punycode) spelling; both are looked up.
        """
        with self._lock:
            scopes: set[str | None] = set()
            for spelling in _spellings(address):
                scopes |= self._entries.get(address_hash(spelling), set())
        return bool(scopes) and (None in scopes or account_id in scopes)

    def __len__(self) -> int:
        return len(self._entries)


def _spellings(address: str) -> set[str]:
    local, _, domain = address.rpartition("@")
    forms = {address}
    try:
        forms.add(f"{local}@{domain.encode('ascii').decode('idna')}")
    except (UnicodeError, ValueError):
        pass
    try:
        forms.add(f"{local}@{domain.encode('idna').decode('ascii')}")
    except (UnicodeError, ValueError):
        pass
    return forms


# Errors after which this reader cannot read the topic: it ends, and a new one
# (new connection, new metadata, new credentials check) is started later.
# Others (a broker restarting, a connection dropped) librdkafka recovers from.
_FATAL = frozenset({
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._AUTHENTICATION,
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
})
METADATA_TIMEOUT = 10.0


class ReaderFailed(Exception):
    """The suppression topic cannot be read by this reader."""


class SuppressionReader:
    """One reading of the topic, in a thread of its own: from the beginning, then following.

    The topic is compacted and small (one record per address); every sender
    instance keeps all of it, so no group membership or offsets are needed.
    `loaded` is set once every partition was read up to its end as of the
    start; the thread ends on an error it cannot read past (`error` says
    which), and on close().
    """

    def __init__(self, config: dict[str, Any], topic: str, registry: Registry,
                 target: Suppressions):
        # `config` names a group (librdkafka wants one even for assigned
        # partitions); nothing is ever committed to it.
        self._config = {**config, "enable.auto.commit": False, "enable.partition.eof": True}
        self._topic, self._registry, self._target = topic, registry, target
        self.loaded = threading.Event()
        self.error: BaseException | None = None
        self.remaining: int | None = None  # partitions not yet read to their start-up end
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="suppressions", daemon=True)

    def start(self) -> None:
        """Connect, assign every partition from the beginning and follow, in the thread."""
        self._thread.start()

    def running(self) -> bool:
        """The thread still follows the topic."""
        return self._thread.is_alive()

    def _main(self) -> None:
        consumer: Consumer | None = None
        try:
            consumer = Consumer(self._config)
            self._read(consumer, self._assign(consumer))
        except BaseException as exc:  # noqa: BLE001 - any end of the thread is reported
            self.error = exc
            log.error("suppressions: the reader stopped: %s", exc)
        finally:
            if consumer is not None:
                consumer.close()

    def _assign(self, consumer: Consumer) -> dict[int, int]:
        """Assign from the beginning; returns the end of each partition now.

        Every partition, empty ones too, counts as read only once a fetch
        reached its end: a reader that may not fetch never reports loaded.
        """
        meta = consumer.list_topics(self._topic, timeout=METADATA_TIMEOUT).topics.get(self._topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ReaderFailed(f"topic {self._topic}: "
                               f"{meta.error if meta is not None else 'no metadata'}")
        ends = {}
        for p in meta.partitions:
            _, ends[p] = consumer.get_watermark_offsets(TopicPartition(self._topic, p),
                                                        timeout=METADATA_TIMEOUT)
        consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING)
                         for p in meta.partitions])
        return ends

    def _read(self, consumer: Consumer, pending: dict[int, int]) -> None:
        while not self._stop.is_set():
            self.remaining = len(pending)
            if not pending and not self.loaded.is_set():
                self.loaded.set()
                log.info("suppressions: %d address(es) loaded", len(self._target))
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.pop(msg.partition() or 0, None)
                elif err.fatal() or err.code() in _FATAL:
                    raise KafkaException(err)
                else:
                    log.warning("suppressions: %s", err)
                continue
            part = msg.partition() or 0
            # The last offset below the end may be a transaction marker or
            # compacted away: the end-of-partition event covers those.
            if part in pending and (msg.offset() or 0) + 1 >= pending[part]:
                del pending[part]
            try:
                _, record = self._registry.decode(msg.value() or b"", "mailbus.Suppression")
            except DecodeError as exc:
                log.error("suppressions: skipping undecodable record at %s[%d]@%d: %s",
                          msg.topic(), part, msg.offset(), exc)
                continue
            self._target.apply(record)

    def close(self) -> None:
        """Stop following (the thread closes its consumer)."""
        self._stop.set()
        self._thread.join(5)


class SuppressionFeed:
    """Keeps one reader following the topic, replacing a dead one with backoff.

    `ready()` is the sender's gate: true only while a reader runs and has
    caught up. Replacements read into the same list, so what was known stays
    known while the new reader catches up (the topic only adds and lifts).
    """

    def __init__(self, make_reader: Callable[[], SuppressionReader], *,
                 backoff_base: float = 1.0, backoff_cap: float = 30.0,
                 report_seconds: float = 10.0):
        self._make = make_reader
        self._base, self._cap, self._report = backoff_base, backoff_cap, report_seconds
        self.reader: SuppressionReader | None = None
        self._stopped = asyncio.Event()

    def ready(self) -> bool:
        """The list is loaded and followed (safe to call from any thread)."""
        reader = self.reader
        return reader is not None and reader.running() and reader.loaded.is_set()

    async def run(self) -> None:
        """Until stop(): start a reader, watch it, replace it when it dies."""
        failures = 0
        while not self._stopped.is_set():
            reader = self.reader = self._make()
            reader.start()
            started = reported = time.monotonic()
            while reader.running() and not self._stopped.is_set():
                if not reader.loaded.is_set() and time.monotonic() - reported >= self._report:
                    reported = time.monotonic()
                    log.warning("suppressions: not loaded after %.0f s (%s partition(s) to go);"
                                " sending waits", reported - started,
                                "?" if reader.remaining is None else reader.remaining)
                await self._sleep(0.2)
            if self._stopped.is_set():
                break
            failures = 1 if reader.loaded.is_set() else failures + 1
            delay = backoff(failures, base=self._base, cap=self._cap)
            metrics.SUPPRESSION_READER_RESTARTS.inc()
            log.error("suppressions: reader died (%s); sending paused, new reader in %.1f s",
                      reader.error, delay)
            await asyncio.to_thread(reader.close)
            await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopped.wait(), seconds)
        except TimeoutError:
            pass

    def stop(self) -> None:
        """End run() (call on the event loop)."""
        self._stopped.set()

    def close(self) -> None:
        """Close the current reader."""
        if self.reader is not None:
            self.reader.close()
