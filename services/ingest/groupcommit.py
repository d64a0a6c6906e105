"""Group commit: single-message requests that arrive together share one transaction.

Each request is validated, routed and (with an Idempotency-Key) claimed on its
own, then handed to a `Coalescer` (coalesce.py). A group is one PostgreSQL
transaction: lock the members' Idempotency-Key records (one statement, one
lock order), insert every member's message row (one pipelined round trip),
produce every event and wait for the broker's acks, record the answers of the
keyed members, commit. Only then does any member get its 202. If Kafka or
PostgreSQL fails anywhere in that, the transaction rolls back and every
member of the group answers 503: nothing of the group was recorded, and
what may have reached Kafka carries message ids the retry of a keyed request
derives again (an unkeyed request is in the same place as an unkeyed
request whose ack was lost, as before).

Per member, without failing the others: a record claimed anew or expired
since the member's claim (503, retry), a record already answered (its stored
answer, or 409 for another body), an event that does not encode (500).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb

from mailbus import topics
from mailbus.errors import UnavailableError
from mailbus.ingest import metrics
from mailbus.ingest.coalesce import Outcome
from mailbus.ingest.handlers import ApiKey, message_row, requested_event
from mailbus.ingest.problems import Problem, unavailable

if TYPE_CHECKING:
    from mailbus.ingest.service import Ingestor, Planned

log = logging.getLogger(__name__)
Answer = tuple[int, dict[str, Any]]


@dataclass(frozen=True)
class Member:
    """One single-message request waiting for its group."""

    key: ApiKey
    planned: Planned
    idempotency_key: str | None
    digest: bytes
    generation: str | None

    @property
    def record(self) -> tuple[str, str] | None:
        """Its Idempotency-Key record's primary key; two members of one never share a group."""
        return None if self.idempotency_key is None else (self.key.id, self.idempotency_key)


def queued(message_id: str) -> Answer:
    """The 202 of an accepted single message."""
    return 202, {"id": message_id, "status": "queued"}


async def commit_group(ing: Ingestor, members: Sequence[Member]) -> list[Outcome[Answer]]:
    """Accept a group of members in one transaction; one outcome per member, in order."""
    metrics.GROUP_SIZE.observe(len(members))
    try:
        return await _commit(ing, members)
    except psycopg.errors.ForeignKeyViolation:
        # A member's key was deleted by hand while the insert checked it (the
        # insert leaves out keys already gone). Once more: this time it is gone.
        # The events of the first attempt are in Kafka already; the second
        # produces the same message ids, which the sender admits once.
        log.warning("a key of a group of %d was deleted meanwhile; committing again",
                    len(members))
    try:
        return await _commit(ing, members)
    except psycopg.errors.ForeignKeyViolation:  # keys deleted again: let the clients retry
        return [unavailable("keys changed meanwhile, retry", 1) for _ in members]


async def _commit(ing: Ingestor, members: Sequence[Member]) -> list[Outcome[Answer]]:
    outcomes: list[Outcome[Answer] | None] = [None] * len(members)
    sql = ing.sql
    try:
        # Pipeline mode: BEGIN and the INSERT leave at once and run while the
        # broker acks; COMMIT (or ROLLBACK) and any error of the statements
        # before it come back in one round trip at the end.
        async with ing.connection() as conn, conn.pipeline() as pipeline, conn.transaction():
            keyed = [(i, m) for i, m in enumerate(members) if m.record is not None]
            if keyed:
                await _check_records(conn, pipeline, sql, keyed, outcomes)
            now = datetime.now(UTC)
            todo: list[tuple[int, Member, dict[str, Any], bytes]] = []
            for i, m in enumerate(members):
                if outcomes[i] is not None:
                    continue
                try:
                    event = _event(m, now)
                    value = ing.registry.encode(topics.REQUESTED, event)
                except Exception as exc:  # one member's data must not fail its group
                    log.exception("event of message %s does not encode", m.planned.message_id)
                    outcomes[i] = exc
                    continue
                todo.append((i, m, event, value))
            if todo:
                rows = Jsonb([_json_row(message_row(e)) for _, _, e, _ in todo])
                # The rows and the events travel at once: neither is visible
                # to anyone before the commit, which waits for both.
                await conn.execute(sql["insert_messages"], {"rows": rows})
                await _produce(ing, [(e["account_id"], v) for _, _, e, v in todo])
                finished = [{"key_id": m.key.id, "idempotency_key": m.idempotency_key,
                             "status_code": 202, "response": Jsonb(queued(e["message_id"])[1]),
                             "request_sha256": m.digest}
                            for _, m, e, _ in todo if m.idempotency_key is not None]
                if finished:
                    async with conn.cursor() as cur:
                        await cur.executemany(sql["finish_idempotency"], finished)
    except (UnavailableError, psycopg.OperationalError, Problem) as exc:
        # Problem: no connection from the pool (503). Every member fails alike.
        detail = str(exc) if isinstance(exc, UnavailableError) else "database unavailable"
        metrics.REJECTED.labels("unavailable").inc(len(members))
        log.warning("not accepted, a group of %d message(s): %s", len(members), exc)
        return [unavailable(detail) for _ in members]
    for i, m in enumerate(members):
        if outcomes[i] is None:
            outcomes[i] = queued(m.planned.message_id)
            metrics.ACCEPTED.labels(m.planned.account_id, m.planned.pool or "").inc()
    return outcomes  # type: ignore[return-value]  # every slot is filled by now


async def _check_records(conn: Any, pipeline: Any, sql: dict[str, str],
                         keyed: list[tuple[int, Member]],
                         outcomes: list[Outcome[Answer] | None]) -> None:
    """Lock the keyed members' records; settle those that must not produce."""
    cur = await conn.execute(sql["lock_idempotency_group"], {
        "key_ids": [m.key.id for _, m in keyed],
        "idempotency_keys": [m.idempotency_key for _, m in keyed]})
    await pipeline.sync()  # their answers decide who produces
    records = {(r["key_id"], r["idempotency_key"]): r for r in await cur.fetchall()}
    for i, m in keyed:
        record = records.get((m.key.id, m.idempotency_key))
        if record is None or str(record["generation"]) != m.generation:
            # Expired and pruned, or claimed anew, since this member's claim.
            outcomes[i] = unavailable("idempotency record changed, retry", 1)
        elif record["status_code"] != 0:
            if record["request_sha256"] != m.digest:
                outcomes[i] = Problem(409, "idempotency-conflict", "Idempotency-Key reused",
                                      "this Idempotency-Key was used with a different request"
                                      " body")
            else:
                metrics.IDEMPOTENT_REPLAYS.inc()
                outcomes[i] = (record["status_code"], record["response"])


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A `messages` row as JSON: times in ISO 8601, which timestamptz reads back exactly."""
    for name in ("send_at", "requested_at"):
        if row[name] is not None:
            row[name] = row[name].isoformat()
    return row


def _event(m: Member, now: datetime) -> dict[str, Any]:
    p = m.planned
    return requested_event(p.request, message_id=p.message_id, account_id=p.account_id,
                           pool=p.pool, key_id=m.key.id, idempotency_key=m.idempotency_key,
                           now=now)


async def _produce(ing: Ingestor, records: list[tuple[str, bytes]]) -> None:
    """Every record of the group acknowledged by the broker, or UnavailableError."""
    start = time.perf_counter()
    results = await ing.producer.produce_many(
        [(ing.topic, value, account.encode(), None) for account, value in records])
    metrics.PRODUCE_SECONDS.observe(time.perf_counter() - start)
    failed = [r for r in results if r is not None]
    if failed:
        raise failed[0]
