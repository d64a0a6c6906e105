"""Accepting requests: the database transaction around producing to Kafka.

Order of work for one request: claim the Idempotency-Key row (the lock),
insert the message rows, produce every event and wait for the broker's acks,
record the response, commit. Any failure before the commit rolls the whole
transaction back, so a 503 leaves nothing half-done in the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from mailbus import apikeys, queries, topics
from mailbus.accounts import Directory
from mailbus.codec import Registry
from mailbus.errors import UnavailableError
from mailbus.ingest import metrics
from mailbus.ingest.handlers import ApiKey, message_row, requested_event
from mailbus.ingest.models import MessageRequest
from mailbus.ingest.problems import Problem, unavailable
from mailbus.producer import AsyncProducer

log = logging.getLogger(__name__)
SQL = queries.load(Path(__file__).with_name("queries.sql"))


@dataclass(frozen=True)
class Planned:
    """A validated request with its routing decided, ready to be accepted."""

    request: MessageRequest
    message_id: str
    account_id: str
    pool: str | None


class Ingestor:
    """The I/O of the ingest API: keys, idempotency, messages, Kafka."""

    def __init__(self, pool: AsyncConnectionPool, producer: AsyncProducer, registry: Registry,
                 directory: Directory, topic: str):
        self.pool, self.producer, self.registry = pool, producer, registry
        self.directory, self.topic = directory, topic

    async def authenticate(self, token: str | None) -> ApiKey:
        """The key a Bearer token names, or 401 (missing, malformed, wrong, revoked)."""
        parsed = apikeys.parse(token) if token else None
        if parsed is None:
            raise Problem(401, "unauthorized", "Unauthorized", "a valid API key is required",
                          headers={"WWW-Authenticate": 'Bearer realm="mailbus"'})
        key_id, secret = parsed
        async with self._connection() as conn:
            row = await (await conn.execute(SQL["key_by_id"], {"key_id": key_id})).fetchone()
        if row is None or row["revoked_at"] is not None or not apikeys.matches(
            secret, row["secret_sha256"]
        ):
            raise Problem(401, "unauthorized", "Unauthorized", "a valid API key is required",
                          headers={"WWW-Authenticate": 'Bearer realm="mailbus"'})
        accounts = frozenset(row["accounts"]) if row["accounts"] is not None else None
        return ApiKey(row["id"], frozenset(row["scopes"]), accounts, row["default_pool"])

    async def accept(
        self, key: ApiKey, planned: Sequence[Planned], idempotency_key: str | None,
        digest: bytes, respond: Any,
    ) -> tuple[int, dict[str, Any]]:
        """Accept planned messages atomically; `respond(ids)` builds the (status, body)."""
        ids = {"key_id": key.id, "idempotency_key": idempotency_key}
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    if idempotency_key is not None:
                        claimed = await (await conn.execute(SQL["claim_idempotency"],
                                         {**ids, "request_sha256": digest})).fetchone()
                        if claimed is None:
                            return await self._replay(conn, ids, digest)
                    now = datetime.now(UTC)
                    events = [
                        requested_event(p.request, message_id=p.message_id, account_id=p.account_id,
                                        pool=p.pool, key_id=key.id,
                                        idempotency_key=idempotency_key, now=now)
                        for p in planned
                    ]
                    rows = [message_row(e) for e in events]
                    async with conn.cursor() as cur:
                        await cur.executemany(SQL["insert_message"], rows)
                    await self._produce_all(events)
                    status, body = respond([p.message_id for p in planned])
                    if idempotency_key is not None:
                        await conn.execute(SQL["finish_idempotency"],
                                           {**ids, "status_code": status, "response": Jsonb(body)})
            except UnavailableError as exc:
                metrics.REJECTED.labels("unavailable").inc(len(planned))
                log.warning("not accepted, %d message(s): %s", len(planned), exc)
                raise unavailable(str(exc)) from exc
            except psycopg.OperationalError as exc:
                raise unavailable("database unavailable") from exc
        for p in planned:
            metrics.ACCEPTED.labels(p.account_id, p.pool or "").inc()
        return status, body

    async def _replay(self, conn: psycopg.AsyncConnection[DictRow], ids: dict[str, Any],
                      digest: bytes) -> tuple[int, dict[str, Any]]:
        record = await (await conn.execute(SQL["idempotency_record"], ids)).fetchone()
        if record is None or record["request_sha256"] != digest:
            raise Problem(409, "idempotency-conflict", "Idempotency-Key reused",
                          "this Idempotency-Key was used with a different request body")
        metrics.IDEMPOTENT_REPLAYS.inc()
        return record["status_code"], record["response"]

    async def _produce_all(self, events: list[dict[str, Any]]) -> None:
        start = time.perf_counter()
        futures = [
            self.producer.produce(
                self.topic,
                self.registry.encode(topics.REQUESTED, e),
                key=e["account_id"].encode(),
            )
            for e in events
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        metrics.PRODUCE_SECONDS.observe(time.perf_counter() - start)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0] if isinstance(failed[0], UnavailableError) else UnavailableError(
                f"kafka: {failed[0]}")

    def _connection(self) -> Any:
        return _Connection(self.pool)

    async def database_ok(self) -> bool:
        """True when PostgreSQL answers."""
        try:
            async with self._connection() as conn:
                await conn.execute("SELECT 1")
        except (Problem, psycopg.Error):
            return False
        return True


class _Connection:
    """A pooled connection with dict rows; pool or server trouble becomes a 503."""

    def __init__(self, pool: AsyncConnectionPool):
        self._cm = pool.connection()

    async def __aenter__(self) -> psycopg.AsyncConnection[DictRow]:
        try:
            conn = await self._cm.__aenter__()
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise unavailable("database unavailable") from exc
        conn.row_factory = dict_row  # type: ignore[assignment]  # pool connections are untyped
        return cast("psycopg.AsyncConnection[DictRow]", conn)

    async def __aexit__(self, *exc: Any) -> None:
        await self._cm.__aexit__(*exc)
