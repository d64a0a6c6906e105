"""The Gmail API transport: one account's mail goes out through users.messages.send.

The client (credentials, token refresh, a connection per worker thread) is
the core's `mailbus.gmail`, shared with the replies service and `mailbus
doctor`; this module sends with it, looks earlier sends up (find_sent), and
says what a failure means for the scheduler (`classify_api_error`).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import google.auth.exceptions
import httplib2

from mailbus.gmail import GOOGLE_API_ENDPOINT, GmailClient, failure
from mailbus.logs import Health
from mailbus.sender.transport import (
    Accepted,
    AccountExhausted,
    Ambiguous,
    Outgoing,
    PermanentError,
    SendError,
    TransientError,
)

log = logging.getLogger(__name__)


class GmailTransport(GmailClient):
    """One Gmail account's way out (the Transport protocol)."""

    def __init__(self, credentials: Any, *, account_id: str,
                 api_endpoint: str = GOOGLE_API_ENDPOINT, token_file: Path | None = None,
                 timeout: float = 30.0, clock: Callable[[], datetime] | None = None):
        self._clock = clock or (lambda: datetime.now(UTC))
        # Connected (the first call through), failed (why), recovered: one log line each.
        self.health = Health(log, f"account {account_id}: Gmail transport",
                             account=account_id, endpoint=api_endpoint,
                             credentials=type(credentials).__module__.rpartition(".")[2])
        super().__init__(credentials, account_id=account_id, api_endpoint=api_endpoint,
                         token_file=token_file, timeout=timeout)

    async def send(self, message: Outgoing) -> Accepted:
        raw = base64.urlsafe_b64encode(_with_bcc(message)).decode()
        users = self.service.users()
        try:
            result = await self._run(lambda: users.messages().send(userId="me",
                                                                   body={"raw": raw}))
        except TransientError as exc:
            if isinstance(exc.__cause__, (TimeoutError, OSError, httplib2.HttpLib2Error,
                                          google.auth.exceptions.TransportError)):
                # The request may have reached Gmail: the retry looks the message up by
                # its Message-ID first (find_sent) and is flagged if it sends again.
                raise Ambiguous(exc.reason, code=exc.code) from exc
            raise
        return Accepted(recipients=list(message.recipients), response=None,
                        provider_message_id=result.get("id"))

    async def find_sent(self, message_id_header: str) -> Accepted | None:
        """Search the account's sent mail; raises TransientError when Gmail cannot tell."""
        wanted = message_id_header.strip().strip("<>")
        messages = self.service.users().messages()
        found = await self._run(lambda: messages.list(
            userId="me", q=f"rfc822msgid:{wanted} in:sent", maxResults=1))
        if not found.get("messages"):
            return None
        gmail_id = found["messages"][0]["id"]
        meta = await self._run(lambda: messages.get(
            userId="me", id=gmail_id, format="metadata", metadataHeaders=["To", "Cc", "Bcc"]))
        headers = meta.get("payload", {}).get("headers", [])
        return Accepted(recipients=[a for _, a in getaddresses([h["value"] for h in headers])],
                        provider_message_id=gmail_id)

    async def _run(self, make_request: Callable[[], Any]) -> dict[str, Any]:
        """Execute in a worker thread; every failure comes out as a SendError."""
        if self.closed:
            raise TransientError(f"Gmail transport for {self.account_id} is closed")
        try:
            result = await self.execute(make_request)
        except Exception as exc:  # the scheduler understands SendError only
            error = classify_api_error(exc, self._clock())
            # Credentials refused, Gmail unreachable or failing: the account's way out
            # is down. A message refused or a rate limit says nothing about it.
            if isinstance(error, TransientError):
                self.health.down(error.reason)
            raise error from exc
        if self.health.failing or not self.health.connected:
            self.health.up()
        return result


def classify_api_error(exc: BaseException, now: datetime) -> SendError:
    """What a failed Gmail call means for the scheduler."""
    if isinstance(exc, SendError):
        return exc
    found = failure(exc, now)
    if found.kind in ("sending_limit", "rate_limit"):
        return AccountExhausted(found.reason, until=found.until, retry_after=found.retry_after)
    if found.kind == "refused":
        return PermanentError(found.reason, code=found.code)
    return TransientError(found.reason, code=found.code)


def _with_bcc(message: Outgoing) -> bytes:
    """Gmail takes recipients from the To/Cc/Bcc headers only, with no separate envelope.

    Envelope recipients the headers do not name (blind copies) go in a Bcc header, which
    Gmail strips from the copies it delivers.
    """
    headers = BytesHeaderParser(policy=compat32).parsebytes(message.raw)
    named = {a.lower() for _, a in getaddresses(
        [str(v) for h in ("To", "Cc", "Bcc") for v in headers.get_all(h, [])])}
    extra = [r for r in message.recipients if r.lower() not in named]
    if not extra:
        return message.raw
    return b"Bcc: " + ",\r\n ".join(extra).encode() + b"\r\n" + message.raw
