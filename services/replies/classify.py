"""What an inbound message is: a delivery report, a complaint, an auto-reply, a reply.

A pure function of the raw RFC 5322 bytes, so the mailbox reader only fetches
and publishes. Inbound mail is hostile input: every message gives a result,
never an exception, with `reason` saying what could not be read.

Headers are read from the parser's raw values and decoded here, because the
default policy's header objects raise on some malformed headers and replace
8-bit text that is nearly always UTF-8 (RFC 6532).

Every step is linear in the size of the message: no pattern here may
backtrack over more than a bounded stretch (no leading whitespace pattern
under re.M that also eats the newlines of the lines that follow; bounded
repetitions),
and what the standard library parses quadratically (structured header
values, address lists) is cut to a bounded length first. The reader still
runs this in a worker it can abandon (`sandbox.py`), for whatever is missed.
"""

from __future__ import annotations

import email.policy
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any, Literal

from mailbus.replies.text import (
    cap,
    decode_bytes,
    decode_raw_header,
    html_to_text,
    sanitise,
    strip_reply,
)
from mailbus.replytag import extract_tag
from mailbus.tokens import MAX_TOKEN

Kind = Literal["dsn", "complaint", "auto_reply", "reply", "unsubscribe", "unmatched"]
BounceClass = Literal["hard", "soft", "unknown"]
Headers = dict[str, list[str]]

MAX_DEPTH = 12
MAX_PARTS = 200
# The stdlib parser is recursive and slow on many parts (20,000 parts: seconds;
# 1,000 nested: RecursionError), so such bodies are not parsed at all.
MAX_BOUNDARIES = 64
MAX_DELIMITER_LINES = 2000
# The parser makes a message object of every blank-line separated block of a
# delivery-status part (a second per 50,000); real reports have a few.
MAX_REPORT_BLOCKS = 1000
MAX_BOUNCE_LINES = 2000
MAX_FIELDS = 100  # values kept of one header name; Received chains stay far below
MAX_PART_BYTES = 2 * 1024 * 1024
MAX_SCAN = 1_000_000  # characters of body text looked at; replies are far shorter
# HTML costs about 100 ms a megabyte to convert; what someone wrote comes first.
MAX_HTML_SCAN = 200_000
MAX_SUBJECT = 998
MAX_DIAGNOSTIC = 1000
MAX_RECIPIENTS = 100
# The stdlib's structured header parser (Content-Type parameters, RFC 2231
# sections, encoded words) and getaddresses() are quadratic or recursive on
# hostile values: 200 KB of Content-Type parameters take 30 s, nested "(" raise
# RecursionError. Real values are far shorter than these caps.
MAX_STRUCTURED_HEADER = 1000
MAX_ADDRESS_TEXT = 8 * 1024
MAX_SUBJECT_SCAN = 4 * 1024
# 5.x.x statuses that say nothing against the address: mailbox full, message
# too big, delivery time expired.
SOFT_PERMANENT = frozenset({"5.2.2", "5.2.3", "5.3.4", "5.4.7"})

_STATUS = re.compile(r"(?<![\w.])([245]\.\d{1,3}\.\d{1,3})(?![\w.])")
_SMTP_CODE = re.compile(r"(?<!\d)([245])\d\d(?:[ -]|$)")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_REF = re.compile(rf"<({_UUID})@([^<>\s@]+)>")
# [ \t], not \s: under re.M a leading \s* runs over every blank line that follows,
# at every line start, which is quadratic on a body of blank lines.
_QUOTED_OURS = re.compile(rf"^[ \t]*X-Mailbus-Message-Id:[ \t]*({_UUID})[ \t\r]*$",
                          re.I | re.M)
_QUOTED_MSGID = re.compile(rf"^[ \t]*Message-ID:[ \t]*(<{_UUID}@[^<>\s@]{{1,255}}>)",
                           re.I | re.M)
_UNSUBSCRIBE = re.compile(r"unsubscribe-(v1\.[A-Za-z0-9_-]{1,32}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)")
# Starts only where a local part can start (the look-behind), so a long run of
# local-part characters without "@" is scanned once, not once per position.
_LOCAL = r"A-Za-z0-9.!#$%&'*+/=?^_`{|}~-"
_ADDRESS = re.compile(
    rf"(?<![{_LOCAL}])[{_LOCAL}]{{1,64}}@[A-Za-z0-9-]{{1,63}}(?:\.[A-Za-z0-9-]{{1,63}}){{1,16}}")
_DELIVERY_STATUS = re.compile(rb"delivery-status", re.I)
_DAEMON = re.compile(r"^(?:mailer-daemon|mail-daemon|postmaster|mailerdaemon)@", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|returned mail|delivery status notification|delivery (?:failure|has failed)"
    r"|mail delivery (?:failed|failure|system)|failure notice|could not be delivered"
    r"|non[- ]?delivery|unzustellbar|nicht zugestellt|non remis|échec de (?:la )?remise", re.I)
_DELAY_SUBJECT = re.compile(r"\bdelay|\bwarning\b|still trying|verzögert|retardé", re.I)
# Where the quoted original starts in a plain-text bounce.
_QUOTED_HEADER = re.compile(
    r"^[ \t]*(?:Return-Path|Received|Message-ID|From|Date|Subject|To|Content-Type|MIME-Version"
    r"|X-Mailbus-Message-Id)[ \t]*:", re.I)
_AUTO_SUBJECT = re.compile(
    r"^[ \t]*(?:automatic reply|auto[- ]?reply|auto[- ]?response|out of (?:the )?office"
    r"|abwesenheitsnotiz|automatische antwort|réponse automatique|respuesta automática"
    r"|risposta automatica|automatisch antwoord|autosvar|absence du bureau)\b", re.I)
_AUTO_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder", "x-mail-autoreply",
                 "x-ms-exchange-inbox-rules-loop")
_TAG_HEADERS = ("to", "cc", "delivered-to", "x-original-to", "envelope-to", "x-envelope-to")
_NOT_COMPLAINTS = frozenset({"not-spam", "auth-failure"})


class _BoundedPolicy(email.policy.EmailPolicy):
    """The default policy, with header values cut before its structured parser sees them.

    The parser itself asks for Content-Type (boundaries) while it reads, so the
    cut has to sit in the policy, where every such lookup passes.
    """

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if isinstance(value, str) and len(value) > MAX_STRUCTURED_HEADER:
            value = value[:MAX_STRUCTURED_HEADER]
        return super().header_fetch_parse(name, value)


POLICY = _BoundedPolicy()


@dataclass(frozen=True)
class DsnResult:
    """One recipient of a delivery report; `bounce_class` is None unless the action failed."""

    recipient: str | None
    action: str
    status: str | None
    bounce_class: BounceClass | None
    diagnostic: str | None


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


@dataclass
class _Parts:
    """The pieces of a message the rules look at, gathered in one bounded walk."""

    plain: list[str]
    html: list[str]
    attached_text: list[str]
    status_blocks: list[Headers]
    feedback: list[Headers]
    originals: list[Headers]
    problems: list[str]


def classify(raw: bytes, *, max_text: int = 10_000,
             domains: Collection[str] = ()) -> Inbound:
    """Classify one raw message; `domains`, when given, limits whose Message-IDs count as ours."""
    ours = frozenset(domain.lower() for domain in domains)
    try:
        return _classify(raw, max_text, ours)
    except Exception as exc:  # noqa: BLE001 - a hostile message must not stop the reader
        return Inbound(kind="unmatched", reason=f"unreadable message: {type(exc).__name__}")


def _classify(raw: bytes, max_text: int, ours: frozenset[str]) -> Inbound:
    parser = BytesParser(policy=POLICY)
    too_complex = _too_complex(raw)
    msg = parser.parsebytes(raw, headersonly=too_complex is not None)
    head = _fields(msg)
    parts = _Parts([], [], [], [], [], [], [])
    if too_complex is None:
        _walk(msg, parts)
    else:
        parts.problems.append(too_complex)
    subject_full = _first(head, "subject") or ""
    subject_scan = subject_full[:MAX_SUBJECT_SCAN]
    body = _body_text(parts)
    text = cap(strip_reply(sanitise(body), limit=max_text), max_text)
    base = Inbound(
        kind="unmatched",
        header_message_id=_angle(_first(head, "message-id")),
        sender=_first_address(head.get("from", [])),
        subject=cap(subject_full, MAX_SUBJECT) if subject_full else None,
        text=text,
        date=_date(_first(head, "date")),
        reply_tags=_reply_tags(head),
        reason="; ".join(dict.fromkeys(parts.problems)) or None,
    )
    return _decide(base, head, parts, subject_scan, ours, body)


def _decide(base: Inbound, head: Headers, parts: _Parts, subject: str,
            ours: frozenset[str], body: str) -> Inbound:
    original_id = next((found for found in (_id_in_headers(h, ours) for h in parts.originals)
                        if found), None)
    if parts.status_blocks:
        results = tuple(_dsn_result(block) for block in parts.status_blocks
                        if {"final-recipient", "original-recipient", "action"} & block.keys())
        if results:
            return replace(base, kind="dsn", dsn=results[:MAX_RECIPIENTS],
                           message_id=original_id or _thread_id(head, ours))
    if parts.feedback:
        return _complaint(base, parts, original_id)
    if _looks_like_bounce(head, base.sender, subject):
        bounce = _plain_bounce(head, body, subject)
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


# -- reading the message ----------------------------------------------------


def _too_complex(raw: bytes) -> str | None:
    # A plain count first: the case-insensitive search costs 5 ms a megabyte.
    rough = raw.count(b"oundary") + raw.count(b"OUNDARY")
    boundaries = len(re.findall(rb"boundary\s*=", raw, re.I)) if rough > MAX_BOUNDARIES else 0
    if boundaries > MAX_BOUNDARIES:
        return f"body not read: {boundaries} multipart boundaries"
    delimiters = raw.count(b"\n--")
    if delimiters > MAX_DELIMITER_LINES:
        return f"body not read: {delimiters} delimiter lines"
    blank = raw.count(b"\n\n") + raw.count(b"\n\r\n") + raw.count(b"\r\r")
    if blank > MAX_REPORT_BLOCKS and _DELIVERY_STATUS.search(raw):
        return f"body not read: a delivery report with {blank} blank lines"
    return None


def _fields(msg: Message) -> Headers:
    """Header values by lower-case name, decoded, in order."""
    out: Headers = {}
    for name, value in msg.raw_items():
        values = out.setdefault(name.strip().lower(), [])
        if isinstance(value, str) and len(values) < MAX_FIELDS:
            values.append(decode_raw_header(value))
    return out


def _first(head: Headers, name: str) -> str | None:
    values = head.get(name)
    return values[0] if values else None


def _walk(msg: Message, parts: _Parts) -> None:
    """Depth-first over the MIME tree without recursion, within depth and count caps."""
    stack: list[tuple[Message, int]] = [(msg, 0)]
    seen = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            parts.problems.append(f"more than {MAX_PARTS} parts; the rest not read")
            return
        try:
            children = _read_part(part, parts)
        except Exception as exc:  # noqa: BLE001 - skip the one broken part, keep the rest
            parts.problems.append(f"part not read: {type(exc).__name__}")
            continue
        finally:
            parts.problems.extend(_defect_name(defect) for defect in part.defects)
        if children and depth >= MAX_DEPTH:
            parts.problems.append(f"parts nested deeper than {MAX_DEPTH} not read")
        elif children:
            stack.extend((child, depth + 1) for child in reversed(children))


def _read_part(part: Message, parts: _Parts) -> list[Message]:
    """Record what one part holds; return its children to visit."""
    ctype = part.get_content_type()
    payload = part.get_payload()
    if ctype in ("message/delivery-status", "message/global-delivery-status"):
        parts.status_blocks.extend(_blocks(part))
    elif ctype == "message/feedback-report":
        parts.feedback.extend(_blocks(part))
    elif ctype in ("message/rfc822", "message/global", "message/global-headers"):
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            parts.originals.append(_fields(payload[0]))
    elif ctype in ("text/rfc822-headers", "message/rfc822-headers"):
        parts.originals.append(_fields(BytesParser(policy=POLICY)
                                       .parsebytes(_payload_bytes(part), headersonly=True)))
    elif part.is_multipart():
        return [child for child in payload if isinstance(child, Message)]
    elif ctype in ("text/plain", "text/html"):
        text = decode_bytes(_payload_bytes(part), part.get_content_charset())
        if part.get_content_disposition() == "attachment":
            parts.attached_text.append(text)
        else:
            (parts.plain if ctype == "text/plain" else parts.html).append(text)
    return []


def _defect_name(defect: object) -> str:
    """"CloseBoundaryNotFoundDefect" -> "close boundary not found"."""
    name = type(defect).__name__.removesuffix("Defect")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).lower()


def _payload_bytes(part: Message) -> bytes:
    data = part.get_payload(decode=True)
    return data[:MAX_PART_BYTES] if isinstance(data, bytes) else b""


def _blocks(part: Message) -> list[Headers]:
    """The field blocks of a report part, whichever way the parser split it."""
    payload = part.get_payload()
    if not isinstance(payload, list):
        return _text_blocks(decode_bytes(_payload_bytes(part), "utf-8"))
    blocks: list[Headers] = []
    for sub in payload:
        if isinstance(sub, Message):
            blocks.append(_fields(sub))
            # The parser leaves the later blocks of message/global-* (UTF-8) in the body.
            rest = sub.get_payload(decode=True)
            if isinstance(rest, bytes) and rest.strip():
                blocks.extend(_text_blocks(decode_bytes(rest[:MAX_PART_BYTES], "utf-8")))
    return [block for block in blocks if block]


def _text_blocks(text: str) -> list[Headers]:
    """Blank-line separated blocks of "Name: value" fields, continuation lines unfolded."""
    blocks: list[Headers] = []
    for chunk in re.split(r"\r?\n[ \t]*\r?\n", text):
        block: Headers = {}
        for line in re.sub(r"\r?\n[ \t]+", " ", chunk).splitlines():
            name, colon, value = line.partition(":")
            if colon and name.strip() and " " not in name.strip():
                block.setdefault(name.strip().lower(), []).append(decode_raw_header(value))
        if block:
            blocks.append(block)
            if len(blocks) >= MAX_REPORT_BLOCKS:
                break
    return blocks


def _body_text(parts: _Parts) -> str:
    """The plain text parts, else the html ones as text; bounded work either way."""
    if parts.plain:
        return "\n\n".join(parts.plain)[:MAX_SCAN]
    return "\n\n".join(html_to_text(html[:MAX_HTML_SCAN]) for html in parts.html[:4])[:MAX_SCAN]


# -- small readers ------------------------------------------------------------


def _angle(value: str | None) -> str | None:
    if not value:
        return None
    match = re.search(r"<([^<>\s]{1,990})>", value)
    return match.group(1) if match else (value.split()[0][:990] or None)


def _addresses(values: list[str]) -> list[str]:
    text = ", ".join(values)[:MAX_ADDRESS_TEXT]
    try:
        pairs = getaddresses([text])
    except (ValueError, IndexError, TypeError, RecursionError):
        pairs = [("", found) for found in _ADDRESS.findall(text)]
    return [address.strip().lower() for _, address in pairs
            if "@" in address and len(address) <= 320]


def _first_address(values: list[str]) -> str | None:
    found = _addresses(values)
    return found[0] if found else None


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
            for address in _addresses(head.get(name, [])))
    return tuple(dict.fromkeys(tag for tag in tags if tag))


def _unsubscribe_token(subject: str) -> str | None:
    match = _UNSUBSCRIBE.search(subject)
    return match.group(1) if match and len(match.group(1)) <= MAX_TOKEN else None


def _is_auto_reply(head: Headers, subject: str) -> bool:
    """RFC 3834 and the headers and subjects autoresponders use instead of it."""
    auto = (_first(head, "auto-submitted") or "no").split(";")[0].strip().lower()
    precedence = (_first(head, "precedence") or "").strip().lower()
    return (auto != "no" or any(name in head for name in _AUTO_HEADERS)
            or precedence in ("auto_reply", "bulk", "junk") or bool(_AUTO_SUBJECT.match(subject)))


# -- delivery reports ---------------------------------------------------------


def bounce_class(action: str, status: str | None, diagnostic: str | None) -> BounceClass | None:
    """How final a report is: None unless delivery failed, then hard, soft or unknown."""
    if action != "failed":
        return None
    code = status[0] if status else None
    if code is None and diagnostic:
        smtp = _SMTP_CODE.search(diagnostic)
        code = smtp.group(1) if smtp else None
    if code == "5":
        return "soft" if status in SOFT_PERMANENT else "hard"
    return "soft" if code == "4" else "unknown"


def _dsn_result(block: Headers) -> DsnResult:
    original = _recipient(_first(block, "original-recipient"), xtext=True)
    recipient = original or _recipient(_first(block, "final-recipient"), xtext=False)
    action = ((_first(block, "action") or "").split() or ["failed"])[0].lower()
    diagnostic = _diagnostic(_first(block, "diagnostic-code"))
    found = _STATUS.search(_first(block, "status") or "") or _STATUS.search(diagnostic or "")
    status = found.group(1) if found else None
    return DsnResult(recipient, action, status, bounce_class(action, status, diagnostic),
                     diagnostic)


def _recipient(value: str | None, *, xtext: bool) -> str | None:
    """The address of "rfc822; user@example.net"; ORCPT values are xtext (RFC 3461)."""
    if not value:
        return None
    address = value.partition(";")[2] if ";" in value else value
    if xtext:
        address = re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), address)
    address = address.strip().strip("<>").strip().lower()
    return address if "@" in address and len(address) <= 320 else None


def _diagnostic(value: str | None) -> str | None:
    if not value:
        return None
    kind, semi, rest = value.partition(";")
    text = rest if semi and len(kind) < 20 else value  # "smtp; 550 5.1.1 ..."
    return cap(" ".join(text.split()), MAX_DIAGNOSTIC) or None


def _looks_like_bounce(head: Headers, sender: str | None, subject: str) -> bool:
    if "x-failed-recipients" in head:
        return True
    null_path = any(value.strip() in ("<>", "") for value in head.get("return-path", []))
    daemon = bool(sender and _DAEMON.match(sender))
    return (null_path or daemon) and bool(_BOUNCE_SUBJECT.search(subject))


def _plain_bounce(head: Headers, body: str, subject: str) -> tuple[DsnResult, ...]:
    """Best effort for bounces without a delivery-status part: recipients, status, class."""
    explanation: list[str] = []
    # The explanation comes first and is short; a body of a million blank lines
    # is not read line by line to its end.
    for line in body.splitlines()[:MAX_BOUNCE_LINES]:
        if _QUOTED_HEADER.match(line):
            break
        explanation.append(line)
    text = "\n".join(explanation)
    action = "delayed" if _DELAY_SUBJECT.search(subject) else "failed"
    status_match = _STATUS.search(text)
    status = status_match.group(1) if status_match else None
    diagnostic = next((" ".join(line.split()) for line in explanation
                       if (status and status in line) or _SMTP_CODE.search(line.strip())), None)
    diagnostic = cap(diagnostic, MAX_DIAGNOSTIC) if diagnostic else None
    recipients = _addresses(head.get("x-failed-recipients", []))
    if not recipients:  # the first address named that is neither ours nor the daemon's
        ours = set(_addresses(head.get("to", [])))
        recipients = [found.lower() for found in _ADDRESS.findall(text)
                      if not _DAEMON.match(found) and found.lower() not in ours][:1]
    klass = bounce_class(action, status, diagnostic)
    named: list[str | None] = [*recipients[:MAX_RECIPIENTS]] or [None]
    return tuple(DsnResult(recipient, action, status, klass, diagnostic) for recipient in named)


# -- complaints -------------------------------------------------------------


def _complaint(base: Inbound, parts: _Parts, original_id: str | None) -> Inbound:
    """An ARF report (RFC 5965); only abuse-like feedback types are complaints."""
    report: Headers = {}
    for block in parts.feedback:
        for name, values in block.items():
            report.setdefault(name, []).extend(values)
    feedback_type = (_first(report, "feedback-type") or "abuse").strip().lower()
    recipient = _first_address(report.get("original-rcpt-to", [])) or next(
        (found for found in (_first_address(h.get("to", [])) for h in parts.originals) if found),
        None)
    if feedback_type in _NOT_COMPLAINTS:
        return replace(base, feedback_type=feedback_type, message_id=original_id,
                       reason=f"feedback report of type {feedback_type}")
    return replace(base, kind="complaint", feedback_type=feedback_type, message_id=original_id,
                   complaint_recipient=recipient)
