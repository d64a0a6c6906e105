"""The ledger's SQL and the outbox: outcomes recorded and emitted, none lost, none twice sent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from mailbus import queries, topics
from mailbus.producer import AsyncProducer

log = logging.getLogger(__name__)
SQL = queries.load_resource(__package__, "queries.sql")


@dataclass(frozen=True)
class Record:
    """One Kafka record to emit."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


class Ledger:
    """send_ledger, through the statements in queries.sql."""

    def __init__(self, pool: AsyncConnectionPool, namespace: str, owner: str | None = None):
        # owner: this instance's id in sender_partitions; None for a ledger that only
        # admits, prunes or reads (take_over and claim need one).
        self.pool, self.namespace, self.owner = pool, namespace, owner

    async def _rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(SQL[name], {**params, "namespace": self.namespace})
            return await cur.fetchall() if cur.description else []

    async def admit(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert arriving requests (one transaction for the batch)."""
        if not rows:
            return
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.executemany(SQL["admit"], [{**r, "namespace": self.namespace}
                                                 for r in rows])

    async def take_over(self, partitions: list[int]) -> tuple[dict[int, int], int]:
        """Own these partitions under a new epoch; re-queue what was left `sending`.

        Returns each partition's epoch and how many rows were re-queued (they
        become ambiguous: sent again flagged as possible duplicates).
        """
        params = {"namespace": self.namespace, "owner": self.owner, "partitions": partitions}
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(SQL["take_over"], params)
            epochs = {int(r[0]): int(r[1]) for r in await cur.fetchall()}
            cur = await conn.execute(SQL["recover_sending"], params)
            return epochs, cur.rowcount

    async def claim(self, account_id: str, epochs: dict[int, int], limit: int,
                    pool_only: bool) -> list[dict[str, Any]]:
        """Due rows of an account in the partitions owned at these epochs, taken into `sending`."""
        parts = sorted(epochs)
        return await self._rows("claim", {
            "account_id": account_id, "owner": self.owner, "partitions": parts,
            "epochs": [epochs[p] for p in parts], "limit": limit, "pool_only": pool_only})

    async def requeue_orphans(self, account_id: str, epochs: dict[int, int],
                              holding: list[str], older_than: float) -> int:
        """Re-queue this account's rows left `sending` that no worker holds; how many."""
        parts = sorted(epochs)
        return len(await self._rows("requeue_orphans", {
            "account_id": account_id, "owner": self.owner, "partitions": parts,
            "epochs": [epochs[p] for p in parts], "holding": holding,
            "older_than": older_than}))

    async def prune(self, *, keep_seconds: float, payload_seconds: float,
                    batch: int) -> tuple[int, int]:
        """Retention, one batch each: (settled rows deleted, payloads cleared).

        The caller repeats while a batch comes back full; each batch is its
        own short transaction, so a large backlog never holds long locks.
        """
        async with self.pool.connection() as conn:
            cur = await conn.execute(SQL["prune_settled"], {
                "namespace": self.namespace, "keep_seconds": keep_seconds, "batch": batch})
            deleted = cur.rowcount
        async with self.pool.connection() as conn:
            cur = await conn.execute(SQL["clear_payloads"], {
                "namespace": self.namespace, "keep_seconds": payload_seconds, "batch": batch})
            cleared = cur.rowcount
        return deleted, cleared

    async def sent_in_window(self, account_id: str) -> list[datetime]:
        """Send times of the last 24 h."""
        return [r["sent_at"] for r in await self._rows("sent_in_window",
                                                        {"account_id": account_id})]


class Outbox:
    """Emits the events settles stored (see settle.py), and what a crash or outage left."""

    def __init__(self, pool: AsyncConnectionPool, producer: AsyncProducer, namespace: str,
                 owner: str):
        self.pool, self.producer, self.namespace = pool, producer, namespace
        self.ledger = Ledger(pool, namespace, owner)
        self._emitting: set[asyncio.Task[None]] = set()
        # Rows whose events the broker acknowledged, not deleted yet: the next settle
        # deletes them in its own transaction (take_emitted), the sweep or shutdown
        # otherwise (flush_emitted). A transaction of their own after every emission
        # cost as much as the settle itself. Lost in a crash, they are emitted again:
        # consumers deduplicate on event_id.
        self._emitted: list[int] = []

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait for background emissions (on shutdown); what is left stays in the outbox."""
        if self._emitting:
            await asyncio.wait(self._emitting, timeout=timeout)
        try:
            await self.flush_emitted()
        except Exception:  # left rows are emitted again by the next owner's sweep
            log.exception("could not clear %d emitted outbox row(s)", len(self._emitted))

    def take_emitted(self) -> list[int]:
        """Ids of emitted rows to delete; the taker deletes them or gives them back."""
        ids, self._emitted = self._emitted, []
        return ids

    def give_back(self, ids: list[int]) -> None:
        """Emitted rows a failed transaction did not delete."""
        self._emitted += ids

    async def flush_emitted(self) -> None:
        """Delete the rows of acknowledged events now."""
        ids = self.take_emitted()
        if not ids:
            return
        try:
            async with self.pool.connection() as conn:
                await conn.execute(SQL["outbox_done"], {"ids": ids})
        except BaseException:
            self.give_back(ids)
            raise

    async def emit(self, items: list[tuple[int, Record]]) -> None:
        results = await self.producer.produce_many([
            (rec.topic, rec.value, rec.key, [(k, v.encode()) for k, v in rec.headers] or None)
            for _, rec in items])
        self._emitted += [i for (i, _), r in zip(items, results, strict=True) if r is None]
        for (_, rec), r in zip(items, results, strict=True):
            if r is not None:
                # Stays in the outbox; the sweep emits it once Kafka is back.
                log.warning("emitting to %s failed, will retry: %s", rec.topic, r)

    async def sweep(self, partitions: list[int], min_age_seconds: float = 10.0) -> int:
        """Emit events left behind by a crash or a Kafka outage; returns how many."""
        await self.flush_emitted()  # what was emitted is not left behind
        async with self.pool.connection() as conn:
            cur = await conn.execute(SQL["outbox_pending"], {
                "partitions": partitions, "age": f"{min_age_seconds} seconds",
                "namespace": self.namespace,
                # The API's cancels and reschedules (change_schedule): no settle emits them.
                "schedule_topic": self.namespace + topics.SCHEDULE})
            rows = await cur.fetchall()
        items = [(r[0], Record(r[1], bytes(r[2]), bytes(r[3]), [tuple(h) for h in r[4]]))
                 for r in rows]
        if items:
            await self.emit(items)
        return len(items)
