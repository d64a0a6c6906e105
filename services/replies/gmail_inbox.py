"""Reads one Gmail account's INBOX through the Gmail API and hands every new message over.

The Gmail client is the core's (mailbus.gmail), as the sender's: the same
token file or delegated service account, the same endpoint override for the
emulator, and the same reading of Google's errors (`failure`), which this
module reports as its own read errors: ReadLimited for 429 and rate limits,
ReadRefused for a request Gmail will not take, ReadUnavailable (with the
HTTP code) for the rest.

Behaviour:
* First run: record the mailbox's current historyId (users.getProfile) and
  read only what arrives after it. The inbox of a sending account holds
  years of mail that answers nothing mailbus sent; reading it all once
  would flood the classifier with history.
* Then users.history.list(startHistoryId, historyTypes=messageAdded,
  labelId=INBOX), every page, every poll_seconds (Gmail offers API clients
  no IDLE; push needs Cloud Pub/Sub). Each added message's size is read
  first (format=minimal, sizeEstimate); one over max_bytes is not
  downloaded, only its header (format=metadata, at most HEADER_BYTES) is
  handed over; the others are fetched with format=raw and handed over. The
  history position moves after each record and after the last page, only
  once its messages were handed over.
* 404 from history.list (Gmail keeps history for about a week, and
  sometimes less): full sync. The new position is read first
  (getProfile), then INBOX is listed for mail newer than the last message
  handed over (at most FULL_SYNC_LIMIT), messages already recorded in
  inbound_messages are skipped, the rest handed over oldest first, and the
  mark is reset to that position (mailbox_state.resets records it).
* 429 and rate errors wait as long as Google says (or a second); 5xx,
  network and credential trouble back off, doubling up to 5 minutes.
* Only with processed_label set is anything changed: each handled message
  gets that label (users.messages.modify addLabelIds, nothing removed). Its
  id comes from users.labels.list once per start, the label is created when
  missing. Gmail records a label change as labelAdded history, which the
  messageAdded filter leaves out, so labelling never brings a message back.
  A message met again already recorded (a retry after the labelling itself
  failed) is labelled again; adding a label it carries changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from google.oauth2 import service_account

from mailbus.accounts import Account
from mailbus.errors import ConfigError, MailbusError
from mailbus.gmail import AUTH, Failure, GmailClient, failure
from mailbus.logs import event
from mailbus.replies.state import Handler, HandlerFailed, MailboxState, MailRef

log = logging.getLogger(__name__)

MAILBOX = "INBOX"
FULL_SYNC_LIMIT = 2000  # messages listed by one full sync, newest first
BACKOFF = (1.0, 300.0)  # first and longest wait after a failure, seconds
MODIFY = AUTH + "gmail.modify"
MAY_MODIFY = {MODIFY, "https://mail.google.com/"}
HEADER_BYTES = 64 * 1024  # of a message over max_bytes, as much header as is handed over


class ReadError(MailbusError):
    """A Gmail call of the inbox reader failed."""

    def __init__(self, reason: str, *, code: int | None = None,
                 retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.code, self.retry_after = reason, code, retry_after


class ReadUnavailable(ReadError):
    """Gmail unreachable, credentials refused, or an HTTP error (`code`): back off, retry."""


class ReadLimited(ReadError):
    """A quota or rate limit: wait `retry_after` seconds (or a second) and retry."""


class ReadRefused(ReadError):
    """Gmail will not take this request as it is (400, 413)."""


def read_error(found: Failure) -> ReadError:
    """The reader's error for a failed Gmail call."""
    if found.kind in ("sending_limit", "rate_limit"):
        return ReadLimited(found.reason, retry_after=found.retry_after)
    if found.kind == "refused":
        return ReadRefused(found.reason, code=found.code)
    return ReadUnavailable(found.reason, code=found.code)


class _Mailbox(GmailClient):
    """The core Gmail client, used to read: calls run in worker threads."""

    def __init__(self, credentials: Any, *, modify: bool = False, **kwargs: Any):
        if modify:
            credentials = _allowed_to_modify(credentials, kwargs["account_id"])
        super().__init__(credentials, **kwargs)

    async def call(self, make_request: Callable[[], Any]) -> dict[str, Any]:
        """One request; every failure comes out as a ReadError."""
        if self.closed:
            raise ReadUnavailable(f"Gmail client for {self.account_id} is closed")
        try:
            return await self.execute(make_request)
        except Exception as exc:
            raise read_error(failure(exc, datetime.now(UTC))) from exc


class GmailReader:
    """One Gmail account's INBOX, read until stop()."""

    def __init__(self, account: Account, *, state: MailboxState, handler: Handler,
                 max_bytes: int, api_endpoint: str | None = None, token_uri: str | None = None,
                 backoff: tuple[float, float] = BACKOFF, timeout: float = 30.0):
        if account.gmail is None:
            raise ConfigError(f"account {account.id} has no [accounts.gmail] table")
        self.account_id, self.config = account.id, account.gmail
        self._gmail = _Mailbox.from_account(account, api_endpoint=api_endpoint,
                                            token_uri=token_uri, timeout=timeout,
                                            modify=account.gmail.processed_label is not None)
        self._state, self._handler, self._max_bytes = state, handler, max_bytes
        self._backoff = backoff
        self._stopping = asyncio.Event()  # bound to a loop by its first wait, in run()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._label_id: str | None = None  # processed_label's, once looked up
        # For health checks and tests.
        self.caught_up = asyncio.Event()
        self.failures = 0
        self.last_error: str | None = None
        self.full_syncs = 0
        self.connected = False
        self._failing = 0  # failures since the last successful sync

    async def run(self) -> None:
        """Poll the mailbox's history until stop()."""
        self._loop = asyncio.get_running_loop()
        delay = self._backoff[0]
        try:
            while not self._stopping.is_set():
                try:
                    await self._sync()
                except ReadLimited as exc:
                    self._failed(logging.WARNING, exc.reason, exc.retry_after or 1.0)
                    await self._sleep(exc.retry_after or 1.0)
                    continue
                except (ReadError, HandlerFailed) as exc:
                    self._failed(logging.WARNING if isinstance(exc, ReadError) else logging.ERROR,
                                 str(exc), delay, exc.__cause__)
                    await self._sleep(delay)
                    delay = min(delay * 2, self._backoff[1])
                    continue
                delay = self._backoff[0]
                if not self.connected:
                    self._reading()
                self.caught_up.set()
                await self._sleep(self.config.poll_seconds)
        finally:
            await self._gmail.close()

    def stop(self) -> None:
        """Stop after the message in hand."""
        if self._loop is None:  # run() has not started: it will not start reading
            self._stopping.set()
        else:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    def _reading(self) -> None:
        what = "mailbox connected" if not self._failing else \
            f"mailbox recovered after {self._failing} failure(s)"
        event(log, logging.INFO, f"account {self.account_id} {what}",
              account=self.account_id, mailbox=f"gmail:{MAILBOX}",
              poll_seconds=self.config.poll_seconds)
        self.connected, self._failing = True, 0

    def _failed(self, level: int, text: str, wait: float, cause: BaseException | None = None
                ) -> None:
        self.failures += 1
        self._failing += 1
        self.connected = False
        self.last_error = text
        event(log, level, f"account {self.account_id} Gmail inbox failed: {text}; retrying "
              f"in {wait:.1f} s", exc_info=cause, account=self.account_id,
              mailbox=f"gmail:{MAILBOX}", reason=text, retry_in_seconds=wait,
              failures_in_a_row=self._failing)

    async def _sync(self) -> None:
        users = self._gmail.service.users()
        if self.config.processed_label and self._label_id is None:
            self._label_id = await self._processed_label(self.config.processed_label)
        mark = await self._state.load(self.account_id, MAILBOX)
        if mark is None or mark.history_id is None:
            profile = await self._gmail.call(lambda: users.getProfile(userId="me"))
            await self._state.save_gmail(self.account_id, MAILBOX,
                                         history_id=str(profile["historyId"]))
            return
        try:
            await self._follow(mark.history_id)
        except ReadUnavailable as exc:
            if exc.code != 404:
                raise
            await self._full_sync(mark.history_id, mark.last_received_at)

    async def _follow(self, start: str) -> None:
        history = self._gmail.service.users().history()
        page: str | None = None
        while self._running():
            reply = await self._gmail.call(partial(
                history.list, userId="me", startHistoryId=start, historyTypes=["messageAdded"],
                labelId=MAILBOX, maxResults=self.config.batch, pageToken=page))
            for record in reply.get("history", []):
                ids = [a["message"]["id"] for a in record.get("messagesAdded", [])
                       if MAILBOX in a["message"].get("labelIds", [])]
                if not await self._hand_over_all(ids):
                    return
                await self._state.save_gmail(self.account_id, MAILBOX, history_id=record["id"])
            page = reply.get("nextPageToken")
            if not page:
                await self._state.save_gmail(self.account_id, MAILBOX,
                                             history_id=str(reply["historyId"]))
                return

    async def _full_sync(self, expired: str, since: datetime | None) -> None:
        log.warning("account %s Gmail inbox: history id %s is no longer kept; full sync of %s "
                    "after %s", self.account_id, expired, MAILBOX, since or "the beginning")
        users = self._gmail.service.users()
        # The position first: whatever arrives while listing is then in the history too.
        profile = await self._gmail.call(lambda: users.getProfile(userId="me"))
        query = f"after:{int(since.timestamp()) - 1}" if since else None
        ids: list[str] = []
        page: str | None = None
        while len(ids) < FULL_SYNC_LIMIT:
            reply = await self._gmail.call(partial(
                users.messages().list, userId="me", labelIds=[MAILBOX], q=query,
                maxResults=self.config.batch, pageToken=page))
            ids += [m["id"] for m in reply.get("messages", [])]
            page = reply.get("nextPageToken")
            if not page:
                break
        ids = list(reversed(ids[:FULL_SYNC_LIMIT]))  # oldest first
        for start in range(0, len(ids), self.config.batch):
            if not await self._hand_over_all(ids[start: start + self.config.batch], since):
                return
        self.full_syncs += 1
        await self._state.reset_gmail(
            self.account_id, MAILBOX, str(profile["historyId"]),
            f"history id {expired} expired (404); full sync after {since}")

    async def _hand_over_all(self, ids: list[str], since: datetime | None = None) -> bool:
        """Hand over the messages not recorded yet; False when stopped part way."""
        known = await self._state.known_refs(self.account_id, [f"gmail:{i}" for i in ids])
        for gmail_id in ids:
            if not self._running():
                return False
            if f"gmail:{gmail_id}" not in known:
                await self._hand_over(gmail_id, since)
            else:
                await self._label(gmail_id)
        return True

    async def _hand_over(self, gmail_id: str, since: datetime | None) -> None:
        messages = self._gmail.service.users().messages()
        try:
            # The size before the body: a 50 MB message is not downloaded to learn it is big.
            meta = await self._gmail.call(
                lambda: messages.get(userId="me", id=gmail_id, format="minimal"))
            received = datetime.fromtimestamp(int(meta.get("internalDate", 0)) / 1000, UTC)
            if since is not None and received < since:
                return  # a full sync's margin: handed over before
            size = int(meta.get("sizeEstimate", 0))
            if size > self._max_bytes:
                raw = _header(await self._gmail.call(
                    lambda: messages.get(userId="me", id=gmail_id, format="metadata")))
            else:
                found = await self._gmail.call(
                    lambda: messages.get(userId="me", id=gmail_id, format="raw"))
                raw = _unb64(found["raw"])
                size = max(size, len(raw))
        except ReadUnavailable as exc:
            if exc.code == 404:  # deleted since it was added: nothing to hand over
                return
            raise
        headers_only = size > self._max_bytes
        if headers_only and len(raw) > HEADER_BYTES:  # sizeEstimate was short of the truth
            end = raw.find(b"\r\n\r\n", 0, HEADER_BYTES)
            raw = raw[: end + 4] if end >= 0 else raw[:HEADER_BYTES]
        ref = MailRef(account_id=self.account_id, mailbox=MAILBOX,
                      source_ref=f"gmail:{gmail_id}", size=size, headers_only=headers_only,
                      received_at=received, gmail_id=gmail_id)
        try:
            await self._handler(raw, ref)
        except Exception as exc:
            raise HandlerFailed(ref.source_ref) from exc
        await self._state.save_gmail(self.account_id, MAILBOX, history_id=None,
                                     received_at=received)
        await self._label(gmail_id)

    async def _processed_label(self, name: str) -> str:
        """The id of the user label called `name`, created when there is none."""
        labels = self._gmail.service.users().labels()
        found = await self._find_label(name)
        if found is not None:
            return found
        body = {"name": name, "labelListVisibility": "labelShow", "messageListVisibility": "show"}
        try:
            created = await self._gmail.call(lambda: labels.create(userId="me", body=body))
        except ReadUnavailable as exc:
            # 409 "Label name exists or conflicts": created meanwhile by someone else, or
            # the name clashes with a system label (Gmail compares names ignoring case).
            if exc.code != 409:
                raise
            found = await self._find_label(name)
            if found is None:
                raise ReadUnavailable(f"Gmail will not create label {name!r}: {exc}",
                                      code=409) from exc
            return found
        log.info("account %s: created Gmail label %r (%s)", self.account_id, name,
                 created["id"])
        return str(created["id"])

    async def _find_label(self, name: str) -> str | None:
        labels = self._gmail.service.users().labels()
        reply = await self._gmail.call(lambda: labels.list(userId="me"))
        return next((str(label["id"]) for label in reply.get("labels", [])
                     if label.get("type") == "user"
                     and label.get("name", "").lower() == name.lower()), None)

    async def _label(self, gmail_id: str) -> None:
        """Add processed_label to a handled message; nothing without one."""
        if self._label_id is None:
            return
        messages, body = self._gmail.service.users().messages(), {"addLabelIds": [self._label_id]}
        try:
            await self._gmail.call(lambda: messages.modify(userId="me", id=gmail_id, body=body))
        except ReadUnavailable as exc:
            if exc.code != 404:  # 404: deleted since it was handled, nothing to label
                raise
        except ReadRefused:
            # 400 for a label deleted while the reader runs: look it up (create it) again.
            self._label_id = None
            raise

    def _running(self) -> bool:
        return not self._stopping.is_set()


def _allowed_to_modify(credentials: Any, account_id: str) -> Any:
    """A service account also asks for gmail.modify; a user's token must have been granted it."""
    if isinstance(credentials, service_account.Credentials):
        return credentials.with_scopes([*(credentials.scopes or ()), MODIFY])
    granted = set(credentials.scopes or ())
    if not granted & MAY_MODIFY:
        raise ConfigError(f"account {account_id}: processed_label needs the gmail.modify scope;"
                          f" the token grants {sorted(granted)}")
    return credentials


def _header(message: dict[str, Any]) -> bytes:
    """The header of a format=metadata answer as RFC 5322 bytes, at most HEADER_BYTES."""
    lines = []
    for field in message.get("payload", {}).get("headers", []):
        name = str(field.get("name", "")).replace(":", "").strip()
        value = " ".join(str(field.get("value", "")).split())  # no line breaks of its own
        if name:
            lines.append(f"{name}: {value}\r\n".encode(errors="replace"))
    out = b"".join(lines)[:HEADER_BYTES]
    return out[: out.rfind(b"\r\n") + 2] + b"\r\n"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
