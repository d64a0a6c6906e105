"""What every transport (SMTP, Gmail API) promises, and how it reports failure.

The scheduler decides from the exception type alone: a TransientError is
retried later, a PermanentError fails the message, AccountExhausted parks
the account (and fails its pool messages over) without failing anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from mailbus.errors import MailbusError

_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


def enhanced_status(text: str) -> str | None:
    """The RFC 3463 enhanced status code at the start of an SMTP reply's text, if any."""
    match = _ENHANCED.match(text)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Outgoing:
    """One composed message, ready to hand over."""

    envelope_from: str
    recipients: list[str]  # envelope recipients: To + Cc + Bcc
    raw: bytes  # the RFC 5322 message, CRLF line endings, Bcc not in the headers
    message_id_header: str  # the Message-ID header value, with angle brackets


@dataclass(frozen=True)
class Accepted:
    """The first hop took the message for these recipients."""

    recipients: list[str]
    response: str | None = None  # SMTP: the final reply, e.g. "250 2.0.0 Ok: queued as X"
    provider_message_id: str | None = None  # Gmail: the message id it assigned
    rejected: dict[str, str] = field(default_factory=dict)  # recipient -> SMTP reply


class SendError(MailbusError):
    """A hand-over did not succeed."""


class TransientError(SendError):
    """Worth retrying later (4xx, connection trouble, 5xx from an HTTP API)."""

    def __init__(self, reason: str, *, code: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.code, self.retry_after = reason, code, retry_after


class Ambiguous(TransientError):
    """Lost after the message was handed over (a timeout or a drop after SMTP DATA, an
    HTTP call cut short): it may have been taken. The retry is flagged possible_duplicate
    (Gmail looks the message up first)."""


class PermanentError(SendError):
    """Will never succeed as it is (5xx SMTP reply, invalid message); the message fails."""

    def __init__(self, reason: str, *, code: int | None = None,
                 enhanced_status: str | None = None, recipient: str | None = None):
        super().__init__(reason)
        self.reason, self.code = reason, code
        self.enhanced_status, self.recipient = enhanced_status, recipient


class AccountExhausted(SendError):
    """The provider says the account's quota or rate is used up; the message itself is fine."""

    def __init__(self, reason: str, *, until: datetime | None = None,
                 retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.until, self.retry_after = reason, until, retry_after


class Transport(Protocol):
    """One account's way out."""

    async def send(self, message: Outgoing) -> Accepted:
        """Hand the message over; raises a SendError subclass when it was not accepted."""
        ...

    async def find_sent(self, message_id_header: str) -> Accepted | None:
        """The earlier hand-over of this Message-ID if the provider can tell, else None.

        Used after a crash between sending and recording: Gmail can search the
        account's sent mail; SMTP cannot know and returns None.
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
