"""Rewinding the projector: empty a namespace's projection and read the topics again.

The projection is a function of the log: every row the projector writes is
derived from events (ids, times and counts come from the events, never from
the clock, except the `updated_at`/`projected_at` bookkeeping), and every
write is idempotent. So the way to repair or rebuild it is to delete it and
let the projector read the topics from their start. What the topics no
longer hold (past their retention, 7 to 30 days) is not rebuilt.
"""

from __future__ import annotations

from typing import Any

import psycopg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from mailbus.errors import MailbusError

PROJECTION_TABLES = ("message_events", "message_status", "daily_counts", "suppressions")
PROJECTOR_GROUP = "mailbus-projector"


class RewindRefused(MailbusError):
    """A rewind that cannot be done safely now."""


def rewind_projector(kafka: dict[str, Any], conninfo: str, namespace: str,
                     group: str = PROJECTOR_GROUP) -> dict[str, int]:
    """Forget the projector group's offsets, then delete the namespace's projection.

    In that order: if the delete fails, the projector reads everything again
    into the rows that are left, which its idempotent writes allow; the other
    order could leave an empty projection behind offsets that skip the log.
    Refused while a projector of the namespace is running.
    """
    admin = AdminClient(kafka)
    name = namespace + group
    try:
        described = admin.describe_consumer_groups([name])[name].result(30)
    except KafkaException as exc:
        raise RewindRefused(f"cannot describe consumer group {name}: {exc}") from exc
    if described.members:
        raise RewindRefused(f"{len(described.members)} projector(s) of namespace "
                            f"{namespace!r} running; stop them first")
    try:
        admin.delete_consumer_groups([name])[name].result(30)
    except KafkaException as exc:
        if "GROUP_ID_NOT_FOUND" not in str(exc):  # never committed: nothing to forget
            raise RewindRefused(f"cannot delete consumer group {name}: {exc}") from exc
    deleted: dict[str, int] = {}
    with psycopg.connect(conninfo) as conn, conn.transaction():
        for table in PROJECTION_TABLES:
            cur = conn.execute(f"DELETE FROM {table} WHERE namespace = %s",  # noqa: S608
                               (namespace,))  # type: ignore[arg-type]  # names are constants
            deleted[table] = cur.rowcount
    return deleted
