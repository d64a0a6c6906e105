"""Account workers: claim due messages from the ledger, hand them over, record the outcome.

One asyncio task per account. A worker waits only for its own account's
rate or quota, so a slow or exhausted account never holds up another, and
nothing waits on a Kafka partition: messages wait in the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial

from mailbus.accounts import Account
from mailbus.errors import MailbusError
from mailbus.sender import decisions, metrics
from mailbus.sender.compose import compose, compose_inline, needs_sandbox
from mailbus.sender.composer import Composed, Failure
from mailbus.sender.context import Claimed, Context
from mailbus.sender.decisions import Fail, Reroute, Retry
from mailbus.sender.dkim import DkimSigner
from mailbus.sender.quota import Budget, Exhausted, Wait
from mailbus.sender.sandbox import SandboxUnavailable, compose_failure
from mailbus.sender.transport import (
    AccountExhausted,
    Ambiguous,
    Outgoing,
    SendError,
    TransientError,
    Transport,
)

log = logging.getLogger(__name__)
# How often a worker looks for rows of its account left `sending` that it does not
# hold, and how old such a row must be (claimed before the last look) to go again.
ORPHAN_CHECK_SECONDS = 30.0


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
        # Held only while handing over. An SMTP session chains two transactions (the
        # next one's commands ride with this one's content), so twice its connections.
        self._slots = asyncio.Semaphore(concurrency * 2 if account.smtp else concurrency)
        # Handing over or awaiting its settle: bounds what a crash may send twice.
        self._unsettled = asyncio.Semaphore(concurrency * (1 + ctx.settling_per_connection))
        # Rows claimed ahead of the free connections, so one claim statement
        # feeds many sends: claiming row by row would cost a round trip each.
        self._depth = max(ctx.claim_min, concurrency * ctx.claim_depth)
        self._inflight: set[asyncio.Task[None]] = set()
        # Message ids claimed and not yet settled: what requeue_orphans must leave alone.
        self._holding: set[str] = set()
        self._orphans_checked = time.monotonic()

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
        if time.monotonic() - self._orphans_checked > ORPHAN_CHECK_SECONDS:
            self._orphans_checked = time.monotonic()
            found = await ctx.outbox.ledger.requeue_orphans(
                self.account.id, owned, sorted(self._holding), ORPHAN_CHECK_SECONDS)
            if found:
                log.warning("account %s: %d row(s) left `sending` by a claim whose reply was"
                            " lost go again, flagged as possible duplicates", self.account.id,
                            found)
        free = self._depth - len(self._inflight)
        if free < self._depth // 2:
            # Claim again once half the depth is free: one claim, many rows.
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            return
        # Claim at most what the rate and the free depth allow right now.
        limit = max(1, min(free, self.budget.allowance(now)))
        rows = await ctx.claim(self.account.id, owned, limit=limit, pool_only=False)
        if not rows:
            await self._sleep(ctx.poll_seconds)
            return
        composed: list[Composed] | None = None
        if ctx.composer is not None:
            # One round trip to the composer process for the whole batch.
            composed = await ctx.composer.compose(self.account.id, [r.payload for r in rows],
                                                  now)
        # The sends start now, after composing: the rate counts them from here, or a
        # slow compose would let tokens refill meanwhile and the batch go out as a burst.
        started = ctx.clock() if ctx.composer is not None else now
        for row, pre in zip(rows, composed or [None] * len(rows), strict=True):
            self.budget.take(started)
            self._holding.add(row.message_id)
            task = asyncio.create_task(self._deliver(row, pre, now))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _sleep(self, seconds: float) -> None:
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), timeout=max(0.01, seconds))
        except TimeoutError:
            pass

    async def _fail_over_exhausted(self, owned: dict[int, int], until: datetime) -> None:
        """Move this account's pool messages to another pool member while it is exhausted."""
        rows = await self.ctx.claim(self.account.id, owned, limit=100, pool_only=True)
        for row in rows:
            target = decisions.failover(self.ctx.directory, row.pool, self.account.id,
                                       row.reroutes, self.ctx.capacity())
            request = self.ctx.decode(row)
            if target is None:
                others = [self.ctx.ready_at(a)
                          for a in self.ctx.directory.pools.get(row.pool or "", ())
                          if a != self.account.id]
                due = min(until, decisions.retry_exhausted_at(row.reroutes, until, others))
                await self.ctx.requeue(row, Retry(due, "account quota exhausted", refund=1))
            else:
                await self.ctx.reroute(row, request, Reroute(target, "account quota exhausted"))

    async def _deliver(self, row: Claimed, pre: Composed, now: datetime) -> None:
        # No slot held here: rows claimed ahead compose meanwhile, and the
        # transport lets as many through as the account has connections.
        try:
            await self._deliver_one(row, pre, now)
        except Exception:
            log.exception("account %s: delivering %s failed unexpectedly",
                          self.account.id, row.message_id)
        finally:
            self._holding.discard(row.message_id)

    async def _deliver_one(self, row: Claimed, pre: Composed, now: datetime) -> None:
        """`pre`: the message the composer process made of the row (or why it failed);
        None: compose it here, through the sandbox when its content needs one."""
        ctx, account = self.ctx, self.account
        if isinstance(pre, Failure):
            self.budget.give_back(now)  # nothing left the account
            if pre.unexpected:
                log.error("account %s: composing %s failed: %s", account.id, row.message_id,
                          pre.reason)
            await ctx.fail(row, account.id, Fail(pre.reason, True))
            return
        if pre is not None:
            outgoing = pre
        else:
            composed = await self._compose_here(row, now)
            if composed is None:
                return
            outgoing = composed
        await self._deliver_composed(row, outgoing, now)

    async def _compose_here(self, row: Claimed, now: datetime) -> Outgoing | None:
        """Compose on the loop (a thread for large ones); None: the row was settled."""
        ctx, account = self.ctx, self.account
        request = ctx.decode(row)
        try:
            # Templates and html-only bodies are hostile work: a process with a hard
            # deadline does it. Composing is bounded and runs in a thread, off the loop.
            body = await ctx.sandbox.content(request) if needs_sandbox(request) else None
            build = partial(compose, request, account, ctx.links, now=now, dkim=self.dkim,
                            body=body)
            # A small message composes in well under a millisecond: on the loop, that
            # costs less than the hop to a thread and back. A large one goes to a thread.
            outgoing = (build() if compose_inline(request, body, signed=self.dkim is not None)
                        else await asyncio.get_running_loop().run_in_executor(ctx.composer_threads,
                                                                              build))
        except SandboxUnavailable as exc:
            await self._retry(row, now, f"content sandbox: {exc}")
            return None
        except Exception as exc:  # whatever it is, this message fails alone
            # Nothing left the account: its send counts against neither rate nor quota.
            self.budget.give_back(now)
            if not isinstance(exc, MailbusError):
                log.error("account %s: composing %s raised %s", account.id, row.message_id,
                          type(exc).__name__, exc_info=exc)
            await ctx.fail(row, account.id, Fail(compose_failure(exc), True))
            return None
        return outgoing

    async def _deliver_composed(self, row: Claimed, outgoing: Outgoing, now: datetime) -> None:
        ctx, account = self.ctx, self.account
        if row.pending is not None:
            wanted = {r.lower() for r in row.pending}
            outgoing = replace(outgoing, recipients=[r for r in outgoing.recipients
                                                     if r.lower() in wanted])
            if not outgoing.recipients:  # a request that changed under the row: nothing left
                self.budget.give_back(now)
                await ctx.settle(row, "sent", [])
                return
        blocked = [r for r in outgoing.recipients if ctx.suppressions.blocked(r, account.id)]
        if blocked:
            remaining = [r for r in outgoing.recipients if r not in blocked]
            if not remaining:
                self.budget.give_back(now)
                await ctx.fail(row, account.id,
                               Fail("suppressed: every recipient is on the suppression list",
                                    True, recipient=blocked[0]))
                return
            outgoing = replace(outgoing, recipients=remaining)
        # A replayed request is composed as the account would, and handed to the sink.
        via, transport = (self.replay if row.replayed and self.replay is not None
                          else (account, self.transport))
        if row.ambiguous:
            async with self._slots:
                earlier = await transport.find_sent(outgoing.message_id_header)
            if earlier is not None:
                # It did leave before the crash: that send keeps its place in the quota.
                await ctx.sent(row, via, earlier, outgoing.message_id_header,
                               possible_duplicate=False, latency_us=None)
                return
        # A connection slot is held for the hand-over, an unsettled slot from then until
        # the outcome is committed: the connection sends the next message meanwhile, and
        # what the server took but the ledger does not know yet (what a crash may send
        # twice) stays within connections * (1 + settling_per_connection).
        async with self._unsettled:
            await self._hand_over(row, outgoing, via, transport, now)

    async def _hand_over(self, row: Claimed, outgoing: Outgoing, via: Account,
                         transport: Transport, now: datetime) -> None:
        ctx, account = self.ctx, self.account
        wait = self.budget.pace(ctx.clock())
        if wait > 0:
            await asyncio.sleep(wait)
        start = time.perf_counter()
        try:
            async with self._slots:
                accepted = await transport.send(outgoing)
        except SendError as exc:
            if isinstance(exc, AccountExhausted):
                self.budget.give_back(now)
                self.budget.park(exc.until or now + timedelta(seconds=exc.retry_after or 60))
                # A message already handed over for some recipients stays on its account.
                target = None if row.pending is not None else decisions.failover(
                    ctx.directory, row.pool, account.id, row.reroutes, ctx.capacity())
                if target is not None:
                    await ctx.reroute(row, ctx.decode(row), Reroute(target, exc.reason))
                    return
            verdict = decisions.after_error(exc, attempts=row.attempts,
                                           max_attempts=ctx.max_attempts, now=ctx.clock(),
                                           retry_base=ctx.retry_base, retry_cap=ctx.retry_cap)
            if isinstance(verdict, Retry):
                metrics.RETRIES.labels(account.id).inc()
                # Lost after DATA went out: the server may have taken it.
                await ctx.requeue(row, verdict, ambiguous=isinstance(exc, Ambiguous))
            elif isinstance(verdict, Fail):
                await ctx.fail(row, account.id, verdict)
            return
        elapsed = time.perf_counter() - start
        metrics.SEND_SECONDS.labels(via.kind).observe(elapsed)
        await ctx.sent(row, via, accepted, outgoing.message_id_header,
                       possible_duplicate=row.ambiguous, latency_us=int(elapsed * 1e6))

    async def _retry(self, row: Claimed, now: datetime, reason: str) -> None:
        """Nothing was tried for this message: requeue it with backoff, or give up."""
        self.budget.give_back(now)
        ctx = self.ctx
        verdict = decisions.after_error(TransientError(reason), attempts=row.attempts,
                                       max_attempts=ctx.max_attempts, now=ctx.clock(),
                                       retry_base=ctx.retry_base, retry_cap=ctx.retry_cap)
        if isinstance(verdict, Retry):
            await ctx.requeue(row, verdict)
        elif isinstance(verdict, Fail):
            await ctx.fail(row, self.account.id, verdict)

    async def drain(self, timeout: float) -> None:
        """Let in-flight deliveries finish (on shutdown)."""
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=timeout)
