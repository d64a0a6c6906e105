"""Who must not be mailed: the compacted email.suppressions topic, held in memory."""

from __future__ import annotations

import logging
import threading
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from mailbus.codec import Registry
from mailbus.errors import DecodeError
from mailbus.topics import address_hash

log = logging.getLogger(__name__)


class Suppressions:
    """The suppression list, by address hash: scope None means every account."""

    def __init__(self) -> None:
        self._entries: dict[str, set[str | None]] = {}
        self._lock = threading.Lock()
        self.loaded = threading.Event()

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


class SuppressionReader:
    """Reads the whole topic from the beginning, then follows it, in a thread of its own.

    The topic is compacted and small (one record per address); every sender
    instance keeps all of it, so no group membership or offsets are needed.
    """

    def __init__(self, config: dict[str, Any], topic: str, registry: Registry,
                 target: Suppressions):
        self._consumer = Consumer({**config, "group.id": "mailbus-sender",
                                   "enable.auto.commit": False,
                                   "enable.partition.eof": True})
        self._topic, self._registry, self._target = topic, registry, target
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="suppressions", daemon=True)

    def start(self) -> None:
        """Assign every partition from the beginning and start following."""
        meta = self._consumer.list_topics(self._topic, timeout=30)
        parts = list(meta.topics[self._topic].partitions)
        self._consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in parts])
        self._pending_eof = set(parts)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._pending_eof.discard(msg.partition())
                    if not self._pending_eof:
                        self._target.loaded.set()
                else:
                    log.warning("suppressions: %s", err)
                continue
            try:
                _, record = self._registry.decode(msg.value() or b"", "mailbus.Suppression")
            except DecodeError as exc:
                log.error("suppressions: skipping undecodable record at %s[%d]@%d: %s",
                          msg.topic(), msg.partition(), msg.offset(), exc)
                continue
            self._target.apply(record)

    def close(self) -> None:
        """Stop following."""
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()
