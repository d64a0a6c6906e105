"""Account workers: claim due messages from the ledger, hand them over, record the outcome.

One asyncio task per account. A worker waits only for its own account's
rate or quota, so a slow or exhausted account never holds up another, and
nothing waits on a Kafka partition: messages wait in the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from functools import partial

from mailbus.accounts import Account
from mailbus.errors import MailbusError
from mailbus.sender import attachments, decisions, delivery
from mailbus.sender.compose import compose, compose_inline, needs_sandbox
from mailbus.sender.composer import Composed, Failure
from mailbus.sender.context import Claimed, Context
from mailbus.sender.decisions import Reroute, Retry
from mailbus.sender.delivery import Retries
from mailbus.sender.dkim import DkimSigner
from mailbus.sender.executor import Executor
from mailbus.sender.quota import Budget, Exhausted, Wait
from mailbus.sender.sandbox import SandboxUnavailable
from mailbus.sender.transport import Outgoing, Transport

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
        self.replay = replay  # the replay sink, if any (see Executor)
        self.wake = asyncio.Event()
        concurrency = account.smtp.connections if account.smtp else 2
        self.retries = Retries(ctx.max_attempts, ctx.retry_base, ctx.retry_cap)
        self.executor = Executor(ctx, account, transport, budget, retries=self.retries,
                                 directory=ctx.directory, capacity=ctx.capacity,
                                 clock=ctx.clock, replay=replay, connections=concurrency,
                                 settling_per_connection=ctx.settling_per_connection,
                                 chained=account.smtp is not None)
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
        composed = pre if pre is not None else await self._compose_here(row, now)
        if isinstance(composed, Outgoing):
            step = delivery.addressed(row, composed, self._blocked,
                                      replay_sink=self.replay is not None)
        else:
            if isinstance(composed, Failure) and composed.unexpected:
                log.error("account %s: composing %s failed: %s", self.account.id,
                          row.message_id, composed.reason)
            step = delivery.not_composed(composed, row, self.retries, self.ctx.clock())
        await self.executor.run(row, step, now)

    def _blocked(self, address: str) -> bool:
        return self.ctx.suppressions.blocked(address, self.account.id)

    async def _compose_here(self, row: Claimed, now: datetime) -> Outgoing | BaseException:
        """Compose on the loop (a thread for large ones); the exception when it failed."""
        ctx, account = self.ctx, self.account
        request = ctx.decode(row)
        try:
            # Templates and html-only bodies are hostile work: a process with a hard
            # deadline does it. Composing is bounded and runs in a thread, off the loop.
            body = await ctx.sandbox.content(request) if needs_sandbox(request) else None
            files = (await attachments.fetch(ctx.outbox.pool, request["attachments"],
                                             ctx.files)
                     if request.get("attachments") else None)
            build = partial(compose, request, account, ctx.links, now=now, dkim=self.dkim,
                            body=body, files=files)
            # A small message composes in well under a millisecond: on the loop, that
            # costs less than the hop to a thread and back. A large one goes to a thread.
            return (build() if compose_inline(request, body, signed=self.dkim is not None)
                    else await asyncio.get_running_loop().run_in_executor(ctx.composer_threads,
                                                                          build))
        except (SandboxUnavailable, attachments.StoreUnavailable) as exc:
            return exc
        except Exception as exc:  # whatever it is, this message fails alone
            if not isinstance(exc, MailbusError):
                log.error("account %s: composing %s raised %s", account.id, row.message_id,
                          type(exc).__name__, exc_info=exc)
            return exc

    async def drain(self, timeout: float) -> None:
        """Let in-flight deliveries finish (on shutdown)."""
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=timeout)
