"""The confirm join's decisions: pure functions over one message's state.

A message's state is a plain JSON-able dict (it is the value of the Faust
table and of its changelog), times in microseconds since the Unix epoch:

    partition      source partition of its events (= its changelog partition)
    account_id     from the sent event
    sent_at, requested_at               from the sent event
    delivered_at, evidence              from the first delivered event
    failed_at      a permanent whole-message failure, if any
    bounced        recipients that bounced, sorted; at most MAX_BOUNCED of them
    verdict        the last verdict emitted: None, "unconfirmed" or "confirmed"
    touched_at     when the state last changed (processing time)

Every function returns a new state instead of changing its argument, and a
state only changes when an event adds something: duplicates and replays
leave it as it was and emit nothing.

A state is bounded whatever arrives for its message: one sent, one
delivered and one failure are kept (the first of each), and at most
MAX_BOUNCED bounced recipients of at most MAX_ADDRESS characters. Anyone
able to write to a per-message topic could otherwise grow one message's
state, and every changelog write of it, without end (thousands of bounces
naming distinct recipients). Past the cap a bounce changes nothing here: no
state write, no verdict; the bounce itself is still on email.bounced, where
the projector and the sender read it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NamedTuple

State = dict[str, Any]

# The Avro schema names of the events the join folds (the `kind` apply() is given);
# the topics they come from are mailbus.topics.SENT and the others.
SENT_SCHEMA = "mailbus.EmailSent"
DELIVERED_SCHEMA = "mailbus.EmailDelivered"
FAILED_SCHEMA = "mailbus.EmailFailed"
BOUNCED_SCHEMA = "mailbus.EmailBounced"
# The verdicts, as the email.confirmed record's `outcome` and the state's `verdict`.
OUTCOME_CONFIRMED = "confirmed"
OUTCOME_UNCONFIRMED = "unconfirmed"
# A message has at most 100 recipients (To, Cc and Bcc, as the API takes them),
# so a genuine message never has more bounces than this.
MAX_BOUNCED = 100
MAX_ADDRESS = 320  # RFC 5321: 64 + 1 + 255; a longer "recipient" is no address
# uuid5 namespace of verdict event ids (a fixed random UUID; never change it).
_VERDICT_NAMESPACE = uuid.UUID("6f1d3c52-8a57-4d0e-9a7e-3f0a2c4b9e15")


class Step(NamedTuple):
    """A decision: the new state (None when unchanged) and the record to emit, if any."""

    state: State | None
    emit: dict[str, Any] | None = None


def micros(value: datetime | int | None) -> int | None:
    """Microseconds since the epoch from a decoded timestamp (aware datetime) or int."""
    if value is None or isinstance(value, int):
        return value
    delta = value - datetime(1970, 1, 1, tzinfo=value.tzinfo)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def verdict_id(message_id: str, outcome: str) -> str:
    """The event id of a message's verdict: the same on every emission, so readers dedupe."""
    return str(uuid.uuid5(_VERDICT_NAMESPACE, f"{message_id}/{outcome}"))


def new_state(partition: int) -> State:
    """The state of a message no event has been seen for."""
    return {
        "partition": partition, "account_id": None, "sent_at": None, "requested_at": None,
        "delivered_at": None, "evidence": None, "failed_at": None, "bounced": [],
        "verdict": None, "touched_at": None,
    }


def apply(state: State | None, kind: str, event: dict[str, Any], partition: int,
          now_us: int) -> Step:
    """Fold one decoded event (kind = its schema name) into a message's state."""
    old = state if state is not None else new_state(partition)
    new = dict(old, bounced=list(old["bounced"]))
    if kind == SENT_SCHEMA and new["sent_at"] is None:
        new.update(account_id=event["account_id"], sent_at=micros(event["occurred_at"]),
                   requested_at=micros(event.get("requested_at")))
    elif kind == DELIVERED_SCHEMA and new["delivered_at"] is None:
        new.update(delivered_at=micros(event["occurred_at"]), evidence=event["evidence"])
    elif (kind == FAILED_SCHEMA and event["permanent"] and event.get("recipient") is None
          and new["failed_at"] is None):
        new["failed_at"] = micros(event["occurred_at"])
    elif kind == BOUNCED_SCHEMA and _room_for(new["bounced"], event["recipient"]):
        new["bounced"] = sorted([*new["bounced"], event["recipient"]])
    else:
        return Step(None)
    new["touched_at"] = now_us
    if new["sent_at"] is not None and new["delivered_at"] is not None \
            and new["verdict"] != OUTCOME_CONFIRMED:
        new["verdict"] = OUTCOME_CONFIRMED
        return Step(new, confirmed_record(event["message_id"], new, now_us))
    return Step(new)


def _room_for(bounced: list[str], recipient: str) -> bool:
    """Whether a bounced recipient is new and the state has room to remember it."""
    return (len(bounced) < MAX_BOUNCED and len(recipient) <= MAX_ADDRESS
            and recipient not in bounced)


def overdue(state: State, message_id: str, now_us: int, within_seconds: int) -> Step:
    """The timer's decision: an unconfirmed verdict once a sent message passed its deadline."""
    sent_at = state["sent_at"]
    if (sent_at is None or state["delivered_at"] is not None or state["verdict"] is not None
            or now_us < sent_at + within_seconds * 1_000_000):
        return Step(None)
    new = dict(state, verdict=OUTCOME_UNCONFIRMED, touched_at=now_us)
    return Step(new, unconfirmed_record(message_id, new, now_us))


def forgettable(state: State, now_us: int, after_seconds: int) -> bool:
    """Whether a state may be dropped: nothing pending, untouched for after_seconds."""
    pending = state["sent_at"] is not None and state["verdict"] is None
    touched = state["touched_at"] or 0
    return not pending and now_us >= touched + after_seconds * 1_000_000


def confirmed_record(message_id: str, state: State, now_us: int) -> dict[str, Any]:
    """The email.confirmed record of a message seen sent and delivered."""
    delivered_at = state["delivered_at"]
    requested_at = state["requested_at"]
    return {
        "event_id": verdict_id(message_id, OUTCOME_CONFIRMED), "message_id": message_id,
        "occurred_at": now_us, "account_id": state["account_id"], "outcome": OUTCOME_CONFIRMED,
        "evidence": state["evidence"], "requested_at": requested_at,
        "sent_at": state["sent_at"], "delivered_at": delivered_at,
        "sent_to_delivered_us": delivered_at - state["sent_at"],
        "requested_to_delivered_us": (None if requested_at is None
                                      else delivered_at - requested_at),
    }


def unconfirmed_record(message_id: str, state: State, now_us: int) -> dict[str, Any]:
    """The email.confirmed record of a sent message without delivery evidence in time."""
    return {
        "event_id": verdict_id(message_id, OUTCOME_UNCONFIRMED), "message_id": message_id,
        "occurred_at": now_us, "account_id": state["account_id"], "outcome": OUTCOME_UNCONFIRMED,
        "evidence": "unknown", "requested_at": state["requested_at"],
        "sent_at": state["sent_at"], "delivered_at": None, "sent_to_delivered_us": None,
        "requested_to_delivered_us": None,
    }
