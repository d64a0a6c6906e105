"""What the webhooks service decides, as pure functions: payloads, retries, giving up.

No Kafka, no database, no HTTP: `intake.py` and `dispatch.py` do the I/O
around them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from mailbus.confirm.projection import EventRow

# The event types an endpoint may ask for: one per outcome of a message, as
# the timeline of GET /v1/messages/{id} names them (docs/api.md, Webhooks).
EVENT_TYPES: tuple[str, ...] = (
    "message.sent", "message.failed", "message.delivered", "message.bounced",
    "message.response", "message.confirmed", "message.unconfirmed")
# Sent only by POST /v1/webhooks/endpoints/{id}/test, whatever the endpoint asked for.
TEST_TYPE = "webhook.test"
# Seconds to wait after each failed attempt: 11 attempts over 27.7 hours, so
# an endpoint that is down for a day still receives everything.
DEFAULT_SCHEDULE: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200)
# The live lane of every endpoint; each replay has its own lane id.
LIVE_LANE = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class Event:
    """An event as endpoints receive it: its id (the webhook-id), type and exact body."""

    event_id: str
    message_id: str
    event_type: str
    occurred_at: datetime
    body: str


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def payload(event_type: str, occurred_at: datetime, data: Mapping[str, Any]) -> str:
    """The JSON body of a delivery: {type, timestamp, data}, as the convention suggests."""
    doc = {"type": event_type, "timestamp": occurred_at.isoformat(), "data": dict(data)}
    return json.dumps(doc, default=_json_default, separators=(",", ":"), ensure_ascii=False)


def event_of(row: EventRow) -> Event | None:
    """The webhook event of a projected event row; None for kinds no endpoint receives."""
    event_type = f"message.{row.kind}"
    if event_type not in EVENT_TYPES:
        return None
    data = {"event_id": row.event_id, "message_id": row.message_id,
            "account": row.account_id, **row.detail}
    return Event(row.event_id, row.message_id, event_type, row.occurred_at,
                 payload(event_type, row.occurred_at, data))


def ping_event(event_id: str, endpoint_id: str, now: datetime) -> Event:
    """The event POST …/test queues: it names the endpoint and nothing else."""
    body = payload(TEST_TYPE, now, {"event_id": event_id, "endpoint_id": endpoint_id})
    return Event(event_id, "", TEST_TYPE, now, body)


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to, as the dispatcher records it."""

    delivered: bool
    state: str  # pending (retry later), delivered, failed (retries exhausted)
    next_attempt_at: datetime | None


def after_attempt(attempt: int, succeeded: bool, now: datetime,
                  schedule: Sequence[float] = DEFAULT_SCHEDULE) -> Outcome:
    """The delivery's state after its `attempt`-th attempt (1-based)."""
    if succeeded:
        return Outcome(True, "delivered", None)
    if attempt > len(schedule):
        return Outcome(False, "failed", None)
    return Outcome(False, "pending", now + timedelta(seconds=schedule[attempt - 1]))


def succeeded(status_code: int | None) -> bool:
    """Only a 2xx counts: redirects are not followed, so a 3xx is a failure too."""
    return status_code is not None and 200 <= status_code < 300


def should_disable(last_success_at: datetime | None, failing_since: datetime) -> bool:
    """An endpoint is disabled when a delivery ran out of retries and nothing
    reached it since that delivery's first attempt: it has been failing for
    the whole schedule (over a day by default)."""
    return last_success_at is None or last_success_at < failing_since
