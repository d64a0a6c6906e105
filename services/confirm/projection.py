"""The projection's decisions, as pure functions: suppressions, folds, what counts.

No Kafka, no database: the projector (`projector.py`) does the I/O around them.
The event -> timeline row and kinds -> status rules it shares with the API and
the webhooks service are the core's (`mailbus/timeline.py`).

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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from mailbus.timeline import COUNTED, EventRow, InvalidEvent, as_uuid, plain, status_for

SUPPRESSION_SCHEMA = "mailbus.Suppression"
_HASH_CHARS = frozenset("0123456789abcdef")


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
        event_id=as_uuid(record.get("event_id"), "event_id"),
        address_hash=address_hash,
        scope=plain(record.get("scope") or ""),
        address=plain(str(record.get("address") or "")),
        reason=plain(str(record.get("reason") or "unknown")),
        active=bool(record.get("active", True)),
        message_id=as_uuid(message_id, "message_id") if message_id else None,
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
