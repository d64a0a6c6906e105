"""What an inbound message is: a delivery report, a complaint, an auto-reply, a reply.

A pure function of the raw RFC 5322 bytes, so the mailbox reader only fetches
and publishes. Inbound mail is hostile input: every message gives a result,
never an exception, with `reason` saying what could not be read.

Reading the MIME tree within bounds is `mime.py`; delivery reports are
`dsn.py`; this module decides. Every step is linear in the size of the
message: no pattern backtracks over more than a bounded stretch (no leading
whitespace pattern under re.M that also eats the newlines of the lines that
follow; bounded or possessive repetitions), and what the standard library
parses quadratically is cut to a bounded length first. The service still
runs this in a worker it can abandon (`sandbox.py`), for whatever is missed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

from mailbus.replies.dsn import (
    MAX_RECIPIENTS,
    DsnResult,
    bounce_class,
    dsn_result,
    looks_like_bounce,
    plain_bounce,
)
from mailbus.replies.mime import (
    MAX_DEPTH,
    MAX_PARTS,
    MAX_SCAN,
    Headers,
    Parts,
    addresses,
    body_text,
    first,
    first_address,
    read,
)
from mailbus.replies.text import cap, sanitise, strip_reply
from mailbus.replytag import extract_tag
from mailbus.tokens import MAX_TOKEN

# Re-exported: what callers and tests read from here.
__all__ = ["MAX_DEPTH", "MAX_PARTS", "MAX_RECIPIENTS", "DsnResult", "Inbound", "bounce_class",
           "classify_inbound"]

Kind = Literal["dsn", "complaint", "auto_reply", "reply", "unsubscribe", "unmatched"]

MAX_SUBJECT = 998
MAX_SUBJECT_SCAN = 4 * 1024

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_REF = re.compile(rf"<({_UUID})@([^<>\s@]+)>")
# [ \t], not \s: under re.M a leading \s* runs over every blank line that follows,
# at every line start, which is quadratic on a body of blank lines.
_QUOTED_OURS = re.compile(rf"^[ \t]*X-Mailbus-Message-Id:[ \t]*({_UUID})[ \t\r]*$",
                          re.I | re.M)
_QUOTED_MSGID = re.compile(rf"^[ \t]*Message-ID:[ \t]*(<{_UUID}@[^<>\s@]{{1,255}}>)",
                           re.I | re.M)
_UNSUBSCRIBE = re.compile(r"unsubscribe-(v1\.[A-Za-z0-9_-]{1,32}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)")
_AUTO_SUBJECT = re.compile(
    r"^[ \t]*(?:automatic reply|auto[- ]?reply|auto[- ]?response|out of (?:the )?office"
    r"|abwesenheitsnotiz|automatische antwort|réponse automatique|respuesta automática"
    r"|risposta automatica|automatisch antwoord|autosvar|absence du bureau)\b", re.I)
_AUTO_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder", "x-mail-autoreply",
                 "x-ms-exchange-inbox-rules-loop")
_TAG_HEADERS = ("to", "cc", "delivered-to", "x-original-to", "envelope-to", "x-envelope-to")
_NOT_COMPLAINTS = frozenset({"not-spam", "auth-failure"})


@dataclass(frozen=True)
class Inbound:
    """What one inbound message is, and what it says about a message of ours."""

    kind: Kind
    message_id: str | None = None
    header_message_id: str | None = None
    sender: str | None = None
    subject: str | None = None
    text: str = ""
    date: datetime | None = None
    dsn: tuple[DsnResult, ...] = ()
    complaint_recipient: str | None = None
    feedback_type: str | None = None
    unsubscribe_token: str | None = None
    reply_tags: tuple[str, ...] = ()
    reason: str | None = None
    quarantined: bool = False  # not classified: past the deadline, or over the size cap


def classify_inbound(raw: bytes, *, max_text: int = 10_000,
                     domains: Collection[str] = ()) -> Inbound:
    """Classify one raw message; `domains`, when given, limits whose Message-IDs count as ours."""
    ours = frozenset(domain.lower() for domain in domains)
    try:
        return _classify(raw, max_text, ours)
    except Exception as exc:  # noqa: BLE001 - a hostile message must not stop the reader
        return Inbound(kind="unmatched", reason=f"unreadable message: {type(exc).__name__}")


def _classify(raw: bytes, max_text: int, ours: frozenset[str]) -> Inbound:
    head, parts = read(raw)
    subject_full = first(head, "subject") or ""
    subject_scan = subject_full[:MAX_SUBJECT_SCAN]
    body = body_text(parts)
    text = cap(strip_reply(sanitise(body), limit=max_text), max_text)
    base = Inbound(
        kind="unmatched",
        header_message_id=_angle(first(head, "message-id")),
        sender=first_address(head.get("from", [])),
        subject=cap(subject_full, MAX_SUBJECT) if subject_full else None,
        text=text,
        date=_date(first(head, "date")),
        reply_tags=_reply_tags(head),
        reason="; ".join(dict.fromkeys(parts.problems)) or None,
    )
    return _decide(base, head, parts, subject_scan, ours, body)


def _decide(base: Inbound, head: Headers, parts: Parts, subject: str,
            ours: frozenset[str], body: str) -> Inbound:
    original_id = next((found for found in (_id_in_headers(h, ours) for h in parts.originals)
                        if found), None)
    if parts.status_blocks:
        results = tuple(dsn_result(block) for block in parts.status_blocks
                        if {"final-recipient", "original-recipient", "action"} & block.keys())
        if results:
            return replace(base, kind="dsn", dsn=results[:MAX_RECIPIENTS],
                           message_id=original_id or _thread_id(head, ours))
    if parts.feedback:
        return _complaint(base, parts, original_id)
    if looks_like_bounce(head, base.sender, subject):
        bounce = plain_bounce(head, body, subject)
        quoted = "\n".join(parts.plain + parts.attached_text)[:MAX_SCAN]
        found = original_id or _quoted_id(quoted, ours)
        return replace(base, kind="dsn", dsn=bounce, message_id=found or _thread_id(head, ours))
    token = _unsubscribe_token(subject)
    if token:
        return replace(base, kind="unsubscribe", unsubscribe_token=token)
    thread_id = _thread_id(head, ours)
    if _is_auto_reply(head, subject):
        return replace(base, kind="auto_reply", message_id=thread_id)
    if thread_id or base.reply_tags:
        return replace(base, kind="reply", message_id=thread_id)
    unmatched = "no reference to a message of ours"
    return replace(base, reason=f"{unmatched}; {base.reason}" if base.reason else unmatched)


# -- small readers ------------------------------------------------------------


def _angle(value: str | None) -> str | None:
    if not value:
        return None
    match = re.search(r"<([^<>\s]{1,990})>", value)
    return match.group(1) if match else (value.split()[0][:990] or None)


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _our_ids(text: str, ours: frozenset[str]) -> list[str]:
    """Our message ids among `<uuid@domain>` tokens, in the order they appear."""
    return [str(uuid.UUID(found)) for found, domain in _REF.findall(text)
            if not ours or domain.lower() in ours]


def _thread_id(head: Headers, ours: frozenset[str]) -> str | None:
    """The message of ours this answers: In-Reply-To, else the latest of References."""
    for name in ("in-reply-to", "references"):
        found = _our_ids(" ".join(head.get(name, [])), ours)
        if found:
            return found[-1]
    return None


def _id_in_headers(head: Headers, ours: frozenset[str]) -> str | None:
    for value in head.get("x-mailbus-message-id", []):
        if re.fullmatch(_UUID, value.strip()):
            return str(uuid.UUID(value.strip()))
    found = _our_ids(" ".join(head.get("message-id", [])), ours)
    return found[0] if found else None


def _quoted_id(text: str, ours: frozenset[str]) -> str | None:
    """Our message id in original headers quoted as text, as plain-text bounces do."""
    match = _QUOTED_OURS.search(text)
    if match:
        return str(uuid.UUID(match.group(1)))
    for quoted in _QUOTED_MSGID.findall(text):
        found = _our_ids(quoted, ours)
        if found:
            return found[0]
    return None


def _reply_tags(head: Headers) -> tuple[str, ...]:
    tags = (extract_tag(address) for name in _TAG_HEADERS
            for address in addresses(head.get(name, [])))
    return tuple(dict.fromkeys(tag for tag in tags if tag))


def _unsubscribe_token(subject: str) -> str | None:
    match = _UNSUBSCRIBE.search(subject)
    return match.group(1) if match and len(match.group(1)) <= MAX_TOKEN else None


def _is_auto_reply(head: Headers, subject: str) -> bool:
    """RFC 3834 and the headers and subjects autoresponders use instead of it."""
    auto = (first(head, "auto-submitted") or "no").split(";")[0].strip().lower()
    precedence = (first(head, "precedence") or "").strip().lower()
    return (auto != "no" or any(name in head for name in _AUTO_HEADERS)
            or precedence in ("auto_reply", "bulk", "junk") or bool(_AUTO_SUBJECT.match(subject)))


# -- complaints -------------------------------------------------------------


def _complaint(base: Inbound, parts: Parts, original_id: str | None) -> Inbound:
    """An ARF report (RFC 5965); only abuse-like feedback types are complaints."""
    report: Headers = {}
    for block in parts.feedback:
        for name, values in block.items():
            report.setdefault(name, []).extend(values)
    feedback_type = (first(report, "feedback-type") or "abuse").strip().lower()
    recipient = first_address(report.get("original-rcpt-to", [])) or next(
        (found for found in (first_address(h.get("to", [])) for h in parts.originals) if found),
        None)
    if feedback_type in _NOT_COMPLAINTS:
        return replace(base, feedback_type=feedback_type, message_id=original_id,
                       reason=f"feedback report of type {feedback_type}")
    return replace(base, kind="complaint", feedback_type=feedback_type, message_id=original_id,
                   complaint_recipient=recipient)
