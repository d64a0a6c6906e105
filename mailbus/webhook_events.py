"""What a webhook endpoint receives: the event types, and each event's exact body.

Shared by the API (services/ingest: which types an endpoint may ask for, the
test event) and the webhooks service (services/webhooks: the event of each
projected row). Pure functions, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mailbus.timeline import EventRow

# The event types an endpoint may ask for: one per outcome of a message, as
# the timeline of GET /v1/messages/{id} names them (docs/api.md, Webhooks).
EVENT_TYPES: tuple[str, ...] = (
    "message.sent", "message.failed", "message.delivered", "message.bounced",
    "message.response", "message.confirmed", "message.unconfirmed",
    # A queued message cancelled through the API (email.schedule); a
    # reschedule is on the timeline only.
    "message.cancelled")
# Sent only by POST /v1/webhooks/endpoints/{id}/test, whatever the endpoint asked for.
TEST_TYPE = "webhook.test"
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
