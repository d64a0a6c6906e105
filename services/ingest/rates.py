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
from collections import deque
from collections.abc import Callable

from limits import RateLimitItem, parse

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
    """Moving windows per key id: the installation's rate, or the key's own.

    Each key keeps the times of its requests within its window, as `limits`'
    moving window does, in a deque: a request may proceed while fewer than
    the rate's amount fall within the last window. Kept here rather than in
    `limits`' memory storage, whose lock and expiry timers cost a twentieth
    of a request under load. Only the event loop calls it.
    """

    # How often windows that emptied are forgotten, seconds.
    SWEEP_SECONDS = 60.0

    def __init__(self, default: str, clock: Callable[[], float] = time.monotonic):
        self.default, self.clock = parse_rate(default), clock
        self._items: dict[str, RateLimitItem] = {}
        self._windows: dict[str, tuple[deque[float], float]] = {}
        self._swept = clock()

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
        amount, span = item.amount, float(item.get_expiry())
        now = self.clock()
        if now - self._swept > self.SWEEP_SECONDS:
            self._sweep(now)
        window = self._windows.get(key_id)
        hits = window[0] if window is not None else deque()
        if window is None or window[1] != span:
            self._windows[key_id] = (hits, span)
        while hits and hits[0] <= now - span:
            hits.popleft()
        if len(hits) < amount:
            hits.append(now)
            return 0
        # A refused request is not counted. The window frees a slot when the
        # request `amount` places from the newest leaves it (a key whose own
        # rate just fell may hold more than `amount`).
        return retry_after(hits[len(hits) - amount] + span, now)

    def _sweep(self, now: float) -> None:
        self._swept = now
        for key_id, (hits, span) in list(self._windows.items()):
            if not hits or hits[-1] <= now - span:
                del self._windows[key_id]
