"""Carrying out what delivery.py decides for a claimed row: the hand-over and the record.

The executor holds one account's connection slots, its budget and its way
out; it asks the pure functions of delivery.py what each answer means and
does what they return, through the `Ledger` and `Outlet` Protocols, so that
tests run it against fakes written by hand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime

from mailbus.accounts import Account, Directory
from mailbus.sender import delivery, metrics
from mailbus.sender.context import Claimed
from mailbus.sender.decisions import Fail, Reroute
from mailbus.sender.delivery import (
    Delivered,
    Delivery,
    Handover,
    Ledger,
    NothingLeft,
    Outlet,
    Requeue,
    Retries,
)
from mailbus.sender.quota import Budget
from mailbus.sender.transport import Accepted, SendError


class Executor:
    """Does what a row's Delivery says, and what the decisions it leads to say."""

    def __init__(self, ledger: Ledger, account: Account, transport: Outlet, budget: Budget, *,
                 retries: Retries, directory: Directory, capacity: Callable[[], dict[str, int]],
                 clock: Callable[[], datetime], replay: tuple[Account, Outlet] | None = None,
                 connections: int, settling_per_connection: int = 0, chained: bool = False):
        self.ledger, self.account, self.transport, self.budget = ledger, account, transport, budget
        self.retries, self.directory = retries, directory
        self.capacity, self.clock = capacity, clock
        # Where replayed requests go instead of the account's own transport (the
        # replay sink); None when the operator let replays reach real accounts.
        self.replay = replay
        # Held only while handing over. An SMTP session chains two transactions (the
        # next one's commands ride with this one's content), so twice its connections.
        self.slots = asyncio.Semaphore(connections * 2 if chained else connections)
        # Handing over or awaiting its settle: bounds what a crash may send twice.
        self.unsettled = asyncio.Semaphore(connections * (1 + settling_per_connection))

    async def run(self, row: Claimed, step: Delivery, claimed_at: datetime) -> None:
        """Carry out `step` for the row claimed at `claimed_at`."""
        self._budget(step)
        if isinstance(step.action, Handover):
            await self._hand_over(row, step.action, claimed_at)
        else:
            await self._record(row, step.action, self.account)

    def _budget(self, step: Delivery) -> None:
        if step.give_back:
            self.budget.give_back()
        if step.park_until is not None:
            self.budget.park(step.park_until)

    async def _hand_over(self, row: Claimed, handover: Handover, claimed_at: datetime) -> None:
        # A replayed request is composed as the account would, and handed to the sink.
        via, transport = (self.replay if handover.replay and self.replay is not None
                          else (self.account, self.transport))
        outgoing, header = handover.outgoing, handover.outgoing.message_id_header
        if handover.look_first:
            async with self.slots:
                earlier = await transport.find_sent(header)
            if earlier is not None:
                await self._record(row, delivery.found_earlier(earlier, header).action, via)
                return
        # A connection slot is held for the hand-over, an unsettled slot from then until
        # the outcome is committed: the connection sends the next message meanwhile, and
        # what the server took but the ledger does not know yet (what a crash may send
        # twice) stays within connections * (1 + settling_per_connection).
        async with self.unsettled:
            wait = self.budget.pace(self.clock())
            if wait > 0:
                await asyncio.sleep(wait)
            start = time.perf_counter()
            result: Accepted | SendError
            latency_us = None
            try:
                async with self.slots:
                    result = await transport.send(outgoing)
            except SendError as exc:
                result = exc
            else:
                elapsed = time.perf_counter() - start
                metrics.SEND_SECONDS.labels(via.kind).observe(elapsed)
                latency_us = int(elapsed * 1e6)
            step = delivery.handed_over(
                row, result, header, latency_us=latency_us, account_id=self.account.id,
                directory=self.directory, left=self.capacity, retries=self.retries,
                claimed_at=claimed_at, now=self.clock())
            self._budget(step)
            await self._record(row, step.action, via)

    async def _record(self, row: Claimed, action: delivery.Action, via: Account) -> None:
        ledger = self.ledger
        if isinstance(action, Delivered):
            await ledger.sent(row, via, action.accepted, action.header,
                              possible_duplicate=action.possible_duplicate,
                              latency_us=action.latency_us)
        elif isinstance(action, Requeue):
            if action.handed_over:
                metrics.RETRIES.labels(self.account.id).inc()
            await ledger.requeue(row, action.retry, ambiguous=action.ambiguous)
        elif isinstance(action, Fail):
            await ledger.fail(row, self.account.id, action)
        elif isinstance(action, Reroute):
            await ledger.reroute(row, ledger.decode(row), action)
        elif isinstance(action, NothingLeft):
            await ledger.settle(row, "sent", [])
        else:  # a Handover is run, never recorded
            raise TypeError(f"cannot record {type(action).__name__}")
