"""What happened to a message, as the API and the webhooks show it: event -> timeline row, status.

Pure rules shared by the projector (services/confirm), the status API
(services/ingest) and the webhooks service: which schema is which kind,
the fields a timeline entry keeps, and the status a set of kinds gives.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

# Every status a message can have, as the API reports it.
Status = Literal["queued", "sent", "delivered", "confirmed", "failed", "bounced", "unconfirmed",
                 "cancelled"]
STATUSES: tuple[str, ...] = get_args(Status)

# Kinds with a column in daily_counts, in column order.
COUNTED: tuple[str, ...] = (
    "requested", "sent", "delivered", "confirmed", "failed", "bounced", "unconfirmed")

# Event kind per schema; email.confirmed splits by its outcome (confirmed_kind).
KIND_OF_SCHEMA: dict[str, str] = {
    "mailbus.EmailRequested": "requested",
    "mailbus.EmailSent": "sent",
    "mailbus.EmailFailed": "failed",
    "mailbus.EmailDelivered": "delivered",
    "mailbus.EmailBounced": "bounced",
    "mailbus.EmailResponse": "response",
    "mailbus.EmailConfirmed": "confirmed",
    # email.schedule splits by its change (cancelled, rescheduled): schedule_kind.
    "mailbus.ScheduleChange": "schedule",
}

# The fields worth keeping per kind, under the names the timeline shows.
_DETAIL: dict[str, tuple[str, ...]] = {
    "requested": ("pool", "send_at"),
    "sent": ("transport", "recipients", "provider_message_id", "rfc822_message_id",
             "smtp_response", "attempt", "possible_duplicate", "send_latency_us"),
    "failed": ("reason", "code", "enhanced_status", "permanent", "recipient", "attempt"),
    "delivered": ("recipient", "evidence", "detail"),
    "bounced": ("recipient", "bounce_class", "status_code", "diagnostic"),
    "response": ("kind", "recipient", "action_id", "subject", "text", "reliable", "source"),
    "confirmed": ("evidence", "requested_at", "sent_at", "delivered_at",
                  "sent_to_delivered_us", "requested_to_delivered_us"),
    "schedule": ("key_id", "send_at", "reason"),
}
# Remote servers and repliers write some of these; a timeline entry stays small.
MAX_TEXT = 2000



class InvalidEvent(ValueError):
    """A decoded record the projection cannot store (its ids are not UUIDs)."""


@dataclass(frozen=True)
class EventRow:
    """One message_events row, before the projector decides whether it counts."""

    event_id: str
    message_id: str
    kind: str
    occurred_at: datetime
    account_id: str | None
    detail: dict[str, Any]


def status_for(kinds: Iterable[str]) -> str:
    """A message's status from the set of event kinds seen for it."""
    seen = set(kinds)
    # Order matters: a bounce overrides delivery evidence; a later delivery
    # overrides an unconfirmed verdict; one recipient's failure does not undo
    # a send to the others. A cancel stands unless the message went anyway,
    # which the ledger's lock makes impossible: a sent event would say so.
    for kind in ("bounced", "confirmed", "delivered", "unconfirmed", "sent", "cancelled",
                 "failed"):
        if kind in seen:
            return kind
    return "queued"


def confirmed_kind(outcome: str | None) -> str:
    """The kind of an email.confirmed event: its outcome, `unknown` for a newer verdict."""
    return outcome if outcome in ("confirmed", "unconfirmed") else "unknown"


def schedule_kind(change: str | None) -> str:
    """The kind of an email.schedule event: its change, `unknown` for a newer one."""
    return change if change in ("cancelled", "rescheduled") else "unknown"


def event_row(schema_name: str, record: Mapping[str, Any]) -> EventRow:
    """The row for a decoded event; InvalidEvent when its ids are not UUIDs."""
    kind = KIND_OF_SCHEMA.get(schema_name)
    if kind is None:
        raise InvalidEvent(f"{schema_name} is not projected")
    event_id = as_uuid(record.get("event_id"), "event_id")
    message_id = as_uuid(record.get("message_id"), "message_id")
    detail = {name: plain(record.get(name)) for name in _DETAIL[kind]}
    if kind == "requested":
        detail["recipients"] = sum(len(record.get(f) or ()) for f in ("to", "cc", "bcc"))
        detail["template"] = stored_template(record.get("template"))
    elif kind == "response":
        detail["response"] = detail.pop("kind")  # "kind" is the timeline entry's own
    elif kind == "confirmed":
        kind = confirmed_kind(record.get("outcome"))
    elif kind == "schedule":
        kind = schedule_kind(record.get("change"))
    detail = {k: v for k, v in detail.items() if v is not None}
    # Text columns refuse NUL too: a stray one must not stall the projector.
    return EventRow(event_id, message_id, kind, record["occurred_at"],
                    plain(record.get("account_id")) or None, detail)


def stored_template(template: Any) -> dict[str, Any] | None:
    """{name, version} of the stored template a request was accepted with, else None."""
    if not isinstance(template, Mapping) or template.get("name") is None:
        return None
    return {"name": plain(template["name"]), "version": template.get("version")}


def as_uuid(value: Any, what: str) -> str:
    """The canonical text of a UUID; InvalidEvent naming `what` when it is none."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidEvent(f"{what} {value!r} is not a UUID") from None


def plain(value: Any) -> Any:
    """A JSON-ready value: times as ISO text, text capped and free of NUL (jsonb refuses it)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        value = value.replace("\x00", "")
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "…"
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
