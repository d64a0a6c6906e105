"""The SMTP transport: a pool of reused, pipelining sessions per account (smtpwire.py)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from pathlib import Path

from mailbus.accounts import Account
from mailbus.logs import Health
from mailbus.sender.smtpwire import (
    AuthError,
    Disconnected,
    LostAfterData,
    ReplyError,
    Session,
)
from mailbus.sender.transport import (
    Accepted,
    Ambiguous,
    Outgoing,
    PermanentError,
    SendError,
    TransientError,
    enhanced_status,
)

log = logging.getLogger(__name__)


def classify_smtp_reply(code: int, text: str,
                        recipient: str | None = None) -> TransientError | PermanentError:
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
    closed and replaced, never reused. A message goes to an idle session, else
    to a new one while fewer than `connections` are open, else chained on a
    pipelining session that carries one transaction (smtpwire.py).
    """

    def __init__(self, account: Account, tls_context: ssl.SSLContext | None = None):
        assert account.smtp is not None
        self.account = account
        self.cfg = account.smtp
        if tls_context is None and self.cfg.ca_file is not None:
            tls_context = ssl.create_default_context(cafile=str(self.cfg.ca_file))
        self._tls_context = tls_context
        self._sessions: list[Session] = []  # connected, in use or idle
        self._connecting = 0
        # Sends waiting for room, woken one at a time as transactions end (waking
        # them all at each would cost every waiter a look per message).
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._open = 0
        self._password = (Path(self.cfg.password_file).expanduser().read_text().strip()
                          if self.cfg.password_file else None)
        # Connected, failed (why), recovered: one log line each (never the password).
        self.health = Health(log, f"account {account.id}: SMTP connection",
                             account=account.id, host=self.cfg.host, port=self.cfg.port,
                             tls=self.cfg.tls, user=self.cfg.username or "-")

    def password_changed(self) -> bool:
        """Whether the password file now holds another password than the one in use
        (a rotation: the file is read once, when the transport is built)."""
        if not self.cfg.password_file:
            return False
        try:
            now = Path(self.cfg.password_file).expanduser().read_text().strip()
        except OSError:  # unreadable now: keep what works (`mailbus doctor` says why)
            return False
        return now != self._password

    @property
    def open_connections(self) -> int:
        """Sessions currently connected."""
        return self._open

    async def _connect(self) -> Session:
        cfg = self.cfg
        self._connecting += 1
        try:
            session = await Session.open(
                cfg.host, cfg.port, tls=cfg.tls, context=self._tls_context,
                timeout=cfg.timeout_seconds, username=cfg.username,
                password=self._password if cfg.username else None)
        finally:
            self._connecting -= 1
            self._wake_one()
        self._open += 1
        self._sessions.append(session)
        self.health.up(open_connections=self._open)
        return session

    def _discard(self, session: Session) -> None:
        if session in self._sessions:
            self._sessions.remove(session)
            self._open -= 1
        session.close()
        self._wake_one()

    async def _session(self) -> Session | None:
        """A session with room for one more transaction; None: open a new one."""
        while True:
            best: Session | None = None
            for session in self._sessions:
                if session.connected and session.transactions < session.capacity and (
                        best is None or session.transactions < best.transactions):
                    best = session
            if best is not None and best.transactions == 0:
                return best
            if len(self._sessions) + self._connecting < self.cfg.connections:
                return None
            if best is not None:
                return best
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the room goes to the next
                raise

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _open_session(self) -> Session:
        """A new session, or the SendError that says why there is none."""
        try:
            return await self._connect()
        except AuthError as exc:
            # The account's credentials, not the message, are wrong:
            # retried (and visible in the reason) until someone fixes them.
            error: SendError = TransientError(
                f"{exc.reply.code} authentication failed for account"
                f" {self.account.id}: {exc.reply.text}", code=exc.reply.code)
            self.health.down(error.reason)
            raise error from exc
        except ReplyError as exc:
            error = classify_smtp_reply(exc.reply.code, exc.reply.text)
            self.health.down(f"refused: {error.reason}")
            raise error from exc
        except (TimeoutError, Disconnected, ssl.SSLError, OSError) as exc:
            error = TransientError(f"cannot connect to {self.cfg.host}:{self.cfg.port}:"
                                   f" {type(exc).__name__}: {exc}")
            self.health.down(error.reason)
            raise error from exc

    async def send(self, message: Outgoing) -> Accepted:
        """One SMTP transaction on a pooled session."""
        session = await self._session() or await self._open_session()
        try:
            refused, final = await session.send(message.envelope_from,
                                                message.recipients, message.raw)
        except LostAfterData as exc:
            # The message may be on the server already: its reply was lost.
            self._discard(session)
            self.health.down(f"connection lost after DATA: {exc}")
            raise Ambiguous(f"no reply to DATA: {exc}") from exc
        except ReplyError as exc:
            if session.connected:
                self._wake_one()
            else:
                self._discard(session)
            raise classify_smtp_reply(exc.reply.code, exc.reply.text, exc.recipient) from exc
        except (TimeoutError, Disconnected, OSError) as exc:
            self._discard(session)
            self.health.down(f"connection lost: {type(exc).__name__}: {exc}")
            raise TransientError(f"SMTP error: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self._discard(session)
            raise
        if session.connected:
            self._wake_one()
        else:
            self._discard(session)
        return Accepted(recipients=[r for r in message.recipients if r not in refused],
                        response=str(final),
                        rejected={r: str(reply) for r, reply in refused.items()})

    async def find_sent(self, message_id_header: str) -> Accepted | None:
        """SMTP cannot tell whether an earlier session delivered a message."""
        return None

    async def close(self) -> None:
        """QUIT every session (the worker drained its deliveries first)."""
        sessions, self._sessions = self._sessions, []
        for session in sessions:
            await session.quit()
            self._open -= 1
