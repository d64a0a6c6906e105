"""Reads one account's IMAP mailbox and hands every new message to the service.

Client: IMAPClient, synchronous, in one thread per account. Its IDLE
(`idle`/`idle_check`/`idle_done`) is the most used and tested in Python,
it parses every response type (including the unsolicited ones servers send
during IDLE), speaks MOVE, UIDPLUS, STARTTLS and implicit TLS with an
ssl.SSLContext, and reports a refused LOGIN as its own LoginError.
aioimaplib would avoid the thread, but its IDLE has to be driven by hand
(`idle_start`/`wait_server_push`, a timeout per push) and its responses
come back as raw lines to parse. The thread only talks IMAP; the handler
and PostgreSQL run on the caller's event loop.

Behaviour, per mailbox:
* SELECT (read-only EXAMINE unless processed_folder is set) and read the
  stored mark. A mailbox never read is read from its first message.
* Messages with UID > last_uid are taken in batches: first their
  RFC822.SIZE, then their bodies with BODY.PEEK (so \\Seen is never set),
  as many per FETCH as fit in fetch_budget bytes (a larger one alone), so a
  batch of large mail is never held in memory at once. One larger than
  max_bytes is not downloaded: only the first HEADER_BYTES of its header
  are. Each is handed over, then the mark moves past it: at least once.
* UIDVALIDITY changed (mailbox recreated, server migrated): the old UIDs
  mean nothing, so the mark is reset (mailbox_state.resets records it) and
  the mailbox is read again from its start, skipping messages whose
  Message-ID the account already recorded in inbound_messages. A restart in
  the middle of that re-read hands the rest over again (consumers dedupe).
* Then IDLE (renewed every 25 minutes, RFC 2177 allows servers to drop it
  after 30) when the server offers it and `idle` is on, else poll every
  poll_seconds. In IDLE too, the mailbox is searched again every
  poll_seconds, so mail announced just before IDLE began waits at most that
  long. stop() wakes either at once.
* Any failure: log, close, reconnect after a backoff doubling up to 5 minutes.
* Only with processed_folder set is anything changed: each processed message
  is moved there (UID MOVE, or COPY + \\Deleted + UID EXPUNGE without MOVE).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import logging
import socket
import ssl
import threading
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from mailbus.accounts import Account
from mailbus.errors import ConfigError
from mailbus.logs import event
from mailbus.replies.state import Handler, HandlerFailed, MailboxState, MailRef
from mailbus.settings import read_secret

log = logging.getLogger(__name__)
T = TypeVar("T")

IDLE_RENEW_SECONDS = 25 * 60
IDLE_CHECK_SECONDS = 5.0  # a safety net: stop() wakes idle_check by closing the socket
BACKOFF = (1.0, 300.0)  # first and longest wait between attempts, seconds
FETCH_BUDGET = 16 * 1024 * 1024
# Of a message over max_bytes, this much of its header is fetched (a partial
# FETCH, RFC 3501 6.4.5): a header can be as large as the message.
HEADER_BYTES = 64 * 1024
_NEW_MAIL = {b"EXISTS", b"RECENT"}
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)


class ImapReader:
    """One account's mailbox, read until stop()."""

    def __init__(self, account: Account, *, state: MailboxState, handler: Handler,
                 max_bytes: int, fetch_budget: int = FETCH_BUDGET,
                 backoff: tuple[float, float] = BACKOFF):
        if account.imap is None:
            raise ConfigError(f"account {account.id} has no [accounts.imap] table")
        self.account_id, self.config = account.id, account.imap
        self.username = self.config.username or account.from_address
        self.mailbox = self.config.mailbox
        self._state, self._handler, self._max_bytes = state, handler, max_bytes
        self._budget = fetch_budget
        self._backoff = backoff
        self._delay = backoff[0]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._idle_sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rescan: tuple[int, int] | None = None  # (uidvalidity, UIDNEXT at the reset)
        # For health checks and tests.
        self.idling = threading.Event()
        self.failures = 0
        self.last_error: str | None = None
        self.connected = False
        self._failing = 0  # failures since the last successful login

    async def run(self) -> None:
        """Read until stop() (or cancellation); the IMAP work runs in its own thread."""
        self._loop = loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finish(exc: BaseException | None) -> None:
            if not done.done():
                done.set_exception(exc) if exc else done.set_result(None)

        def target() -> None:
            try:
                self._read_until_stopped()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                loop.call_soon_threadsafe(finish, exc)
            else:
                loop.call_soon_threadsafe(finish, None)

        threading.Thread(target=target, name=f"imap-{self.account_id}", daemon=True).start()
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self.stop()
            await done
            raise

    def stop(self) -> None:
        """Finish the message in hand, leave IDLE or the poll wait, log out."""
        with self._lock:
            self._stop.set()
            sock, self._idle_sock = self._idle_sock, None  # taken: _wait sees it was shut
        if sock is not None:
            try:  # the plain socket's shutdown: wakes the poll() inside idle_check
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    # -- the reader thread --
    def _read_until_stopped(self) -> None:
        while not self._stop.is_set():
            client: IMAPClient | None = None
            try:
                client = self._connect()
                self._logged_in(client)
                self._session(client)
            except LoginError as exc:
                self._failed(logging.ERROR, f"IMAP login refused for {self.username!r} at "
                             f"{self.config.host}:{self.config.port}: {_text(exc)}")
            except HandlerFailed as exc:
                self._failed(logging.ERROR, f"handler failed on {exc}; not moving past it",
                             exc.__cause__)
            except ConfigError as exc:
                self._failed(logging.ERROR, str(exc))
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect after a backoff
                if self._stop.is_set():
                    break
                self._failed(logging.WARNING, f"IMAP {type(exc).__name__}: {_text(exc)}")
            finally:
                if client is not None:
                    _close(client)
            if not self._stop.is_set():
                self._stop.wait(self._delay)
                self._delay = min(self._delay * 2, self._backoff[1])

    def _where(self) -> dict[str, object]:
        cfg = self.config
        return {"account": self.account_id, "mailbox": self.mailbox, "host": cfg.host,
                "port": cfg.port, "tls": cfg.tls, "user": self.username}

    def _logged_in(self, client: IMAPClient) -> None:
        idle = b"IDLE" in client.capabilities()
        what = "mailbox connected" if not self._failing else \
            f"mailbox recovered after {self._failing} failure(s)"
        event(log, logging.INFO, f"account {self.account_id} {what}", **self._where(),
              idle=idle and self.config.idle, poll_seconds=self.config.poll_seconds)
        self.connected, self._failing = True, 0

    def _failed(self, level: int, text: str, cause: BaseException | None = None) -> None:
        self.failures += 1
        self._failing += 1
        self.connected = False
        self.last_error = text
        event(log, level, f"account {self.account_id} mailbox failed: {text}; retrying in "
              f"{self._delay:.1f} s", exc_info=cause, **self._where(), reason=text,
              retry_in_seconds=self._delay, failures_in_a_row=self._failing)

    def _connect(self) -> IMAPClient:
        cfg = self.config
        password = read_secret(None, cfg.password_file,
                               f"account {self.account_id} imap.password_file")
        context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        client = IMAPClient(cfg.host, port=cfg.port, ssl=cfg.tls == "implicit",
                            ssl_context=context, timeout=cfg.timeout_seconds)
        try:
            client.normalise_times = False  # INTERNALDATE with its zone, not local naive time
            if cfg.tls == "starttls":
                client.starttls(context)
            client.login(self.username, password)
        except BaseException:
            _close(client)
            raise
        return client

    def _session(self, client: IMAPClient) -> None:
        cfg = self.config
        info = client.select_folder(self.mailbox, readonly=cfg.processed_folder is None)
        uidvalidity = int(info[b"UIDVALIDITY"])
        if cfg.processed_folder and not client.folder_exists(cfg.processed_folder):
            client.create_folder(cfg.processed_folder)
        mark = self._call(self._state.load(self.account_id, self.mailbox))
        if mark is None or mark.uidvalidity is None:
            self._call(self._state.save_imap(self.account_id, self.mailbox, uidvalidity, 0))
            last = 0
        elif mark.uidvalidity != uidvalidity:
            reason = f"UIDVALIDITY changed from {mark.uidvalidity} to {uidvalidity}"
            log.warning("account %s mailbox %s: %s; reading it again, skipping Message-IDs "
                        "already recorded", self.account_id, self.mailbox, reason)
            self._call(self._state.reset_imap(self.account_id, self.mailbox, uidvalidity,
                                              reason))
            self._rescan = (uidvalidity, int(info.get(b"UIDNEXT", 2**32)))
            last = 0
        else:
            last = mark.last_uid
        while not self._stop.is_set():
            last = self._drain(client, uidvalidity, last)
            if self._stop.is_set():
                break
            self._delay = self._backoff[0]  # caught up: the connection is healthy
            self._wait(client)

    def _drain(self, client: IMAPClient, uidvalidity: int, last: int) -> int:
        """Hand over every message after `last`, a batch at a time; returns the new mark."""
        while not self._stop.is_set():
            # "n:*" always matches the highest UID, even when it is below n: filter.
            pending = sorted(u for u in client.search(["UID", f"{last + 1}:*"]) if u > last)
            if not pending:
                return last
            batch = pending[: self.config.batch]
            info = client.fetch(batch, ["RFC822.SIZE", "INTERNALDATE"])
            sizes = {u: int(info[u].get(b"RFC822.SIZE", 0)) for u in batch if u in info}
            if not sizes:  # expunged in between: gone
                return last
            for chunk in fetch_rounds(sorted(sizes), sizes, self._max_bytes, self._budget):
                raws = self._fetch(client, chunk, sizes)
                skip = self._already_read(uidvalidity, raws)
                for uid in chunk:
                    if self._stop.is_set():
                        return last
                    self._hand_over(client, uidvalidity, uid, raws.get(uid), uid in skip,
                                    size=sizes[uid], received=info[uid].get(b"INTERNALDATE"))
                    last = uid
        return last

    def _fetch(self, client: IMAPClient, uids: list[int], sizes: dict[int, int]
               ) -> dict[int, bytes | None]:
        """The bodies of one round; of a message over max_bytes, the start of its header."""
        small = [u for u in uids if sizes[u] <= self._max_bytes]
        large = [u for u in uids if u not in small]
        raws = {u: d.get(b"BODY[]") for u, d in
                (client.fetch(small, ["BODY.PEEK[]"]).items() if small else ())}
        part = f"BODY.PEEK[HEADER]<0.{HEADER_BYTES}>"
        raws |= {u: d.get(b"BODY[HEADER]<0>") for u, d in
                 (client.fetch(large, [part]).items() if large else ())}
        return raws

    def _hand_over(self, client: IMAPClient, uidvalidity: int, uid: int, raw: bytes | None,
                   skip: bool, *, size: int, received: datetime | None) -> None:
        if raw is not None and not skip:
            ref = MailRef(account_id=self.account_id, mailbox=self.mailbox,
                          source_ref=f"imap:{uidvalidity}:{uid}", size=size or len(raw),
                          headers_only=size > self._max_bytes, received_at=_utc(received),
                          uid=uid, uidvalidity=uidvalidity)
            try:
                self._call(self._handler(raw, ref))
            except Exception as exc:
                raise HandlerFailed(ref.source_ref) from exc
        # A message expunged between the FETCHes is simply gone.
        self._call(self._state.save_imap(self.account_id, self.mailbox, uidvalidity, uid))
        if raw is not None and self.config.processed_folder:
            self._move(client, uid)
        self._delay = self._backoff[0]

    def _already_read(self, uidvalidity: int, raws: dict[int, bytes | None]) -> set[int]:
        """During the re-read after a UIDVALIDITY change: UIDs whose Message-ID was recorded."""
        if self._rescan is None or self._rescan[0] != uidvalidity:
            return set()
        ids = {uid: _message_id(raw) for uid, raw in raws.items()
               if raw is not None and uid < self._rescan[1]}
        if not any(ids.values()):
            return set()
        known = self._call(self._state.known_message_ids(
            self.account_id, {i for i in ids.values() if i}))
        return {uid for uid, mid in ids.items() if mid in known}

    def _move(self, client: IMAPClient, uid: int) -> None:
        folder = self.config.processed_folder
        if client.has_capability("MOVE"):
            client.move([uid], folder)
            return
        client.copy([uid], folder)
        client.add_flags([uid], [b"\\Deleted"], silent=True)
        if client.has_capability("UIDPLUS"):
            client.uid_expunge([uid])
        else:  # plain EXPUNGE also removes whatever else was marked \Deleted
            client.expunge()

    def _wait(self, client: IMAPClient) -> None:
        """Until the server announces new mail, IDLE needs renewing, or stop()."""
        if not (self.config.idle and client.has_capability("IDLE")):
            if not self._stop.wait(self.config.poll_seconds):
                client.noop()
            return
        client.idle()
        with self._lock:
            watched = not self._stop.is_set()
            if watched:
                self._idle_sock = client.socket()
        if watched:
            self.idling.set()
            try:
                # Also leave IDLE every poll_seconds for one UID SEARCH: mail that
                # arrived between the last search and the IDLE command may have been
                # announced in that search's response, where nothing watches for it.
                renew_at = time.monotonic() + min(IDLE_RENEW_SECONDS, self.config.poll_seconds)
                while not self._stop.is_set():
                    left = renew_at - time.monotonic()
                    if left <= 0:
                        break
                    responses = client.idle_check(timeout=min(IDLE_CHECK_SECONDS, left))
                    if any(len(r) > 1 and r[1] in _NEW_MAIL for r in responses
                           if isinstance(r, tuple)):
                        break
            finally:
                self.idling.clear()
                with self._lock:
                    shut = self._idle_sock is None  # stop() took the socket and shut it
                    self._idle_sock = None
            if shut:
                return
        # Always end IDLE on a live connection, also when stopping: a server in IDLE
        # answers nothing but DONE, so a LOGOUT sent instead waits out the read timeout.
        client.idle_done()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the caller's event loop and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


def fetch_rounds(uids: list[int], sizes: dict[int, int], max_bytes: int, budget: int
                 ) -> list[list[int]]:
    """UIDs in order, grouped so that the bytes one FETCH brings stay within the budget."""
    rounds: list[list[int]] = []
    used = budget  # no round open yet
    for uid in uids:
        cost = sizes[uid] if sizes[uid] <= max_bytes else HEADER_BYTES
        if used + cost > budget:
            rounds.append([])
            used = 0
        rounds[-1].append(uid)
        used += cost
    return rounds


def _message_id(raw: bytes) -> str | None:
    value = _HEADERS.parsebytes(raw).get("Message-ID")
    return str(value).strip() or None if value is not None else None


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if isinstance(value, datetime) else None


def _text(exc: BaseException) -> str:
    if exc.args and isinstance(exc.args[0], bytes):  # imaplib hands over the server's bytes
        return exc.args[0].decode(errors="replace")
    return str(exc)


def _close(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # noqa: BLE001 - the connection may already be gone
        try:
            client.shutdown()
        except OSError:
            pass
