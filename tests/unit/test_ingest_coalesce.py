"""Coalescer: who goes together, and who gets which outcome (no Kafka, no database)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from mailbus.ingest.coalesce import Coalescer, Outcome


class Runs:
    """A run function that records its groups and ends each when the test says so."""

    def __init__(self, fail: set[Any] | None = None, raise_all: bool = False):
        self.groups: list[list[Any]] = []
        self.gates: list[asyncio.Event] = []
        self.fail, self.raise_all = fail or set(), raise_all

    async def __call__(self, items: Sequence[Any]) -> list[Outcome[str]]:
        self.groups.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.raise_all:
            raise ConnectionError("down")
        return [ValueError(i) if i in self.fail else f"done {i}" for i in items]

    def release(self, index: int) -> None:
        self.gates[index].set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_lone_item_runs_at_once_and_later_ones_gather_behind_the_busy_runs() -> None:
    async def scenario() -> None:
        runs = Runs()
        c: Coalescer[int, str] = Coalescer(runs, max_in_flight=1, max_size=100)
        first = asyncio.ensure_future(c.submit(0))
        await settle()
        assert runs.groups == [[0]]  # nobody waited for company
        rest = [asyncio.ensure_future(c.submit(i)) for i in range(1, 6)]
        await settle()
        assert runs.groups == [[0]] and c.in_flight == 1  # all busy: they wait
        runs.release(0)
        assert await first == "done 0"
        await settle()
        assert runs.groups == [[0], [1, 2, 3, 4, 5]]  # then leave together
        runs.release(1)
        assert await asyncio.gather(*rest) == [f"done {i}" for i in range(1, 6)]

    run(scenario())


def test_runs_in_flight_and_group_size_are_bounded() -> None:
    async def scenario() -> None:
        runs = Runs()
        c: Coalescer[int, str] = Coalescer(runs, max_in_flight=2, max_size=3)
        futures = [asyncio.ensure_future(c.submit(0)), asyncio.ensure_future(c.submit(1))]
        await settle()
        assert runs.groups == [[0], [1]] and c.in_flight == 2
        futures += [asyncio.ensure_future(c.submit(i)) for i in range(2, 9)]
        await settle()
        assert len(runs.groups) == 2
        runs.release(0)
        await settle()
        assert runs.groups[2] == [2, 3, 4]
        runs.release(1)
        await settle()
        assert runs.groups[3] == [5, 6, 7] and c.in_flight == 2
        runs.release(2)
        await settle()
        assert runs.groups[4] == [8]
        runs.release(3)
        runs.release(4)
        assert sorted(x for g in runs.groups for x in g) == list(range(9))
        assert await asyncio.gather(*futures) == [f"done {i}" for i in range(9)]

    run(scenario())


def test_items_of_one_key_never_share_a_run() -> None:
    async def scenario() -> None:
        runs = Runs()
        c: Coalescer[tuple[str, int], str] = Coalescer(
            runs, max_in_flight=1, max_size=100, key=lambda item: item[0] or None)
        busy = asyncio.ensure_future(c.submit(("", 0)))
        await settle()
        items = [("a", 1), ("b", 2), ("a", 3), ("", 4), ("", 5), ("a", 6)]
        futures = [asyncio.ensure_future(c.submit(i)) for i in items]
        await settle()
        for n in range(4):
            runs.release(n)
            await settle()
        assert runs.groups[1] == [("a", 1), ("b", 2), ("", 4), ("", 5)]  # no key: any number
        assert runs.groups[2] == [("a", 3)] and runs.groups[3] == [("a", 6)]
        await asyncio.gather(busy, *futures)

    run(scenario())


def test_each_item_gets_its_own_outcome_and_a_failed_run_fails_every_item() -> None:
    async def scenario() -> None:
        runs = Runs(fail={2})
        c: Coalescer[int, str] = Coalescer(runs, max_in_flight=1, max_size=100)
        futures = [asyncio.ensure_future(c.submit(i)) for i in range(4)]
        await settle()
        runs.release(0)
        await settle()
        runs.release(1)
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[0] == "done 0" and results[1] == "done 1" and results[3] == "done 3"
        assert isinstance(results[2], ValueError)

        down = Runs(raise_all=True)
        d: Coalescer[int, str] = Coalescer(down, max_in_flight=1, max_size=100)
        futures = [asyncio.ensure_future(d.submit(i)) for i in range(3)]
        await settle()
        down.release(0)
        await settle()
        down.release(1)
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results)
        assert d.in_flight == 0  # and the next submit runs again
        later = asyncio.ensure_future(d.submit(9))
        await settle()
        assert down.groups[-1] == [9]
        down.release(2)
        with pytest.raises(ConnectionError):
            await later

    run(scenario())


def test_a_caller_gone_before_its_run_is_not_carried_and_drain_waits_for_the_rest() -> None:
    async def scenario() -> None:
        runs = Runs()
        c: Coalescer[int, str] = Coalescer(runs, max_in_flight=1, max_size=100)
        busy = asyncio.ensure_future(c.submit(0))
        await settle()
        gone = asyncio.ensure_future(c.submit(1))
        kept = asyncio.ensure_future(c.submit(2))
        await settle()
        gone.cancel()
        await settle()
        drained = asyncio.ensure_future(c.drain())
        runs.release(0)
        await settle()
        assert runs.groups == [[0], [2]]
        assert not drained.done()
        runs.release(1)
        await drained
        assert await busy == "done 0" and await kept == "done 2"

    run(scenario())


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Coalescer(Runs(), max_in_flight=0, max_size=1)
