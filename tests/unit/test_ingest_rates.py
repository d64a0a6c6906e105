"""Per-key moving windows (services/ingest/rates.py) on a clock the test turns."""

from __future__ import annotations

from mailbus.ingest.rates import KeyRates


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_moving_window_counts_accepted_requests_only_and_frees_the_oldest_first() -> None:
    clock = Clock()
    rates = KeyRates("3/second", clock)
    assert [rates.hit("k") for _ in range(3)] == [0, 0, 0]
    assert rates.hit("k") == 1  # the fourth in the same second waits
    assert rates.hit("other") == 0  # other keys have their own windows
    clock.now += 0.5
    assert rates.hit("k") == 1  # refused requests did not count, but the window is still full
    clock.now += 0.5001
    assert rates.hit("k") == 0  # the first three left the window
    assert [rates.hit("k") for _ in range(2)] == [0, 0]
    assert rates.hit("k") == 1


def test_retry_after_is_when_a_slot_frees_and_a_key_may_carry_its_own_rate() -> None:
    clock = Clock()
    rates = KeyRates("100/second", clock)
    assert rates.hit("k", "2/minute") == 0
    clock.now += 20
    assert rates.hit("k", "2/minute") == 0
    assert rates.hit("k", "2/minute") == 40  # the first leaves the minute 40 s from now
    assert rates.hit("k", "broken") == 0  # an unreadable rate falls back to the installation's
    # A key whose rate falls below what its window holds waits until enough left.
    clock.now += 1
    for _ in range(3):
        rates.hit("j", "5/minute")
    assert rates.hit("j", "1/minute") == 60


def test_windows_that_emptied_are_forgotten() -> None:
    clock = Clock()
    rates = KeyRates("10/second", clock)
    for i in range(50):
        rates.hit(f"k{i}")
    clock.now += KeyRates.SWEEP_SECONDS + 1
    rates.hit("fresh")
    assert set(rates._windows) == {"fresh"}
