"""Turns an email.requested event into the RFC 5322 message a transport hands over. Pure.

Decisions:
- Content: a template part that renders wins; the event's literal subject, text
  and html fill in whatever part the template lacks.
- Bodies: text alone is text/plain; html always travels in multipart/alternative
  with a text/plain part first (RFC 2046: least faithful first), derived from the
  html when the event has no text, because html-only mail scores as spam.
- Caller-chosen headers (allow-listed X- names, Precedence, Auto-Submitted) come
  after the headers mailbus writes, folded like the subject.
- Nothing from the event is trusted: every value bound for a header is refused
  (ComposeFailed) if it holds CR, LF, NUL, other control characters or an RFC 2047
  encoded word, every address is re-validated, and the finished bytes are parsed
  back and must carry exactly the headers built (headers.py); Bcc recipients go
  to the envelope only.
- Signed links name the recipient of a message sent to one address. A message
  with several envelope recipients carries the same links for all of them, so
  its action and open links name nobody and it has no List-Unsubscribe: a click
  cannot say who made it, and one recipient must never unsubscribe another.
  Per-recipient links need one message per recipient (the batch endpoint).
- Open tracking is opt-in (LinkBuilder.open_tracking): an html body gets a 1x1
  image linking to the hooks service; text-only mail has nothing to load it.
"""

from __future__ import annotations

import binascii
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from html import escape
from typing import Any

from mailbus.accounts import Account
from mailbus.replytag import make_tag, tagged_address
from mailbus.sender import attachments, headers
from mailbus.sender.dkim import DkimSigner
from mailbus.sender.headers import ComposeFailed, Intended, Mailbox, header_text
from mailbus.sender.htmltext import html_to_text
from mailbus.sender.templates import render
from mailbus.sender.transport import Outgoing
from mailbus.tokens import Keyring, LinkBuilder, TokenError

MAX_NAME = 256
MAX_SUBJECT = 998
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
__all__ = ["ComposeFailed", "Content", "compose", "compose_inline", "content", "header_text",
           "html_to_text"]
_MESSAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DOMAIN = re.compile(r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ACTION_ID = re.compile(r"[a-z0-9_-]{1,64}")
_ACTION_URL = re.compile(r"https://[^\s\x00-\x1f\x7f]{1,2000}")
_BUTTON = ("display:inline-block;margin:0 8px 8px 0;padding:12px 20px;border-radius:4px;"
           "background:#1a56db;color:#ffffff;font-family:Arial,sans-serif;font-size:16px;"
           "font-weight:bold;line-height:1.2;text-decoration:none")


def mailbox(email: str, name: str | None, field: str) -> Mailbox:
    """Re-validate one address (ASCII form, IDN domains as punycode) with its display name."""
    return headers.mailbox(email, name, field, MAX_NAME)


def _mailboxes(entries: list[dict[str, Any]] | None, field: str) -> list[Mailbox]:
    return [mailbox(e.get("email", ""), e.get("name"), field) for e in entries or ()]


def envelope(*groups: list[Mailbox]) -> list[str]:
    """Recipient addresses in order, without case-insensitive duplicates."""
    seen: set[str] = set()
    out = []
    for address in (a.addr_spec for group in groups for a in group):
        if address.lower() not in seen:
            seen.add(address.lower())
            out.append(address)
    return out


def _actions(event: dict[str, Any], links: LinkBuilder | None, recipient: str | None,
             now: datetime) -> list[tuple[str, str]]:
    actions = event.get("actions") or []
    if not actions:
        return []
    if links is None:
        raise ComposeFailed("the message has actions but no link signer is configured")
    out = []
    for action in actions:
        action_id, url = action.get("id", ""), action.get("url")
        if not _ACTION_ID.fullmatch(action_id) or (url is not None
                                                   and not _ACTION_URL.fullmatch(url)):
            raise ComposeFailed(f"action {action_id!r}: bad id or url")
        label = " ".join(_CONTROL.sub(" ", str(action.get("label") or action_id)).split())
        out.append((label, links.action_url(event["message_id"], recipient, action_id, url,
                                            now=now)))
    return out


def with_buttons(html: str, actions: list[tuple[str, str]]) -> str:
    """Insert the action buttons before </body>, or append them."""
    buttons = "".join(f'<a href="{escape(url)}" style="{_BUTTON}">{escape(label)}</a>\n'
                      for label, url in actions)
    block = f'\n<div role="group" aria-label="Actions" style="margin:24px 0">\n{buttons}</div>\n'
    at = html.lower().rfind("</body>")
    return html[:at] + block + html[at:] if at >= 0 else html + block


def with_pixel(html: str, url: str) -> str:
    """Insert the open-tracking image before </body>, or append it."""
    img = (f'<img src="{escape(url)}" width="1" height="1" alt="" '
           'style="display:block;width:1px;height:1px;border:0">')
    at = html.lower().rfind("</body>")
    return html[:at] + img + html[at:] if at >= 0 else html + img


def _body(content: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, wire bytes with CRLF line ends) of a UTF-8 text body.

    7bit needs ASCII, no NUL and lines of at most 998 octets (RFC 5322 2.1.1);
    anything else goes quoted-printable (binascii's encoder: every byte outside
    printable ASCII, "=" and trailing whitespace encoded, lines of at most 76
    characters), which also keeps HTML readable. Line breaks are CR, LF or CRLF,
    as RFC 5322 and Python's parser read them; the body ends with one.
    """
    lines = content.encode("utf-8").splitlines()
    if content.isascii() and b"\0" not in content.encode("ascii") and all(
            len(x) <= 998 for x in lines):
        return "7bit", b"\r\n".join(lines) + b"\r\n"
    encoded = binascii.b2a_qp(b"\n".join(lines) + b"\n", istext=True)
    return "quoted-printable", encoded.replace(b"\n", b"\r\n")


def _part_head(subtype: str, cte: str) -> bytes:
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n").encode("ascii")


def _mime(text: str, html: str | None) -> tuple[list[str], bytes, bytes]:
    """(header names, MIME header lines, body) of the text part, or of text and html in
    multipart/alternative (RFC 2046: least faithful first)."""
    text_cte, text_body = _body(text)
    if html is None:
        return (["MIME-Version", "Content-Type", "Content-Transfer-Encoding"],
                b"MIME-Version: 1.0\r\n" + _part_head("plain", text_cte), text_body)
    html_cte, html_body = _body(html)
    while True:
        # "=_" never occurs in quoted-printable output ("=" is always followed by hex
        # digits or a line break); a 7bit body is searched.
        boundary = b"=_mailbus_" + secrets.token_hex(16).encode("ascii")
        if boundary not in text_body and boundary not in html_body:
            break
    head = (b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative;\r\n"
            b' boundary="' + boundary + b'"\r\n')
    body = b"".join((b"--", boundary, b"\r\n", _part_head("plain", text_cte), b"\r\n",
                     text_body, b"\r\n--", boundary, b"\r\n", _part_head("html", html_cte),
                     b"\r\n", html_body, b"\r\n--", boundary, b"--\r\n"))
    return ["MIME-Version", "Content-Type"], head, body


def _domain(domain: str | None, from_address: str) -> str:
    domain = domain or from_address.rpartition("@")[2]
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ComposeFailed(f"Message-ID domain {domain!r} is not a DNS name") from exc
    if not _DOMAIN.fullmatch(domain):
        raise ComposeFailed(f"Message-ID domain {domain!r} is not a DNS name")
    return domain.lower()


@dataclass(frozen=True)
class Content:
    """What a message says: its subject (and which field it came from) and bodies."""

    subject: str | None
    subject_field: str  # "subject" or "template subject", for failure reasons
    text: str | None  # derived from html when the event gives html alone
    html: str | None


def needs_sandbox(event: dict[str, Any]) -> bool:
    """Whether content() runs hostile work: a template, or text derived from html."""
    return bool(event.get("template")) or (event.get("html") is not None
                                           and event.get("text") is None)


INLINE_CHARS = 32_768  # bodies up to this size compose in well under a millisecond


def compose_inline(event: dict[str, Any], body: Content | None, *, signed: bool) -> bool:
    """Whether the message is small enough to compose on the event loop, not in a thread.

    DKIM signing (RSA) and large bodies go to a thread, so the loop never stalls on them.
    """
    if signed or event.get("attachments"):
        return False
    parts = (body.text, body.html) if body is not None else (event.get("text"),
                                                             event.get("html"))
    return sum(len(p or "") for p in parts) <= INLINE_CHARS and not event.get("template")


def content(event: dict[str, Any]) -> Content:
    """Render the template and fill in from the event; derive a text part from html alone."""
    subject, text, html = event.get("subject"), event.get("text"), event.get("html")
    field = "subject"
    template = event.get("template")
    if template:
        rendered = render(template, template.get("variables_json") or "{}")
        if rendered.subject is not None:
            subject, field = rendered.subject, "template subject"
        text = rendered.text if rendered.text is not None else text
        html = rendered.html if rendered.html is not None else html
    if html is not None and text is None:
        text = html_to_text(html)
    return Content(subject, field, text, html)


def tagged_reply_address(account: Account, keyring: Keyring, message_id: str) -> str:
    """from_address+<reply tag>: where replies to this message go, naming it."""
    try:
        return tagged_address(account.from_address, make_tag(keyring, message_id))
    except TokenError as exc:
        raise ComposeFailed(f"reply tag: {exc}") from exc


def _pairs(addresses: list[Mailbox]) -> list[tuple[str, str]]:
    return [(a.display_name, a.addr_spec) for a in addresses]


def compose(event: dict[str, Any], account: Account, links: LinkBuilder | None, *,
            now: datetime, domain: str | None = None, dkim: DkimSigner | None = None,
            body: Content | None = None, files: dict[str, bytes] | None = None) -> Outgoing:
    """Build, check and DKIM-sign if asked, the message of an email.requested event.

    `body` is content(event) when the caller computed it elsewhere (the sender does,
    in its sandbox process); without it, content(event) runs here. `files`: the bytes
    of the event's attachments by SHA-256 (attachments.fetch).
    """
    message_id = event.get("message_id")
    if not isinstance(message_id, str) or not _MESSAGE_ID.fullmatch(message_id):
        raise ComposeFailed("message_id must be a UUID-like token")
    if now.tzinfo is None:
        raise ComposeFailed("now must be timezone-aware")
    sender = mailbox(account.from_address, account.from_name, "from")
    to, cc = _mailboxes(event.get("to"), "to"), _mailboxes(event.get("cc"), "cc")
    bcc = _mailboxes(event.get("bcc"), "bcc")
    reply = event.get("reply_to")
    reply_to = mailbox(reply.get("email", ""), reply.get("name"), "reply_to") if reply else None
    if reply_to is None and account.reply_tags and links is not None:
        reply_to = mailbox(tagged_reply_address(account, links.keyring, message_id),
                           account.from_name, "reply_to")
    recipients = envelope(to, cc, bcc)
    if not recipients:
        raise ComposeFailed("the message has no recipients")
    msgid = f"<{message_id}@{_domain(domain, sender.addr_spec)}>"
    custom = headers.custom_headers(event.get("headers"))
    body = body or content(event)
    # A subject of whitespace alone folds to nothing: the message has no Subject.
    subject = header_text(body.subject, body.subject_field, MAX_SUBJECT) or None if (
        body.subject) else None
    text, html = body.text, body.html
    only = recipients[0] if len(recipients) == 1 else None  # whom a link may name
    try:
        actions = _actions(event, links, only, now)
        unsubscribe = (links.unsubscribe_links(message_id, only, now=now)
                       if links is not None and only is not None else [])
        pixel = (links.open_url(message_id, only, now=now)
                 if links is not None and links.open_tracking and html is not None else None)
    except TokenError as exc:
        raise ComposeFailed(f"links: {exc}") from exc

    # Every header is written here, pre-folded, from values checked above or built
    # from checked parts (message_id and the domain matched their patterns); the
    # parse-back check below reads the finished bytes as a receiver would.
    intended = Intended(subject=subject)
    head: list[tuple[str, str]] = []

    def mailboxes(name: str, addresses: list[Mailbox]) -> None:
        # Folded here (headers.mailbox_list), not by Python's folder, which loses
        # spaces in long non-ASCII names; remembered, so the check knows what was built.
        head.append((name, headers.mailbox_list(addresses)))
        intended.mailboxes[name] = _pairs(addresses)

    mailboxes("From", [sender])
    if to:
        mailboxes("To", to)
    if cc:
        mailboxes("Cc", cc)
    if reply_to:
        mailboxes("Reply-To", [reply_to])
    if subject:
        head.append(("Subject", headers.unstructured(subject)))
    head.append(("Date", format_datetime(now.astimezone(UTC))))
    head.append(("Message-ID", msgid))
    if unsubscribe:
        # One URI per line: each stays whole, whatever its length (under 998).
        head.append(("List-Unsubscribe", ",\r\n ".join(f"<{u}>" for u in unsubscribe)))
        head.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))  # RFC 8058
    head.append(("X-Mailbus-Message-Id", message_id))
    for name, value in custom:  # allow-listed names, checked values (headers.py)
        head.append((name, headers.unstructured(value)))
        intended.texts[name] = value

    text = text or ""
    if actions:
        lines = "\n".join(f"{label}: {url}" for label, url in actions)
        text = f"{text.rstrip()}\n\n{lines}\n" if text.strip() else f"{lines}\n"
        html = with_buttons(html, actions) if html is not None else None
    if pixel is not None and html is not None:
        html = with_pixel(html, pixel)
    mime_names, mime_head, body_bytes = _mime(text, html)
    body_pieces = [body_bytes]
    if event.get("attachments"):
        data = attachments.checked(event["attachments"], files or {})
        mime_names, mime_head, body_pieces = attachments.wrap(mime_head, body_bytes,
                                                              event["attachments"], data)
    intended.names = [name for name, _ in head] + mime_names
    try:
        raw = b"".join((*(f"{name}: {value}\r\n".encode("ascii") for name, value in head),
                        mime_head, b"\r\n", *body_pieces))
    except UnicodeEncodeError as exc:  # every value above is ASCII by construction
        raise ComposeFailed("headers: a header value is not ASCII") from exc
    if dkim is not None:
        raw = dkim.sign(raw)
        intended.names.insert(0, "DKIM-Signature")
    headers.check(raw, intended)  # the last word: nothing leaves that was not built
    return Outgoing(envelope_from=sender.addr_spec, recipients=recipients, raw=raw,
                    message_id_header=msgid)
