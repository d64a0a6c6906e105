"""The key cache (services/ingest/keycache.py) on a clock the test turns."""

from __future__ import annotations

from mailbus.ingest.keycache import KeyCache


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_a_row_is_kept_for_the_ttl_from_when_it_was_asked_for() -> None:
    clock = Clock()
    cache = KeyCache(1.0, clock=clock)
    cache.put("k", {"id": "k"}, read_at=clock.now - 0.4)  # the lookup took 0.4 s
    assert cache.get("k") == {"id": "k"}
    clock.now += 0.59
    assert cache.get("k") == {"id": "k"}
    clock.now += 0.02  # 1.01 s after the lookup was sent
    assert cache.get("k") is None and cache.get("k") is None


def test_zero_keeps_nothing_and_the_size_is_bounded_oldest_first() -> None:
    clock = Clock()
    off = KeyCache(0.0, clock=clock)
    off.put("k", {"id": "k"}, clock.now)
    assert off.get("k") is None
    cache = KeyCache(10.0, max_entries=3, clock=clock)
    for name in ("a", "b", "c"):
        cache.put(name, name, clock.now)
    cache.put("a", "a again", clock.now)  # refreshed: now the newest
    cache.put("d", "d", clock.now)
    assert [cache.get(n) for n in ("a", "b", "c", "d")] == ["a again", None, "c", "d"]
