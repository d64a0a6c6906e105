"""What one classified inbound message means for the pipeline, as a pure function.

`plan()` turns the classifier's verdict into the Kafka records to produce
(delivery evidence, bounces, responses, suppressions) and the row that
records the message in `inbound_messages`. No I/O: the service
(`app.py`) produces the records, waits for the broker's acks, then writes
the row.

Event ids are derived from the inbound message (its account and its name in
the mailbox, or its own Message-ID), so the same mail handed over twice (the
readers are at-least-once) produces the same events, which every consumer
deduplicates. Hard bounces, complaints and unsubscribes suppress the
recipient for every account: an address that does not exist, or whose owner
asked not to be mailed, is not to be mailed by any of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mailbus import topics
from mailbus.replies.classify import Inbound
from mailbus.topics import address_hash

# uuid5 namespace of the events the replies service derives.
EVENT_NAMESPACE = uuid.UUID("5b0c1d2e-8f4a-4e7b-9a61-3c2d1e0f9a8b")
MAX_TEXT = 2000
MAX_SUBJECT = 500
MAX_DIAGNOSTIC = 1000  # per recipient in a DSN: hostile reports may list many


@dataclass(frozen=True)
class Record:
    """One record to produce: logical topic, key and the Avro record."""

    topic: str
    key: str
    value: dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """Everything one inbound message leads to."""

    records: tuple[Record, ...]
    kind: str  # as recorded in inbound_messages
    message_id: str | None
    detail: dict[str, Any] = field(default_factory=dict)


# (token) -> (message id, recipient) when the token is genuine, else None.
TokenCheck = Callable[[str], tuple[str, str] | None]
# (reply tag) -> message id when the tag is genuine, else None.
TagCheck = Callable[[str], str | None]



def _event_id(*parts: str) -> str:
    return str(uuid.uuid5(EVENT_NAMESPACE, "\x1f".join(parts)))


def _cap(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    text = text.replace("\x00", "")
    return text if len(text) <= limit else text[:limit] + "…"


def plan(inbound: Inbound, *, account_id: str, source: str, source_ref: str, now: datetime,
         check_token: TokenCheck, check_tag: TagCheck) -> Plan:
    """The records and the inbound_messages row for one classified message."""
    # The identity of this piece of mail: its own Message-ID when it has one
    # (the same mail fetched under a new UIDVALIDITY keeps it), else its place.
    identity = (account_id, inbound.header_message_id or source_ref)
    occurred = inbound.date if inbound.date is not None else now
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    message_id = inbound.message_id
    if message_id is None:
        for tag in inbound.reply_tags:
            if (found := check_tag(tag)) is not None:
                message_id = found
                break

    def response(kind: str, recipient: str | None, mid: str, **extra: Any) -> Record:
        return Record(topics.RESPONSES, mid, {
            "event_id": _event_id("response", kind, *identity), "message_id": mid,
            "occurred_at": occurred, "account_id": account_id, "kind": kind,
            "recipient": recipient, "action_id": None,
            "subject": _cap(inbound.subject, MAX_SUBJECT), "text": None, "reliable": True,
            "source": source} | extra)

    def suppress(address: str, reason: str, mid: str | None) -> Record:
        address = address.strip().lower()
        digest = address_hash(address)
        return Record(topics.SUPPRESSIONS, digest, {
            "event_id": _event_id("suppression", reason, digest, *identity),
            "message_id": mid, "occurred_at": occurred, "address": address,
            "address_hash": digest, "reason": reason, "scope": None, "active": True})

    kind = inbound.kind
    if kind == "dsn":
        return _dsn(inbound, message_id, occurred, account_id, identity, suppress)
    if kind == "complaint":
        records = []
        who = inbound.complaint_recipient
        if message_id is not None:
            records.append(response("complaint", who, message_id))
        if who:
            records.append(suppress(who, "complaint", message_id))
        return Plan(tuple(records), kind, message_id, {"recipient": who})
    if kind == "unsubscribe" and inbound.unsubscribe_token:
        claims = check_token(inbound.unsubscribe_token)
        if claims is None:
            return Plan((), "unmatched", None, {"reason": "unsubscribe token not genuine"})
        mid, recipient = claims
        return Plan((response("unsubscribe", recipient, mid, subject=None),
                     suppress(recipient, "unsubscribe", mid)), kind, mid,
                    {"recipient": recipient})
    if kind in ("reply", "auto_reply") and message_id is not None:
        return Plan((response(kind, inbound.sender, message_id,
                              text=_cap(inbound.text, MAX_TEXT)),), kind, message_id)
    reason = inbound.reason or ("no message of ours is referenced" if kind in (
        "reply", "auto_reply") else f"{kind} not understood")
    return Plan((), "unmatched", None, {"classified_as": kind, "reason": reason})


def _dsn(inbound: Inbound, message_id: str | None, occurred: datetime, account_id: str,
         identity: tuple[str, str], suppress: Callable[[str, str, str | None], Record]) -> Plan:
    results = [{"recipient": r.recipient, "action": r.action, "status": r.status,
                "bounce_class": r.bounce_class, "diagnostic": _cap(r.diagnostic, MAX_DIAGNOSTIC)}
               for r in inbound.dsn]
    if message_id is None:
        return Plan((), "unmatched", None, {"classified_as": "dsn", "results": results,
                                             "reason": "the DSN names no message of ours"})
    records: list[Record] = []
    for r in inbound.dsn:
        if not r.recipient:
            continue
        base = {"message_id": message_id, "occurred_at": occurred, "account_id": account_id,
                "recipient": r.recipient.lower()}
        if r.action in ("delivered", "relayed", "expanded"):
            records.append(Record(topics.DELIVERED, message_id, base | {
                "event_id": _event_id("delivered", r.recipient.lower(), *identity),
                "evidence": "dsn",
                "detail": _cap(f"{r.action}; {r.status or ''}".strip("; "), MAX_TEXT)}))
        elif r.action == "failed":
            records.append(Record(topics.BOUNCED, message_id, base | {
                "event_id": _event_id("bounced", r.recipient.lower(), *identity),
                "bounce_class": r.bounce_class, "status_code": r.status,
                "diagnostic": _cap(r.diagnostic, MAX_TEXT)}))
            if r.bounce_class == "hard":
                records.append(suppress(r.recipient, "hard_bounce", message_id))
        # "delayed": the remote server is still trying. Not an event of any topic:
        # the row in inbound_messages is the record, and the API's message
        # timeline shows it as a `delayed` entry.
    return Plan(tuple(records), "dsn", message_id, {"results": results})
