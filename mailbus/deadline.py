"""Work under a hard deadline, in worker processes that can be abandoned.

Some work on hostile input is CPU-bound Python that no cooperative check can
be trusted to stop: classifying inbound mail (the stdlib parser has had
quadratic corners), rendering a client's template (one sandboxed filter call
can run for tens of seconds between two checks), deriving text from html
(HTMLParser is quadratic on some malformed markup). A thread cannot be
stopped, and while it runs pure Python it holds the GIL, so a real deadline
needs a process that can be killed.

Not concurrent.futures.ProcessPoolExecutor: in Python 3.11 a running task can
be neither cancelled nor have its worker killed through the public API
(terminate_workers came in 3.14), so after a timeout the pool would keep
grinding the stuck job and every later one would queue behind it. Here each
slot is one process spoken to over a Pipe; past the deadline it is killed and
a fresh one is started for the next job, outside that job's deadline.
Processes start with "spawn" (the services run threads: librdkafka's, IMAP
readers, the Gmail client; a fork of a threaded process can deadlock) and only
when a job first needs one.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from mailbus.errors import UnavailableError

# A fresh process imports what its target needs; slow on a loaded host.
READY_SECONDS = 120.0
_READY = "ready"


class Unavailable(UnavailableError):
    """No worker process could be started; the job may be tried again later."""


@dataclass(frozen=True)
class Late:
    """The job ran past its deadline; its process was killed."""

    seconds: float


@dataclass(frozen=True)
class Died:
    """The process died (or its pipe broke) while it held the job."""


def _serve(conn: Connection, target: Callable[[Any], Any],
           setup: Callable[[], None] | None) -> None:
    """A worker's loop: one job in, one result out, until the pipe closes."""
    if setup is not None:
        setup()
    conn.send(_READY)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the service closed the pipe or died
        conn.send(target(job))


class _Process:
    def __init__(self, target: Callable[[Any], Any], setup: Callable[[], None] | None,
                 name: str):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(target=_serve, args=(child, target, setup),
                                                name=name, daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(READY_SECONDS) or self._recv() != _READY:
            self.kill()
            raise Unavailable(f"{name} process not ready within {READY_SECONDS:.0f} s")

    def _recv(self) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return Died()

    def ask(self, job: Any, deadline: float) -> Any:
        """The target's result, Late or Died (the process is then gone)."""
        started = time.monotonic()
        try:
            self.conn.send(job)
        except OSError:
            self.kill()
            return Died()
        # The send returns once the process took the job; the deadline counts from before.
        if not self.conn.poll(max(0.0, deadline - (time.monotonic() - started))):
            self.kill()
            return Late(deadline)
        result = self._recv()
        if isinstance(result, Died):
            self.kill()
        return result

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class DeadlinePool:
    """`processes` worker processes running `target(job)`, each job under `deadline` s.

    `target` and `setup` (run once in each new process) must be picklable:
    module-level functions, or functools.partial of them.
    """

    def __init__(self, target: Callable[[Any], Any], *, deadline: float, processes: int,
                 name: str, setup: Callable[[], None] | None = None):
        self.target, self.setup, self.name = target, setup, name
        self.deadline = deadline
        self._idle: asyncio.Queue[_Process | None] = asyncio.Queue()
        for _ in range(processes):
            self._idle.put_nowait(None)  # a slot; its process starts on first use
        self._all: set[_Process] = set()
        self.abandoned = 0  # jobs past the deadline or whose process died

    async def run(self, job: Any) -> Any:
        """target(job) in a process: its result, or Late, or Died; Unavailable if none starts."""
        slot = await self._idle.get()
        try:
            if slot is None or not slot.alive():
                slot = await asyncio.to_thread(self._start)
            result = await asyncio.to_thread(slot.ask, job, self.deadline)
        except BaseException:
            # Failed to start, or cancelled (the service stops) while the process may
            # still hold the job: it is not handed to the next job in that state.
            if slot is not None:
                self._all.discard(slot)
                slot.kill()
            self._idle.put_nowait(None)
            raise
        if isinstance(result, Late | Died) or not slot.alive():
            self._all.discard(slot)
            self.abandoned += isinstance(result, Late | Died)
            slot = None
        self._idle.put_nowait(slot)
        return result

    def _start(self) -> _Process:
        process = _Process(self.target, self.setup, self.name)
        self._all.add(process)
        return process

    def close(self) -> None:
        """Stop every process."""
        for process in self._all:
            process.kill()
        self._all.clear()
