"""API keys remembered for a moment: most requests skip the lookup, revocation still tells.

A key's row (scopes, accounts, hash, whether revoked) is kept for
`MAILBUS_KEY_CACHE_SECONDS` after it was read, so a revocation, or any
other change of the key, is honoured by each ingest process within that
time. Off by default (0: every request reads its key, and a change takes
effect at once); 1 s spares most requests of a busy key the lookup. The secret is
checked against the kept hash on every request, and an id that names no key
is never kept: a key just created works at once, and a stranger's made-up
ids cannot push real keys out. Bounded: past `max_entries`, the oldest go.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class KeyCache:
    """Key rows by id, each for `ttl` seconds from when it was read."""

    def __init__(self, ttl: float, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl, self.max_entries, self.clock = ttl, max_entries, clock
        self._rows: dict[str, tuple[float, Any]] = {}  # insertion order is age order

    def get(self, key_id: str) -> Any | None:
        """The row read less than `ttl` ago, else None."""
        entry = self._rows.get(key_id)
        if entry is None:
            return None
        if self.clock() - entry[0] >= self.ttl:
            del self._rows[key_id]
            return None
        return entry[1]

    def put(self, key_id: str, row: Any, read_at: float) -> None:
        """Keep a row read at `read_at` (the clock's time when its lookup was sent)."""
        if self.ttl <= 0:
            return
        self._rows.pop(key_id, None)
        while len(self._rows) >= self.max_entries:
            del self._rows[next(iter(self._rows))]
        self._rows[key_id] = (read_at, row)
