"""A message's content work (template rendering, text derived from html) under a deadline.

Templates and html come from API clients. Rendering counts loop steps and output
and checks the clock as it goes (templates.py), but that deadline is
cooperative: one sandboxed filter call (a sort of 50,000 strings in a loop that
prints nothing) runs between two checks, and a template was seen holding the
CPU for 27 s before its 2 s deadline was noticed. html_to_text() leans on
HTMLParser, which is quadratic on some malformed markup ("<a" repeated). On the
event loop either would stall every account of the sender; in a thread it would
still hold the GIL and could not be stopped.

So compose.content() runs in worker processes spoken to over a Pipe: past the
hard deadline the process is killed, the message fails permanently with
"deadline exceeded", and a fresh process is started for the next one, outside
that message's deadline. Not concurrent.futures.ProcessPoolExecutor: in Python
3.11 its running tasks can be neither cancelled nor have their worker killed.
Processes start with "spawn" (the sender runs librdkafka's and the Gmail
transport's threads; a fork of a threaded process can deadlock) and only when
a message first needs one. Messages without a template or html-only body never
come here: their content is cheap and computed in the worker itself.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from mailbus.errors import MailbusError, UnavailableError
from mailbus.sender.compose import ComposeFailed, Content, content
from mailbus.sender.templates import DEADLINE_SECONDS, TemplateFailed

# Above the cooperative deadline, so a template that honours it gets its own reason.
HARD_DEADLINE = DEADLINE_SECONDS + 1.0
READY_SECONDS = 120.0  # a fresh process imports jinja2 and the composer; slow on a loaded host
MEMORY_LIMIT = 1 << 30  # address space of a content process: a runaway render gets MemoryError
_READY = "ready"
_FIELDS = ("subject", "text", "html", "template")


class SandboxUnavailable(UnavailableError):
    """No content process could be started; the message is tried again later."""


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):  # not on this platform, or already lower
        pass


def _serve(conn: Connection) -> None:
    """The process's loop: one event's content fields in, Content or a failure out."""
    _limit_memory()
    conn.send(_READY)
    while True:
        try:
            fields = conn.recv()
        except (EOFError, OSError):
            return  # the sender closed the pipe or died
        try:
            reply: Any = content(fields)
        except TemplateFailed as exc:
            reply = ("template", str(exc))
        except MailbusError as exc:
            reply = ("compose", str(exc))
        except Exception as exc:  # noqa: BLE001 - hostile input can reach any corner

            reply = ("compose", f"unexpected {type(exc).__name__}")
        conn.send(reply)


def compose_failure(exc: BaseException) -> str:
    """The email.failed reason for a message whose content or composing failed.

    Our own errors say what is wrong with the message; anything else is named by
    its type alone, since its text might quote configuration or key material.
    """
    if isinstance(exc, TemplateFailed):
        return f"template: {exc}"
    if isinstance(exc, MailbusError):
        return f"compose: {exc}"
    return f"compose: unexpected {type(exc).__name__}"


def failure(event: dict[str, Any], reason: str) -> MailbusError:
    """The error for a content job that did not finish, by what the job was doing."""
    if event.get("template"):
        return TemplateFailed(reason)
    return ComposeFailed(f"html: {reason}")


class _Process:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(target=_serve, args=(child,),
                                                name="mailbus-content", daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(READY_SECONDS) or self._recv() != _READY:
            self.kill()
            raise SandboxUnavailable(f"content process not ready within {READY_SECONDS:.0f} s")

    def _recv(self) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def ask(self, fields: dict[str, Any], deadline: float) -> Content | tuple[str, str] | None:
        """Content, ("template"|"compose", reason), or None when the process is dead."""
        started = time.monotonic()
        try:
            self.conn.send(fields)
        except OSError:
            self.kill()
            return None
        if not self.conn.poll(max(0.0, deadline - (time.monotonic() - started))):
            self.kill()
            return ("deadline", f"deadline exceeded: stopped after {deadline:g} s")
        reply = self._recv()
        if reply is None:
            self.kill()
        return reply  # type: ignore[no-any-return]

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class ContentSandbox:
    """`processes` content processes; each message's content under `deadline` seconds."""

    def __init__(self, deadline: float = HARD_DEADLINE, processes: int = 2):
        self.deadline = deadline
        self._idle: asyncio.Queue[_Process | None] = asyncio.Queue()
        for _ in range(processes):
            self._idle.put_nowait(None)  # a slot; its process starts on first use
        self._all: set[_Process] = set()

    async def content(self, event: dict[str, Any]) -> Content:
        """compose.content(event) in a process; raises TemplateFailed or ComposeFailed."""
        fields = {name: event.get(name) for name in _FIELDS}
        slot = await self._idle.get()
        try:
            if slot is None or not slot.alive():
                slot = await asyncio.to_thread(self._start)
            reply = await asyncio.to_thread(slot.ask, fields, self.deadline)
        except BaseException:
            # Failed to start, or cancelled (the sender stops) while the process may
            # still hold the job: it is not handed to the next message in that state.
            if slot is not None:
                self._all.discard(slot)
                slot.kill()
            self._idle.put_nowait(None)
            raise
        if isinstance(reply, Content):
            self._idle.put_nowait(slot)
            return reply
        if not slot.alive():
            self._all.discard(slot)
            slot = None
        self._idle.put_nowait(slot)
        if reply is None:
            raise failure(event, "the content process died while working on it")
        kind, reason = reply
        if kind == "deadline":
            raise failure(event, reason)
        raise TemplateFailed(reason) if kind == "template" else ComposeFailed(reason)

    def _start(self) -> _Process:
        process = _Process()
        self._all.add(process)
        return process

    def close(self) -> None:
        """Stop every process."""
        for process in self._all:
            process.kill()
        self._all.clear()
