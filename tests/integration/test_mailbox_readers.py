"""The mailbox readers of `mailbus replies` against real servers: Dovecot over real IMAP
sockets, and the Gmail emulator through the real google-api-python-client; marks in
the real PostgreSQL as the replies role."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from mailbus.accounts import Account, GmailAccount, ImapAccount, SmtpAccount
from mailbus.db import open_pool
from mailbus.errors import ConfigError
from mailbus.gmail import AUTH, SCOPES
from mailbus.replies.gmail_inbox import GmailReader
from mailbus.replies.imap import HEADER_BYTES, ImapReader, fetch_rounds
from mailbus.replies.state import InboundMessage, MailboxState, MailRef
from mailbus.settings import ServiceSettings
from tests.support import dovecot
from tests.support.gmail_emulator import GmailEmulator
from tests.support.kafka import new_prefix

pytestmark = pytest.mark.integration
REPLIES = ServiceSettings(service_name="replies")
QUICK = (0.1, 1.0)  # reconnect backoff for tests: first, longest


def message(subject: str, body: str = "hello", message_id: str | None = None) -> bytes:
    return (f"From: Ada <ada@example.com>\r\nTo: box@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id or make_msgid(domain='example.com')}\r\n"
            f"Date: Thu, 01 Jan 2026 10:00:00 +0000\r\n\r\n{body}\r\n").encode()


def subject_of(raw: bytes) -> str:
    return next(line.split(b": ", 1)[1].decode() for line in raw.split(b"\r\n")
                if line.startswith(b"Subject: "))


async def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait for a condition with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


class Collector:
    """The service's part, as the glue does it: record each message, remember what came."""

    def __init__(self, state: MailboxState, fail: Callable[[bytes, int], bool] | None = None):
        self.state, self.fail = state, fail
        self.attempts: list[MailRef] = []
        self.got: list[tuple[bytes, MailRef]] = []

    async def __call__(self, raw: bytes, ref: MailRef) -> None:
        self.attempts.append(ref)
        if self.fail and self.fail(raw, len(self.attempts)):
            raise RuntimeError(f"handler refuses {ref.source_ref}")
        mid = next((line.split(b": ", 1)[1].decode() for line in raw.split(b"\r\n")
                    if line.lower().startswith(b"message-id: ")), None)
        await self.state.record_inbound(InboundMessage(ref, kind="unknown",
                                                       header_message_id=mid))
        self.got.append((raw, ref))

    @property
    def subjects(self) -> list[str]:
        return [subject_of(raw) for raw, _ in self.got]


@asynccontextmanager
async def state_for(namespace: str) -> AsyncIterator[MailboxState]:
    pool = open_pool(REPLIES.postgres)
    await pool.open()
    try:
        yield MailboxState(pool, namespace)
    finally:
        await pool.close()


@asynccontextmanager
async def running(reader: ImapReader | GmailReader) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(reader.run())
    try:
        yield task
    finally:
        reader.stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
def imap(dovecot_server: dovecot.Dovecot) -> dovecot.Dovecot:
    dovecot_server.clear()
    return dovecot_server


@pytest.fixture
def namespace() -> str:
    """A fresh namespace of marks and inbound messages (no Kafka needed here)."""
    return new_prefix()


def imap_account(server: dovecot.Dovecot, **imap: Any) -> Account:
    settings: dict[str, Any] = {"host": server.host, "port": server.port, "tls": "none",
                                "username": server.user, "password_file": server.password_file}
    return Account(id="box", kind="smtp", from_address=server.user,
                   smtp=SmtpAccount(host="127.0.0.1"), imap=ImapAccount(**settings | imap))


def imap_reader(server: dovecot.Dovecot, state: MailboxState, handler: Any,
                max_bytes: int = 1 << 20, **imap: Any) -> ImapReader:
    return ImapReader(imap_account(server, **imap), state=state, handler=handler,
                      max_bytes=max_bytes, backoff=QUICK)


def stored_mark(namespace: str, account: str = "box", mailbox: str = "INBOX"
                ) -> dict[str, Any] | None:
    with psycopg.connect(REPLIES.postgres.conninfo()) as conn:
        row = conn.execute("SELECT uidvalidity, last_uid, history_id, resets, reset_reason"
                           " FROM mailbox_state WHERE namespace = %s AND account_id = %s"
                           " AND mailbox = %s", (namespace, account, mailbox)).fetchone()
    return dict(zip(("uidvalidity", "last_uid", "history_id", "resets", "reset_reason"), row,
                    strict=True)) if row else None


def imap_mark(namespace: str, account: str = "box", mailbox: str = "INBOX") -> dict[str, Any]:
    mark = stored_mark(namespace, account, mailbox)
    assert mark, "no mark stored"
    return mark


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


# -- IMAP --

def test_messages_already_there_are_handed_over_once_and_the_mailbox_is_unchanged(
        imap: dovecot.Dovecot, namespace: str) -> None:
    for n in range(3):
        imap.append(message(f"before {n}"))

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = imap_reader(imap, state, got, batch=2)  # two fetch rounds
            async with running(reader):
                await until(lambda: len(got.got) == 3, what="3 messages")
                await until(reader.idling.is_set, what="IDLE")
            assert got.subjects == ["before 0", "before 1", "before 2"]
            uidvalidity = got.got[0][1].uidvalidity
            assert [r.source_ref for _, r in got.got] == [
                f"imap:{uidvalidity}:{uid}" for uid in (1, 2, 3)]
            assert all(not r.headers_only and r.size == len(raw) for raw, r in got.got)
            assert all(r.received_at and r.received_at.tzinfo for _, r in got.got)
            assert imap_mark(namespace) | {"uidvalidity": None} == {
                "uidvalidity": None, "last_uid": 3, "history_id": None, "resets": 0,
                "reset_reason": None}

    run(scenario)
    box = imap.mailbox()
    assert len(box) == 3
    assert not any(b"\\Seen" in flags for _, flags in box)


def test_a_message_delivered_during_idle_arrives_within_seconds(
        imap: dovecot.Dovecot, namespace: str) -> None:
    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = imap_reader(imap, state, got)
            async with running(reader):
                await until(reader.idling.is_set, what="IDLE")
                await asyncio.to_thread(imap.append, message("while idle"))
                await until(lambda: len(got.got) == 1, timeout=5, what="the new message")
            assert got.subjects == ["while idle"]

    run(scenario)


def test_polling_without_idle_finds_new_mail(imap: dovecot.Dovecot, namespace: str) -> None:
    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = imap_reader(imap, state, got, idle=False, poll_seconds=1)
            async with running(reader):
                await until(lambda: stored_mark(namespace) is not None, what="SELECT")
                await asyncio.to_thread(imap.append, message("polled"))
                await until(lambda: len(got.got) == 1, timeout=5, what="the polled message")
                assert not reader.idling.is_set()
            assert got.subjects == ["polled"]

    run(scenario)


def test_a_restart_resumes_after_the_stored_uid(imap: dovecot.Dovecot, namespace: str) -> None:
    async def scenario() -> None:
        async with state_for(namespace) as state:
            imap.append(message("one"))
            imap.append(message("two"))
            first = Collector(state)
            async with running(reader := imap_reader(imap, state, first)):
                await until(lambda: len(first.got) == 2)
                await until(reader.idling.is_set)
            imap.append(message("three"))  # while no reader runs
            second = Collector(state)
            async with running(reader := imap_reader(imap, state, second)):
                await until(lambda: len(second.got) == 1)
                await until(reader.idling.is_set)
                await asyncio.to_thread(imap.append, message("four"))
                await until(lambda: len(second.got) == 2)
            assert first.subjects == ["one", "two"]
            assert second.subjects == ["three", "four"]
            assert imap_mark(namespace)["last_uid"] == 4

    run(scenario)


def test_a_failing_handler_is_retried_and_never_skipped(
        imap: dovecot.Dovecot, namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    for subject in ("a", "b", "c"):
        imap.append(message(subject))

    async def scenario() -> None:
        async with state_for(namespace) as state:
            # The second attempt overall (message b) fails once.
            got = Collector(state, fail=lambda raw, attempt: attempt == 2)
            async with running(reader := imap_reader(imap, state, got)):
                await until(lambda: len(got.got) == 3)
            assert [subject_of(raw) for raw, _ in got.got] == ["a", "b", "c"]
            assert [r.uid for r in got.attempts] == [1, 2, 2, 3]
            assert reader.failures == 1 and "imap:" in (reader.last_error or "")
            assert imap_mark(namespace)["last_uid"] == 3

    with caplog.at_level(logging.ERROR, logger="mailbus.replies.imap"):
        run(scenario)
    assert any("handler failed" in r.getMessage() for r in caplog.records)


def test_processed_mail_moves_to_the_processed_folder_when_one_is_set(
        imap: dovecot.Dovecot, namespace: str) -> None:
    imap.append(message("first"))

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = imap_reader(imap, state, got, processed_folder="Processed")
            async with running(reader):
                await until(lambda: len(got.got) == 1)
                await until(reader.idling.is_set)
                await asyncio.to_thread(imap.append, message("second"))
                await until(lambda: len(got.got) == 2)
                await until(lambda: len(imap.mailbox("Processed")) == 2, what="the moves")
            assert got.subjects == ["first", "second"]

    run(scenario)
    assert imap.mailbox("INBOX") == []


def test_an_oversized_message_is_handed_over_as_its_header(
        imap: dovecot.Dovecot, namespace: str) -> None:
    big = message("big", body="x" * 200_000)
    imap.append(big)
    imap.append(message("small"))

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            async with running(imap_reader(imap, state, got, max_bytes=64 * 1024)):
                await until(lambda: len(got.got) == 2)
            (raw, ref), (small, small_ref) = got.got
            assert ref.headers_only and ref.size == len(big)
            assert raw.startswith(b"From: ") and raw.endswith(b"\r\n\r\n")
            assert b"xxxx" not in raw and len(raw) < 1000
            assert not small_ref.headers_only and small.endswith(b"hello\r\n")

    run(scenario)


class FetchSpy(ImapReader):
    """A reader whose FETCH commands are recorded: which UIDs, which items."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fetches: list[tuple[list[int], list[str]]] = []

    def _connect(self) -> Any:
        client = super()._connect()
        fetch = client.fetch

        def spied(uids: Any, items: Any, *args: Any, **kwargs: Any) -> Any:
            self.fetches.append((list(uids), list(items)))
            return fetch(uids, items, *args, **kwargs)

        client.fetch = spied
        return client


def test_bodies_come_within_the_byte_budget_and_oversized_ones_are_never_downloaded(
        imap: dovecot.Dovecot, namespace: str) -> None:
    # A header as big as the message: only its first HEADER_BYTES may come.
    huge_header = "".join(f"X-Filler-{n}: {'h' * 90}\r\n" for n in range(2000))
    oversized = message("oversized", body="x" * 300_000).replace(
        b"Subject:", huge_header.encode() + b"Subject:")
    mails = [message(f"mail {n}", body=f"{n}" * 40_000) for n in range(5)]
    for raw in (*mails[:2], oversized, *mails[2:]):
        imap.append(raw)
    budget = 100_000

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = FetchSpy(imap_account(imap, batch=10), state=state, handler=got,
                              max_bytes=128 * 1024, fetch_budget=budget, backoff=QUICK)
            async with running(reader):
                await until(lambda: len(got.got) == 6, what="6 messages")
            sizes = {ref.uid: ref.size for _, ref in got.got}
            bodies = [uids for uids, items in reader.fetches if items == ["BODY.PEEK[]"]]
            headers = [uids for uids, items in reader.fetches
                       if items == [f"BODY.PEEK[HEADER]<0.{HEADER_BYTES}>"]]
            # Five 40 KB bodies, 100 KB a round: two, then two, then one; the big one apart.
            assert bodies == [[1, 2], [4, 5], [6]]
            assert all(sum(sizes[u] for u in uids) <= budget for uids in bodies)
            assert headers == [[3]]
            (raw, ref), = [(raw, ref) for raw, ref in got.got if ref.uid == 3]
            assert ref.headers_only and ref.size == len(oversized) > 128 * 1024
            assert len(raw) == HEADER_BYTES and b"xxxx" not in raw
            assert [ref.uid for _, ref in got.got] == [1, 2, 3, 4, 5, 6]
            assert imap_mark(namespace)["last_uid"] == 6

    run(scenario)


def test_fetch_rounds_keep_order_and_budget() -> None:
    sizes = {1: 60, 2: 50, 3: 10_000, 4: 40, 5: 100, 6: 1}
    assert fetch_rounds([1, 2, 3, 4, 5, 6], sizes, max_bytes=1000, budget=100) == [
        [1], [2], [3], [4], [5], [6]]
    assert fetch_rounds([1, 2, 4, 6], sizes, max_bytes=1000, budget=150) == [[1, 2, 4], [6]]
    # Over max_bytes only its header is fetched, which counts HEADER_BYTES.
    assert fetch_rounds([3, 6], sizes, max_bytes=1000, budget=HEADER_BYTES + 1) == [[3, 6]]


def test_a_wrong_password_is_logged_and_retried_with_backoff(
        imap: dovecot.Dovecot, namespace: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = imap_reader(imap, state, got, password_file=wrong)
            async with running(reader) as task:
                await until(lambda: reader.failures >= 2, what="a retried login")
                await asyncio.sleep(1.0)  # let the backoff show: 0.1, 0.2, 0.4, 0.8 s ...
                assert not task.done()
            # Five attempts at most in ~1.3 s: doubling waits, not a tight loop.
            assert 2 <= reader.failures <= 5
            assert "login refused" in (reader.last_error or "")
            assert got.attempts == []

    with caplog.at_level(logging.ERROR, logger="mailbus.replies.imap"):
        run(scenario)
    refused = [r for r in caplog.records if "login refused" in r.getMessage()]
    assert refused and all(r.levelno == logging.ERROR for r in refused)
    assert "not-the-password" not in caplog.text


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_tls_with_a_private_ca_file(imap: dovecot.Dovecot, namespace: str, tls: str) -> None:
    imap.append(message("over tls"))

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            port = imap.tls_port if tls == "implicit" else imap.port
            async with running(imap_reader(imap, state, got, tls=tls, port=port,
                                           ca_file=imap.ca_file)):
                await until(lambda: len(got.got) == 1)
            assert got.subjects == ["over tls"]

    run(scenario)


class SeamAtIdle(ImapReader):
    """A reader whose IDLE command goes through `at_idle(client, send_idle)`."""

    def __init__(self, *args: Any, at_idle: Callable[[Any, Callable[[], Any]], Any],
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.at_idle = at_idle

    def _connect(self) -> Any:
        client = super()._connect()
        send_idle = client.idle
        client.idle = lambda: self.at_idle(client, send_idle)
        return client


def seam_reader(server: dovecot.Dovecot, state: MailboxState, handler: Any,
                at_idle: Callable[[Any, Callable[[], Any]], Any], **imap: Any) -> SeamAtIdle:
    return SeamAtIdle(imap_account(server, **imap), state=state, handler=handler,
                      max_bytes=1 << 20, backoff=QUICK, at_idle=at_idle)


@pytest.mark.parametrize("tls", ["none", "implicit"])
def test_a_stop_just_after_idle_was_sent_ends_idle_and_logs_out(
        imap: dovecot.Dovecot, namespace: str, tls: str) -> None:
    # A server in IDLE answers nothing but DONE: a LOGOUT sent instead would wait out
    # the 30 s read timeout, and running() gives the reader 10 s to finish.
    imap.append(message("before idle"))
    idles_sent: list[Any] = []
    readers: list[SeamAtIdle] = []

    def send_then_stop(client: Any, send_idle: Callable[[], Any]) -> Any:
        idles_sent.append(answer := send_idle())
        readers[0].stop()
        return answer

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = seam_reader(imap, state, got, send_then_stop, tls=tls,
                                 ca_file=imap.ca_file, timeout_seconds=30,
                                 port=imap.tls_port if tls == "implicit" else imap.port)
            readers.append(reader)
            async with running(reader) as task:
                await until(task.done, timeout=20, what="the reader to finish")
            assert len(idles_sent) == 1 and reader.failures == 0
            assert got.subjects == ["before idle"]
            assert imap_mark(namespace)["last_uid"] == 1

    run(scenario)


def test_mail_announced_just_before_idle_is_found_by_the_next_search(
        imap: dovecot.Dovecot, namespace: str) -> None:
    # New mail announced in the response to a command just before IDLE is never
    # announced again in IDLE; only leaving IDLE for a search finds it.
    announced: list[Any] = []

    def deliver_then_idle(client: Any, send_idle: Callable[[], Any]) -> Any:
        if not announced:
            imap.append(message("just before idle"))
            announced.append(client.noop())  # the server's EXISTS goes to this NOOP
        return send_idle()

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = seam_reader(imap, state, got, deliver_then_idle, poll_seconds=1)
            async with running(reader):
                await until(lambda: len(got.got) == 1, timeout=10, what="the announced mail")
            assert got.subjects == ["just before idle"]
            assert reader.failures == 0

    run(scenario)
    _, untagged = announced[0]
    assert (1, b"EXISTS") in untagged, untagged


def test_tls_refuses_a_certificate_not_signed_by_the_ca(
        imap: dovecot.Dovecot, namespace: str) -> None:
    imap.append(message("never read"))

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = imap_reader(imap, state, got, tls="implicit", port=imap.tls_port)
            async with running(reader):  # the system CAs do not know the test certificate
                await until(lambda: reader.failures >= 1)
            assert "CERTIFICATE_VERIFY_FAILED" in (reader.last_error or "")
            assert got.attempts == []

    run(scenario)


def test_a_new_uidvalidity_rereads_the_mailbox_without_repeating_messages(
        imap: dovecot.Dovecot, namespace: str) -> None:
    imap.append(message("old one"))
    imap.append(message("old two"))

    async def scenario() -> None:
        async with state_for(namespace) as state:
            first = Collector(state)
            async with running(imap_reader(imap, state, first)):
                await until(lambda: len(first.got) == 2)
            old = imap_mark(namespace)["uidvalidity"]
            imap.set_uidvalidity(old + 1000)
            imap.append(message("new"))
            second = Collector(state)
            async with running(reader := imap_reader(imap, state, second)):
                await until(lambda: imap_mark(namespace)["last_uid"] == 3, what="the re-read")
                await until(reader.idling.is_set)
            assert second.subjects == ["new"]
            assert second.got[0][1].source_ref == f"imap:{old + 1000}:3"
            mark = imap_mark(namespace)
            assert mark["uidvalidity"] == old + 1000 and mark["resets"] == 1
            assert "UIDVALIDITY changed" in mark["reset_reason"]

    run(scenario)


# -- Gmail --

ME, REFRESH = "box@example.test", "1//refresh-box"


@pytest.fixture
def emu() -> Iterator[GmailEmulator]:
    with GmailEmulator() as emulator:
        emulator.add_user(ME, refresh_token=REFRESH)
        yield emulator


def token_account(emu: GmailEmulator, tmp_path: Path, scopes: tuple[str, ...] = SCOPES,
                  **gmail: Any) -> Account:
    token = tmp_path / "token.json"
    expiry = datetime.now(UTC) + timedelta(hours=1)
    token.write_text(json.dumps({
        "token": emu.issue_token(ME, scopes), "refresh_token": REFRESH,
        "client_id": "client-id", "client_secret": "client-secret",
        "token_uri": emu.token_uri, "scopes": list(scopes),
        "expiry": expiry.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}))
    return Account(id="gbox", kind="gmail", from_address=ME,
                   gmail=GmailAccount(token_file=token, read_inbox=True, poll_seconds=1,
                                      batch=2, **gmail))


@pytest.fixture
def gmail_account(emu: GmailEmulator, tmp_path: Path) -> Account:
    return token_account(emu, tmp_path)


def gmail_reader(emu: GmailEmulator, account: Account, state: MailboxState,
                 handler: Any, max_bytes: int = 1 << 20) -> GmailReader:
    return GmailReader(account, state=state, handler=handler, max_bytes=max_bytes,
                       api_endpoint=emu.api_endpoint, token_uri=emu.token_uri, backoff=QUICK)


def test_gmail_inbox_mail_arrives_through_history_and_a_restart_resumes(
        emu: GmailEmulator, gmail_account: Account, namespace: str) -> None:
    emu.deliver(ME, message("already there"))  # before the first run: not read (see module)

    async def scenario() -> None:
        async with state_for(namespace) as state:
            first = Collector(state)
            async with running(reader := gmail_reader(emu, gmail_account, state, first)):
                await reader.caught_up.wait()
                stored = [emu.deliver(ME, message(f"reply {n}")) for n in range(3)]
                emu.deliver(ME, message("sent by us"), labels=("SENT",))
                await until(lambda: len(first.got) == 3, what="3 replies")
            assert first.subjects == ["reply 0", "reply 1", "reply 2"]
            assert [r.source_ref for _, r in first.got] == [f"gmail:{s.id}" for s in stored]
            assert first.got[0][0] == stored[0].raw
            emu.deliver(ME, message("while stopped"))
            second = Collector(state)
            async with running(reader := gmail_reader(emu, gmail_account, state, second)):
                await until(lambda: len(second.got) == 1)
                await reader.caught_up.wait()
            assert second.subjects == ["while stopped"]
            # No processed_label: not one call that could change the mailbox.
            assert emu.requests["modify"] == emu.requests["labels.create"] == 0
            assert all(m.label_ids in (["INBOX", "UNREAD"], ["SENT"]) for m in emu.messages(ME))
            mark = stored_mark(namespace, "gbox")
            assert mark and mark | {"uidvalidity": None} == {
                "uidvalidity": None, "last_uid": 0, "history_id": str(
                    emu.messages(ME)[-1].history_id), "resets": 0, "reset_reason": None}

    run(scenario)


def test_an_oversized_gmail_message_is_sized_first_and_never_downloaded(
        emu: GmailEmulator, gmail_account: Account, namespace: str) -> None:
    big = message("big", body="x" * 200_000)

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = gmail_reader(emu, gmail_account, state, got, max_bytes=64 * 1024)
            async with running(reader):
                await reader.caught_up.wait()
                stored = [emu.deliver(ME, raw) for raw in (message("small"), big,
                                                           message("after"))]
                await until(lambda: len(got.got) == 3, what="3 messages")
            assert got.subjects == ["small", "big", "after"]
            (raw, ref) = got.got[1]
            assert ref.headers_only and ref.size == len(big)
            assert ref.source_ref == f"gmail:{stored[1].id}"
            assert raw.startswith(b"From: Ada") and raw.endswith(b"\r\n\r\n")
            assert b"xxxx" not in raw and len(raw) < 1000
            assert not any(r.headers_only for _, r in (got.got[0], got.got[2]))
            # Every message sized first; only the two small ones downloaded.
            assert (emu.requests["get.minimal"], emu.requests["get.raw"],
                    emu.requests["get.metadata"]) == (3, 2, 1)

    run(scenario)


@pytest.mark.parametrize("kind", ["imap", "gmail"])
def test_a_reader_stopped_before_it_ran_reads_nothing_and_returns(
        kind: str, imap: dovecot.Dovecot, emu: GmailEmulator, gmail_account: Account,
        namespace: str) -> None:
    # A service told to stop while it starts: the reader tasks exist but have not run.
    imap.append(message("never read"))
    emu.deliver(ME, message("never read"))

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            reader = (imap_reader(imap, state, got) if kind == "imap"
                      else gmail_reader(emu, gmail_account, state, got))
            reader.stop()
            await asyncio.wait_for(reader.run(), 10)
            assert got.attempts == [] and stored_mark(namespace, reader.account_id) is None

    run(scenario)
    assert sum(emu.requests.values()) == 0, emu.requests  # no call reached "Gmail"


def test_an_expired_history_id_falls_back_to_a_full_sync_without_loss_or_repeats(
        emu: GmailEmulator, gmail_account: Account, namespace: str) -> None:
    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            async with running(reader := gmail_reader(emu, gmail_account, state, got)):
                await reader.caught_up.wait()
                emu.deliver(ME, message("one"))
                emu.deliver(ME, message("two"))
                await until(lambda: len(got.got) == 2)
            # While stopped: more mail, then Gmail forgets the history the mark points into.
            for subject in ("three", "four", "five"):
                emu.deliver(ME, message(subject))
            emu.expire_history(ME)
            async with running(reader := gmail_reader(emu, gmail_account, state, got)):
                await until(lambda: reader.full_syncs == 1, what="the full sync")
                emu.deliver(ME, message("six"))  # followed through history again
                await until(lambda: len(got.got) == 6)
            assert got.subjects == ["one", "two", "three", "four", "five", "six"]
            assert len({r.source_ref for r in got.attempts}) == len(got.attempts) == 6
            assert emu.requests["modify"] == emu.requests["labels.list"] == 0
            mark = stored_mark(namespace, "gbox")
            assert mark and mark["resets"] == 1 and "expired" in mark["reset_reason"]

    run(scenario)


@pytest.mark.parametrize(("status", "method"), [(429, "history"), (503, "get")])
def test_gmail_rate_limits_and_server_errors_are_retried(
        emu: GmailEmulator, gmail_account: Account, namespace: str, status: int,
        method: str) -> None:
    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            async with running(reader := gmail_reader(emu, gmail_account, state, got)):
                await reader.caught_up.wait()
                emu.fail_next(status, method=method)
                emu.deliver(ME, message("after a refusal"))
                await until(lambda: len(got.got) == 1, timeout=10)
            assert got.subjects == ["after a refusal"]
            assert reader.failures == 1
            assert emu.requests[method] >= 2

    run(scenario)


# -- Gmail: processed_label --

LABEL = "mailbus/processed"
MAY_MODIFY = (*SCOPES, AUTH + "gmail.modify")


def labelled(emu: GmailEmulator) -> list[str]:
    """Subjects of the messages that carry the processed label, as Gmail holds them."""
    label_id = emu.labels(ME).get(LABEL)
    return [str(m.message["Subject"]) for m in emu.messages(ME) if label_id in m.label_ids]


@pytest.mark.parametrize("name", ["", " Processed", "Processed ", "x" * 226])
def test_a_processed_label_gmail_would_not_take_is_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="processed_label"):
        GmailAccount(token_file=Path("t.json"), processed_label=name)
    assert GmailAccount(token_file=Path("t.json"), processed_label="x" * 225).processed_label


def test_handled_messages_get_the_processed_label_created_once_across_restarts(
        emu: GmailEmulator, tmp_path: Path, namespace: str) -> None:
    account = token_account(emu, tmp_path, MAY_MODIFY, processed_label=LABEL)
    emu.deliver(ME, message("already there"))

    async def scenario() -> None:
        async with state_for(namespace) as state:
            first = Collector(state)
            async with running(reader := gmail_reader(emu, account, state, first)):
                await reader.caught_up.wait()
                emu.deliver(ME, message("one"))
                emu.deliver(ME, message("two"))
                emu.deliver(ME, message("sent by us"), labels=("SENT",))
                await until(lambda: labelled(emu) == ["one", "two"], what="two labels")
                # Polls after the labelling: its history is labelAdded, never read as new mail.
                polls = emu.requests["history"]
                await until(lambda: emu.requests["history"] >= polls + 2, what="two more polls")
            assert [subject_of(raw) for raw, _ in first.got] == ["one", "two"]
            assert len(first.attempts) == 2
            emu.deliver(ME, message("while stopped"))
            second = Collector(state)
            async with running(reader := gmail_reader(emu, account, state, second)):
                await until(lambda: "while stopped" in labelled(emu), what="the third label")
                await reader.caught_up.wait()
            assert second.subjects == ["while stopped"]

    run(scenario)
    assert list(emu.labels(ME)) == [LABEL]
    assert emu.requests["labels.create"] == 1
    assert emu.requests["labels.list"] == 2  # once per start, not per poll
    assert emu.requests["modify"] == 3
    inbox = [m for m in emu.messages(ME) if "INBOX" in m.label_ids]
    assert len(inbox) == 4 and all("UNREAD" in m.label_ids for m in inbox)  # nothing else


def test_a_message_whose_handler_fails_stays_unlabelled_until_handled(
        emu: GmailEmulator, tmp_path: Path, namespace: str) -> None:
    account = token_account(emu, tmp_path, MAY_MODIFY, processed_label=LABEL)
    refusing = True

    async def scenario() -> None:
        nonlocal refusing
        async with state_for(namespace) as state:
            got = Collector(state, fail=lambda raw, _: refusing and subject_of(raw) == "bad")
            async with running(reader := gmail_reader(emu, account, state, got)):
                await reader.caught_up.wait()
                emu.deliver(ME, message("good"))
                emu.deliver(ME, message("bad"))
                await until(lambda: reader.failures >= 2, what="two refusals")
                assert labelled(emu) == ["good"]
                assert emu.requests["modify"] == 1
                refusing = False
                await until(lambda: labelled(emu) == ["good", "bad"], what="the late label")
            assert got.subjects == ["good", "bad"]

    run(scenario)


def test_labelling_that_failed_is_retried_without_handling_the_message_again(
        emu: GmailEmulator, tmp_path: Path, namespace: str) -> None:
    account = token_account(emu, tmp_path, MAY_MODIFY, processed_label=LABEL)

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            async with running(reader := gmail_reader(emu, account, state, got)):
                await reader.caught_up.wait()
                emu.fail_next(503, method="modify")
                emu.deliver(ME, message("once"))
                await until(lambda: labelled(emu) == ["once"], what="the label")
            assert len(got.attempts) == 1 and reader.failures == 1
            assert emu.requests["modify"] == 2

    run(scenario)


def test_a_label_deleted_while_reading_is_created_again(
        emu: GmailEmulator, tmp_path: Path, namespace: str) -> None:
    account = token_account(emu, tmp_path, MAY_MODIFY, processed_label=LABEL)

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            async with running(reader := gmail_reader(emu, account, state, got)):
                await reader.caught_up.wait()
                emu.deliver(ME, message("first"))
                await until(lambda: labelled(emu) == ["first"])
                emu.delete_label(ME, emu.labels(ME)[LABEL])
                emu.deliver(ME, message("second"))
                await until(lambda: labelled(emu) == ["second"], what="a new label")
            assert got.subjects == ["first", "second"] and reader.failures == 1
            assert emu.requests["labels.create"] == 2

    run(scenario)


def test_a_token_without_the_modify_scope_is_refused_up_front(
        emu: GmailEmulator, tmp_path: Path, namespace: str) -> None:
    account = token_account(emu, tmp_path, processed_label=LABEL)

    async def scenario() -> None:
        async with state_for(namespace) as state:
            with pytest.raises(ConfigError, match=r"gmail\.modify"):
                gmail_reader(emu, account, state, Collector(state))

    run(scenario)
    assert emu.requests["token"] == 0


def test_a_delegated_service_account_asks_for_the_modify_scope(
        emu: GmailEmulator, tmp_path: Path, namespace: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    sa_file = tmp_path / "sa.json"
    sa_file.write_text(json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": "k1",
        "private_key": pem, "client_email": "reader@p.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}))
    emu.add_service_account("reader@p.iam.gserviceaccount.com", key.public_key(),
                            delegates={ME})
    account = Account(id="gbox", kind="gmail", from_address=ME, gmail=GmailAccount(
        service_account_file=sa_file, read_inbox=True, poll_seconds=1, processed_label=LABEL))

    async def scenario() -> None:
        async with state_for(namespace) as state:
            got = Collector(state)
            async with running(reader := gmail_reader(emu, account, state, got)):
                await reader.caught_up.wait()
                emu.deliver(ME, message("to a delegate"))
                await until(lambda: labelled(emu) == ["to a delegate"])
            assert reader.failures == 0

    run(scenario)
