"""Accepting requests: the database transaction around producing to Kafka.

Order of work for one request: claim the Idempotency-Key row (its own short
transaction, which draws the generation message ids derive from), then in
one transaction lock that row, insert the message rows, produce every event
and wait for the broker's acks, record the response, commit. Any failure
before that commit rolls it back, so a 503 leaves no message behind; only
an unanswered claim stays, for the retry to reuse.

A batch request is one such transaction. Single-message requests that
arrive together share one (groupcommit.py), and so do their key lookups
(coalesce.py), which a short cache spares most requests (keycache.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
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
from mailbus.ingest.coalesce import Coalescer, Outcome
from mailbus.ingest.groupcommit import Answer, Member, commit_group
from mailbus.ingest.handlers import ApiKey, message_row, requested_event
from mailbus.ingest.keycache import KeyCache
from mailbus.ingest.models import MessageRequest
from mailbus.ingest.problems import Problem, unauthorized, unavailable
from mailbus.producer import AsyncProducer

log = logging.getLogger(__name__)
SQL = queries.load_resource(__package__, "queries.sql")
# Concurrent runs of each kind, from the connection pool; what arrives while
# they are busy waits for the next, together.
LOOKUPS_IN_FLIGHT = 2
LOOKUP_GROUP_MAX = 500


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
                 directory: Directory, topic: str, retention_seconds: int = 86_400,
                 groups_in_flight: int = 2, group_max: int = 256,
                 key_cache_seconds: float = 0.0):
        self.pool, self.producer, self.registry = pool, producer, registry
        self.directory, self.topic = directory, topic
        self.retention_seconds = retention_seconds
        self.sql = SQL
        self.keys = KeyCache(key_cache_seconds)
        self._lookups: Coalescer[str, DictRow | None] = Coalescer(
            self._lookup_keys, max_in_flight=LOOKUPS_IN_FLIGHT, max_size=LOOKUP_GROUP_MAX)
        self._groups: Coalescer[Member, Answer] = Coalescer(
            partial(commit_group, self), max_in_flight=groups_in_flight, max_size=group_max,
            key=lambda m: m.record)

    async def authenticate(self, token: str | None) -> ApiKey:
        """The key a Bearer token names, or 401 (missing, malformed, wrong, revoked)."""
        parsed = apikeys.parse(token) if token else None
        if parsed is None:
            raise unauthorized()
        key_id, secret = parsed
        row = self.keys.get(key_id)
        if row is not None and not self._accepts(row, secret):
            # Kept from before a rotation, maybe: the new secret must work at once.
            row = None
        if row is None:
            # Its age counts from before the lookup: a revocation committed
            # while it was under way is seen within the TTL all the same.
            asked_at = self.keys.clock()
            row = await self._lookups.submit(key_id)
            if row is not None:
                self.keys.put(key_id, row, asked_at)
        if row is None or row["revoked_at"] is not None or not self._accepts(row, secret):
            raise unauthorized()
        accounts = frozenset(row["accounts"]) if row["accounts"] is not None else None
        return ApiKey(row["id"], frozenset(row["scopes"]), accounts, row["default_pool"],
                      row["rate_limit"])

    @staticmethod
    def _accepts(row: DictRow, secret: str) -> bool:
        return apikeys.accepts(secret, row["secret_sha256"], row["previous_secret_sha256"],
                               row["previous_valid_until"], datetime.now(UTC))

    async def _lookup_keys(self, key_ids: Sequence[str]) -> list[Outcome[DictRow | None]]:
        try:
            async with self.connection() as conn:
                cur = await conn.execute(SQL["keys_by_id"], {"ids": list(set(key_ids))})
                rows = await cur.fetchall()
                # The grace's end on this host's clock: however far it is from the
                # database's, the grace lasts what the rotation gave it.
                now = datetime.now(UTC)
                by_id = {row["id"]: row | {"previous_valid_until": None
                                           if row["previous_valid_seconds"] is None
                                           else now + timedelta(
                                               seconds=row["previous_valid_seconds"])}
                         for row in rows}
        except (Problem, psycopg.OperationalError):
            return [unavailable("database unavailable") for _ in key_ids]
        return [by_id.get(k) for k in key_ids]

    async def accept_one(self, member: Member) -> Answer:
        """Accept one single-message request in the next group commit; its (status, body)."""
        return await self._groups.submit(member)

    async def drain(self) -> None:
        """Let every group and lookup under way finish (shutdown)."""
        await self._groups.drain()
        await self._lookups.drain()

    async def claim(self, key: ApiKey, idempotency_key: str, digest: bytes) -> str:
        """Claim an Idempotency-Key (committed at once); the generation of this use of it."""
        ids = {"key_id": key.id, "idempotency_key": idempotency_key}
        async with self.connection() as conn:
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
        async with self.connection() as conn:
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
            except psycopg.errors.ForeignKeyViolation as exc:
                # The key was deleted by hand since this request was authenticated;
                # the rows come before any produce, so nothing was accepted.
                raise unauthorized() from exc
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
        async with self.connection() as conn:
            cur = await conn.execute(SQL["prune_idempotency"],
                                     {"retention": self.retention_seconds, "batch": batch})
            return cur.rowcount

    async def _produce_all(self, events: list[dict[str, Any]]) -> None:
        start = time.perf_counter()
        results = await self.producer.produce_many([
            (self.topic, self.registry.encode(topics.REQUESTED, e), e["account_id"].encode(), None)
            for e in events])
        metrics.PRODUCE_SECONDS.observe(time.perf_counter() - start)
        failed = [r for r in results if r is not None]
        if failed:
            raise failed[0]

    def connection(self) -> Any:
        """A pooled connection with dict rows; no connection to be had is a 503."""
        return _Connection(self.pool)

    async def database_ok(self) -> bool:
        """True when PostgreSQL answers."""
        try:
            async with self.connection() as conn:
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
