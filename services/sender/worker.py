"""Account workers: claim due messages from the ledger, hand them over, record the outcome.

One asyncio task per account. A worker waits only for its own account's
rate or quota, so a slow or exhausted account never holds up another, and
nothing waits on a Kafka partition: messages wait in the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from psycopg_pool import AsyncConnectionPool

from mailbus import topics
from mailbus.accounts import Account, Directory
from mailbus.codec import Registry
from mailbus.errors import MailbusError
from mailbus.sender import handlers, metrics
from mailbus.sender.compose import compose, needs_sandbox
from mailbus.sender.dkim import DkimSigner
from mailbus.sender.handlers import Fail, Reroute, Retry
from mailbus.sender.outbox import Outbox, Record
from mailbus.sender.quota import Budget, Exhausted, Wait
from mailbus.sender.sandbox import ContentSandbox, SandboxUnavailable, compose_failure
from mailbus.sender.suppressions import Suppressions
from mailbus.sender.transport import (
    Accepted,
    AccountExhausted,
    SendError,
    TransientError,
    Transport,
)
from mailbus.tokens import LinkBuilder

log = logging.getLogger(__name__)


@dataclass
class Claimed:
    """A ledger row a worker holds in state `sending`."""

    message_id: str
    payload: bytes
    attempts: int
    ambiguous: bool
    reroutes: int
    partition: int
    pool: str | None
    # Set once the message was handed over for its other recipients: the ones
    # still to send to (refused for now at RCPT). None: all of them.
    pending: tuple[str, ...] | None = None
    # Admitted from a `mailbus replay` record: goes to the replay sink.
    replayed: bool = False


class AccountWorker:
    """Sends one account's messages within its rate, quota and connection count."""

    def __init__(self, ctx: Context, account: Account, transport: Transport, budget: Budget,
                 dkim: DkimSigner | None = None,
                 replay: tuple[Account, Transport] | None = None):
        self.ctx, self.account, self.transport, self.budget = ctx, account, transport, budget
        self.dkim = dkim
        # Where replayed requests go instead of the account's own transport (the
        # replay sink); None when the operator let replays reach real accounts.
        self.replay = replay
        self.wake = asyncio.Event()
        concurrency = account.smtp.connections if account.smtp else 2
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._inflight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Until cancelled: claim what is due and may go, deliver it."""
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("account %s: worker step failed; retrying", self.account.id)
                await asyncio.sleep(1.0)

    async def _step(self) -> None:
        ctx = self.ctx
        owned = ctx.owned()
        if not owned:
            await self._sleep(ctx.poll_seconds)
            return
        now = ctx.clock()
        decision = self.budget.decide(now)
        if isinstance(decision, Wait):
            await asyncio.sleep(decision.seconds)
            return
        if isinstance(decision, Exhausted):
            await self._fail_over_exhausted(owned, decision.until)
            await self._sleep(min(ctx.poll_seconds * 5, (decision.until - now).total_seconds()))
            return
        free = self._concurrency - len(self._inflight)
        if free <= 0:
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            return
        # Claim at most what the rate and the free connections allow right now.
        limit = max(1, min(free, self.budget.allowance(now)))
        rows = await ctx.claim(self.account.id, owned, limit=limit, pool_only=False)
        if not rows:
            await self._sleep(ctx.poll_seconds)
            return
        for row in rows:
            self.budget.take(now)
            task = asyncio.create_task(self._deliver(row))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _sleep(self, seconds: float) -> None:
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), timeout=max(0.01, seconds))
        except TimeoutError:
            pass

    async def _fail_over_exhausted(self, owned: list[int], until: datetime) -> None:
        """Move this account's pool messages to another pool member while it is exhausted."""
        rows = await self.ctx.claim(self.account.id, owned, limit=100, pool_only=True)
        for row in rows:
            target = handlers.failover(self.ctx.directory, row.pool, self.account.id,
                                       row.reroutes, self.ctx.capacity())
            request = self.ctx.decode(row)
            if target is None:
                await self.ctx.requeue(row, Retry(until, "account quota exhausted", refund=1))
            else:
                await self.ctx.reroute(row, request, Reroute(target, "account quota exhausted"))

    async def _deliver(self, row: Claimed) -> None:
        async with self._slots:
            try:
                await self._deliver_one(row)
            except Exception:
                log.exception("account %s: delivering %s failed unexpectedly",
                              self.account.id, row.message_id)

    async def _deliver_one(self, row: Claimed) -> None:
        ctx, account = self.ctx, self.account
        now = ctx.clock()
        request = ctx.decode(row)
        try:
            # Templates and html-only bodies are hostile work: a process with a hard
            # deadline does it. Composing is bounded and runs in a thread, off the loop.
            body = await ctx.sandbox.content(request) if needs_sandbox(request) else None
            outgoing = await asyncio.get_running_loop().run_in_executor(
                ctx.composer, partial(compose, request, account, ctx.links, now=now,
                                      dkim=self.dkim, body=body))
        except SandboxUnavailable as exc:
            await self._retry(row, request, now, f"content sandbox: {exc}")
            return
        except Exception as exc:  # whatever it is, this message fails alone
            # Nothing left the account: its send counts against neither rate nor quota.
            self.budget.give_back(now)
            if not isinstance(exc, MailbusError):
                log.error("account %s: composing %s raised %s", account.id, row.message_id,
                          type(exc).__name__, exc_info=exc)
            await ctx.fail(row, request, account.id, Fail(compose_failure(exc), True))
            return
        if row.pending is not None:
            wanted = {r.lower() for r in row.pending}
            outgoing = replace(outgoing, recipients=[r for r in outgoing.recipients
                                                     if r.lower() in wanted])
            if not outgoing.recipients:  # a request that changed under the row: nothing left
                self.budget.give_back(now)
                await ctx.outbox.settle(row.message_id, row.partition, "sent", [])
                return
        blocked = [r for r in outgoing.recipients if ctx.suppressions.blocked(r, account.id)]
        if blocked:
            remaining = [r for r in outgoing.recipients if r not in blocked]
            if not remaining:
                self.budget.give_back(now)
                await ctx.fail(row, request, account.id,
                               Fail("suppressed: every recipient is on the suppression list",
                                    True, recipient=blocked[0]))
                return
            outgoing = replace(outgoing, recipients=remaining)
        # A replayed request is composed as the account would, and handed to the sink.
        via, transport = (self.replay if row.replayed and self.replay is not None
                          else (account, self.transport))
        if row.ambiguous:
            earlier = await transport.find_sent(outgoing.message_id_header)
            if earlier is not None:
                # It did leave before the crash: that send keeps its place in the quota.
                await ctx.sent(row, request, via, earlier, outgoing.message_id_header,
                               possible_duplicate=False, latency_us=None)
                return
        start = time.perf_counter()
        try:
            accepted = await transport.send(outgoing)
        except SendError as exc:
            if isinstance(exc, AccountExhausted):
                self.budget.give_back(now)
                self.budget.park(exc.until or now + timedelta(seconds=exc.retry_after or 60))
                # A message already handed over for some recipients stays on its account.
                target = None if row.pending is not None else handlers.failover(
                    ctx.directory, row.pool, account.id, row.reroutes, ctx.capacity())
                if target is not None:
                    await ctx.reroute(row, request, Reroute(target, exc.reason))
                    return
            verdict = handlers.after_error(exc, attempts=row.attempts,
                                           max_attempts=ctx.max_attempts, now=ctx.clock(),
                                           retry_base=ctx.retry_base, retry_cap=ctx.retry_cap)
            if isinstance(verdict, Retry):
                metrics.RETRIES.labels(account.id).inc()
                await ctx.requeue(row, verdict)
            elif isinstance(verdict, Fail):
                await ctx.fail(row, request, account.id, verdict)
            return
        elapsed = time.perf_counter() - start
        metrics.SEND_SECONDS.labels(via.kind).observe(elapsed)
        await ctx.sent(row, request, via, accepted, outgoing.message_id_header,
                       possible_duplicate=row.ambiguous, latency_us=int(elapsed * 1e6))

    async def _retry(self, row: Claimed, request: dict[str, Any], now: datetime,
                     reason: str) -> None:
        """Nothing was tried for this message: requeue it with backoff, or give up."""
        self.budget.give_back(now)
        ctx = self.ctx
        verdict = handlers.after_error(TransientError(reason), attempts=row.attempts,
                                       max_attempts=ctx.max_attempts, now=ctx.clock(),
                                       retry_base=ctx.retry_base, retry_cap=ctx.retry_cap)
        if isinstance(verdict, Retry):
            await ctx.requeue(row, verdict)
        elif isinstance(verdict, Fail):
            await ctx.fail(row, request, self.account.id, verdict)

    async def drain(self, timeout: float) -> None:
        """Let in-flight deliveries finish (on shutdown)."""
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=timeout)


class Context:
    """What the workers share: the ledger, the outbox, the clock, the settings."""

    def __init__(self, *, pool: AsyncConnectionPool, outbox: Outbox, registry: Registry,
                 directory: Directory, suppressions: Suppressions, links: LinkBuilder | None,
                 owned: Callable[[], list[int]], capacity: Callable[[], dict[str, int]],
                 topic: Callable[[str], str], max_attempts: int, retry_base: float,
                 retry_cap: float, poll_seconds: float,
                 clock: Callable[[], datetime] = handlers.utcnow,
                 sandbox: ContentSandbox | None = None):
        self.pool, self.outbox, self.registry = pool, outbox, registry
        self.directory, self.suppressions, self.links = directory, suppressions, links
        self.owned, self.capacity, self.topic = owned, capacity, topic
        self.max_attempts, self.retry_base, self.retry_cap = max_attempts, retry_base, retry_cap
        self.poll_seconds, self.clock = poll_seconds, clock
        self.sandbox = sandbox or ContentSandbox()  # its processes start when first needed
        # Composing holds the GIL, so more threads would not go faster; its own executor
        # keeps it from queueing behind the Gmail transport's blocking calls.
        self.composer = ThreadPoolExecutor(2, thread_name_prefix="mailbus-compose")

    def close(self) -> None:
        """Stop what the workers started beside the event loop."""
        self.sandbox.close()
        self.composer.shutdown(wait=False, cancel_futures=True)

    def decode(self, row: Claimed) -> dict[str, Any]:
        """The request a ledger row holds (it was decoded once already on admission)."""
        return self.registry.decode(row.payload, "mailbus.EmailRequested")[1]

    async def claim(self, account_id: str, partitions: list[int], *, limit: int,
                    pool_only: bool) -> list[Claimed]:
        """Take due rows into `sending`."""
        rows = await self.outbox.ledger.claim(account_id, partitions, limit, pool_only)
        return [Claimed(str(r["message_id"]), bytes(r["payload"]), r["attempts"],
                        r["ambiguous"], r["reroutes"], r["source_partition"], r["pool"],
                        tuple(r["pending_recipients"]) if r["pending_recipients"] is not None
                        else None, r["replayed"])
                for r in rows]

    async def requeue(self, row: Claimed, retry: Retry) -> None:
        """Back to the queue until `retry.due_at`."""
        await self.outbox.ledger.requeue(row.message_id, retry.due_at, retry.reason, retry.refund)

    async def sent(self, row: Claimed, request: dict[str, Any], account: Account,
                   accepted: Accepted, header: str, *, possible_duplicate: bool,
                   latency_us: int | None) -> None:
        """Record the hand-over and emit email.sent (and what follows from it)."""
        now = self.clock()
        key = row.message_id.encode()
        records = [Record(self.topic(topics.SENT), key, self.registry.encode(
            topics.SENT, handlers.sent_event(
                request, account, accepted, message_id_header=header, attempt=row.attempts,
                possible_duplicate=possible_duplicate, latency_us=latency_us, now=now)))]
        if account.evidence == "smtp_final":
            records += [Record(self.topic(topics.DELIVERED), key, self.registry.encode(
                topics.DELIVERED, handlers.delivered_event(request, account, r,
                                                           accepted.response, now)))
                        for r in accepted.recipients]
        refused = handlers.refused(accepted.rejected, attempts=row.attempts,
                                   max_attempts=self.max_attempts, now=now,
                                   retry_base=self.retry_base, retry_cap=self.retry_cap)
        records += self._failed_records(row, request, account.id, refused.failed, now)
        if refused.retry is not None:
            # Taken for the others, refused for now for these: the same message again,
            # to them only, when the retry is due.
            await self.outbox.settle(row.message_id, row.partition, "partial", records,
                                     sent_at=now, due_at=refused.retry.due_at,
                                     pending=refused.again, error=refused.retry.reason)
            metrics.RETRIES.labels(account.id).inc()
        else:
            await self.outbox.settle(row.message_id, row.partition, "sent", records,
                                     sent_at=now)
        metrics.SENT.labels(account.id, account.kind).inc()

    def _failed_records(self, row: Claimed, request: dict[str, Any], account_id: str,
                        fails: list[Fail], now: datetime) -> list[Record]:
        return [Record(self.topic(topics.FAILED), row.message_id.encode(), self.registry.encode(
            topics.FAILED, handlers.failed_event(request, account_id, fail,
                                                 attempt=row.attempts, now=now)))
            for fail in fails]

    async def fail(self, row: Claimed, request: dict[str, Any], account_id: str,
                   fail: Fail) -> None:
        """Record the failure, emit email.failed, and dead-letter when retries ran out."""
        if row.pending is not None:
            # Handed over for its other recipients already: only these failed, the
            # row stays sent, and nothing is dead-lettered (a replay would mail everyone).
            fails = [replace(fail, recipient=r, dead_letter=False) for r in row.pending]
            await self.outbox.settle(row.message_id, row.partition, "sent",
                                     self._failed_records(row, request, account_id, fails,
                                                          self.clock()))
            for fail in fails:
                metrics.FAILED.labels(account_id, metrics.reason_class(fail.reason),
                                      str(fail.permanent).lower()).inc()
            return
        key = row.message_id.encode()
        records = [Record(self.topic(topics.FAILED), key, self.registry.encode(
            topics.FAILED, handlers.failed_event(request, account_id, fail,
                                                 attempt=row.attempts, now=self.clock())))]
        if fail.dead_letter:
            records.append(Record(self.topic(topics.REQUESTED_DLQ), account_id.encode(),
                                  row.payload, [("mailbus.reason", fail.reason)]))
            metrics.DEAD_LETTERED.labels("retries_exhausted").inc()
        await self.outbox.settle(row.message_id, row.partition, "failed", records,
                                 error=fail.reason)
        metrics.FAILED.labels(account_id, metrics.reason_class(fail.reason),
                              str(fail.permanent).lower()).inc()

    async def reroute(self, row: Claimed, request: dict[str, Any], reroute: Reroute) -> None:
        """Hand the message to another pool account through a new email.requested record."""
        moved = handlers.rerouted_request(request, reroute.account_id, self.clock())
        records = [Record(self.topic(topics.REQUESTED), reroute.account_id.encode(),
                          self.registry.encode(topics.REQUESTED, moved))]
        await self.outbox.settle(row.message_id, row.partition, "rerouted", records,
                                 error=reroute.reason)
        metrics.REROUTED.labels(moved["account_id"]).inc()
