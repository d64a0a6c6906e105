"""Request rates per API key: a moving window kept in this process's memory.

Every authenticated request to `/v1/...` counts one, whatever its body (a
batch is one request): the limit protects the API's work per request, while
how much mail leaves is the accounts' quotas' business. Several ingest
processes each keep their own windows, so a key may make up to N times its
rate across N processes; run one process per key budget, or divide the rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from mailbus import apikeys


def parse_rate(text: str) -> RateLimitItem:
    """A rate in the `limits` notation ('100/second'); ValueError when it is not one."""
    if not apikeys.valid_rate(text):
        raise ValueError(f"not a rate like '100/second' or '6000 per minute': {text!r}")
    return parse(text)


def retry_after(reset_at: float, now: float) -> int:
    """Whole seconds until the window frees a slot, at least 1 (Retry-After)."""
    return max(1, math.ceil(reset_at - now))


class KeyRates:
    """Moving windows per key id: the installation's rate, or the key's own."""

    def __init__(self, default: str, clock: Callable[[], float] = time.time):
        # limits' memory storage stamps entries with time.time(); the clock
        # only turns its reset time into a wait.
        self.default, self.clock = parse_rate(default), clock
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._items: dict[str, RateLimitItem] = {}

    def _item(self, override: str | None) -> RateLimitItem:
        if override is None:
            return self.default
        item = self._items.get(override)
        if item is None:
            try:
                item = parse_rate(override)
            except ValueError:
                # The database refuses such a value; should one get there, the
                # installation's rate applies rather than none.
                item = self.default
            self._items[override] = item
        return item

    def hit(self, key_id: str, override: str | None = None) -> int:
        """Count one request: 0 when it may proceed, else the seconds to wait."""
        item = self._item(override)
        if self._limiter.hit(item, key_id):
            return 0
        reset_at, _ = self._limiter.get_window_stats(item, key_id)
        return retry_after(reset_at, self.clock())
