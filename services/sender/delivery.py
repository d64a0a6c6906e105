"""What becomes of one claimed row, as pure decisions; worker.py carries them out.

A delivery goes through up to three points where something from outside
comes in: the composed message (or why composing failed), the transport's
answer to a look-up for an earlier hand-over, and the transport's answer to
the hand-over itself. At each, a function here takes that answer with the
row and returns a `Delivery`: the next action and what it does to the
account's budget. No function here reads a clock, a socket or the ledger.

The seam is two Protocols: `Ledger`, where outcomes are recorded (the
worker's Context), and `Outlet`, the account's way out (a Transport).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeAlias

from mailbus.accounts import Account, Directory
from mailbus.sender.attachments import StoreUnavailable
from mailbus.sender.composer import Failure
from mailbus.sender.context import Claimed
from mailbus.sender.decisions import Fail, Reroute, Retry, after_error, failover
from mailbus.sender.sandbox import SandboxUnavailable, compose_failure
from mailbus.sender.transport import (
    Accepted,
    AccountExhausted,
    Ambiguous,
    Outgoing,
    SendError,
    TransientError,
)

SUPPRESSED = "suppressed: every recipient is on the suppression list"


@dataclass(frozen=True)
class Retries:
    """How failed attempts are retried: at most `max_attempts`, backing off from
    `base` seconds up to `cap`."""

    max_attempts: int
    base: float
    cap: float


@dataclass(frozen=True)
class Handover:
    """Hand `outgoing` over; first ask the transport whether it left already when
    `look_first` (the row was left ambiguous), through the replay sink when `replay`."""

    outgoing: Outgoing
    look_first: bool
    replay: bool


@dataclass(frozen=True)
class Delivered:
    """The transport took it: record email.sent (and what follows from it)."""

    accepted: Accepted
    header: str  # the Message-ID header value
    possible_duplicate: bool
    latency_us: int | None


@dataclass(frozen=True)
class NothingLeft:
    """Every recipient the row still waited for dropped out of the request: done."""


@dataclass(frozen=True)
class Requeue:
    """Back to the queue; `ambiguous`: the server may have taken it; `handed_over`:
    an attempt reached the transport (counted as a retry)."""

    retry: Retry
    ambiguous: bool = False
    handed_over: bool = False


Action: TypeAlias = Handover | Delivered | NothingLeft | Requeue | Fail | Reroute


@dataclass(frozen=True)
class Delivery:
    """The next action, and whether the send leaves the quota window (nothing left the
    account) and the account is parked until a time (the provider said exhausted)."""

    action: Action
    give_back: bool = False
    park_until: datetime | None = None


class Ledger(Protocol):
    """Where the outcome of a claimed row is recorded (Context)."""

    def decode(self, row: Claimed) -> dict[str, Any]:
        """The request the row holds."""
        ...

    async def settle(self, row: Claimed, state: str, records: list[Any],
                     **params: Any) -> None:
        """Record a state with these records."""
        ...

    async def requeue(self, row: Claimed, retry: Retry, *, ambiguous: bool = False) -> None:
        """Back to the queue until the retry is due."""
        ...

    async def sent(self, row: Claimed, account: Account, accepted: Accepted, header: str, *,
                   possible_duplicate: bool, latency_us: int | None) -> None:
        """Record the hand-over."""
        ...

    async def fail(self, row: Claimed, account_id: str, fail: Fail) -> None:
        """Record the failure."""
        ...

    async def reroute(self, row: Claimed, request: dict[str, Any], reroute: Reroute) -> None:
        """Move the message to another account of its pool."""
        ...


class Outlet(Protocol):
    """The part of a Transport a delivery uses."""

    async def send(self, message: Outgoing) -> Accepted:
        """Hand the message over; raises a SendError subclass when it was not accepted."""
        ...

    async def find_sent(self, message_id_header: str) -> Accepted | None:
        """The earlier hand-over of this Message-ID, if the provider can tell."""
        ...


def _requeue_or_fail(err: SendError, row: Claimed, retries: Retries, now: datetime, *,
                     handed_over: bool) -> Requeue | Fail:
    verdict = after_error(err, attempts=row.attempts, max_attempts=retries.max_attempts,
                          now=now, retry_base=retries.base, retry_cap=retries.cap)
    if isinstance(verdict, Retry):
        # Lost after DATA went out: the server may have taken it.
        return Requeue(verdict, ambiguous=isinstance(err, Ambiguous), handed_over=handed_over)
    assert isinstance(verdict, Fail)  # after_error reroutes nothing
    return verdict


def not_composed(error: Failure | BaseException, row: Claimed, retries: Retries,
                 now: datetime) -> Delivery:
    """A row whose message could not be composed: nothing left the account.

    The content sandbox being unavailable is retried like a transient error;
    anything else fails the message for good.
    """
    if isinstance(error, Failure):
        return Delivery(Fail(error.reason, True), give_back=True)
    if isinstance(error, SandboxUnavailable | StoreUnavailable):
        err = TransientError(f"content sandbox: {error}" if isinstance(
            error, SandboxUnavailable) else str(error))
        return Delivery(_requeue_or_fail(err, row, retries, now, handed_over=False),
                        give_back=True)
    return Delivery(Fail(compose_failure(error), True), give_back=True)


def addressed(row: Claimed, outgoing: Outgoing, blocked: Callable[[str], bool], *,
              replay_sink: bool) -> Delivery:
    """Who a composed message goes to: the recipients still pending, less the suppressed.

    `blocked` answers whether an address is suppressed for this account;
    `replay_sink`: replayed requests go to a sink, not to the account.
    """
    if row.pending is not None:
        wanted = {r.lower() for r in row.pending}
        outgoing = replace(outgoing, recipients=[r for r in outgoing.recipients
                                                 if r.lower() in wanted])
        if not outgoing.recipients:  # a request that changed under the row: nothing left
            return Delivery(NothingLeft(), give_back=True)
    stopped = [r for r in outgoing.recipients if blocked(r)]
    if stopped:
        remaining = [r for r in outgoing.recipients if r not in stopped]
        if not remaining:
            return Delivery(Fail(SUPPRESSED, True, recipient=stopped[0]), give_back=True)
        outgoing = replace(outgoing, recipients=remaining)
    return Delivery(Handover(outgoing, look_first=row.ambiguous,
                             replay=row.replayed and replay_sink))


def found_earlier(earlier: Accepted, header: str) -> Delivery:
    """The transport found the hand-over an ambiguous row made before a crash: it did
    leave, and keeps its place in the quota; nothing is sent again."""
    return Delivery(Delivered(earlier, header, possible_duplicate=False, latency_us=None))


def handed_over(row: Claimed, result: Accepted | SendError, header: str, *,
                latency_us: int | None, account_id: str, directory: Directory,
                left: Callable[[], dict[str, int]], retries: Retries, claimed_at: datetime,
                now: datetime) -> Delivery:
    """What the transport's answer to a hand-over means.

    `left`: quota left per account, read only when a pool failover needs it;
    `claimed_at`: when the row was claimed, from which a provider's retry-after
    parks the account.
    """
    if isinstance(result, Accepted):
        return Delivery(Delivered(result, header, possible_duplicate=row.ambiguous,
                                  latency_us=latency_us))
    if not isinstance(result, AccountExhausted):
        return Delivery(_requeue_or_fail(result, row, retries, now, handed_over=True))
    park = result.until or claimed_at + timedelta(seconds=result.retry_after or 60)
    # A message already handed over for some recipients stays on its account.
    target = None if row.pending is not None else failover(
        directory, row.pool, account_id, row.reroutes, left())
    if target is not None:
        return Delivery(Reroute(target, result.reason), give_back=True, park_until=park)
    return Delivery(_requeue_or_fail(result, row, retries, now, handed_over=True),
                    give_back=True, park_until=park)
