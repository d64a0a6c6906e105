"""Delivering queued events: one worker per (endpoint, lane), none waits on another.

Every `dispatch_seconds` the dispatcher asks which (endpoint, lane) pairs
have a due delivery nobody holds, and starts a worker for each it is not
already running, up to `max_endpoints_in_flight`. A worker claims its
lane's oldest due deliveries (a lease, so another instance leaves them
alone), and sends them one at a time in event order; each attempt and its
outcome are written in one transaction. At a failure the worker stops and
hands the rest back; the failed delivery waits out its backoff while the
others are tried again at once. A slow or failing endpoint so holds only
its own worker, never another endpoint's deliveries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from mailbus import queries, webhook_signing
from mailbus.webhooks import metrics
from mailbus.webhooks.client import Attempt, Limits, attempt, new_client
from mailbus.webhooks.rules import after_attempt, should_disable, succeeded
from mailbus.webhooks.settings import WebhooksSettings

log = logging.getLogger(__name__)
SQL = queries.load_resource(__package__, "queries.sql")
# Rows per delete statement: a backlog never holds many row locks at once.
PRUNE_BATCH = 1000


class Dispatcher:
    """Starts and tracks the workers of one namespace's endpoints."""

    def __init__(self, settings: WebhooksSettings, pool: AsyncConnectionPool):
        self.settings = settings
        self.pool = pool
        self.namespace = settings.kafka.topic_prefix
        self.policy = settings.policy()
        self.limits = Limits(settings.timeout_seconds, settings.max_response_bytes)
        self.workers: dict[tuple[str, str], asyncio.Task[None]] = {}
        # One client per endpoint and host: a pooled connection (and the TLS
        # session verified for one name) is never reused for another name.
        self.clients: dict[tuple[str, str], httpx.AsyncClient] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until `stop` is set; running workers finish their attempt first."""
        pruned_at = measured_at = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                    if loop.time() - measured_at >= self.settings.lag_seconds:
                        measured_at = loop.time()
                        await self.measure()
                    if loop.time() - pruned_at >= self.settings.prune_seconds:
                        pruned_at = loop.time()
                        if deleted := await self.prune():
                            log.info("webhooks: pruned %d settled deliveries", deleted)
                except Exception:  # the loop must outlive a database outage
                    log.exception("webhooks: dispatch round failed")
                try:
                    await asyncio.wait_for(stop.wait(), self.settings.dispatch_seconds)
                except TimeoutError:
                    pass
        finally:
            if self.workers:
                await asyncio.wait(list(self.workers.values()),
                                   timeout=self.settings.timeout_seconds + 1)
            for client in self.clients.values():
                await client.aclose()

    async def tick(self) -> None:
        """One round: start a worker for every due lane that has none."""
        free = self.settings.max_endpoints_in_flight - len(self.workers)
        if free <= 0:
            return
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(SQL["due_lanes"], {
                "namespace": self.namespace,
                "limit": free + len(self.workers)})).fetchall()
        for endpoint_id, lane in rows:
            key = (str(endpoint_id), str(lane))
            if key in self.workers or len(self.workers) >= self.settings.max_endpoints_in_flight:
                continue
            task = asyncio.create_task(self.work(*key))
            self.workers[key] = task
            task.add_done_callback(self._forget(key))

    def _forget(self, key: tuple[str, str]) -> Callable[[asyncio.Task[None]], None]:
        def done(_: asyncio.Task[None]) -> None:
            self.workers.pop(key, None)
        return done

    async def work(self, endpoint_id: str, lane: str) -> None:
        """Deliver one lane's due deliveries in event order until none is due or one fails."""
        ids = {"endpoint_id": endpoint_id, "lane": lane}
        try:
            while True:
                async with self.pool.connection() as conn:
                    cur = conn.cursor(row_factory=dict_row)
                    await cur.execute(SQL["endpoint"], ids)
                    endpoint = await cur.fetchone()
                    if endpoint is None or not endpoint["enabled"]:
                        return
                    await cur.execute(SQL["claim"], ids | {
                        "limit": self.settings.claim_batch,
                        "lease": self.settings.lease_seconds})
                    claimed = sorted(await cur.fetchall(),
                                     key=lambda r: (r["occurred_at"], str(r["event_id"])))
                if not claimed:
                    return
                for i, row in enumerate(claimed):
                    if not await self.deliver(endpoint, ids, row):
                        rest = [r["event_id"] for r in claimed[i + 1:]]
                        if rest:
                            async with self.pool.connection() as conn:
                                await conn.execute(SQL["release"], ids | {"event_ids": rest})
                        return
        except Exception:  # its leases run out; the next round retries
            log.exception("webhooks: worker for endpoint %s stopped", endpoint_id)

    async def deliver(self, endpoint: dict[str, Any], ids: dict[str, str],
                      row: dict[str, Any]) -> bool:
        """One attempt of one delivery, recorded with its outcome; True when delivered."""
        secrets_ = [endpoint["secret"]]
        if endpoint["previous_secret"] and endpoint["previous_valid"]:
            secrets_.append(endpoint["previous_secret"])
        body = row["body"].encode()
        now = datetime.now(UTC)
        headers = webhook_signing.headers(secrets_, str(row["event_id"]), int(now.timestamp()),
                                          body)
        client_key = (ids["endpoint_id"], urlsplit(endpoint["url"]).netloc)
        client = self.clients.get(client_key)
        if client is None:
            ca = str(self.settings.ca_file) if self.settings.ca_file else None
            client = self.clients[client_key] = new_client(ca)
        result = await attempt(client, endpoint["url"], self.policy, self.limits, headers, body)
        number = row["attempts"] + 1
        ok = succeeded(result.status_code)
        outcome = after_attempt(number, ok, datetime.now(UTC),
                                self.settings.retry_schedule_seconds)
        metrics.ATTEMPTS.labels(_label(result, ok)).inc()
        metrics.ATTEMPT_SECONDS.observe(result.latency_ms / 1000)
        params = ids | {"event_id": row["event_id"], "attempt": number,
                        "status_code": result.status_code, "latency_ms": result.latency_ms,
                        "error": result.error, "response": _clean(result.response),
                        "state": outcome.state, "next_attempt_at": outcome.next_attempt_at}
        try:
            disabled = await self._settle(ids, row, params, outcome.state, number)
        except psycopg.errors.ForeignKeyViolation:
            # The endpoint was deleted during the attempt: nothing to record.
            return False
        if outcome.state == "failed":
            metrics.EXHAUSTED.inc()
        if disabled:
            metrics.DISABLED.inc()
            log.warning("webhooks: endpoint %s disabled: %s", ids["endpoint_id"], disabled)
        return ok

    async def _settle(self, ids: dict[str, str], row: dict[str, Any], params: dict[str, Any],
                      state: str, number: int) -> str | None:
        """Record the attempt and the delivery's state; the reason when the endpoint was
        disabled by it."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(SQL["record_attempt"], params)
            await conn.execute(SQL["settle"], params)
            if state != "failed":
                return None
            last = await (await conn.execute(SQL["last_success"], ids)).fetchone()
            if not should_disable(last[0] if last else None, row["created_at"]):
                return None
            reason = (f"every attempt failed for {number} attempts since"
                      f" {row['created_at'].isoformat()}")
            cur = await conn.execute(SQL["disable"], ids | {"reason": reason})
            return reason if cur.rowcount else None

    async def measure(self) -> None:
        """Set the pending gauge from the deliveries table."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute(SQL["backlog"], {"namespace": self.namespace}
                                            )).fetchone()
        due, waiting = row if row is not None else (0, 0)
        metrics.PENDING.labels("due").set(due)
        metrics.PENDING.labels("waiting").set(waiting)

    async def prune(self) -> int:
        """Delete settled deliveries (and their attempts) past the retention; how many."""
        deleted = 0
        while True:
            async with self.pool.connection() as conn:
                cur = await conn.execute(SQL["prune"], {
                    "namespace": self.namespace, "days": self.settings.retention_days,
                    "batch": PRUNE_BATCH})
            deleted += max(cur.rowcount, 0)
            if cur.rowcount < PRUNE_BATCH:
                return deleted


def _label(result: Attempt, ok: bool) -> str:
    if ok:
        return "delivered"
    if result.status_code is not None:
        return "http_error"
    return "refused" if (result.error or "").startswith("refused") else "error"


def _clean(text: str | None) -> str | None:
    # A text column refuses NUL; an endpoint's answer may hold one.
    return text.replace("\x00", "\ufffd") if text is not None else None
