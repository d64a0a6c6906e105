"""Consumer lag per topic and partition for one group, as a Prometheus gauge.

The lag of a partition is its high watermark minus the group's committed
offset (or minus the low watermark while the group has committed nothing
there). Both come from the broker: a Consumer configured with the group's id
but never subscribed fetches the committed offsets (OffsetFetch: DESCRIBE on
the group and the topic, which READ implies) and the watermarks (ListOffsets:
DESCRIBE on the topic), so a service's own principal can report its own
group. The partition label is bounded by the topics' partition counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import Gauge

log = logging.getLogger(__name__)

LAG = Gauge("mailbus_consumer_lag", "Records behind the high watermark, per partition",
            ["group", "topic", "partition"])


class LagReporter:
    """Reads a group's committed offsets and the watermarks; sets mailbus_consumer_lag."""

    def __init__(self, config: dict[str, Any], group: str, topics: Sequence[str],
                 timeout: float = 10.0):
        self.group = group
        self.topics = list(topics)
        self.timeout = timeout
        self._consumer: Consumer | None = None
        self._config = {**config, "group.id": group, "enable.auto.commit": False,
                        "client.id": f"{group}-lag"}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _client(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(self._config)
        return self._consumer

    def _partitions(self, consumer: Consumer) -> list[TopicPartition]:
        found: list[TopicPartition] = []
        for topic in self.topics:
            meta = consumer.list_topics(topic, timeout=self.timeout).topics.get(topic)
            if meta is None or meta.error is not None:
                continue
            found += [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        return found

    def measure(self) -> dict[tuple[str, int], int]:
        """The lag of every partition of the topics: (topic, partition) -> records."""
        with self._lock:
            consumer = self._client()
            partitions = self._partitions(consumer)
            if not partitions:
                return {}
            committed = consumer.committed(partitions, timeout=self.timeout)
            lag: dict[tuple[str, int], int] = {}
            for tp in committed:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(tp.topic, tp.partition), timeout=self.timeout, cached=False)
                start = tp.offset if tp.offset >= 0 else low
                lag[(tp.topic, tp.partition)] = max(0, high - start)
            consumer.poll(0)  # hands over librdkafka's log lines (client_config's logger)
            return lag

    def refresh(self) -> bool:
        """Measure and publish; False (and a log line) when the broker did not answer."""
        try:
            lag = self.measure()
        except KafkaException as exc:
            log.warning("lag of group %s not measured: %s", self.group, exc)
            return False
        for (topic, partition), value in lag.items():
            LAG.labels(self.group, topic, str(partition)).set(value)
        return True

    def start(self, interval: float = 10.0) -> LagReporter:
        """Refresh every `interval` seconds in a daemon thread (for non-asyncio services)."""
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception:  # never take the service down for a metric
                    log.exception("lag reporter failed")
                self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, name=f"lag-{self.group}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, if any, and close the client."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1)
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
