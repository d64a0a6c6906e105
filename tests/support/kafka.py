"""Test helpers around the real broker: namespaces, consuming with a deadline."""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AclBindingFilter, AdminClient

from mailbus.provision import bindings
from mailbus.topics import GRANTS, TOPICS


def new_prefix() -> str:
    """A fresh namespace prefix: this test's topics and groups only."""
    return f"t{uuid.uuid4().hex[:12]}."


def drop_namespace(admin_config: dict[str, Any], prefix: str) -> None:
    """Delete a namespace's topics (Faust's own included) and ACLs."""
    admin = AdminClient(admin_config)
    names = [t for t in admin.list_topics(timeout=30).topics if t.startswith(prefix)]
    for future in admin.delete_topics(names or [prefix + t.name for t in TOPICS]).values():
        with contextlib.suppress(KafkaException):  # already gone: nothing to clean
            future.result(30)
    filters = [
        AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal, b.host,
                         b.operation, b.permission_type)
        for service, grant in GRANTS.items() for b in bindings(service, grant, prefix)
    ]
    for future in admin.delete_acls(filters).values():
        future.result(30)


def read_all(config: dict[str, Any], topic: str, *, expect: int | None = None,
             timeout: float = 20.0, settle: float = 1.0) -> list[Message]:
    """Every record of a topic from the beginning.

    With `expect`, returns as soon as that many arrived (or fails at the
    deadline); without, reads until every partition reached its end and then
    nothing new arrived for `settle` s. Reaching the end first matters on a
    slow broker: the first fetch can take longer than `settle` by itself.
    """
    consumer = Consumer({
        **config,
        "group.id": f"test-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
    })
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = meta.topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        at_end: set[int] = set()
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if (expect is None and len(at_end) == len(parts)
                        and time.monotonic() - last_new > settle):
                    break
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    if len(at_end) < len(parts):
                        at_end.add(msg.partition() or 0)
                        if len(at_end) == len(parts):
                            last_new = time.monotonic()  # quiet from here on
                    continue
                raise AssertionError(f"consumer error: {msg.error()}")
            out.append(msg)
            last_new = time.monotonic()
            if expect is not None and len(out) >= expect:
                break
        return out
    finally:
        consumer.close()
