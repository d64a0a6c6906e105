"""May this account send now? Rolling 24 h quota and sustained rate, as pure decisions."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class Go:
    """Send one now."""


@dataclass(frozen=True)
class Wait:
    """The rate allows the next send after `seconds`."""

    seconds: float


@dataclass(frozen=True)
class Exhausted:
    """The 24 h quota (or the provider) says no until `until`."""

    until: datetime


Decision = Go | Wait | Exhausted


class Budget:
    """One account's rolling-window quota and token-bucket rate.

    The window holds the time of every send in the last 24 h (at most
    `daily_quota` entries), rebuilt from the ledger when an instance takes the
    account over, so a restart never lets the account exceed its quota.
    """

    def __init__(self, daily_quota: int, rate_per_second: float):
        self.daily_quota = daily_quota
        self.rate = rate_per_second
        # One second's worth of burst, at least one send.
        self.capacity = max(1.0, rate_per_second)
        self._tokens = self.capacity
        self._refilled: datetime | None = None
        self._sent: deque[datetime] = deque()
        self._parked_until: datetime | None = None
        # The pacer's theoretical arrival time (GCRA): when the next hand-over
        # would be due if sends went out exactly at the rate.
        self._tat: datetime | None = None

    def load(self, sent_at: Iterable[datetime], now: datetime) -> None:
        """Start from the sends the ledger knows of."""
        self._sent = deque(sorted(t for t in sent_at if t > now - WINDOW))

    def _expire(self, now: datetime) -> None:
        while self._sent and self._sent[0] <= now - WINDOW:
            self._sent.popleft()

    def _refill(self, now: datetime) -> None:
        if self._refilled is not None:
            elapsed = max(0.0, (now - self._refilled).total_seconds())
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._refilled = now

    def decide(self, now: datetime) -> Decision:
        """Whether one more send may go now."""
        if self._parked_until is not None:
            if now < self._parked_until:
                return Exhausted(self._parked_until)
            self._parked_until = None
        self._expire(now)
        if len(self._sent) >= self.daily_quota:
            # The oldest send in the window frees the next slot.
            return Exhausted(self._sent[len(self._sent) - self.daily_quota] + WINDOW)
        self._refill(now)
        if self._tokens >= 1.0:
            return Go()
        return Wait((1.0 - self._tokens) / self.rate)

    def allowance(self, now: datetime) -> int:
        """How many sends may start now (call after `decide` said Go)."""
        self._refill(now)
        return max(0, min(int(self._tokens), self.daily_quota - len(self._sent)))

    def take(self, now: datetime) -> None:
        """Record that a send was started (counts against rate and quota)."""
        self._refill(now)
        self._tokens -= 1.0
        self._sent.append(now)

    def give_back(self) -> None:
        """Take a send that never left (refused by the provider, or failed before) out of
        the quota window.

        Its rate token stays spent: the rate only paces the account, and a spent
        token costs it one interval's wait, never a send over the rate. Returning
        it would let `allowance` claim rows the pacer (whose slots are not given
        back either) then holds back.
        """
        if self._sent:
            self._sent.pop()

    def pace(self, now: datetime) -> float:
        """Seconds this hand-over waits so hand-overs keep to the rate and burst;
        the slot is reserved.

        The bucket decides how many rows to claim; sends then wait on connections
        and settles, and a stall would let those claimed meanwhile leave together,
        faster than the rate. Pacing the hand-overs themselves (GCRA: the same
        rate and burst as the bucket) keeps the wire to the rate.
        """
        interval = timedelta(seconds=1.0 / self.rate)
        tolerance = interval * (self.capacity - 1.0)
        tat = now if self._tat is None or self._tat < now else self._tat
        start = max(now, tat - tolerance)
        self._tat = tat + interval
        return (start - now).total_seconds()

    def park(self, until: datetime) -> None:
        """The provider said the account is exhausted: send nothing before `until`."""
        self._parked_until = max(until, self._parked_until or until)

    def used(self, now: datetime) -> int:
        """Sends in the last 24 h."""
        self._expire(now)
        return len(self._sent)

    def left(self, now: datetime) -> int:
        """Sends the quota still allows in the rolling window."""
        return max(0, self.daily_quota - self.used(now))


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before retry number `attempt` (1-based): exponential, capped, equal jitter."""
    ceiling = min(cap, base * (2 ** (attempt - 1)))
    # Equal jitter (uniform in [ceiling/2, ceiling]) keeps retries of many messages
    # from arriving at a recovering server in lockstep, and none comes back sooner
    # than half its backoff (full jitter, uniform in [0, ceiling], would retry some
    # at once, against a server that just said "later").
    return (rng or random).uniform(ceiling / 2, ceiling)
