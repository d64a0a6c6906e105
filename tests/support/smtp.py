"""A real SMTP server in the test process (aiosmtpd), scriptable per recipient and per message."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class Received:
    """One accepted transaction."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def message(self) -> EmailMessage:
        return BytesParser(policy=policy.default).parsebytes(self.data)  # type: ignore[return-value]


class ScriptedHandler:
    """Accepts mail unless a rule says otherwise; records what it accepted."""

    def __init__(self, pipelining: bool = True) -> None:
        # Offer PIPELINING (RFC 2920), as Postfix and the large providers do:
        # aiosmtpd reads commands line by line, so pipelined ones are answered in order.
        self.pipelining = pipelining
        self.received: list[Received] = []
        self.rcpt_rule: Callable[[str], str | None] = lambda _addr: None
        self.data_rule: Callable[[bytes], str | None] = lambda _data: None
        self.transactions = 0
        self.connections = 0
        self._peers: set[Any] = set()
        self._lock = threading.Lock()

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        with self._lock:
            # A session says EHLO again after STARTTLS: count peers, not greetings.
            self._peers.add(session.peer)
            self.connections = len(self._peers)
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.rcpt_rule(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = envelope.original_content or envelope.content
        with self._lock:
            self.transactions += 1
        reply = self.data_rule(data)
        if reply:
            return reply
        with self._lock:
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), data))
            n = len(self.received)
        return f"250 2.0.0 Ok: queued as T{n}"

    def messages(self) -> list[EmailMessage]:
        with self._lock:
            return [r.message for r in self.received]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SmtpServer:
    """Context manager: a scripted SMTP server on 127.0.0.1."""

    def __init__(self) -> None:
        self.handler = ScriptedHandler()
        self.port = free_port()
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> SmtpServer:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()
