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

Anyone can mail a report to our mailboxes, so a DSN or a complaint counts
only when it names a message of ours and a recipient that message really
had. The service looks that up (`sent.py`, through `replies_sent_to()`)
and hands the answer in as `Sent`; `judge()` decides. A report that fails
is kept as unmatched mail with its reason, and produces nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from mailbus import topics
from mailbus.errors import MailbusError
from mailbus.replies.classify import Inbound
from mailbus.topics import address_hash

# uuid5 namespace of the events the replies service derives.
EVENT_NAMESPACE = uuid.UUID("5b0c1d2e-8f4a-4e7b-9a61-3c2d1e0f9a8b")
MAX_TEXT = 2000
MAX_SUBJECT = 500
MAX_DIAGNOSTIC = 1000  # per recipient in a DSN: hostile reports may list many
# Reports that can suppress an address or settle a message.
REPORTS = frozenset({"dsn", "complaint"})
# How long after a hand-over a report on it may wait for the projection of its
# email.sent (normally well under a second) before it is judged without it.
# The reader reads such a report again later; past this, a projector that is
# still behind costs the report, not the mailbox.
PROJECTION_GRACE = timedelta(minutes=15)
NOT_OURS = "forged or unknown report: message not ours"
NOT_A_RECIPIENT = "recipient not a recipient of that message"


class ReportTooEarly(MailbusError):
    """A report on a message being handed over whose email.sent is not projected yet."""


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


@dataclass(frozen=True)
class Sent:
    """What the database knows of the message a report names (`replies_sent_to()`)."""

    message_id: str
    recipients: frozenset[str]  # of the addresses asked about, those it was sent to
    projected: bool = True  # an email.sent of it is recorded
    handed_over_at: datetime | None = None  # per the sender's ledger, if it knows


@dataclass(frozen=True)
class Verdict:
    """Which recipients a report may speak for, or why it speaks for none."""

    message_id: str | None
    accepted: frozenset[str] = frozenset()
    refused: tuple[str, ...] = ()  # named but not recipients of the message
    reason: str | None = None  # set when nothing is accepted


def reference(inbound: Inbound, check_tag: TagCheck) -> str | None:
    """The message of ours the mail names: our Message-ID, else a genuine reply tag."""
    if inbound.message_id is not None:
        return inbound.message_id
    return next((found for found in map(check_tag, inbound.reply_tags) if found), None)


def canonical(address: str) -> str:
    """An address as the suppression list keys it (and as reports are matched)."""
    return address.strip().lower()


def named(inbound: Inbound) -> tuple[str, ...]:
    """The addresses a report speaks for, canonical, without repeats."""
    found = ([r.recipient for r in inbound.dsn] if inbound.kind == "dsn"
             else [inbound.complaint_recipient])
    return tuple(dict.fromkeys(canonical(a) for a in found if a))


def judge(inbound: Inbound, message_id: str | None, sent: Sent | None,
          now: datetime) -> Verdict:
    """Which of a report's recipients were recipients of the message of ours it names.

    Raises ReportTooEarly for a report on a message handed over moments ago
    whose email.sent is not projected yet: the reader hands it over again.
    """
    what = "the DSN" if inbound.kind == "dsn" else "the complaint"
    if message_id is None:
        return Verdict(None, reason=f"{what} names no message of ours")
    if sent is None or sent.message_id != message_id or not sent.projected:
        handed = sent.handed_over_at if sent is not None else None
        if handed is not None and now - handed < PROJECTION_GRACE:
            raise ReportTooEarly(f"message {message_id} handed over at {handed.isoformat()}")
        return Verdict(None, reason=NOT_OURS)
    addresses = named(inbound)
    accepted = frozenset(a for a in addresses if a in sent.recipients)
    refused = tuple(a for a in addresses if a not in accepted)
    if not accepted:
        reason = NOT_A_RECIPIENT if refused else f"{what} names no recipient"
        return Verdict(message_id, refused=refused, reason=reason)
    return Verdict(message_id, accepted, refused)


def _event_id(*parts: str) -> str:
    return str(uuid.uuid5(EVENT_NAMESPACE, "\x1f".join(parts)))


def _cap(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    text = text.replace("\x00", "")
    return text if len(text) <= limit else text[:limit] + "…"


def plan(inbound: Inbound, *, account_id: str, source: str, source_ref: str, now: datetime,
         check_token: TokenCheck, check_tag: TagCheck, sent: Sent | None = None) -> Plan:
    """The records and the inbound_messages row for one classified message.

    `sent` is the lookup of the message a DSN or complaint names; without it
    such a report produces nothing.
    """
    # The identity of this piece of mail: its own Message-ID when it has one
    # (the same mail fetched under a new UIDVALIDITY keeps it), else its place.
    identity = (account_id, inbound.header_message_id or source_ref)
    occurred = inbound.date if inbound.date is not None else now
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    message_id = reference(inbound, check_tag)

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
    if kind in REPORTS:
        verdict = judge(inbound, message_id, sent, now)
        if verdict.reason is not None or verdict.message_id is None:
            return _refused(inbound, message_id, verdict)
        if kind == "dsn":
            return _dsn(inbound, verdict, verdict.message_id, occurred, account_id, identity,
                        suppress)
        [who] = verdict.accepted  # a complaint names one recipient
        mid = verdict.message_id
        return Plan((response("complaint", who, mid), suppress(who, "complaint", mid)),
                    kind, mid, {"recipient": who})
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


def _results(inbound: Inbound) -> list[dict[str, Any]]:
    return [{"recipient": r.recipient, "action": r.action, "status": r.status,
             "bounce_class": r.bounce_class, "diagnostic": _cap(r.diagnostic, MAX_DIAGNOSTIC)}
            for r in inbound.dsn]


def _refused(inbound: Inbound, named_id: str | None, verdict: Verdict) -> Plan:
    """A report that speaks for nobody: kept as unmatched mail, threaded to no message."""
    detail: dict[str, Any] = {"classified_as": inbound.kind, "reason": verdict.reason}
    if inbound.kind == "dsn":
        detail["results"] = _results(inbound)
    else:
        detail["recipient"] = inbound.complaint_recipient
    if named_id is not None:
        detail["named_message_id"] = named_id
    if verdict.refused:
        detail["refused"] = list(verdict.refused)
    return Plan((), "unmatched", None, detail)


def _dsn(inbound: Inbound, verdict: Verdict, message_id: str, occurred: datetime,
         account_id: str, identity: tuple[str, str],
         suppress: Callable[[str, str, str | None], Record]) -> Plan:
    # Only the recipients the message had are its results (the timeline shows
    # their delays); the others are kept apart.
    results = [r for r in _results(inbound)
               if r["recipient"] and canonical(r["recipient"]) in verdict.accepted]
    records: list[Record] = []
    for r in inbound.dsn:
        who = canonical(r.recipient or "")
        if who not in verdict.accepted:
            continue
        base = {"message_id": message_id, "occurred_at": occurred, "account_id": account_id,
                "recipient": who}
        if r.action in ("delivered", "relayed", "expanded"):
            records.append(Record(topics.DELIVERED, message_id, base | {
                "event_id": _event_id("delivered", who, *identity),
                "evidence": "dsn",
                "detail": _cap(f"{r.action}; {r.status or ''}".strip("; "), MAX_TEXT)}))
        elif r.action == "failed":
            records.append(Record(topics.BOUNCED, message_id, base | {
                "event_id": _event_id("bounced", who, *identity),
                "bounce_class": r.bounce_class, "status_code": r.status,
                "diagnostic": _cap(r.diagnostic, MAX_TEXT)}))
            if r.bounce_class == "hard":
                records.append(suppress(who, "hard_bounce", message_id))
        # "delayed": the remote server is still trying. Not an event of any topic:
        # the row in inbound_messages is the record, and the API's message
        # timeline shows it as a `delayed` entry.
    detail: dict[str, Any] = {"results": results}
    if verdict.refused:
        detail["refused"] = list(verdict.refused)
        detail["reason"] = NOT_A_RECIPIENT
    return Plan(tuple(records), "dsn", message_id, detail)
