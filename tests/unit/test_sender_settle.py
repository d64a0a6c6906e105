"""The settler's pure decisions: which outcomes may settle, what their statements get."""

from __future__ import annotations

from datetime import UTC, datetime

from mailbus.sender.compose import INLINE_CHARS, Content, compose_inline
from mailbus.sender.settle import Outcome, fenced, statement_params


def outcome(message_id: str, partition: int, epoch: int, **params) -> Outcome:
    return Outcome(message_id, partition, epoch, "sent", [], params)


def test_only_outcomes_claimed_under_the_current_epoch_settle():
    batch = [outcome("a", 0, 3), outcome("b", 0, 2), outcome("c", 1, 1), outcome("d", 2, 1)]
    keep, drop = fenced(batch, {0: 3, 1: 1})
    assert [o.message_id for o in keep] == ["a", "c"]
    # An older epoch of an owned partition, and a partition owned no more.
    assert [o.message_id for o in drop] == ["b", "d"]


def test_nothing_settles_where_this_sender_owns_nothing():
    keep, drop = fenced([outcome("a", 0, 1)], {})
    assert keep == [] and [o.message_id for o in drop] == ["a"]


def test_statement_params_default_and_truncate():
    at = datetime(2026, 1, 1, tzinfo=UTC)
    p = statement_params(outcome("a", 0, 1, sent_at=at, error="x" * 5000,
                                 pending=("r@example.com",), ambiguous=True), "ns.")
    assert p["namespace"] == "ns." and p["sent_at"] == at and len(p["error"]) == 2000
    assert p["pending"] == ["r@example.com"] and p["ambiguous"] is True and p["refund"] == 0
    bare = statement_params(outcome("b", 0, 1), "ns.")
    assert bare["pending"] is None and bare["ambiguous"] is False and bare["error"] == ""


def test_small_unsigned_messages_compose_inline_large_or_signed_ones_do_not():
    small = {"text": "hi", "html": None}
    assert compose_inline(small, None, signed=False)
    assert not compose_inline(small, None, signed=True)
    assert not compose_inline({"text": "x" * (INLINE_CHARS + 1)}, None, signed=False)
    big_html = Content("s", "subject", "t", "y" * INLINE_CHARS)
    assert not compose_inline(small, big_html, signed=False)
