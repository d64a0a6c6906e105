"""Delivery reports: per-recipient results of RFC 3464 DSNs, and of plain-text bounces.

Pure functions over fields the MIME reader (`mime.py`) gathered; every scan
is line by line with a cap on the lines, or a pattern that cannot backtrack
over more than a bounded stretch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mailbus.replies.mime import ADDRESS, Headers, addresses, first
from mailbus.replies.text import cap

BounceClass = Literal["hard", "soft", "unknown"]

MAX_BOUNCE_LINES = 2000
MAX_DIAGNOSTIC = 1000
MAX_RECIPIENTS = 100
# 5.x.x statuses that say nothing against the address: mailbox full, message
# too big, delivery time expired.
SOFT_PERMANENT = frozenset({"5.2.2", "5.2.3", "5.3.4", "5.4.7"})

_STATUS = re.compile(r"(?<![\w.])([245]\.\d{1,3}\.\d{1,3})(?![\w.])")
_SMTP_CODE = re.compile(r"(?<!\d)([245])\d\d(?:[ -]|$)")
DAEMON = re.compile(r"^(?:mailer-daemon|mail-daemon|postmaster|mailerdaemon)@", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|returned mail|delivery status notification|delivery (?:failure|has failed)"
    r"|mail delivery (?:failed|failure|system)|failure notice|could not be delivered"
    r"|non[- ]?delivery|unzustellbar|nicht zugestellt|non remis|échec de (?:la )?remise", re.I)
_DELAY_SUBJECT = re.compile(r"\bdelay|\bwarning\b|still trying|verzögert|retardé", re.I)
# Where the quoted original starts in a plain-text bounce.
_QUOTED_HEADER = re.compile(
    r"^[ \t]*(?:Return-Path|Received|Message-ID|From|Date|Subject|To|Content-Type|MIME-Version"
    r"|X-Mailbus-Message-Id)[ \t]*:", re.I)


@dataclass(frozen=True)
class DsnResult:
    """One recipient of a delivery report; `bounce_class` is None unless the action failed."""

    recipient: str | None
    action: str
    status: str | None
    bounce_class: BounceClass | None
    diagnostic: str | None


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


def dsn_result(block: Headers) -> DsnResult:
    original = _recipient(first(block, "original-recipient"), xtext=True)
    recipient = original or _recipient(first(block, "final-recipient"), xtext=False)
    action = ((first(block, "action") or "").split() or ["failed"])[0].lower()
    diagnostic = _diagnostic(first(block, "diagnostic-code"))
    found = _STATUS.search(first(block, "status") or "") or _STATUS.search(diagnostic or "")
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


def looks_like_bounce(head: Headers, sender: str | None, subject: str) -> bool:
    if "x-failed-recipients" in head:
        return True
    null_path = any(value.strip() in ("<>", "") for value in head.get("return-path", []))
    daemon = bool(sender and DAEMON.match(sender))
    return (null_path or daemon) and bool(_BOUNCE_SUBJECT.search(subject))


def plain_bounce(head: Headers, body: str, subject: str) -> tuple[DsnResult, ...]:
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
    recipients = addresses(head.get("x-failed-recipients", []))
    if not recipients:  # the first address named that is neither ours nor the daemon's
        ours = set(addresses(head.get("to", [])))
        recipients = [found.lower() for found in ADDRESS.findall(text)
                      if not DAEMON.match(found) and found.lower() not in ours][:1]
    klass = bounce_class(action, status, diagnostic)
    named: list[str | None] = [*recipients[:MAX_RECIPIENTS]] or [None]
    return tuple(DsnResult(recipient, action, status, klass, diagnostic) for recipient in named)
