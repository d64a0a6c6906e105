"""The SMTP transport: a pool of reused connections per account (aiosmtplib)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from mailbus.accounts import Account
from mailbus.sender.transport import (
    Accepted,
    Ambiguous,
    Outgoing,
    PermanentError,
    TransientError,
    enhanced_status,
)

log = logging.getLogger(__name__)


def classify(code: int, text: str, recipient: str | None = None) -> TransientError | PermanentError:
    """An SMTP reply as the error it is: 4xx transient, 5xx permanent (RFC 5321 4.2.1)."""
    reason = f"{code} {text}".strip()
    if 400 <= code < 500:
        return TransientError(reason, code=code)
    if 500 <= code < 600:
        return PermanentError(reason, code=code, enhanced_status=enhanced_status(text),
                              recipient=recipient)
    # Anything else (a client-side timeout shows as -1, say) is worth a retry.
    return TransientError(reason, code=code if code > 0 else None)


class SmtpTransport:
    """Submits over SMTP; keeps up to `connections` sessions open and reuses them.

    Opening a connection (TCP, EHLO, STARTTLS, AUTH) costs several round
    trips; a session carries many transactions, so the pool pays it once per
    connection, not once per message. A connection that failed in any way is
    closed and replaced, never reused.
    """

    def __init__(self, account: Account, tls_context: ssl.SSLContext | None = None):
        assert account.smtp is not None
        self.account = account
        self.cfg = account.smtp
        if tls_context is None and self.cfg.ca_file is not None:
            tls_context = ssl.create_default_context(cafile=str(self.cfg.ca_file))
        self._tls_context = tls_context
        self._idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.cfg.connections)
        self._open = 0
        self._password = (Path(self.cfg.password_file).expanduser().read_text().strip()
                          if self.cfg.password_file else None)

    @property
    def open_connections(self) -> int:
        """Sessions currently connected."""
        return self._open

    async def _connect(self) -> aiosmtplib.SMTP:
        cfg = self.cfg
        client = aiosmtplib.SMTP(
            hostname=cfg.host, port=cfg.port, timeout=cfg.timeout_seconds,
            use_tls=cfg.tls == "implicit",
            # STARTTLS is required when configured: never fall back to plain text.
            start_tls=True if cfg.tls == "starttls" else False,
            tls_context=self._tls_context,
        )
        await client.connect()
        if cfg.username:
            await client.login(cfg.username, self._password or "")
        self._open += 1
        return client

    async def _discard(self, client: aiosmtplib.SMTP) -> None:
        self._open -= 1
        try:
            client.close()
        except Exception:
            log.debug("closing a broken SMTP connection failed", exc_info=True)

    async def send(self, message: Outgoing) -> Accepted:
        """One SMTP transaction on a pooled connection."""
        async with self._slots:
            try:
                client = self._idle.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    client = await self._connect()
                except SMTPAuthenticationError as exc:
                    # The account's credentials, not the message, are wrong:
                    # retried (and visible in the reason) until someone fixes them.
                    raise TransientError(f"{exc.code} authentication failed for account"
                                         f" {self.account.id}: {exc.message}",
                                         code=exc.code) from exc
                except SMTPResponseException as exc:
                    raise classify(exc.code, exc.message) from exc
                except (TimeoutError, SMTPException, OSError) as exc:
                    raise TransientError(f"cannot connect to {self.cfg.host}:{self.cfg.port}:"
                                         f" {exc}") from exc
            try:
                refused, response = await self._transaction(client, message)
            except Ambiguous:
                await self._discard(client)
                raise
            except SMTPServerDisconnected as exc:
                await self._discard(client)
                raise TransientError(f"server disconnected: {exc}") from exc
            except SMTPResponseException as exc:
                await self._discard(client)
                raise classify(exc.code, exc.message) from exc
            except (TimeoutError, SMTPException, OSError) as exc:
                await self._discard(client)
                raise TransientError(f"SMTP error: {exc}") from exc
            await self._release(client)
        accepted = [r for r in message.recipients if r not in refused]
        return Accepted(recipients=accepted, response=response, rejected=refused)

    @staticmethod
    async def _transaction(client: aiosmtplib.SMTP, message: Outgoing
                           ) -> tuple[dict[str, str], str]:
        """MAIL, RCPT per recipient, DATA; returns the refused recipients and the final reply.

        Done step by step rather than with sendmail(), which drops the reply
        code: the event records the server's whole final reply.
        """
        await client.mail(message.envelope_from)
        refused: dict[str, str] = {}
        first_error: SMTPRecipientRefused | None = None
        for rcpt in message.recipients:
            try:
                await client.rcpt(rcpt)
            except SMTPRecipientRefused as exc:
                refused[rcpt] = f"{exc.code} {exc.message}"
                first_error = first_error or exc
        if first_error is not None and len(refused) == len(message.recipients):
            await client.rset()
            raise classify(first_error.code, first_error.message, first_error.recipient)
        try:
            reply = await client.data(message.raw)
        except (TimeoutError, SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
            # The message may be on the server already: its reply was lost.
            raise Ambiguous(f"no reply to DATA: {type(exc).__name__}: {exc}") from exc
        return refused, f"{reply.code} {reply.message}"

    async def _release(self, client: aiosmtplib.SMTP) -> None:
        if client.is_connected:
            self._idle.put_nowait(client)
        else:
            await self._discard(client)

    async def find_sent(self, message_id_header: str) -> Accepted | None:
        """SMTP cannot tell whether an earlier session delivered a message."""
        return None

    async def close(self) -> None:
        """QUIT every idle connection."""
        while not self._idle.empty():
            client = self._idle.get_nowait()
            try:
                await client.quit()
            except (TimeoutError, SMTPException, OSError):
                client.close()
            self._open -= 1
