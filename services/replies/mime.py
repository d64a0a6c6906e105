"""Reading hostile MIME within bounds: headers, the part tree, the text to classify.

The stdlib parser does the reading, under caps that keep its work linear:
bodies with too many boundaries or delimiter lines (or delivery reports of
too many blocks) are not parsed at all, the walk over the part tree is
iterative and stops at a depth and a part count, and header values are cut
before the stdlib's structured parser (quadratic or recursive on hostile
values) sees them.

Headers are read from the parser's raw values and decoded here, because the
default policy's header objects raise on some malformed headers and replace
8-bit text that is nearly always UTF-8 (RFC 6532).
"""

from __future__ import annotations

import email.policy
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses
from typing import Any

from mailbus.replies.text import decode_bytes, decode_raw_header, html_to_text

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
MAX_FIELDS = 100  # values kept of one header name; Received chains stay far below
MAX_PART_BYTES = 2 * 1024 * 1024
MAX_SCAN = 1_000_000  # characters of body text looked at; replies are far shorter
# HTML costs about 100 ms a megabyte to convert; what someone wrote comes first.
MAX_HTML_SCAN = 200_000
# The stdlib's structured header parser (Content-Type parameters, RFC 2231
# sections, encoded words) and getaddresses() are quadratic or recursive on
# hostile values: 200 KB of Content-Type parameters take 30 s, nested "(" raise
# RecursionError. Real values are far shorter than these caps.
MAX_STRUCTURED_HEADER = 1000
MAX_ADDRESS_TEXT = 8 * 1024

# Starts only where a local part can start (the look-behind), so a long run of
# local-part characters without "@" is scanned once, not once per position.
_LOCAL = r"A-Za-z0-9.!#$%&'*+/=?^_`{|}~-"
ADDRESS = re.compile(
    rf"(?<![{_LOCAL}])[{_LOCAL}]{{1,64}}@[A-Za-z0-9-]{{1,63}}(?:\.[A-Za-z0-9-]{{1,63}}){{1,16}}")
_DELIVERY_STATUS = re.compile(rb"delivery-status", re.I)


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


@dataclass
class Parts:
    """The pieces of a message the rules look at, gathered in one bounded walk."""

    plain: list[str]
    html: list[str]
    attached_text: list[str]
    status_blocks: list[Headers]
    feedback: list[Headers]
    originals: list[Headers]
    problems: list[str]


def read(raw: bytes) -> tuple[Headers, Parts]:
    """The top-level header and the parts of a message, within the caps."""
    complex_ = too_complex(raw)
    msg = BytesParser(policy=POLICY).parsebytes(raw, headersonly=complex_ is not None)
    parts = Parts([], [], [], [], [], [], [])
    if complex_ is None:
        walk(msg, parts)
    else:
        parts.problems.append(complex_)
    return fields(msg), parts


def too_complex(raw: bytes) -> str | None:
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


def fields(msg: Message) -> Headers:
    """Header values by lower-case name, decoded, in order."""
    out: Headers = {}
    for name, value in msg.raw_items():
        values = out.setdefault(name.strip().lower(), [])
        if isinstance(value, str) and len(values) < MAX_FIELDS:
            values.append(decode_raw_header(value))
    return out


def first(head: Headers, name: str) -> str | None:
    values = head.get(name)
    return values[0] if values else None


def walk(msg: Message, parts: Parts) -> None:
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


def _read_part(part: Message, parts: Parts) -> list[Message]:
    """Record what one part holds; return its children to visit."""
    ctype = part.get_content_type()
    payload = part.get_payload()
    if ctype in ("message/delivery-status", "message/global-delivery-status"):
        parts.status_blocks.extend(_blocks(part))
    elif ctype == "message/feedback-report":
        parts.feedback.extend(_blocks(part))
    elif ctype in ("message/rfc822", "message/global", "message/global-headers"):
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            parts.originals.append(fields(payload[0]))
    elif ctype in ("text/rfc822-headers", "message/rfc822-headers"):
        parts.originals.append(fields(BytesParser(policy=POLICY)
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
            blocks.append(fields(sub))
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


def body_text(parts: Parts) -> str:
    """The plain text parts, else the html ones as text; bounded work either way."""
    if parts.plain:
        return "\n\n".join(parts.plain)[:MAX_SCAN]
    return "\n\n".join(html_to_text(html[:MAX_HTML_SCAN]) for html in parts.html[:4])[:MAX_SCAN]


def addresses(values: list[str]) -> list[str]:
    text = ", ".join(values)[:MAX_ADDRESS_TEXT]
    try:
        pairs = getaddresses([text])
    except (ValueError, IndexError, TypeError, RecursionError):
        pairs = [("", found) for found in ADDRESS.findall(text)]
    return [address.strip().lower() for _, address in pairs
            if "@" in address and len(address) <= 320]


def first_address(values: list[str]) -> str | None:
    found = addresses(values)
    return found[0] if found else None
