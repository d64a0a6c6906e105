"""Reload the accounts file without a restart: on SIGHUP, and when the file changes.

A service hands `AccountsReloader` a function that puts a new `Directory`
in force. The file is read and validated whole first: one that does not
parse or validate is refused with an error line saying why, and the
accounts in force stay as they were. The swap itself is one assignment (or
whatever the service's function does), so no request ever sees half of an
edit. The file is watched by polling its stat (inode, size, mtime): an
editor that writes a new file and renames it over the old one is seen as
well as one that writes in place, and no inotify watch is needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from mailbus.accounts import Account, Directory, load_accounts
from mailbus.errors import ConfigError
from mailbus.logs import event

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
SETTLE_SECONDS = 0.2

Stat = tuple[int, int, int] | None


def _stat(path: Path) -> Stat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def changes(old: Directory, new: Directory) -> dict[str, list[str]]:
    """Account ids added, removed and changed between two directories."""
    before: dict[str, Account] = old.by_id
    after: dict[str, Account] = new.by_id
    return {"added": sorted(after.keys() - before.keys()),
            "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(a for a in after.keys() & before.keys() if after[a] != before[a])}


class AccountsReloader:
    """Watches one accounts file; calls `apply(new)` with each valid new version.

    `apply` may refuse a version the file's own validation let through (a
    service that builds more of each account, such as the sender's
    transports and DKIM keys) by raising ConfigError before it changes
    anything: the refusal is logged like a file that does not parse.
    """

    def __init__(self, path: Path, current: Directory, apply: Callable[[Directory], None],
                 *, service: str, poll_seconds: float = POLL_SECONDS):
        self.path, self.current, self.apply = Path(path), current, apply
        self.service, self.poll_seconds = service, poll_seconds
        self.reloads = self.refusals = 0
        self._seen = _stat(self.path)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._signal = False

    def start(self) -> None:
        """Begin watching in a task of the running loop; stop() ends it."""
        self._task = asyncio.create_task(self.run(), name="accounts-reloader")

    async def stop(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        """Watch until cancelled: SIGHUP too when this is the main thread's loop."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._wake.set)
            self._signal = True
        except (ValueError, RuntimeError):  # not the main thread (a test's server): poll only
            log.debug("SIGHUP not watched outside the main thread")
        try:
            await self._watch()
        finally:
            if self._signal:
                loop.remove_signal_handler(signal.SIGHUP)
                self._signal = False

    def reload(self, why: str) -> bool:
        """Read, validate and put in force the file now; False (old accounts kept) if refused."""
        self._seen = _stat(self.path)
        try:
            new = load_accounts(self.path)
            diff = changes(self.current, new)
            self.apply(new)
        except ConfigError as exc:
            self.refusals += 1
            event(log, logging.ERROR, "accounts file refused; the accounts in force stay",
                  service=self.service, path=str(self.path), trigger=why,
                  accounts_in_force=len(self.current), reason=" ".join(str(exc).split()))
            return False
        self.current = new
        self.reloads += 1
        event(log, logging.INFO, "accounts reloaded", service=self.service,
              path=str(self.path), trigger=why, accounts=len(new),
              **{k: ",".join(v) or "-" for k, v in diff.items()})
        return True

    async def _watch(self) -> None:
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            if self._wake.is_set():
                self._wake.clear()
                self._reload("SIGHUP")
            elif _stat(self.path) != self._seen:
                # Let a writer finish: read once the file has stood still briefly.
                while True:
                    before = _stat(self.path)
                    await asyncio.sleep(SETTLE_SECONDS)
                    if _stat(self.path) == before:
                        break
                self._reload("file changed")

    def _reload(self, why: str) -> None:
        try:
            self.reload(why)
        except Exception:  # a service's apply failing unexpectedly must not end the watch
            log.exception("accounts file not reloaded (%s): applying it failed", why)
