"""Group commit: outcomes of many deliveries settled in one transaction, never dropped.

Workers hand an `Outcome` to the settler and move on to the next message.
The settler takes whatever arrived within a few milliseconds, and in one
transaction checks that this instance still owns each outcome's partition at
the epoch its row was claimed under (`fence`), marks the rows, and stores the
events of the rows it marked in the outbox. Events of a row that was not
`sending` any more, or of a partition another sender took over, are dropped
and logged: the row belongs to someone else now, who sends it again flagged
as a possible duplicate. A batch that fails (PostgreSQL down) is retried with
backoff until it lands, so a message the transport accepted ends `sent`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from mailbus.sender import metrics
from mailbus.sender.outbox import SQL, Outbox, Record
from mailbus.sender.quota import backoff

log = logging.getLogger(__name__)
STATEMENTS = {"sent": "mark_sent", "failed": "mark_failed", "rerouted": "mark_rerouted",
              "partial": "mark_partial", "retry": "mark_retry"}
RETRY_BASE, RETRY_CAP = 0.2, 5.0


@dataclass
class Outcome:
    """What became of one claimed row, and the events that say so."""

    message_id: str
    partition: int
    epoch: int
    state: str  # a key of STATEMENTS
    records: Sequence[Record] = ()
    params: dict[str, Any] = field(default_factory=dict)


def fenced(outcomes: Iterable[Outcome], owned: dict[int, int]
           ) -> tuple[list[Outcome], list[Outcome]]:
    """(may settle, may not): an outcome settles only under its partition's current epoch."""
    keep: list[Outcome] = []
    drop: list[Outcome] = []
    for o in outcomes:
        (keep if owned.get(o.partition) == o.epoch else drop).append(o)
    return keep, drop


# A settle batch's arrays go to PostgreSQL as array literals written here, not as
# Python lists: psycopg adapts a list element by element in Python, which cost a
# settle batch of 64 about three times the CPU of the literal (measured). Each
# element is quoted; the values are ours (UUIDs, topic names, ISO times, hex).
def text_array(items: Iterable[str | None]) -> str:
    """A PostgreSQL array literal of strings that hold no `"` or backslash (None: NULL)."""
    return "{" + ",".join(["NULL" if item is None else '"' + item + '"'
                           for item in items]) + "}"


def bytea_array(items: Iterable[bytes]) -> str:
    """A PostgreSQL array literal of byte strings, each in bytea's hex form."""
    return "{" + ",".join(['"\\\\x' + item.hex() + '"' for item in items]) + "}"


def statement_params(o: Outcome, namespace: str) -> dict[str, Any]:
    """Parameters of the outcome's mark_* statement."""
    p = o.params
    pending = p.get("pending")
    return {"message_id": o.message_id, "namespace": namespace, "sent_at": p.get("sent_at"),
            "error": (p.get("error") or "")[:2000], "due_at": p.get("due_at"),
            "pending": list(pending) if pending is not None else None,
            "refund": p.get("refund", 0), "ambiguous": p.get("ambiguous", False)}


class Settler:
    """Batches outcomes into transactions; emits their events after each commit."""

    def __init__(self, pool: AsyncConnectionPool, namespace: str, owner: str,
                 emit: Callable[[list[tuple[int, Record]]], Coroutine[Any, Any, None]], *,
                 window: float = 0.0, max_batch: int = 500, outbox: Outbox | None = None):
        self.pool, self.namespace, self.owner, self._emit = pool, namespace, owner, emit
        # Whose emitted rows each transaction deletes on its way (Outbox.take_emitted).
        self.outbox = outbox
        self.window, self.max_batch = window, max_batch
        self._queue: list[tuple[Outcome, asyncio.Future[bool]]] = []
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._emitting: set[asyncio.Task[None]] = set()

    @property
    def backlog(self) -> int:
        """Outcomes not committed yet."""
        return len(self._queue)

    def put(self, outcome: Outcome) -> asyncio.Future[bool]:
        """Queue an outcome; the future says, once run() committed it, whether it landed
        (False: fenced off, the row is another sender's)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((outcome, done))
        self._idle.clear()
        self._arrived.set()
        return done

    async def run(self) -> None:
        """Until cancelled: commit what arrived, retrying a failed batch until it lands."""
        failures = 0
        while True:
            if not self._queue:
                self._idle.set()
                self._arrived.clear()
                await self._arrived.wait()
            if self.window and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.window)  # let the batch fill
            # Without a window the batch is what arrived during the previous commit.
            waiting = self._queue[:self.max_batch]
            batch = [o for o, _ in waiting]
            try:
                landed = await self._commit(batch)
            except Exception as exc:  # noqa: BLE001 - retried until it lands
                failures += 1
                metrics.SETTLE_ERRORS.inc()
                delay = backoff(failures, base=RETRY_BASE, cap=RETRY_CAP)
                log.error("settling %d outcome(s) failed (%s: %s); retrying in %.1f s",
                          len(batch), type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("settling resumed after %d failed attempt(s)", failures)
            failures = 0
            del self._queue[:len(waiting)]
            for o, done in waiting:
                if not done.done():
                    done.set_result(o.message_id in landed)

    async def _commit(self, batch: list[Outcome]) -> set[str]:
        """One transaction; returns the message ids whose rows it settled."""
        start = time.perf_counter()
        emitted: list[tuple[int, Record]] = []
        matched: set[str] = set()
        done = self.outbox.take_emitted() if self.outbox is not None else []
        try:
            await self._transaction(batch, done, emitted, matched)
        except BaseException:
            if self.outbox is not None:
                self.outbox.give_back(done)
            raise
        keep = [o for o in batch if o.message_id in matched]
        for o in batch:
            if o.message_id not in matched:
                metrics.SETTLES_FENCED.inc()
                log.warning("%s: not settled as %s, its row is no longer this sender's"
                            " (partition %d, epoch %d); %d event(s) discarded", o.message_id,
                            o.state, o.partition, o.epoch, len(o.records))
        metrics.SETTLE_BATCH.observe(len(batch))
        metrics.SETTLE_SECONDS.observe(time.perf_counter() - start)
        if emitted:
            task = asyncio.create_task(self._emit(emitted))
            self._emitting.add(task)
            task.add_done_callback(self._emitting.discard)
        return {o.message_id for o in keep}

    async def _transaction(self, batch: list[Outcome], done: list[int],
                           emitted: list[tuple[int, Record]], matched: set[str]) -> None:
        """Fence, mark, store the events (and delete the rows of `done`); fills `emitted`
        with the stored events and `matched` with the message ids settled."""
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(SQL["fence"], {"namespace": self.namespace, "owner": self.owner,
                                             "partitions": sorted({o.partition for o in batch})})
            owned = {int(r[0]): int(r[1]) for r in await cur.fetchall()}
            keep, _ = fenced(batch, owned)
            for state in STATEMENTS:
                mine = [o for o in keep if o.state == state]
                if not mine:
                    continue
                if state == "sent":  # the hot path: one statement for the batch
                    await cur.execute(SQL["mark_sent"], {
                        "namespace": self.namespace,
                        "message_ids": text_array([o.message_id for o in mine]),
                        # None: sent for other recipients before; that time stays.
                        "sent_at": text_array([at.isoformat() if (at := o.params.get("sent_at"))
                                               else None for o in mine])})
                    matched.update(str(r[0]) for r in await cur.fetchall())
                    continue
                await cur.executemany(SQL[STATEMENTS[state]],
                                      [statement_params(o, self.namespace) for o in mine],
                                      returning=True)
                while True:
                    matched.update(str(r[0]) for r in await cur.fetchall())
                    if not cur.nextset():
                        break
            items = [(o, rec) for o in keep if o.message_id in matched for rec in o.records]
            if items:
                await cur.execute(SQL["outbox_add"], {
                    "namespace": self.namespace,
                    "message_ids": text_array([o.message_id for o, _ in items]),
                    "partitions": text_array([str(o.partition) for o, _ in items]),
                    "topics": text_array([rec.topic for _, rec in items]),
                    "keys": bytea_array([rec.key for _, rec in items]),
                    "values": bytea_array([rec.value for _, rec in items]),
                    "headers": Jsonb([rec.headers for _, rec in items])})
                ids = sorted(int(r[0]) for r in await cur.fetchall())
                emitted.extend(zip(ids, (rec for _, rec in items), strict=True))
            if done:
                await cur.execute(SQL["outbox_done"], {"ids": done})

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued outcome is committed and emitted (on shutdown)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.error("%d outcome(s) not settled at shutdown: the next owner sends them"
                      " again as possible duplicates", len(self._queue))
            return False
        if self._emitting:
            await asyncio.wait(self._emitting, timeout=timeout)
        return True
