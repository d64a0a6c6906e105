"""The projection's decisions, as pure functions: event -> row, kinds -> status, what counts.

No Kafka, no database: the projector (`projector.py`) does the I/O around them.

Counting once. A message is counted at most once per kind in `daily_counts`:
the projector keeps the set of kinds it has seen per message
(`message_status.kinds`), and an event counts only when it adds its kind to
that set. So a message with two email.delivered events (one per recipient)
counts `delivered` once, and a redelivered event (same event id) is not even
new. The count goes to the UTC day of the event that added the kind, and to
its account (or the message's, for events that do not name one). `failed`
therefore counts messages with any failure event, also a message rejected for
one recipient and sent to the others (its status stays sent); `response` and
unknown verdicts are in the timeline but not counted.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal, get_args

# Every status a message can have, as the API reports it.
Status = Literal["queued", "sent", "delivered", "confirmed", "failed", "bounced", "unconfirmed"]
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
}
# Remote servers and repliers write some of these; a timeline entry stays small.
MAX_TEXT = 2000


SUPPRESSION_SCHEMA = "mailbus.Suppression"
_HASH_CHARS = frozenset("0123456789abcdef")


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
    # a send to the others.
    for kind in ("bounced", "confirmed", "delivered", "unconfirmed", "sent", "failed"):
        if kind in seen:
            return kind
    return "queued"


def confirmed_kind(outcome: str | None) -> str:
    """The kind of an email.confirmed event: its outcome, `unknown` for a newer verdict."""
    return outcome if outcome in ("confirmed", "unconfirmed") else "unknown"


def event_row(schema_name: str, record: Mapping[str, Any]) -> EventRow:
    """The row for a decoded event; InvalidEvent when its ids are not UUIDs."""
    kind = KIND_OF_SCHEMA.get(schema_name)
    if kind is None:
        raise InvalidEvent(f"{schema_name} is not projected")
    event_id = _uuid(record.get("event_id"), "event_id")
    message_id = _uuid(record.get("message_id"), "message_id")
    detail = {name: _plain(record.get(name)) for name in _DETAIL[kind]}
    if kind == "requested":
        detail["recipients"] = sum(len(record.get(f) or ()) for f in ("to", "cc", "bcc"))
    elif kind == "response":
        detail["response"] = detail.pop("kind")  # "kind" is the timeline entry's own
    elif kind == "confirmed":
        kind = confirmed_kind(record.get("outcome"))
    detail = {k: v for k, v in detail.items() if v is not None}
    # Text columns refuse NUL too: a stray one must not stall the projector.
    return EventRow(event_id, message_id, kind, record["occurred_at"],
                    _plain(record.get("account_id")) or None, detail)


@dataclass(frozen=True)
class SuppressionRow:
    """One suppressions row: the state of an address for a scope ('' = every account)."""

    event_id: str
    address_hash: str
    scope: str
    address: str
    reason: str
    active: bool
    message_id: str | None
    occurred_at: datetime


def suppression_row(record: Mapping[str, Any]) -> SuppressionRow:
    """The row for a decoded Suppression; InvalidEvent when its ids or hash are malformed."""
    address_hash = str(record.get("address_hash") or "")
    if len(address_hash) != 64 or not set(address_hash) <= _HASH_CHARS:
        raise InvalidEvent(f"address_hash {address_hash[:80]!r} is not a hex SHA-256")
    message_id = record.get("message_id")
    return SuppressionRow(
        event_id=_uuid(record.get("event_id"), "event_id"),
        address_hash=address_hash,
        scope=_plain(record.get("scope") or ""),
        address=_plain(str(record.get("address") or "")),
        reason=_plain(str(record.get("reason") or "unknown")),
        active=bool(record.get("active", True)),
        message_id=_uuid(message_id, "message_id") if message_id else None,
        occurred_at=record["occurred_at"],
    )


@dataclass
class Fold:
    """What a batch of new events does to one message."""

    kinds: frozenset[str]
    status: str
    account_id: str | None
    # event_id -> (day, account) of the events that count
    counted: dict[str, tuple[date, str]] = field(default_factory=dict)


def fold(kinds: Iterable[str], account_id: str | None, events: Iterable[EventRow]) -> Fold:
    """Apply new events (not seen before) to a message's kinds: status and what counts."""
    seen = set(kinds)
    account = account_id
    counted: dict[str, tuple[date, str]] = {}
    ordered = sorted(events, key=lambda e: (e.occurred_at, e.event_id))
    # The message's account: its own record's, else the first event naming one.
    for event in ordered:
        if account is None and event.account_id:
            account = event.account_id
    for event in ordered:
        if event.kind in COUNTED and event.kind not in seen:
            counted[event.event_id] = (utc_day(event.occurred_at),
                                       event.account_id or account or "")
        seen.add(event.kind)
    return Fold(frozenset(seen), status_for(seen), account, counted)


def increments(counted: Iterable[tuple[str, date, str]]) -> list[dict[str, Any]]:
    """daily_counts upsert parameters from (kind, day, account), sorted by key."""
    totals: dict[tuple[date, str], dict[str, int]] = {}
    for kind, day, account in counted:
        row = totals.setdefault((day, account), dict.fromkeys(COUNTED, 0))
        row[kind] += 1
    return [{"day": day, "account_id": account, **row}
            for (day, account), row in sorted(totals.items())]


def utc_day(moment: datetime) -> date:
    """The UTC calendar day of an instant (a naive time is taken as UTC)."""
    if moment.utcoffset() is None:
        return moment.date()
    return moment.astimezone(UTC).date()


def _uuid(value: Any, what: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidEvent(f"{what} {value!r} is not a UUID") from None


def _plain(value: Any) -> Any:
    """A JSON-ready value: times as ISO text, text capped and free of NUL (jsonb refuses it)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        value = value.replace("\x00", "")
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "…"
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
