"""What a link does, decided without I/O: which token a route takes, the events it records.

Event ids are uuid5 of what was recorded, so the same click, unsubscribe or
open recorded twice is one response downstream (readers deduplicate on
event_id); occurred_at is the moment of each recording.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from mailbus import topics
from mailbus.tokens import (
    OPEN,
    RESERVED_ACTIONS,
    UNSUBSCRIBE,
    Claims,
    TokenError,
    TokenExpired,
    TokenInvalid,
    UnknownKey,
)
from mailbus.topics import address_hash

# uuid5 namespace of the hooks' event ids (a fixed random UUID; never change it).
_EVENT_NAMESPACE = uuid.UUID("3b8e2f64-9d1c-4a7b-b5e0-7c2d6a18f943")
SOURCE = "hooks"

Route = Literal["action", "unsubscribe", "open"]


class WrongRoute(TokenInvalid):
    """A genuine token presented at another route than the one it was made for."""


@dataclass(frozen=True)
class Refusal:
    """How a token that is not accepted is answered."""

    status: int
    reason: str  # bounded: a metrics label


@dataclass(frozen=True)
class Record:
    """One event to produce: logical topic, Kafka key, Avro record."""

    topic: str
    key: bytes
    value: dict[str, Any]



def event_id(*parts: str) -> str:
    """A deterministic event id over the given parts."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, "\n".join(parts)))


def check_route(claims: Claims, route: Route) -> None:
    """Refuse a token made for another route: each action id belongs to one."""
    if route == "action":
        ok = claims.action not in RESERVED_ACTIONS
    else:
        ok = claims.action == (UNSUBSCRIBE if route == "unsubscribe" else OPEN)
    if not ok:
        raise WrongRoute(f"token for {claims.action!r} presented at the {route} route")


def refusal(exc: TokenError) -> Refusal:
    """The answer to a refused token: 410 once expired, 400 otherwise."""
    if isinstance(exc, TokenExpired):
        return Refusal(410, "expired")
    if isinstance(exc, UnknownKey):
        return Refusal(400, "unknown_key")
    if isinstance(exc, WrongRoute):
        return Refusal(400, "wrong_route")
    return Refusal(400, "invalid")


def response(claims: Claims, kind: Literal["action", "unsubscribe", "open"], *,
             now: datetime) -> Record:
    """The email.responses event of a recorded click, unsubscribe or open."""
    action_id = claims.action if kind == "action" else None
    value = {
        # A link of a message sent to several recipients names none of them:
        # one response per message and action, whoever among them clicked.
        "event_id": event_id("response", kind, claims.message_id, claims.recipient or "",
                             claims.action),
        "message_id": claims.message_id,
        "occurred_at": now,
        "account_id": None,
        "kind": kind,
        "recipient": claims.recipient,
        "action_id": action_id,
        "subject": None,
        "text": None,
        # An open is a weak signal: image proxies and scanners load pixels too.
        "reliable": kind != "open",
        "source": SOURCE,
    }
    return Record(topics.RESPONSES, claims.message_id.encode(), value)


def unsubscriber(claims: Claims) -> str:
    """The address an unsubscribe token names (verify() refuses one that names none)."""
    if claims.recipient is None:
        raise TokenInvalid("an unsubscribe token without a recipient")
    return claims.recipient


def suppression(claims: Claims, *, now: datetime) -> Record:
    """The email.suppressions record of an unsubscribe, keyed by the address hash."""
    address = unsubscriber(claims).strip().lower()
    digest = address_hash(address)
    value = {
        "event_id": event_id("suppression", claims.message_id, address),
        "message_id": claims.message_id,
        "occurred_at": now,
        "address": address,
        "address_hash": digest,
        "reason": "unsubscribe",
        "scope": None,
        "active": True,
    }
    return Record(topics.SUPPRESSIONS, digest.encode(), value)


def unsubscribe(claims: Claims, *, now: datetime) -> list[Record]:
    """Both events of an unsubscribe: the suppression first, then the response."""
    return [suppression(claims, now=now), response(claims, "unsubscribe", now=now)]
