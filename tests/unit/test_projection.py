"""The projection's pure rules: status from kinds, event -> row, counting once."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any, get_args

import pytest

from mailbus.confirm.projection import fold, increments, utc_day
from mailbus.ingest.problems import Problem
from mailbus.ingest.status import decode_cursor, encode_cursor, parse_day
from mailbus.timeline import (
    COUNTED,
    STATUSES,
    EventRow,
    InvalidEvent,
    Status,
    confirmed_kind,
    event_row,
    status_for,
)

T0 = datetime(2026, 3, 1, 23, 59, 30, tzinfo=UTC)
MID = str(uuid.uuid4())


@pytest.mark.parametrize(("kinds", "status"), [
    (set(), "queued"),
    ({"requested"}, "queued"),
    ({"requested", "response"}, "queued"),
    ({"requested", "failed"}, "failed"),
    ({"requested", "sent"}, "sent"),
    # One recipient rejected, the others accepted: the message was sent.
    ({"requested", "sent", "failed"}, "sent"),
    ({"sent", "unconfirmed"}, "unconfirmed"),
    ({"sent", "delivered"}, "delivered"),
    # A delivery after the deadline beats the unconfirmed verdict.
    ({"sent", "unconfirmed", "delivered"}, "delivered"),
    ({"sent", "delivered", "confirmed"}, "confirmed"),
    ({"sent", "unconfirmed", "confirmed"}, "confirmed"),
    # Delivered before sent (another partition was faster): order does not matter.
    ({"delivered"}, "delivered"),
    ({"sent", "delivered", "confirmed", "bounced"}, "bounced"),
    ({"bounced"}, "bounced"),
    ({"sent", "unknown"}, "sent"),
])
def test_status_rules(kinds: set[str], status: str) -> None:
    assert status_for(kinds) == status
    assert status in STATUSES


def test_statuses_are_the_literal() -> None:
    assert STATUSES == get_args(Status)
    assert set(COUNTED) - {"requested"} <= set(STATUSES)


def _head(**kw: Any) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "message_id": MID, "occurred_at": T0} | kw


def test_sent_event_row_keeps_the_interesting_fields() -> None:
    record = _head(account_id="dev", transport="smtp", recipients=["a@x.test"],
                   provider_message_id=None, rfc822_message_id="<m@x>",
                   smtp_response="250 2.0.0 queued as 42", attempt=2, requested_at=T0,
                   possible_duplicate=True, send_latency_us=1234)
    row = event_row("mailbus.EmailSent", record)
    assert (row.event_id, row.message_id, row.kind) == (record["event_id"], MID, "sent")
    assert row.occurred_at == T0 and row.account_id == "dev"
    assert row.detail == {"transport": "smtp", "recipients": ["a@x.test"],
                          "rfc822_message_id": "<m@x>", "smtp_response": "250 2.0.0 queued as 42",
                          "attempt": 2, "possible_duplicate": True, "send_latency_us": 1234}


def test_each_schema_maps_to_its_kind() -> None:
    cases = {
        "mailbus.EmailRequested": (_head(account_id="dev", pool="p", to=[{}, {}], cc=[{}],
                                         bcc=[], send_at=None), "requested",
                                   {"pool": "p", "recipients": 3}),
        "mailbus.EmailFailed": (_head(account_id="dev", reason="550 no such user", code=550,
                                      enhanced_status="5.1.1", permanent=True,
                                      recipient="b@x.test", attempt=1), "failed",
                                {"reason": "550 no such user", "code": 550,
                                 "enhanced_status": "5.1.1", "permanent": True,
                                 "recipient": "b@x.test", "attempt": 1}),
        "mailbus.EmailDelivered": (_head(account_id=None, recipient="a@x.test",
                                         evidence="dsn", detail=None), "delivered",
                                   {"recipient": "a@x.test", "evidence": "dsn"}),
        "mailbus.EmailBounced": (_head(recipient="a@x.test", bounce_class="hard",
                                       status_code="5.1.1", diagnostic="gone"), "bounced",
                                 {"recipient": "a@x.test", "bounce_class": "hard",
                                  "status_code": "5.1.1", "diagnostic": "gone"}),
        "mailbus.EmailResponse": (_head(kind="reply", recipient="a@x.test", text="Yes!",
                                        reliable=True), "response",
                                  {"response": "reply", "recipient": "a@x.test",
                                   "text": "Yes!", "reliable": True}),
    }
    for schema, (record, kind, detail) in cases.items():
        row = event_row(schema, record)
        assert (row.kind, row.detail) == (kind, detail), schema
    assert event_row("mailbus.EmailDelivered", cases["mailbus.EmailDelivered"][0]
                     ).account_id is None


@pytest.mark.parametrize(("outcome", "kind"), [
    ("confirmed", "confirmed"), ("unconfirmed", "unconfirmed"), ("unknown", "unknown"),
    (None, "unknown"),
])
def test_confirmed_event_kind_follows_its_outcome(outcome: str | None, kind: str) -> None:
    assert confirmed_kind(outcome) == kind
    record = _head(account_id="dev", outcome=outcome, evidence="smtp_final", sent_at=T0,
                   delivered_at=T0 + timedelta(seconds=2), sent_to_delivered_us=2_000_000,
                   requested_at=None, requested_to_delivered_us=None)
    row = event_row("mailbus.EmailConfirmed", record)
    assert row.kind == kind
    assert row.detail == {"evidence": "smtp_final", "sent_at": T0.isoformat(),
                          "delivered_at": (T0 + timedelta(seconds=2)).isoformat(),
                          "sent_to_delivered_us": 2_000_000}


def test_detail_text_is_capped_and_free_of_nul() -> None:
    row = event_row("mailbus.EmailBounced", _head(recipient="a\x00@x.test",
                                                  bounce_class="soft", diagnostic="x" * 5000))
    assert row.detail["recipient"] == "a@x.test"
    assert event_row("mailbus.EmailSent", _head(account_id="d\x00ev")).account_id == "dev"
    assert len(row.detail["diagnostic"]) == 2001 and row.detail["diagnostic"].endswith("…")


@pytest.mark.parametrize("field", ["event_id", "message_id"])
def test_ids_must_be_uuids(field: str) -> None:
    with pytest.raises(InvalidEvent, match=field):
        event_row("mailbus.EmailSent", _head(**{field: "not-a-uuid"}))
    with pytest.raises(InvalidEvent):
        event_row("mailbus.Suppression", _head())


def _row(kind: str, at: datetime = T0, account: str | None = "dev", **kw: Any) -> EventRow:
    return EventRow(kw.get("event_id", str(uuid.uuid4())), MID, kind, at, account, {})


def test_fold_counts_each_kind_once_per_message() -> None:
    first = _row("delivered", T0)
    second = _row("delivered", T0 + timedelta(seconds=1))
    sent = _row("sent", T0 - timedelta(seconds=1))
    result = fold({"requested"}, "dev", [second, first, sent])
    assert result.status == "delivered"
    assert result.kinds == {"requested", "sent", "delivered"}
    # The earliest delivered event counts; the second recipient's does not.
    assert set(result.counted) == {first.event_id, sent.event_id}


def test_fold_counts_nothing_for_kinds_already_seen() -> None:
    result = fold({"requested", "sent", "delivered"}, "dev",
                  [_row("delivered"), _row("sent"), _row("response")])
    assert result.counted == {} and result.status == "delivered"
    assert "response" in result.kinds


def test_fold_attributes_to_the_event_day_in_utc_and_its_account() -> None:
    late = datetime(2026, 3, 2, 1, 0, tzinfo=timezone(timedelta(hours=2)))  # 23:00 UTC
    event = _row("sent", late, account="team-b")
    result = fold(set(), "team-a", [event])
    assert result.counted[event.event_id] == (date(2026, 3, 1), "team-b")
    assert utc_day(late) == date(2026, 3, 1)


def test_fold_falls_back_to_the_message_account() -> None:
    delivered = _row("delivered", account=None)
    assert fold(set(), "dev", [delivered]).counted[delivered.event_id][1] == "dev"
    # Unknown until an event names it: then that one.
    sent = _row("sent", T0 + timedelta(seconds=5), account="solo")
    delivered = _row("delivered", account=None)
    result = fold(set(), None, [delivered, sent])
    assert result.account_id == "solo"
    assert result.counted[delivered.event_id][1] == "solo"
    lone = _row("bounced", account=None)
    assert fold(set(), None, [lone]).counted[lone.event_id][1] == ""


def test_increments_sum_per_day_and_account() -> None:
    d1, d2 = date(2026, 3, 1), date(2026, 3, 2)
    rows = increments([("sent", d1, "a"), ("delivered", d1, "a"), ("sent", d1, "a"),
                       ("failed", d2, "b")])
    assert rows == [
        {"day": d1, "account_id": "a", "requested": 0, "sent": 2, "delivered": 1,
         "confirmed": 0, "failed": 0, "bounced": 0, "unconfirmed": 0},
        {"day": d2, "account_id": "b", "requested": 0, "sent": 0, "delivered": 0,
         "confirmed": 0, "failed": 1, "bounced": 0, "unconfirmed": 0},
    ]


def test_cursor_round_trip_and_rejects() -> None:
    moment = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    cursor = encode_cursor({"t": moment.isoformat(), "id": MID})
    assert "=" not in cursor
    assert decode_cursor(cursor, ("t", "id")) == {"t": moment.isoformat(), "id": MID}
    for bad in ("", "!!!", "e30", encode_cursor({"t": moment.isoformat(), "id": "nope"}),
                encode_cursor({"t": moment.replace(tzinfo=None).isoformat(), "id": MID}),
                encode_cursor({"t": moment.isoformat(), "id": 7}),  # type: ignore[dict-item]
                encode_cursor({"t": moment.isoformat(), "id": MID, "x": "y"})):
        with pytest.raises(Problem) as info:
            decode_cursor(bad, ("t", "id"))
        assert info.value.status == 422 and info.value.errors[0]["field"] == "cursor"


@pytest.mark.parametrize("value", [None, "", "2026-02-30", "20260301", "2026-W09-1",
                                   "2026-03-01T00:00:00"])
def test_day_must_be_yyyy_mm_dd(value: str | None) -> None:
    with pytest.raises(Problem) as info:
        parse_day(value)
    assert info.value.errors[0]["field"] == "date"
    assert parse_day("2026-03-01") == date(2026, 3, 1)
