"""What a message can be found by (GET /v1/messages filters), as pure functions.

The projector writes one `message_search` row per recipient and tag when it
projects a message's email.requested, and one per account when it projects
an email.sent (migration 0015). The API normalises a `recipient` filter with
`search_address` so that it meets the stored value: the address as the API
normalised it when the message was accepted, with its case folded.

Events come from any producer of email.requested, not only the API: values
that could not be stored or indexed (NUL, longer than a btree entry allows)
are left out rather than allowed to stop the projector, and a message's rows
are capped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from email_validator import EmailNotValidError, validate_email

from mailbus.timeline import EventRow

# Longest value stored: an address is at most 254 characters (RFC 5321's
# path, less the brackets), an API tag 64, an account id 64. Well under
# btree's limit on an index entry (about 2,700 bytes), even in 4-byte UTF-8.
MAX_VALUE = 320
# Rows per message: the API allows 100 recipients and 20 tags.
MAX_TERMS = 200


class NotAnAddress(ValueError):
    """A recipient filter that is no address the API would accept."""


@dataclass(frozen=True)
class Findable:
    """A message's scope and time, and the recipients and tags it is found by."""

    message_id: str
    key_id: str
    requested_at: datetime
    recipients: tuple[str, ...]
    tags: tuple[str, ...]

    def terms(self) -> list[tuple[str, str]]:
        """(field, value) of every row of the message, capped."""
        both = [("recipient", r) for r in self.recipients] + [("tag", t) for t in self.tags]
        return both[:MAX_TERMS]


# A message's key and time, once its email.requested was projected.
Scope = tuple[str | None, datetime | None]


@dataclass
class SearchTerms:
    """The message_search rows of one projected batch, decided per message."""

    # (field, value, key_id, requested_at, message_id)
    rows: set[tuple[str, str, str, datetime, str]] = field(default_factory=set)
    # Messages whose key became known only now, with an email.sent projected
    # earlier: the account rows of those events are written from the table.
    sent_before: set[str] = field(default_factory=set)

    def add(self, message_id: str, scope: Scope, kinds_before: Iterable[str],
            account_id: str | None, new: Iterable[EventRow],
            findables: Mapping[str, Findable]) -> Scope:
        """Add the rows a message's new events make; returns its scope after them.

        Every row of a message has the key and time of the first
        email.requested projected for it (a rerouted request repeats both).
        """
        key, at = scope
        ordered = sorted(new, key=lambda e: (e.kind != "requested", e.occurred_at, e.event_id))
        for event in ordered:
            if event.kind == "requested" and (found := findables.get(event.event_id)):
                if key is None or at is None:
                    key, at = found.key_id, found.requested_at
                    if "sent" in kinds_before:
                        self.sent_before.add(message_id)
                self.rows.update((f, v, key, at, message_id) for f, v in found.terms())
            elif event.kind == "sent" and key is not None and at is not None:
                account = storable(event.account_id or account_id)
                if account is not None:
                    self.rows.add(("account", account, key, at, message_id))
        return key, at

    def columns(self) -> dict[str, list[Any]]:
        """The rows as the arrays of one INSERT, in primary-key order (the order of its locks)."""
        ordered = sorted(self.rows)
        return {name: [r[i] for r in ordered] for i, name in
                enumerate(("fields", "values", "key_ids", "times", "message_ids"))}


def storable(value: Any) -> str | None:
    """A value as a row keeps it, or None when it cannot be one."""
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > MAX_VALUE:
        return None
    return value


def folded(address: str) -> str:
    """The stored form of an already normalised address: its case folded, whole."""
    return address.lower()


def findable(message_id: str, record: Mapping[str, Any]) -> Findable | None:
    """The search terms of a decoded email.requested; None without a key to scope them."""
    key_id = storable(record.get("key_id"))
    requested_at = record.get("requested_at")
    if key_id is None or not isinstance(requested_at, datetime):
        return None
    addresses = (a.get("email") for f in ("to", "cc", "bcc") for a in record.get(f) or ()
                 if isinstance(a, Mapping))
    recipients = _distinct(folded(a) for a in map(storable, addresses) if a is not None)
    tags = _distinct(storable(t) for t in record.get("tags") or ())
    return Findable(message_id, key_id, requested_at, recipients, tags)


def search_address(value: str) -> str:
    """A recipient filter as the stored rows have it: normalised as POST does, case folded."""
    try:
        # Syntax only, as for a request's recipients: no DNS on the request path.
        normalised = validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise NotAnAddress(str(exc)) from None
    return folded(normalised)


def _distinct(values: Iterable[str | None]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))
