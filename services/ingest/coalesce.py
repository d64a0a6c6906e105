"""Concurrent callers share one round trip: what arrives while a run is in flight goes together.

A request hands its item to `submit` and waits. When fewer than
`max_in_flight` runs are going, whatever is pending starts at once as one
run (a lone request never waits for company); while they are all busy,
arrivals gather and leave together when one ends. So at low load each item
runs alone, and under load one round trip carries many. An item only ever
joins a run that has not started: nothing it reads can be older than the
item itself.

Items with the same `key` never share a run (two uses of one Idempotency-Key
must see each other's outcome); the later one waits for a following run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeAlias, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# What a run returns per item: its result, or the exception that item raises.
Outcome: TypeAlias = R | BaseException


class Coalescer(Generic[T, R]):
    """Runs `run(items)` for groups of submitted items; each caller gets its own outcome."""

    def __init__(self, run: Callable[[Sequence[T]], Awaitable[Sequence[Outcome[R]]]], *,
                 max_in_flight: int, max_size: int,
                 key: Callable[[T], Hashable | None] = lambda _: None):
        if max_in_flight < 1 or max_size < 1:
            raise ValueError("max_in_flight and max_size must be at least 1")
        self._run, self._key = run, key
        self.max_in_flight, self.max_size = max_in_flight, max_size
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """The item's outcome once the run that carried it ended (its exception raised)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._start()
        return await future

    def _start(self) -> None:
        while self._pending and len(self._tasks) < self.max_in_flight:
            group: list[tuple[T, asyncio.Future[R]]] = []
            rest: list[tuple[T, asyncio.Future[R]]] = []
            keys: set[Hashable] = set()
            for entry in self._pending:
                if entry[1].done():  # its caller went away before it ran: nothing to do
                    continue
                key = self._key(entry[0])
                if len(group) >= self.max_size or (key is not None and key in keys):
                    rest.append(entry)
                    continue
                if key is not None:
                    keys.add(key)
                group.append(entry)
            self._pending = rest
            if not group:
                return
            task = asyncio.ensure_future(self._carry(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _carry(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes: Sequence[Outcome[R]] = await self._run([item for item, _ in group])
            if len(outcomes) != len(group):
                raise RuntimeError(f"a run returned {len(outcomes)} outcomes for {len(group)}")
        except asyncio.CancelledError:  # shutting down: no caller is left waiting forever
            for _, future in group:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001  # the run failed as a whole: so does each item
            outcomes = [exc] * len(group)
        finally:
            # The task leaves the set before the next run starts, not when it returns.
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        self._start()

    @property
    def in_flight(self) -> int:
        """Runs going now."""
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait until every pending item has been carried and every run ended."""
        while self._tasks or any(not f.done() for _, f in self._pending):
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            else:
                self._start()
                await asyncio.sleep(0)
