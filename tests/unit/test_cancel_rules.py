"""Cancel and reschedule, the pure parts: answers, the event, the timeline, the horizon."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from mailbus import topics
from mailbus.codec import Registry
from mailbus.ingest.cancel import StateProblem, event, verdict
from mailbus.ingest.handlers import ApiKey
from mailbus.ingest.models import CancelRequest, MessageRequest, RescheduleRequest
from mailbus.ingest.problems import Problem
from mailbus.sender.settings import SenderSettings
from mailbus.timeline import STATUSES, event_row, status_for
from mailbus.webhook_events import event_of

MID = str(uuid.uuid4())
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
KEY = ApiKey(id="k1", scopes=frozenset({"send"}), accounts=None, default_pool=None)


def test_each_outcome_answers_what_happened() -> None:
    assert verdict(MID, "cancelled", "cancelled", NOW).body == {
        "id": MID, "result": "cancelled", "status": "cancelled"}
    assert verdict(MID, "already_cancelled", "cancelled", NOW).body["result"] == \
        "already_cancelled"
    moved = verdict(MID, "rescheduled", "queued", NOW + timedelta(days=3)).body
    assert moved == {"id": MID, "result": "rescheduled", "status": "queued",
                     "send_at": "2026-12-03T12:00:00+00:00"}


@pytest.mark.parametrize("state", ["sending", "sent", "failed", "cancelled", "partly_sent",
                                   "ambiguous"])
def test_too_late_is_a_409_naming_the_state(state: str) -> None:
    with pytest.raises(StateProblem) as caught:
        verdict(MID, "too_late", state, NOW)
    body = caught.value.body("/v1/messages/x/cancel")
    assert caught.value.status == 409 and body["type"] == "/problems/too-late"
    assert body["state"] == state and body["detail"]
    assert "Retry-After" not in caught.value.headers


def test_not_queued_yet_asks_again_and_not_found_reveals_nothing() -> None:
    with pytest.raises(StateProblem) as caught:
        verdict(MID, "not_admitted", None, None)
    assert caught.value.status == 409 and caught.value.headers == {"Retry-After": "1"}
    assert "state" not in caught.value.body()
    with pytest.raises(Problem) as missing:
        verdict(MID, "not_found", None, None)
    # The same answer whether the message is another key's or does not exist.
    assert missing.value.status == 404 and missing.value.body() == {
        "type": "/problems/not-found", "title": "No such message", "status": 404}
    with pytest.raises(ValueError):
        verdict(MID, "something new", None, None)


def test_the_event_round_trips_and_becomes_a_timeline_entry() -> None:
    registry = Registry.load()
    later = NOW + timedelta(days=20)
    for send_at, kind in ((None, "cancelled"), (later, "rescheduled")):
        record = event(MID, "dev", KEY, send_at, "plans changed", NOW)
        name, decoded = registry.decode(registry.encode(topics.SCHEDULE, record))
        assert name == "mailbus.ScheduleChange" and decoded["change"] == kind
        row = event_row(name, decoded)
        assert (row.kind, row.message_id, row.account_id) == (kind, MID, "dev")
        expected = {"key_id": "k1", "reason": "plans changed"}
        if send_at:
            expected["send_at"] = later.isoformat()
        assert row.detail == expected
    # Two changes are two events.
    assert event(MID, "dev", KEY, None, None, NOW)["event_id"] != \
        event(MID, "dev", KEY, None, None, NOW)["event_id"]


def test_cancelled_is_a_status_of_its_own_and_a_webhook_type() -> None:
    assert "cancelled" in STATUSES
    assert status_for({"requested", "cancelled"}) == "cancelled"
    assert status_for({"requested", "rescheduled"}) == "queued"
    assert status_for({"requested", "rescheduled", "cancelled"}) == "cancelled"
    # Had it gone anyway, the send would say so: evidence wins.
    assert status_for({"requested", "cancelled", "sent"}) == "sent"
    registry = Registry.load()
    for change, webhook in (("cancelled", "message.cancelled"), ("rescheduled", None)):
        record = event(MID, "dev", KEY, NOW if change == "rescheduled" else None, None, NOW)
        name, decoded = registry.decode(registry.encode(topics.SCHEDULE, record))
        found = event_of(event_row(name, decoded))
        assert (found.event_type if found else None) == webhook


def test_the_horizon_is_thirty_days_and_the_retentions_outlive_it() -> None:
    base = {"from": "dev", "to": ["ada@example.com"], "text": "x"}
    ok = datetime.now(UTC) + timedelta(days=29, hours=23)
    too_far = datetime.now(UTC) + timedelta(days=30, minutes=5)
    MessageRequest.model_validate(base | {"send_at": ok})
    RescheduleRequest.model_validate({"send_at": ok})
    for model, body in ((MessageRequest, base), (RescheduleRequest, {})):
        with pytest.raises(ValidationError) as caught:
            model.model_validate(body | {"send_at": too_far})
        assert caught.value.errors()[0]["loc"] == ("send_at",)
        assert "30 days" in caught.value.errors()[0]["msg"]
    # email.requested outlives the horizon (a rewind rebuilds the queue from it),
    # and the ledger outlives email.requested (a rewind finds every settled row).
    horizon_ms = topics.SCHEDULE_HORIZON_DAYS * 86_400_000
    retention = int(dict(next(t for t in topics.TOPICS if t.name == topics.REQUESTED)
                         .config)["retention.ms"])
    assert retention >= horizon_ms + topics.WEEK_MS
    ledger_ms = SenderSettings.model_fields["ledger_retention_hours"].default * 3_600_000
    assert ledger_ms > retention


@pytest.mark.parametrize("reason", ["a\nBcc: x@example.com", "=?utf-8?q?x?=", "x" * 201,
                                    "tab\x00nul"])
def test_a_reason_is_one_short_line(reason: str) -> None:
    with pytest.raises(ValidationError) as caught:
        CancelRequest.model_validate({"reason": reason})
    assert caught.value.errors()[0]["loc"] == ("reason",)
    assert CancelRequest.model_validate({"reason": "Ünïcode is fine"}).reason


def test_only_the_sender_writes_the_topic_and_its_readers_read_it() -> None:
    writers = {s for s, g in topics.GRANTS.items() if topics.SCHEDULE in g.write}
    readers = {s for s, g in topics.GRANTS.items() if topics.SCHEDULE in g.read}
    assert writers == {"sender"} and readers == {"projector", "webhooks"}
