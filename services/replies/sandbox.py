"""Classification under a deadline, in worker processes the service can abandon.

classify() is linear on any input we know of, but it is CPU-bound Python over
hostile bytes, and the standard library parser it leans on has had quadratic
corners before. A mail that still finds one must cost one mail, not the
mailbox: each classification gets `deadline` seconds, and a mail that runs
past it (or kills its worker) is kept as unmatched, with the reason, and the
reader moves past it.

A thread cannot be stopped, and while it runs pure Python it holds the GIL, so
the deadline needs a process. Not concurrent.futures.ProcessPoolExecutor: in
Python 3.11 a running task can be neither cancelled nor have its worker killed
through the public API (terminate_workers came in 3.14), so after a timeout the
pool would keep grinding the stuck mail and every later mail would queue behind
it. Here each slot is one process spoken to over a Pipe; past the deadline it
is killed and a fresh one started, before the next mail and outside its
deadline. Processes are started with "spawn": the service runs threads (IMAP
readers, librdkafka's), and a fork of a threaded process can deadlock.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable, Collection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from mailbus.errors import MailbusError
from mailbus.replies.classify import Inbound, classify

Classify = Callable[..., Inbound]  # classify(raw, domains=...) or a stand-in of the same shape
READY_SECONDS = 120.0  # a fresh worker imports the classifier; slow on a loaded host
_READY = "ready"


class WorkerFailed(MailbusError):
    """A classifier worker could not be started; the mail is handed over again later."""


def quarantine(reason: str, header: Inbound | None = None) -> Inbound:
    """An unmatched verdict for mail that was not (fully) classified, keeping what is known."""
    if header is None:
        return Inbound(kind="unmatched", reason=reason, quarantined=True)
    return Inbound(kind="unmatched", header_message_id=header.header_message_id,
                   sender=header.sender, subject=header.subject, date=header.date,
                   reason=reason, quarantined=True)


def _serve(conn: Connection, target: Classify) -> None:
    """The worker's loop: one mail in, one verdict out, until the pipe closes."""
    conn.send(_READY)
    while True:
        try:
            raw, domains = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(target(raw, domains=domains))


class _Worker:
    def __init__(self, target: Classify):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(target=_serve, args=(child, target),
                                                name="mailbus-classify", daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(READY_SECONDS) or self._recv() != _READY:
            self.kill()
            raise WorkerFailed(f"classifier worker not ready within {READY_SECONDS:.0f} s")

    def _recv(self) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def ask(self, raw: bytes, domains: tuple[str, ...], deadline: float) -> Inbound | str:
        """The verdict, or why there is none (the worker is then dead)."""
        started = time.monotonic()
        try:
            self.conn.send((raw, domains))
        except OSError:
            self.kill()
            return "the classifier worker died"
        # The send returns once the worker took the bytes; the deadline counts from before.
        if not self.conn.poll(max(0.0, deadline - (time.monotonic() - started))):
            self.kill()
            return f"classification did not finish within {deadline:g} s"
        verdict = self._recv()
        if not isinstance(verdict, Inbound):
            self.kill()
            return "the classifier worker died"
        return verdict

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class Sandbox:
    """`workers` classifier processes, each mail under `deadline` seconds of wall time."""

    def __init__(self, deadline: float, workers: int = 2, target: Classify = classify):
        self.deadline, self.target = deadline, target
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        for _ in range(workers):
            self._idle.put_nowait(None)  # a slot; its process starts on first use
        self._all: set[_Worker] = set()
        self.abandoned = 0  # mails past the deadline or whose worker died; for tests

    async def classify(self, raw: bytes, *, domains: Collection[str] = ()) -> Inbound:
        """classify() in a worker; past the deadline an unmatched verdict saying so."""
        worker = await self._idle.get()
        try:
            if worker is None or not worker.alive():
                worker = await asyncio.to_thread(self._start)
            found = await asyncio.to_thread(worker.ask, raw, tuple(domains), self.deadline)
        except BaseException:
            # Cancelled (the service stops) while the worker may still hold the mail:
            # it is not handed to the next one in that state.
            if worker is not None:
                self._all.discard(worker)
                worker.kill()
            self._idle.put_nowait(None)
            raise
        if isinstance(found, str):
            self._all.discard(worker)
            self._idle.put_nowait(None)
            self.abandoned += 1
            return quarantine(found)
        self._idle.put_nowait(worker)
        return found

    def _start(self) -> _Worker:
        worker = _Worker(self.target)
        self._all.add(worker)
        return worker

    def close(self) -> None:
        """Stop every worker."""
        for worker in self._all:
            worker.kill()
        self._all.clear()
