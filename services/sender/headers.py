"""Header values the sender may write, and the check that what leaves is what was built. Pure.

Python's email package does not protect us by itself: when a str is assigned
to a header, headerregistry *parses* it, decoding RFC 2047 encoded words (even
ones glued to other text, with whitespace inside, or in a quoted display name),
and then folds the decoded text, so an encoded word holding CR LF left as two
header lines; and its folder drops spaces in long non-ASCII values. Hence:

- Values: line breaks and control characters are refused, Unicode whitespace
  (U+0085, U+2028, U+2029, NBSP...) folds into one space, and anything that
  looks like an encoded word is refused: mailbus never means one (the API
  refuses them, JSON carries Unicode), so only a producer bypassing the API
  sends one, and failing that message is safer than guessing.
- Writing: Subject and the address headers are folded here (unstructured(),
  mailbox_list()) and stored raw, never parsed or refolded by Python.
- Caller-chosen headers (the event's `headers`) pass an allow-list of names
  (custom_name_problem) and the same value rules as the subject.
- Parse-back: the composed bytes are split into header lines again, by our own
  byte rules and by Python's parser, and must name exactly the headers the
  message was built with, and decode to exactly the intended Subject, From,
  To, Cc, Reply-To and caller-chosen values. Whatever a future library quirk does, a message whose
  headers differ from the intended ones does not leave.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from email import policy
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.utils import formataddr, getaddresses
from functools import lru_cache
from typing import NamedTuple

from email_validator import EmailNotValidError, validate_email

from mailbus import customheaders
from mailbus.errors import MailbusError

# C0 controls (TAB excepted: it is whitespace and folds), DEL, and C1 controls
# except NEL (U+0085), which str.split() folds like U+2028 and U+2029.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x84\x86-\x9f]")
_FIELD_NAME = re.compile(rb"[!-9;-~]+")  # RFC 5322 ftext
# What a header failing the check is called in email.failed: the request's field.
_FIELDS = {"from": "from", "to": "to", "cc": "cc", "reply-to": "reply_to",
           "subject": "subject"}
# Python's parser splits the block into fields (compat32: raw values, no header
# registry, the same splitting as every policy); the registry reads a value only
# when RFC 2047's reading of it differs from the intended one.
_PARSER = BytesHeaderParser(policy=policy.compat32)
_REGISTRY = BytesHeaderParser(policy=policy.default)
FOLD = "\r\n "  # a line break before whitespace: unfolded, it is that whitespace

def custom_headers(entries: list[dict[str, str]] | None) -> list[tuple[str, str]]:
    """The event's caller-chosen headers as (name, one-line text), every rule re-checked
    (mailbus/customheaders.py: the API applies the same; a producer may bypass it)."""
    entries = entries or []
    if len(entries) > customheaders.MAX_HEADERS:
        raise ComposeFailed(f"headers: more than {customheaders.MAX_HEADERS} headers")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    size = 0
    for entry in entries:
        name, value = entry.get("name", ""), entry.get("value", "")
        problem = customheaders.name_problem(name)
        if problem is not None:
            raise ComposeFailed(f"headers.{name[:customheaders.MAX_NAME]!r}: {problem}")
        if name.lower() in seen:
            raise ComposeFailed(f"headers.{name}: given more than once")
        seen.add(name.lower())
        if not isinstance(value, str):
            raise ComposeFailed(f"headers.{name}: the value is not text")
        size += len(name.encode("utf-8")) + len(value.encode("utf-8"))
        if size > customheaders.MAX_BYTES:
            raise ComposeFailed(f"headers: names and values exceed {customheaders.MAX_BYTES} bytes")
        text = header_text(value, f"headers.{name}", customheaders.MAX_VALUE)
        if not text:
            raise ComposeFailed(f"headers.{name}: the value is empty")
        keywords = customheaders.KEYWORDS.get(name.lower())
        if keywords is not None and text.lower() not in keywords:
            raise ComposeFailed(f"headers.{name}: one of {', '.join(sorted(keywords))}")
        out.append((name, text))
    return out


def has_encoded_word(value: str) -> bool:
    """Whether an "=?" is later followed by "?=": a superset of what Python's parser decodes.

    Python accepts charsets with *lang, any case, whitespace inside and words glued
    to other text. Two find()s: linear, where a regex with .* would be quadratic.
    """
    start = value.find("=?")
    return start >= 0 and value.find("?=", start + 2) >= 0


class ComposeFailed(MailbusError):
    """The event cannot become a safe, well-formed message; retrying will not help."""


def header_text(value: str, field: str, limit: int) -> str:
    """A header value as one line: refuse controls and encoded words, fold whitespace runs."""
    if _CONTROL.search(value):
        raise ComposeFailed(f"{field}: contains a line break or control character")
    if has_encoded_word(value):
        raise ComposeFailed(f"{field}: contains an RFC 2047 encoded word (=?...?=)")
    value = " ".join(value.split())  # also Unicode separators such as U+2028
    if len(value) > limit:
        raise ComposeFailed(f"{field}: longer than {limit} characters")
    return value


class Mailbox(NamedTuple):
    """A checked address (ASCII form) and its display name ("" for none)."""

    display_name: str
    addr_spec: str


@lru_cache(maxsize=4096)
def mailbox(email: str, name: str | None, field: str, name_limit: int) -> Mailbox:
    """Re-validate one address (ASCII form, IDN domains as punycode) with its display name.

    Cached: the same sender and recipients come again and again, and validation is
    the dearest part of composing. Mailbox is immutable; a refusal is not cached.
    """
    if not isinstance(email, str) or _CONTROL.search(email):
        raise ComposeFailed(f"{field}: address contains a line break or control character")
    if has_encoded_word(email):
        raise ComposeFailed(f"{field}: address contains an RFC 2047 encoded word (=?...?=)")
    try:
        # Syntax only. .test domains pass for the local stack; local parts that
        # need SMTPUTF8 are refused, as neither transport offers it.
        valid = validate_email(email, check_deliverability=False, allow_smtputf8=False,
                               test_environment=True)
    except EmailNotValidError as exc:
        raise ComposeFailed(f"{field}: {email!r} is not a valid address: {exc}") from exc
    if valid.ascii_email is None:  # not with allow_smtputf8=False; never sent unchecked
        raise ComposeFailed(f"{field}: {email!r} has no ASCII form")
    display = header_text(name, f"{field} name", name_limit) if name else ""
    return Mailbox(display, valid.ascii_email)


def encoded_words(text: str) -> list[str]:
    """`text` as RFC 2047 B-encoded words of at most 75 characters, split between characters.

    Python 3.11's folder splits long non-ASCII values at spaces and then puts
    that space between two encoded words, where decoders drop it ("long x" came
    back "longx"); here no space ever falls outside an encoded word.
    """
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    for char in text:
        width = len(char.encode("utf-8"))
        if size + width > 42 and chunk:  # 42 octets: 56 base64 characters, 68 in all
            words.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(char)
        size += width
    if chunk:
        words.append("".join(chunk))
    return [f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words]


def unstructured(text: str) -> str:
    """A one-line value (a subject) folded for the wire: ASCII at its spaces, else encoded."""
    words = text.split(" ")
    if not text.isascii() or any(len(w) > 70 for w in words):
        return FOLD.join(encoded_words(text))
    lines = [words[0]]
    for word in words[1:]:  # fold before a space: unfolding gives the text back exactly
        if len(lines[-1]) + 1 + len(word) > 68:
            lines.append(word)
        else:
            lines[-1] += " " + word
    return FOLD.join(lines)


def mailbox_list(addresses: list[Mailbox]) -> str:
    """An address header's value, one mailbox per line; non-ASCII names as encoded words."""
    out = []
    for address in addresses:
        name = address.display_name
        if not name or name.isascii():
            # formataddr quotes a name holding specials; email_validator's ASCII
            # form of the address needs no quoting.
            out.append(formataddr(address))
        else:
            out.append(f"{FOLD.join(encoded_words(name))} <{address.addr_spec}>")
    return ("," + FOLD).join(out)


@dataclass
class Intended:
    """The header set a message was built with, and the decoded values that matter."""

    names: list[str] = field(default_factory=list)  # every header, in order, as written
    subject: str | None = None
    texts: dict[str, str] = field(default_factory=dict)  # caller-chosen name -> text
    mailboxes: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # "To" -> pairs


def _names(head: bytes) -> list[str]:
    """The name of each header field in a header block, by RFC 5322's line rules alone."""
    if not head.isascii() or b"\0" in head:
        raise ComposeFailed("headers: 8-bit data or NUL in the header block")
    found: list[str] = []
    for line in head.split(b"\r\n"):
        if b"\r" in line or b"\n" in line:
            raise ComposeFailed("headers: a bare CR or LF in the header block")
        if len(line) > 998:
            raise ComposeFailed("headers: a header line longer than 998 octets")
        if line[:1] in (b" ", b"\t"):
            if not found:
                raise ComposeFailed("headers: the message starts with a continuation line")
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise ComposeFailed("headers: a line that is no header field")
        found.append(name.decode("ascii"))
    return found


def _field(name: str) -> str:
    """The request field a header comes from: `subject`, `headers.X-Campaign`..."""
    lower = name.lower()
    if lower in _FIELDS:
        return _FIELDS[lower]
    return f"headers.{name}" if customheaders.name_problem(name) is None else "headers"


def _culprit(written: list[str], intended: list[str]) -> str:
    """The request field whose header spilled: the one just before the first difference."""
    for i, (got, want) in enumerate(zip(written, intended, strict=False)):
        if got.lower() != want.lower():
            return _field(written[i - 1]) if i else "headers"
    shorter = min(len(written), len(intended))
    return _field(written[shorter - 1]) if shorter else "headers"


def check(raw: bytes, intended: Intended) -> None:
    """Raise ComposeFailed unless `raw` reads back with exactly the intended headers."""
    end = raw.find(b"\r\n\r\n")  # not partition(): that would copy the whole body
    if end < 0:
        raise ComposeFailed("headers: no blank line after the header block")
    head = raw[:end]
    written = _names(head)
    if [n.lower() for n in written] != [n.lower() for n in intended.names]:
        extra = sorted({n for n in written if n.lower() not in
                        {m.lower() for m in intended.names}})
        raise ComposeFailed(f"{_culprit(written, intended.names)}: the message would leave "
                            f"with headers it was not built with {extra or written}")
    block = head + b"\r\n\r\n"
    parsed = _PARSER.parsebytes(block)
    raw_values = {n.lower(): v for n, v in parsed.raw_items()}
    if [n.lower() for n in parsed.keys()] != [n.lower() for n in written]:
        raise ComposeFailed(f"{_culprit(parsed.keys(), written)}: the header block parses "
                            "into other headers than were written")
    registry = None
    # Two readings: RFC 2047's (email.header, quick) and Python's header registry
    # (slow, and it keeps the space between adjacent encoded words of a display
    # name, which RFC 2047 drops). Either must give exactly the intended value.
    subject = intended.subject
    if subject is not None and _rfc2047_text(raw_values.get("subject", "")) != subject:
        registry = _REGISTRY.parsebytes(block)
        if str(registry["Subject"]) != subject:
            raise ComposeFailed("subject: does not decode back to the intended text")
    for name, text in intended.texts.items():
        if _rfc2047_text(raw_values.get(name.lower(), "")) == text:
            continue
        registry = registry or _REGISTRY.parsebytes(block)
        if str(registry[name]) != text:
            raise ComposeFailed(f"headers.{name}: does not decode back to the intended text")
    for name, pairs in intended.mailboxes.items():
        if _rfc2047_pairs(raw_values.get(name.lower(), "")) == pairs:
            continue
        registry = registry or _REGISTRY.parsebytes(block)
        decoded = [(a.display_name, a.addr_spec)
                   for a in getattr(registry[name], "addresses", ())]
        if decoded != pairs:
            raise ComposeFailed(f"{_field(name)}: does not decode back to the "
                                "intended addresses")


def _rfc2047_text(value: str) -> str | None:
    """An unstructured value as RFC 2047 decodes it (adjacent encoded words joined)."""
    try:
        return str(make_header(decode_header(re.sub(r"\r?\n(?=[ \t])", "", value))))
    except (ValueError, LookupError):
        return None


def _rfc2047_pairs(value: str) -> list[tuple[str, str]]:
    """Display names and addresses as RFC 2047 section 6.2 decodes them (email.utils)."""
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", value)
    try:
        return [(str(make_header(decode_header(name))), addr)
                for name, addr in getaddresses([unfolded])]
    except (ValueError, LookupError):  # an unknown charset or a malformed word: no match
        return []
