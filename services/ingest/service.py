"""Accepting requests: the database transaction around producing to Kafka.

Order of work for one request: claim the Idempotency-Key row (its own short
transaction, which draws the generation message ids derive from), then in
one transaction lock that row, insert the message rows, produce every event
and wait for the broker's acks, record the response, commit. Any failure
before that commit rolls it back, so a 503 leaves no message behind; only
an unanswered claim stays, for the retry to reuse.
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
from mailbus.ingest.problems import Problem, unauthorized, unavailable
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
                 directory: Directory, topic: str, retention_seconds: int = 86_400):
        self.pool, self.producer, self.registry = pool, producer, registry
        self.directory, self.topic = directory, topic
        self.retention_seconds = retention_seconds

    async def authenticate(self, token: str | None) -> ApiKey:
        """The key a Bearer token names, or 401 (missing, malformed, wrong, revoked)."""
        parsed = apikeys.parse(token) if token else None
        if parsed is None:
            raise unauthorized()
        key_id, secret = parsed
        async with self._connection() as conn:
            row = await (await conn.execute(SQL["key_by_id"], {"key_id": key_id})).fetchone()
        if row is None or row["revoked_at"] is not None or not apikeys.matches(
            secret, row["secret_sha256"]
        ):
            raise unauthorized()
        accounts = frozenset(row["accounts"]) if row["accounts"] is not None else None
        return ApiKey(row["id"], frozenset(row["scopes"]), accounts, row["default_pool"],
                      row["rate_limit"])

    async def claim(self, key: ApiKey, idempotency_key: str, digest: bytes) -> str:
        """Claim an Idempotency-Key (committed at once); the generation of this use of it."""
        ids = {"key_id": key.id, "idempotency_key": idempotency_key}
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    await conn.execute(SQL["forget_expired_idempotency"],
                                       {**ids, "retention": self.retention_seconds})
                    row = await (await conn.execute(SQL["claim_idempotency"],
                                 {**ids, "request_sha256": digest})).fetchone()
                    if row is None:
                        row = await (await conn.execute(SQL["idempotency_generation"],
                                                        ids)).fetchone()
            except psycopg.OperationalError as exc:
                raise unavailable("database unavailable") from exc
        if row is None:  # pruned in the instant between the two statements
            raise unavailable("idempotency record changed, retry", retry_after=1)
        return str(row["generation"])

    async def accept(
        self, key: ApiKey, planned: Sequence[Planned], idempotency_key: str | None,
        digest: bytes, respond: Any, generation: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Accept planned messages atomically; `respond(ids)` builds the (status, body).

        With an Idempotency-Key, `generation` is what `claim` returned and the
        planned ids derive from it.
        """
        ids = {"key_id": key.id, "idempotency_key": idempotency_key}
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    if idempotency_key is not None:
                        record = await (await conn.execute(SQL["lock_idempotency"],
                                                           ids)).fetchone()
                        if record is None or str(record["generation"]) != generation:
                            # Expired and pruned, or claimed anew, since our claim.
                            raise unavailable("idempotency record changed, retry", 1)
                        if record["status_code"] != 0:
                            return self._replay(record, digest)
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
                                           {**ids, "status_code": status, "response": Jsonb(body),
                                            "request_sha256": digest})
            except UnavailableError as exc:
                metrics.REJECTED.labels("unavailable").inc(len(planned))
                log.warning("not accepted, %d message(s): %s", len(planned), exc)
                raise unavailable(str(exc)) from exc
            except psycopg.OperationalError as exc:
                raise unavailable("database unavailable") from exc
        for p in planned:
            metrics.ACCEPTED.labels(p.account_id, p.pool or "").inc()
        return status, body

    @staticmethod
    def _replay(record: dict[str, Any], digest: bytes) -> tuple[int, dict[str, Any]]:
        if record["request_sha256"] != digest:
            raise Problem(409, "idempotency-conflict", "Idempotency-Key reused",
                          "this Idempotency-Key was used with a different request body")
        metrics.IDEMPOTENT_REPLAYS.inc()
        return record["status_code"], record["response"]

    async def prune(self, batch: int) -> int:
        """Delete up to `batch` expired Idempotency-Key records; how many went."""
        async with self._connection() as conn:
            cur = await conn.execute(SQL["prune_idempotency"],
                                     {"retention": self.retention_seconds, "batch": batch})
            return cur.rowcount

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
