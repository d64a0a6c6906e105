"""The confirm join's pure decisions: when an event completes a confirmation, and what it says."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from mailbus.codec import Registry
from mailbus.confirm import join
from mailbus.confirm.join import BOUNCED_SCHEMA, DELIVERED_SCHEMA, FAILED_SCHEMA, SENT_SCHEMA, Step

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
T0_US = join.micros(T0)
MID = "0b6f1f6e-5f1a-4c55-9f0e-2a8d3c1b7e42"
HOUR_US = 3600 * 1_000_000


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def us(seconds: float) -> int:
    return T0_US + round(seconds * 1_000_000)


def sent(seconds: float = 0, requested: float | None = -3, account: str = "dev") -> dict[str, Any]:
    return {"message_id": MID, "occurred_at": at(seconds), "account_id": account,
            "requested_at": None if requested is None else at(requested)}


def delivered(seconds: float = 2, evidence: str = "smtp_final") -> dict[str, Any]:
    return {"message_id": MID, "occurred_at": at(seconds), "account_id": None,
            "evidence": evidence, "recipient": "ada@example.org"}


def failed(permanent: bool = True, recipient: str | None = None) -> dict[str, Any]:
    return {"message_id": MID, "occurred_at": at(1), "account_id": "dev", "reason": "550",
            "permanent": permanent, "recipient": recipient}


def bounced(recipient: str = "ada@example.org") -> dict[str, Any]:
    return {"message_id": MID, "occurred_at": at(5), "account_id": None,
            "recipient": recipient, "bounce_class": "hard"}


def run(events: list[tuple[str, dict[str, Any]]], state: join.State | None = None,
        now: float = 10) -> tuple[join.State | None, list[dict[str, Any]]]:
    """Fold events in order like the agent does; returns the final state and what was emitted."""
    emitted = []
    for kind, event in events:
        step = join.apply(state, kind, event, 3, us(now))
        if step.state is not None:
            state = step.state
        if step.emit is not None:
            emitted.append(step.emit)
    return state, emitted


def test_sent_then_delivered_confirms_once_with_latencies():
    state, out = run([(SENT_SCHEMA, sent(0, requested=-3)), (DELIVERED_SCHEMA, delivered(2))],
                     now=10)
    assert out == [{
        "event_id": join.verdict_id(MID, "confirmed"), "message_id": MID,
        "occurred_at": us(10), "account_id": "dev", "outcome": "confirmed",
        "evidence": "smtp_final", "requested_at": us(-3), "sent_at": us(0),
        "delivered_at": us(2), "sent_to_delivered_us": 2_000_000,
        "requested_to_delivered_us": 5_000_000,
    }]
    assert state is not None and state["verdict"] == "confirmed" and state["partition"] == 3


def test_delivered_then_sent_confirms_the_same():
    first, out1 = run([(SENT_SCHEMA, sent()), (DELIVERED_SCHEMA, delivered())])
    second, out2 = run([(DELIVERED_SCHEMA, delivered()), (SENT_SCHEMA, sent())])
    assert out1 == out2 and len(out1) == 1
    assert first == second


def test_first_event_only_records_state():
    for kind, event in ((SENT_SCHEMA, sent()), (DELIVERED_SCHEMA, delivered())):
        state, out = run([(kind, event)])
        assert out == [] and state is not None and state["verdict"] is None


def test_duplicates_of_either_half_change_nothing():
    state, _ = run([(SENT_SCHEMA, sent())])
    assert join.apply(state, SENT_SCHEMA, sent(), 3, us(20)) == Step(None)
    state, out = run([(DELIVERED_SCHEMA, delivered()),
                      (DELIVERED_SCHEMA, delivered(9, "dsn"))], state)
    assert len(out) == 1 and out[0]["evidence"] == "smtp_final"  # the first evidence wins
    # A second sent (a replay, or a retry's event) neither re-confirms nor moves sent_at.
    assert join.apply(state, SENT_SCHEMA, sent(5), 3, us(20)) == Step(None)


def test_replays_after_confirmation_emit_nothing():
    state, out = run([(SENT_SCHEMA, sent()), (DELIVERED_SCHEMA, delivered())])
    again, out2 = run([(SENT_SCHEMA, sent()), (DELIVERED_SCHEMA, delivered()),
                       (FAILED_SCHEMA, failed()),
                       (DELIVERED_SCHEMA, delivered(30, "mailbox"))], state, now=99)
    assert len(out) == 1 and out2 == []
    assert again["verdict"] == "confirmed" and again["failed_at"] == us(1)


def test_unknown_kinds_are_ignored():
    assert join.apply(None, "mailbus.EmailResponse", {"message_id": MID}, 0, us(0)) == Step(None)


def test_missing_requested_at_leaves_its_latency_null():
    _, out = run([(SENT_SCHEMA, sent(requested=None)), (DELIVERED_SCHEMA, delivered(2))])
    assert out[0]["requested_at"] is None and out[0]["requested_to_delivered_us"] is None
    assert out[0]["sent_to_delivered_us"] == 2_000_000


def test_overdue_emits_unconfirmed_once_then_late_delivery_confirms():
    state, _ = run([(SENT_SCHEMA, sent(0, requested=-1))], now=0)
    assert join.overdue(state, MID, us(3599), 3600) == Step(None)  # not yet
    step = join.overdue(state, MID, us(3600), 3600)
    assert step.emit == {
        "event_id": join.verdict_id(MID, "unconfirmed"), "message_id": MID,
        "occurred_at": us(3600), "account_id": "dev", "outcome": "unconfirmed",
        "evidence": "unknown", "requested_at": us(-1), "sent_at": us(0), "delivered_at": None,
        "sent_to_delivered_us": None, "requested_to_delivered_us": None,
    }
    state = step.state
    assert join.overdue(state, MID, us(7200), 3600) == Step(None)  # once only
    state, out = run([(DELIVERED_SCHEMA, delivered(5000))], state, now=5001)
    assert [r["outcome"] for r in out] == ["confirmed"]
    assert out[0]["sent_to_delivered_us"] == 5000 * 1_000_000
    assert out[0]["event_id"] != step.emit["event_id"]
    assert join.overdue(state, MID, us(99999), 3600) == Step(None)


def test_overdue_ignores_unsent_and_delivered_messages():
    delivered_only, _ = run([(DELIVERED_SCHEMA, delivered())])
    confirmed, _ = run([(SENT_SCHEMA, sent()), (DELIVERED_SCHEMA, delivered())])
    for state in (delivered_only, confirmed):
        assert join.overdue(state, MID, us(10**6), 1) == Step(None)


def test_failed_and_bounced_record_state_only():
    state, out = run([(FAILED_SCHEMA, failed(permanent=False)),
                      (FAILED_SCHEMA, failed(recipient="x@y"))])
    assert state is None and out == []  # retried or per-recipient failures are not recorded
    state, out = run([(FAILED_SCHEMA, failed()), (BOUNCED_SCHEMA, bounced("b@x")),
                      (BOUNCED_SCHEMA, bounced("a@x")),
                      (BOUNCED_SCHEMA, bounced("b@x"))])
    assert out == [] and state is not None
    assert state["failed_at"] == us(1) and state["bounced"] == ["a@x", "b@x"]
    assert join.apply(state, FAILED_SCHEMA, failed(), 3, us(50)) == Step(None)


def test_state_is_json_and_never_mutated():
    state, _ = run([(SENT_SCHEMA, sent()), (BOUNCED_SCHEMA, bounced())])
    snapshot = json.loads(json.dumps(state))
    assert snapshot == state
    join.apply(state, BOUNCED_SCHEMA, bounced("z@x"), 3, us(11))
    join.apply(state, DELIVERED_SCHEMA, delivered(), 3, us(11))
    join.overdue(state, MID, us(10**9), 1)
    assert state == snapshot


def test_forget_only_settled_states_after_the_retention():
    pending, _ = run([(SENT_SCHEMA, sent())], now=0)
    assert not join.forgettable(pending, us(10**9), 60)  # awaiting a verdict: kept
    done, _ = run([(SENT_SCHEMA, sent()), (DELIVERED_SCHEMA, delivered())], now=0)
    assert not join.forgettable(done, us(59), 60)
    assert join.forgettable(done, us(60), 60)
    orphan, _ = run([(DELIVERED_SCHEMA, delivered())], now=0)
    assert join.forgettable(orphan, us(60), 60)


def test_verdicts_encode_with_the_schema():
    registry = Registry.load()
    _, out = run([(SENT_SCHEMA, sent()), (DELIVERED_SCHEMA, delivered())])
    pending, _ = run([(SENT_SCHEMA, sent(requested=None))], now=0)
    late = join.overdue(pending, MID, us(7200), 3600).emit
    assert late is not None
    for record in (*out, late):
        name, decoded = registry.decode(registry.encode("email.confirmed", record))
        assert name == "mailbus.EmailConfirmed"
        assert decoded["outcome"] == record["outcome"]


def test_micros_is_exact():
    assert join.micros(datetime(1970, 1, 1, 0, 0, 1, 7, tzinfo=UTC)) == 1_000_007
    assert join.micros(at(0.000001)) == T0_US + 1
    assert join.micros(None) is None and join.micros(42) == 42


def test_a_flood_for_one_message_cannot_grow_its_state():
    flood = [(BOUNCED_SCHEMA, bounced(f"r{i}@flood.example")) for i in range(5000)]
    flood += [(DELIVERED_SCHEMA,
               delivered(3, evidence="dsn") | {"recipient": f"d{i}@flood.example"})
              for i in range(2000)]
    flood += [(SENT_SCHEMA, sent(i)) for i in range(1, 500)]
    flood += [(FAILED_SCHEMA, failed(recipient=None) | {"occurred_at": at(i)}) for i in range(500)]
    state, out = run([(SENT_SCHEMA, sent()), *flood])
    assert state is not None
    assert len(state["bounced"]) == join.MAX_BOUNCED
    assert state["bounced"] == sorted(f"r{i}@flood.example" for i in range(join.MAX_BOUNCED))
    assert state["sent_at"] == us(0) and state["delivered_at"] == us(3)
    assert len(json.dumps(state)) < join.MAX_BOUNCED * (join.MAX_ADDRESS + 4) + 1000
    assert [v["outcome"] for v in out] == ["confirmed"]  # the flood did not stop the verdict
    # Past the cap nothing is written: no state change, hence no changelog write.
    assert join.apply(state, BOUNCED_SCHEMA, bounced("new@flood.example"), 3, us(20)) == Step(None)


def test_a_recipient_longer_than_an_address_is_not_kept():
    state, _ = run([(SENT_SCHEMA, sent())])
    step = join.apply(state, BOUNCED_SCHEMA, bounced("x" * 10_000 + "@example.org"), 3, us(11))
    assert step == Step(None)
    fits = "x" * (join.MAX_ADDRESS - len("@example.org")) + "@example.org"
    kept = join.apply(state, BOUNCED_SCHEMA, bounced(fits), 3, us(11)).state
    assert kept is not None and kept["bounced"] == [fits]


def test_a_state_restored_over_the_cap_does_not_grow_further():
    # A changelog written before the cap may hold more; it is read as it is, and kept.
    big = join.new_state(3) | {"bounced": sorted(f"r{i:04}@x" for i in range(300))}
    assert join.apply(big, BOUNCED_SCHEMA, bounced("new@x"), 3, us(1)) == Step(None)
    step = join.apply(big, SENT_SCHEMA, sent(), 3, us(1))
    assert step.state is not None and len(step.state["bounced"]) == 300
