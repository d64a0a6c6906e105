"""The sender's pure decisions: quota and rate, backoff, what an error means, failover."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from mailbus.accounts import Account, Directory, SmtpAccount
from mailbus.sender import decisions
from mailbus.sender.decisions import Fail, Retry
from mailbus.sender.metrics import reason_class
from mailbus.sender.quota import Budget, Exhausted, Go, Wait, backoff
from mailbus.sender.smtp import classify_smtp_reply
from mailbus.sender.transport import (
    AccountExhausted,
    PermanentError,
    TransientError,
)

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_rate_is_a_token_bucket():
    budget = Budget(daily_quota=1000, rate_per_second=2.0)
    assert budget.allowance(at(0)) == 2  # one second of burst
    budget.take(at(0))
    budget.take(at(0))
    decision = budget.decide(at(0))
    assert isinstance(decision, Wait) and abs(decision.seconds - 0.5) < 1e-9
    assert isinstance(budget.decide(at(0.5)), Go)


def test_slow_rates_still_send_one_at_a_time():
    budget = Budget(daily_quota=10, rate_per_second=0.5)
    assert isinstance(budget.decide(at(0)), Go)
    budget.take(at(0))
    decision = budget.decide(at(1))
    assert isinstance(decision, Wait) and abs(decision.seconds - 1.0) < 1e-9


def test_hand_overs_are_paced_to_the_rate_and_burst_whenever_they_come():
    budget = Budget(daily_quota=1000, rate_per_second=2.0)
    # Six hand-overs arriving together after a stall: the burst of two goes now,
    # the rest at the rate, each slot reserved for the one that asked.
    waits = [budget.pace(at(10)) for _ in range(6)]
    assert waits == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]
    starts = sorted(10 + w for w in waits)
    assert all(sum(1 for u in starts if t <= u < t + 1.0) <= 4 for t in starts)
    # Idle long enough, the burst is back.
    assert [budget.pace(at(20)) for _ in range(3)] == [0.0, 0.0, 0.5]


def test_pacing_at_a_high_rate_costs_no_wait():
    budget = Budget(daily_quota=10_000_000, rate_per_second=100_000.0)
    assert max(budget.pace(at(0)) for _ in range(50_000)) == 0.0


def test_rolling_quota_frees_exactly_24h_after_each_send():
    budget = Budget(daily_quota=3, rate_per_second=100)
    for t in (0, 10, 20):
        assert isinstance(budget.decide(at(t)), Go)
        budget.take(at(t))
    decision = budget.decide(at(30))
    assert decision == Exhausted(at(0) + timedelta(hours=24))
    assert budget.left(at(30)) == 0
    assert isinstance(budget.decide(at(24 * 3600)), Go)  # the first send left the window
    assert budget.used(at(24 * 3600 + 15)) == 1


def test_quota_is_rebuilt_from_the_ledger():
    budget = Budget(daily_quota=2, rate_per_second=100)
    budget.load([at(-25 * 3600), at(-3600), at(-60)], now=T0)  # one is too old to count
    assert budget.used(T0) == 2
    assert isinstance(budget.decide(T0), Exhausted)


def test_provider_parking_overrides_the_local_view():
    budget = Budget(daily_quota=100, rate_per_second=100)
    budget.park(at(60))
    assert budget.decide(at(30)) == Exhausted(at(60))
    assert isinstance(budget.decide(at(61)), Go)


def test_backoff_grows_is_capped_and_jittered():
    rng = random.Random(7)
    delays = [backoff(n, base=30, cap=3600, rng=rng) for n in range(1, 12)]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(3600, 30 * 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays}) == len(delays)


def test_what_errors_mean():
    kw = {"max_attempts": 3, "now": T0, "retry_base": 1.0, "retry_cap": 10.0}
    retry = decisions.after_error(TransientError("451 later"), attempts=1, **kw)
    assert isinstance(retry, Retry) and retry.refund == 0 and retry.due_at > T0
    gave_up = decisions.after_error(TransientError("451 later", code=451), attempts=3, **kw)
    assert isinstance(gave_up, Fail) and not gave_up.permanent and gave_up.dead_letter
    perm = decisions.after_error(PermanentError("550 no", code=550, enhanced_status="5.1.1"),
                                 attempts=1, **kw)
    assert perm == Fail("550 no", True, 550, "5.1.1", None)
    parked = decisions.after_error(AccountExhausted("daily limit", until=at(3600)),
                                   attempts=3, **kw)
    assert parked == Retry(at(3600), "daily limit", refund=1)  # never a failure


def test_smtp_replies_are_classified():
    assert isinstance(classify_smtp_reply(451, "4.3.0 later"), TransientError)
    err = classify_smtp_reply(550, "5.1.1 No such user", "x@example.com")
    assert isinstance(err, PermanentError)
    assert (err.code, err.enhanced_status, err.recipient) == (550, "5.1.1", "x@example.com")
    assert isinstance(classify_smtp_reply(-1, "timeout"), TransientError)


def _account(id_: str, *pools: str) -> Account:
    return Account(id=id_, kind="smtp", from_address=f"{id_}@x.test", pools=pools,
                   smtp=SmtpAccount(host="127.0.0.1"))


def test_recipients_refused_at_rcpt_fail_for_good_or_wait_for_their_own_retry():
    rejected = {"grey@example.com": "450 4.2.0 Greylisted, try again later",
                "ghost@example.com": "550 5.1.1 No such user",
                "full@example.com": "452 4.2.2 Mailbox full"}
    out = decisions.refused(rejected, attempts=1, max_attempts=3, now=at(0),
                           retry_base=10.0, retry_cap=60.0)
    assert out.again == ["grey@example.com", "full@example.com"]
    assert out.failed == [Fail("550 5.1.1 No such user", True, 550, "5.1.1",
                               recipient="ghost@example.com")]
    assert out.retry is not None and at(5) <= out.retry.due_at <= at(10)  # backoff(1)
    assert out.retry.reason == "refused for now: 450 4.2.0 Greylisted, try again later"
    # The last attempt: what was refused for now has failed, not for good.
    last = decisions.refused(rejected, attempts=3, max_attempts=3, now=at(0),
                            retry_base=10.0, retry_cap=60.0)
    assert last.again == [] and last.retry is None
    assert [(f.recipient, f.permanent, f.code) for f in last.failed] == [
        ("grey@example.com", False, 450), ("ghost@example.com", True, 550),
        ("full@example.com", False, 452)]
    assert last.failed[0].reason.startswith("gave up after 3 attempts: 450 4.2.0")
    assert not any(f.dead_letter for f in last.failed)
    nothing = decisions.refused({}, attempts=1, max_attempts=3, now=at(0), retry_base=10.0,
                               retry_cap=60.0)
    assert (nothing.failed, nothing.again, nothing.retry) == ([], [], None)


def test_failover_stays_in_the_pool_and_is_bounded():
    directory = Directory([_account("a", "p"), _account("b", "p"), _account("c", "q"),
                           _account("d", "p")])
    assert decisions.failover(directory, "p", "a", 0, {"b": 5, "d": 9}) == "d"  # most left
    assert decisions.failover(directory, "p", "a", 0, {"b": 0, "d": 0}) is None
    assert decisions.failover(directory, "p", "a", 0, {"b": 0}) == "d"  # unknown: last resort
    assert decisions.failover(directory, None, "a", 0, {"b": 5}) is None
    assert decisions.failover(directory, "p", "a", decisions.MAX_REROUTES, {"b": 5}) is None


def test_admission_waits_for_send_at():
    event = {"message_id": "m", "account_id": "a", "pool": None, "requested_at": T0,
             "send_at": at(600)}
    assert decisions.admission(event, b"x", 3, T0)["due_at"] == at(600)
    assert decisions.admission(event | {"send_at": at(-5)}, b"x", 3, T0)["due_at"] == T0


def test_reason_labels_are_bounded():
    assert reason_class("suppressed: all") == "suppressed"
    assert reason_class("550 5.1.1 no such user") == "smtp_5xx"
    assert reason_class("gave up after 8 attempts: 451") == "gave_up"
    assert reason_class("anything else at all") == "other"


def test_a_message_no_pool_member_can_take_waits_for_the_first_that_may_send():
    until = at(3600)
    # Another member only paused by its rate: as soon as it may send.
    assert decisions.retry_exhausted_at(0, until, [at(2), None, at(7200)]) == at(2)
    # Nobody known: at this account's reset.
    assert decisions.retry_exhausted_at(0, until, [None]) == until
    # Moved as often as allowed already: it stays here, so at this account's reset,
    # however soon another member could send.
    assert decisions.retry_exhausted_at(decisions.MAX_REROUTES, until, [at(2)]) == until
