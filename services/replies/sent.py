"""The edge of the report check: what PostgreSQL knows of the message a report names.

`events.judge()` decides whether a DSN or a complaint speaks for a recipient
of ours; this module asks the database the one question it needs answered,
through `replies_sent_to()`, which the replies role may call without reading
the projection or the sender's ledger.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from psycopg_pool import AsyncConnectionPool

from mailbus import queries
from mailbus.replies.classify import Inbound
from mailbus.replies.events import REPORTS, Sent, TagCheck, named, reference

SQL = queries.load_resource(__package__, "queries.sql")


class SentMessages:
    """The messages an installation (namespace) handed over, as reports need them."""

    def __init__(self, pool: AsyncConnectionPool, namespace: str):
        self.pool, self.namespace = pool, namespace

    async def lookup(self, message_id: str, addresses: Iterable[str]) -> Sent:
        """Whether the message was handed over, and which of these addresses it went to."""
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(SQL["sent_to"], {
                "namespace": self.namespace, "message_id": uuid.UUID(message_id),
                "addresses": list(addresses)})
            row = await cur.fetchone()
        projected, recipients, handed_over_at = row if row is not None else (False, [], None)
        return Sent(message_id, frozenset(recipients or ()), bool(projected), handed_over_at)

    async def for_report(self, inbound: Inbound, check_tag: TagCheck) -> Sent | None:
        """The lookup a DSN or complaint needs; None for other mail, or one naming nothing."""
        message_id = reference(inbound, check_tag)
        if inbound.kind not in REPORTS or message_id is None:
            return None
        return await self.lookup(message_id, named(inbound))
