"""One SMTP client session on an asyncio protocol, with command pipelining (RFC 2920).

A transaction is MAIL, one RCPT per recipient, DATA, then the message. Sent
one command at a time that is four round trips and four writes and wakeups
for each message, which is most of what a sender spends per message on a
fast relay. When the server offers PIPELINING (Postfix, Exim, Gmail's and
every large provider's submission servers do), the commands up to DATA go in
one write and their replies are read together. A session also chains
transactions: the next transaction's commands go in the same write as this
one's message content (RFC 2920 3.1 allows content first in a group), so in
steady state a message costs one write and one wait. At most two
transactions share a session: one waiting for the reply to its content, the
next between its commands and its content. Without PIPELINING, one command
at a time and one transaction at a time.

What this client does, and no more: the greeting, EHLO, STARTTLS (required
when configured: never a fall back to plain text), implicit TLS, AUTH PLAIN or
LOGIN, the transaction, RSET and QUIT. The envelope addresses must be plain
(no space, control character or angle bracket: they come from validated
addresses, and anything else is refused before a byte is written); the
message must have CRLF line ends (compose writes them) and is dot-stuffed
here. Replies are capped in length and line count, so a hostile server cannot
make the client buffer without end.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

MAX_LINE = 4096  # octets of one reply line (RFC 5321 asks 512 of the server)
MAX_LINES = 100  # lines of one reply
_PLAIN_ADDRESS = re.compile(r"[!-;=?-~]{1,512}")  # printable ASCII but < and >
_LEADING_DOT = re.compile(rb"(?m)^\.")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: its code and text (lines joined by newlines)."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class ReplyError(Exception):
    """The server answered a command with an unexpected reply."""

    def __init__(self, reply: Reply, command: str, recipient: str | None = None):
        super().__init__(f"{command}: {reply}")
        self.reply, self.command, self.recipient = reply, command, recipient


class AuthError(ReplyError):
    """The server refused the account's credentials."""


class Disconnected(ConnectionError):
    """The connection closed, or broke the protocol, while a reply was awaited."""


class LostAfterData(Exception):
    """The message went out, and its reply was lost: the server may have taken it."""


class _Protocol(asyncio.Protocol):
    """Turns received bytes into replies, each handed to the oldest expectation.

    Expectations are registered when the commands are written, in the order
    they are written, so transactions chained on one session each get their
    own replies.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[tuple[int, str]] = []
        self._arrived: deque[Reply] = deque()  # replies nobody expected yet
        self._expected: deque[asyncio.Future[Reply]] = deque()
        self._error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's and uvloop's (which does not subclass asyncio.Transport) alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._error is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    self._fail(Disconnected("a reply line longer than the cap"))
                break
            line = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[:end + 1]
            if len(line) > MAX_LINE or len(line) < 3 or not line[:3].isdigit() or (
                    line[3:4] not in (b"", b" ", b"-")):
                self._fail(Disconnected(f"not an SMTP reply line: {line[:80]!r}"))
                break
            code = int(line[:3])
            self._lines.append((code, line[4:].decode("utf-8", "replace")))
            if len(self._lines) > MAX_LINES:
                self._fail(Disconnected("a reply of more lines than the cap"))
                break
            if line[3:4] != b"-":
                self._deliver(Reply(code, "\n".join(t for _, t in self._lines)))
                self._lines = []

    def _deliver(self, reply: Reply) -> None:
        while self._expected:
            waiter = self._expected.popleft()
            if not waiter.done():  # one that timed out: its reply is spent with it
                waiter.set_result(reply)
                return
        if len(self._arrived) >= MAX_LINES:
            self._fail(Disconnected("more replies than commands"))
            return
        self._arrived.append(reply)

    @property
    def unread(self) -> bool:
        """Bytes or replies arrived that no command asked for yet."""
        return bool(self._buffer or self._lines or self._arrived)

    def _fail(self, error: Exception) -> None:
        self._error = error
        if self.transport is not None:
            self.transport.abort()
        self._fail_waiters()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            self._error = Disconnected(f"connection closed{f': {exc}' if exc else ''}")
        self.transport = None
        self._fail_waiters()

    def _fail_waiters(self) -> None:
        assert self._error is not None
        while self._expected:
            waiter = self._expected.popleft()
            if not waiter.done():
                _set_error(waiter, self._error)

    def expect(self) -> asyncio.Future[Reply]:
        """The next reply to arrive that no earlier expectation takes."""
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        if self._arrived:
            waiter.set_result(self._arrived.popleft())
        elif self._error is not None:
            _set_error(waiter, self._error)
        else:
            self._expected.append(waiter)
        return waiter


async def _within(waiter: asyncio.Future[Reply], timeout: float) -> Reply:
    """The reply, waiting up to `timeout` seconds for it.

    A timer only while waiting: pipelined replies usually arrive together, and
    the ones already read cost no timer (asyncio.timeout() around each read
    cost a twentieth of the sender's time at volume).
    """
    if not waiter.done():
        timer = asyncio.get_running_loop().call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
    return waiter.result()


def _set_error(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fail a future that its task may no longer await (it failed or was cancelled
    first): asyncio would log each such one as never retrieved."""
    future.set_exception(error)
    future.exception()


def _expire(waiter: asyncio.Future[Reply]) -> None:
    if not waiter.done():
        _set_error(waiter, TimeoutError("no SMTP reply in time"))


@dataclass
class _Next:
    """A transaction waiting for its turn to write its commands."""

    commands: bytes
    replies: int  # how many replies its commands get
    turn: asyncio.Future[list[asyncio.Future[Reply]]]


@cache
def local_hostname() -> str:
    """The name said in EHLO (looked up once: getfqdn may ask DNS)."""
    return socket.getfqdn()


class Session:
    """One connected, greeted (and, if configured, encrypted and logged-in) session."""

    def __init__(self, protocol: _Protocol, timeout: float):
        self._protocol, self.timeout = protocol, timeout
        self.extensions: dict[str, str] = {}
        self.broken = False  # set once anything failed: the session is not reused
        # The turn: held by the transaction between its commands and its content
        # (or, without pipelining or on an error path, until it ends).
        self._turn_held = False
        self._waiting: deque[_Next] = deque()
        self.transactions = 0  # started and not ended on this session

    @property
    def capacity(self) -> int:
        """Transactions this session carries at once: two chained with PIPELINING."""
        return 2 if "pipelining" in self.extensions else 1

    @classmethod
    async def open(cls, host: str, port: int, *, tls: str, context: ssl.SSLContext | None,
                   timeout: float, username: str | None = None, password: str | None = None,
                   helo: str | None = None) -> Session:
        """Connect, read the greeting, EHLO, STARTTLS and EHLO again, AUTH."""
        loop = asyncio.get_running_loop()
        context = context or ssl.create_default_context()
        helo = helo or local_hostname()
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(
                _Protocol, host, port, ssl=context if tls == "implicit" else None,
                server_hostname=host if tls == "implicit" else None)
        session = cls(protocol, timeout)
        try:
            await session._expect(await session._read(), 220, "greeting")
            await session._ehlo(helo)
            if tls == "starttls":
                if "starttls" not in session.extensions:
                    raise ReplyError(Reply(502, "the server does not offer STARTTLS"),
                                     "STARTTLS")
                await session._command(b"STARTTLS\r\n", 220, "STARTTLS")
                if protocol.unread:
                    # Anything after the 220 came in clear text and would be read as
                    # replies from inside TLS: an injection (CVE-2011-0411's kind).
                    raise Disconnected("data after the STARTTLS reply, before TLS")
                transport = protocol.transport
                assert transport is not None
                async with asyncio.timeout(timeout):
                    new = await loop.start_tls(transport, protocol, context,
                                               server_hostname=host)
                protocol.transport = cast(asyncio.Transport, new)
                await session._ehlo(helo)
            if username:
                await session._login(username, password or "")
        except BaseException:
            session.close()
            raise
        return session

    @property
    def connected(self) -> bool:
        return not self.broken and self._protocol.transport is not None

    def _write(self, data: bytes) -> None:
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            self.broken = True
            raise Disconnected("connection closed")
        transport.write(data)

    async def _read(self, waiter: asyncio.Future[Reply] | None = None) -> Reply:
        """The reply `waiter` expects (default: the next one)."""
        try:
            reply = await _within(waiter or self._protocol.expect(), self.timeout)
        except BaseException:
            self.broken = True
            raise
        if reply.code == 421:  # the server is closing this session (RFC 5321 3.8)
            self.broken = True
        return reply

    @staticmethod
    async def _expect(reply: Reply, code: int, command: str) -> Reply:
        if reply.code != code:
            raise ReplyError(reply, command)
        return reply

    async def _command(self, line: bytes, code: int, command: str) -> Reply:
        self._write(line)
        return await self._expect(await self._read(), code, command)

    async def _ehlo(self, helo: str) -> None:
        reply = await self._command(f"EHLO {helo}\r\n".encode("ascii"), 250, "EHLO")
        self.extensions = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _, params = line.strip().partition(" ")
            self.extensions[keyword.lower()] = params

    async def _login(self, username: str, password: str) -> None:
        mechanisms = self.extensions.get("auth", "").upper().split()
        try:
            if "PLAIN" in mechanisms or "LOGIN" not in mechanisms:
                token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
                await self._command(f"AUTH PLAIN {token}\r\n".encode("ascii"), 235, "AUTH")
                return
            await self._command(b"AUTH LOGIN\r\n", 334, "AUTH")
            await self._command(base64.b64encode(username.encode()) + b"\r\n", 334, "AUTH")
            await self._command(base64.b64encode(password.encode()) + b"\r\n", 235, "AUTH")
        except ReplyError as exc:
            raise AuthError(exc.reply, "AUTH") from None

    async def send(self, sender: str, recipients: list[str], message: bytes
                   ) -> tuple[dict[str, Reply], Reply]:
        """One transaction: (the recipients refused and their replies, the final reply).

        Raises ReplyError for MAIL refused, every recipient refused, or DATA
        refused (the transaction is reset where it can be); Disconnected or
        TimeoutError when the connection failed before the message went out;
        LostAfterData when it failed after. Up to `capacity` transactions may
        run at once; they take turns on the wire.
        """
        self.transactions += 1
        try:
            for address in (sender, *recipients):
                if not _PLAIN_ADDRESS.fullmatch(address):
                    raise ValueError(f"envelope address {address!r} is not plain")
            commands = [f"MAIL FROM:<{sender}>\r\n".encode("ascii")] + [
                f"RCPT TO:<{r}>\r\n".encode("ascii") for r in recipients] + [b"DATA\r\n"]
            content = _LEADING_DOT.sub(b"..", message)
            if not content.endswith(b"\r\n"):
                content += b"\r\n"
            return await self._transact(commands, recipients, content + b".\r\n")
        finally:
            self.transactions -= 1

    async def _transact(self, commands: list[bytes], recipients: list[str], content: bytes
                        ) -> tuple[dict[str, Reply], Reply]:
        pipelining = "pipelining" in self.extensions
        held = False  # whether this transaction holds the turn
        try:
            if pipelining:
                expected = await self._take_turn(b"".join(commands), len(commands))
                held = True
                replies = [await self._read(w) for w in expected]
            else:
                await self._take_turn(b"", 0)
                held = True
                replies = []
                for command in commands:
                    self._write(command)
                    replies.append(await self._read())
                    if replies[0].code != 250:
                        break
            mail = replies[0]
            if mail.code != 250:
                await self._reset()
                raise ReplyError(mail, "MAIL")
            refused = {r: reply for r, reply in zip(recipients, replies[1:-1], strict=True)
                       if reply.code not in (250, 251)}
            data = replies[-1]
            if len(refused) == len(recipients):
                if data.code == 354:  # RFC 2920 3.1: end the empty message; it is refused
                    self._write(b".\r\n")
                    await self._read()
                await self._reset()
                first = next(iter(refused))
                raise ReplyError(refused[first], "RCPT", first)
            if data.code != 354:
                await self._reset()
                raise ReplyError(data, "DATA")
            try:
                if pipelining:
                    # The content, and the next transaction's commands in the same write.
                    final_waiter: asyncio.Future[Reply] | None = self._pass_turn(content)
                    held = False
                else:
                    self._write(content)
                    final_waiter = None
                final = await self._read(final_waiter)
            except (Disconnected, TimeoutError, OSError) as exc:
                raise LostAfterData(f"{type(exc).__name__}: {exc}") from exc
            if final.code != 250:
                raise ReplyError(final, "DATA")
            return refused, final
        finally:
            if held:
                self._release_turn()

    async def _take_turn(self, commands: bytes, replies: int) -> list[asyncio.Future[Reply]]:
        """Write these commands once no other transaction is between its commands and
        its content; the expectations of their replies."""
        if not self._turn_held and not self._waiting:
            self._turn_held = True
            try:
                if commands:
                    self._write(commands)
            except BaseException:
                self._release_turn()
                raise
            return [self._protocol.expect() for _ in range(replies)]
        turn: asyncio.Future[list[asyncio.Future[Reply]]] = (
            asyncio.get_running_loop().create_future())
        self._waiting.append(_Next(commands, replies, turn))
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                # Its commands went out with nobody left to read their replies.
                self.broken = True
                self._release_turn()
            raise

    def _pass_turn(self, content: bytes) -> asyncio.Future[Reply]:
        """Write this transaction's content, chained with the next waiting transaction's
        commands, and hand it the turn; the expectation of the content's reply."""
        final = self._protocol.expect()
        nxt = self._next_waiting()
        try:
            self._write(content + nxt.commands if nxt is not None else content)
        except BaseException as exc:
            if nxt is not None:
                _set_error(nxt.turn, Disconnected(f"connection closed: {exc}"))
            self._turn_held = False
            self._fail_waiting()
            raise
        if nxt is None:
            self._turn_held = False
        else:
            nxt.turn.set_result([self._protocol.expect() for _ in range(nxt.replies)])
        return final

    def _release_turn(self) -> None:
        """The holder is done with the wire: the next waiting transaction writes."""
        self._turn_held = False
        if not self.connected:
            self._fail_waiting()
            return
        nxt = self._next_waiting()
        if nxt is None:
            return
        self._turn_held = True
        try:
            if nxt.commands:
                self._write(nxt.commands)
        except Disconnected as exc:
            self._turn_held = False
            _set_error(nxt.turn, exc)
            self._fail_waiting()
            return
        nxt.turn.set_result([self._protocol.expect() for _ in range(nxt.replies)])

    def _next_waiting(self) -> _Next | None:
        while self._waiting:
            nxt = self._waiting.popleft()
            if not nxt.turn.done():  # not cancelled meanwhile
                return nxt
        return None

    def _fail_waiting(self) -> None:
        while self._waiting:
            nxt = self._waiting.popleft()
            if not nxt.turn.done():
                _set_error(nxt.turn, Disconnected("the session failed before its turn"))

    async def _reset(self) -> None:
        try:
            await self._command(b"RSET\r\n", 250, "RSET")
        except (ReplyError, Disconnected, TimeoutError):
            self.broken = True

    async def quit(self) -> None:
        """QUIT politely (best effort), then close."""
        try:
            self._write(b"QUIT\r\n")
            await _within(self._protocol.expect(), min(self.timeout, 5.0))
        except (Disconnected, TimeoutError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.broken = True
        self._fail_waiting()
        transport = self._protocol.transport
        if transport is not None:
            transport.close()
