"""The sender against the real broker, PostgreSQL and a real SMTP server in the test."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from mailbus.sender.settings import SenderSettings
from mailbus.tokens import Keyring, verify
from tests.support.kafka import read_all
from tests.support.sender import SenderThread, produce, request, smtp_account
from tests.support.smtp import SmtpServer


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
def sender_env(namespace: str, tmp_path: Path, smtp: SmtpServer, admin_kafka, registry):
    """Build settings for an accounts file, run the sender, and read its topics."""

    class Env:
        def settings(self, accounts: str, **overrides: Any) -> SenderSettings:
            path = tmp_path / "accounts.toml"
            path.write_text(accounts)
            return SenderSettings(
                accounts_file=path, kafka={"topic_prefix": namespace}, metrics_port=0,
                retry_base_seconds=0.2, retry_cap_seconds=1.0, poll_seconds=0.2,
                link_keys_file=tmp_path / "link-keys.json", **overrides)

        def produce(self, events: list[dict[str, Any]]) -> None:
            produce(admin_kafka, namespace + "email.requested", registry, events)

        def events(self, topic: str, **kw: Any) -> list[dict[str, Any]]:
            return [registry.decode(m.value())[1]
                    for m in read_all(admin_kafka, namespace + topic, **kw)]

    return Env()


def ledger_states(message_ids: list[str], admin) -> dict[str, str]:
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        rows = conn.execute("SELECT message_id::text, state FROM send_ledger"
                            " WHERE message_id = ANY(%s::uuid[])", (message_ids,)).fetchall()
    return dict(rows)


def test_delivers_with_correct_mime_and_emits_events(sender_env, smtp, tmp_path, admin):
    settings = sender_env.settings(smtp_account("dev", smtp.port))
    events = [request(subject=f"Grüße {i} \u2013 ünïcode", to=f"user{i}@example.com",
                      html="<p>Hello <b>there</b></p>",
                      actions=[{"id": "yes", "label": "Yes", "url": None}])
              for i in range(3)]
    with SenderThread(settings):
        sender_env.produce(events)
        sent = sender_env.events("email.sent", expect=3)
        delivered = sender_env.events("email.delivered", expect=3)
    by_subject = {m["Subject"]: m for m in smtp.handler.messages()}
    keyring = Keyring.from_file(tmp_path / "link-keys.json")
    for i, event in enumerate(events):
        msg = by_subject[event["subject"]]
        assert msg["Message-ID"] == f"<{event['message_id']}@sender.example>"
        assert msg["To"] == f"Ada Lovelace <user{i}@example.com>"
        assert msg.get_content_type() == "multipart/alternative"
        unsubscribe = msg["List-Unsubscribe"]
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        token = unsubscribe.split("/u/")[1].split(">")[0]
        claims = verify(keyring, token, now=datetime.now(UTC))
        assert (claims.message_id, claims.recipient) == (event["message_id"],
                                                          f"user{i}@example.com")
    assert {e["message_id"] for e in sent} == {e["message_id"] for e in events}
    assert all(e["smtp_response"].startswith("250 2.0.0 Ok") and e["attempt"] == 1
               and not e["possible_duplicate"] and e["transport"] == "smtp" for e in sent)
    assert {e["evidence"] for e in delivered} == {"smtp_final"}
    ids = [e["message_id"] for e in events]
    assert set(ledger_states(ids, admin).values()) == {"sent"}


def test_transient_failures_are_retried_then_sent(sender_env, smtp):
    tries = {"n": 0}

    def flaky(_data: bytes) -> str | None:
        tries["n"] += 1
        return "451 4.3.0 Try again later" if tries["n"] <= 2 else None

    smtp.handler.data_rule = flaky
    settings = sender_env.settings(smtp_account("dev", smtp.port))
    event = request()
    with SenderThread(settings):
        sender_env.produce([event])
        [sent] = sender_env.events("email.sent", expect=1, timeout=30)
    assert sent["attempt"] == 3 and sent["message_id"] == event["message_id"]
    assert len(smtp.handler.received) == 1
    assert sender_env.events("email.failed", settle=0.5) == []


def test_permanent_rejection_fails_with_the_code(sender_env, smtp):
    smtp.handler.rcpt_rule = lambda a: "550 5.1.1 No such user" if a.startswith("ghost") else None
    settings = sender_env.settings(smtp_account("dev", smtp.port))
    ghost, mixed = request(to="ghost@example.com"), request(
        to="ada@example.com", cc=[{"email": "ghost2@example.com", "name": None}])
    with SenderThread(settings):
        sender_env.produce([ghost, mixed])
        failed = sender_env.events("email.failed", expect=2)
        [sent] = sender_env.events("email.sent", expect=1)
    by_message = {f["message_id"]: f for f in failed}
    assert by_message[ghost["message_id"]]["code"] == 550
    assert by_message[ghost["message_id"]]["enhanced_status"] == "5.1.1"
    assert by_message[ghost["message_id"]]["permanent"] is True
    # Accepted for one recipient, refused for the other: sent, plus a failure for that one.
    assert sent["message_id"] == mixed["message_id"]
    assert sent["recipients"] == ["ada@example.com"]
    assert by_message[mixed["message_id"]]["recipient"] == "ghost2@example.com"
    assert by_message[mixed["message_id"]]["enhanced_status"] == "5.1.1"
    assert by_message[mixed["message_id"]]["permanent"] is True


def test_a_recipient_refused_for_now_gets_the_same_message_later(sender_env, smtp, admin):
    # Greylisting: 450 at RCPT for one recipient, the first two times it is offered.
    offered = {"n": 0}

    def greylist(address: str) -> str | None:
        if address.lower().startswith("grey"):
            offered["n"] += 1
            if offered["n"] <= 2:
                return "450 4.2.0 Greylisted, try again later"
        return None

    smtp.handler.rcpt_rule = greylist
    settings = sender_env.settings(smtp_account("dev", smtp.port))
    event = request(to="ada@example.com", cc=[{"email": "grey@example.com", "name": None}])
    with SenderThread(settings):
        sender_env.produce([event])
        sent = sender_env.events("email.sent", expect=2, timeout=30)
        delivered = sender_env.events("email.delivered", expect=2)
    assert [(e["recipients"], e["attempt"]) for e in sent] == [
        (["ada@example.com"], 1), (["grey@example.com"], 3)]
    assert sorted(e["recipient"] for e in delivered) == ["ada@example.com", "grey@example.com"]
    assert sender_env.events("email.failed", settle=0.5) == []
    # One message, as written, to each: the same headers, Cc included, and Message-ID.
    first, second = smtp.handler.received
    assert (first.rcpt_tos, second.rcpt_tos) == (["ada@example.com"], ["grey@example.com"])
    assert first.message["Message-ID"] == second.message["Message-ID"]
    assert first.message["To"] == second.message["To"] and second.message["Cc"] == \
        "grey@example.com"
    assert ledger_states([event["message_id"]], admin) == {event["message_id"]: "sent"}


def test_a_recipient_refused_for_now_until_retries_run_out_fails_alone(
        sender_env, smtp, admin, admin_kafka, namespace):
    smtp.handler.rcpt_rule = lambda a: ("450 4.2.0 Greylisted" if a.lower().startswith("grey")
                                        else None)
    settings = sender_env.settings(smtp_account("dev", smtp.port), max_attempts=2)
    event = request(to="ada@example.com", bcc=[{"email": "grey@example.com", "name": None}])
    with SenderThread(settings):
        sender_env.produce([event])
        [failed] = sender_env.events("email.failed", expect=1, timeout=30)
        [sent] = sender_env.events("email.sent", expect=1)
    assert sent["recipients"] == ["ada@example.com"]
    assert (failed["recipient"], failed["permanent"], failed["code"], failed["attempt"]) == (
        "grey@example.com", False, 450, 2)
    assert failed["reason"].startswith("gave up after 2 attempts: 450 4.2.0 Greylisted")
    # Sent for the others: no replay of the whole message is offered anywhere.
    assert read_all(admin_kafka, namespace + "email.requested.dlq", settle=0.5) == []
    assert ledger_states([event["message_id"]], admin) == {event["message_id"]: "sent"}
    assert [r.rcpt_tos for r in smtp.handler.received] == [["ada@example.com"]]


def test_retries_run_out_into_the_dead_letter_topic(sender_env, smtp, admin_kafka, namespace,
                                                    admin):
    smtp.handler.data_rule = lambda _d: "421 4.7.0 Server busy"
    settings = sender_env.settings(smtp_account("dev", smtp.port), max_attempts=2)
    event = request()
    with SenderThread(settings):
        sender_env.produce([event])
        [failed] = sender_env.events("email.failed", expect=1, timeout=30)
        [dead] = read_all(admin_kafka, namespace + "email.requested.dlq", expect=1)
    assert failed["permanent"] is False and failed["reason"].startswith("gave up after 2")
    assert dict(dead.headers())["mailbus.reason"].decode().startswith("gave up after 2")
    assert ledger_states([event["message_id"]], admin) == {event["message_id"]: "failed"}


def test_undecodable_unknown_account_and_non_uuid_records_are_dead_lettered(
        sender_env, smtp, admin_kafka, namespace, registry):
    settings = sender_env.settings(smtp_account("dev", smtp.port))
    producer = Producer(admin_kafka)
    with SenderThread(settings):
        producer.produce(namespace + "email.requested", b"\xc3\x01garbage", key=b"dev")
        producer.produce(namespace + "email.requested",
                         registry.encode("email.requested", request("nobody")), key=b"nobody")
        producer.flush(10)
        # Ids the ledger's uuid key cannot hold (one Python's parser would take): each
        # used to fail the batch's insert again and again, and stop admission for all.
        sender_env.produce([request(message_id="order-42"),
                            request(message_id=f"urn:uuid:{uuid.uuid4()}")])
        good = request()
        sender_env.produce([good])
        [sent] = sender_env.events("email.sent", expect=1)
        dead = read_all(admin_kafka, namespace + "email.requested.dlq", expect=4)
    assert sent["message_id"] == good["message_id"]
    reasons = sorted(dict(m.headers())["mailbus.reason"].decode() for m in dead)
    assert [r.split(" ")[0] for r in reasons] == [
        "invalid:", "invalid:", "undecodable:", "unknown"], reasons
    assert "order-42" in reasons[0] + reasons[1]
    assert all(b"email.requested/" in dict(m.headers())["mailbus.source"] for m in dead)


def test_suppressed_recipients_are_not_mailed(sender_env, smtp, admin_kafka, namespace,
                                              registry):
    address = "Unsubscribed@Example.com"
    suppression = {
        "event_id": str(uuid.uuid4()), "message_id": None, "occurred_at": datetime.now(UTC),
        "address": address.lower(),
        "address_hash": hashlib.sha256(address.lower().encode()).hexdigest(),
        "reason": "unsubscribe", "scope": None, "active": True,
    }
    producer = Producer(admin_kafka)
    producer.produce(namespace + "email.suppressions",
                     registry.encode("email.suppressions", suppression),
                     key=suppression["address_hash"].encode())
    producer.flush(10)
    settings = sender_env.settings(smtp_account("dev", smtp.port))
    blocked = request(to=address)
    partly = request(to="ok@example.com", bcc=[{"email": address, "name": None}])
    with SenderThread(settings):
        sender_env.produce([blocked, partly])
        [failed] = sender_env.events("email.failed", expect=1)
        [sent] = sender_env.events("email.sent", expect=1)
    assert failed["message_id"] == blocked["message_id"]
    assert failed["reason"].startswith("suppressed") and failed["permanent"] is True
    assert sent["message_id"] == partly["message_id"]
    [received] = smtp.handler.received
    assert [r.lower() for r in received.rcpt_tos] == ["ok@example.com"]


def test_template_failure_fails_the_message_with_the_reason(sender_env, smtp):
    settings = sender_env.settings(smtp_account("dev", smtp.port))
    broken = request(subject=None, text=None, template={
        "subject": "Hi {{ name }}", "text": "Hello {{ missing_variable }}", "html": None,
        "variables_json": '{"name": "Ada"}'})
    rendered = request(subject=None, text=None, template={
        "subject": "Hi {{ name }}", "text": "Hello {{ name }}", "html": "<p>{{ name }}</p>",
        "variables_json": '{"name": "<script>Ada</script>"}'})
    with SenderThread(settings):
        sender_env.produce([broken, rendered])
        [failed] = sender_env.events("email.failed", expect=1)
        sender_env.events("email.sent", expect=1)
    assert failed["message_id"] == broken["message_id"]
    assert "template" in failed["reason"] and "missing_variable" in failed["reason"]
    [msg] = smtp.handler.messages()
    assert msg["Subject"] == "Hi <script>Ada</script>"
    html = msg.get_body(("html",)).get_content()
    assert "&lt;script&gt;Ada&lt;/script&gt;" in html and "<script>" not in html


def test_five_accounts_share_the_load_within_quota_and_rate(sender_env, smtp, admin):
    from mailbus.accounts import pick_account

    accounts = [f"acct{i}" for i in range(5)]
    toml = "".join(smtp_account(a, smtp.port, pools=("spread",), quota=6, rate=2)
                   for a in accounts)
    settings = sender_env.settings(toml)
    events = []
    for i in range(40):
        to = f"person{i}@example.com"
        events.append(request(pick_account(accounts, to), to=to, pool="spread"))
    with SenderThread(settings):
        sender_env.produce(events)
        sent = sender_env.events("email.sent", expect=30, timeout=60)
        # The quota is spent: nothing more goes out, and nothing fails.
        assert len(sender_env.events("email.sent", settle=3.0)) == 30
    per_account: dict[str, list[float]] = {}
    for e in sent:
        # When the hand-over started: the event's time less the send's latency. The
        # SMTP server's own clock would add its scheduling in this process (it runs
        # in a thread beside the sender's), which under load bunches arrivals.
        started = e["occurred_at"].timestamp() - e["send_latency_us"] / 1e6
        per_account.setdefault(e["account_id"], []).append(started)
    assert sorted(per_account) == accounts  # every account took a share
    assert all(len(v) == 6 for v in per_account.values())  # and none passed its quota
    assert len(smtp.handler.received) == 30
    for times in per_account.values():
        times.sort()
        # Token bucket: 2/s sustained, bursts of 2: at most 4 in any one second.
        assert all(sum(1 for u in times if t <= u < t + 1.0) <= 4 for t in times), [
            round(u - times[0], 3) for u in times]
    states = ledger_states([e["message_id"] for e in events], admin)
    assert sorted(states.values()).count("sent") == 30
    assert set(states.values()) == {"sent", "queued"}  # waiting, never failed
    assert sender_env.events("email.failed", settle=0.5) == []


def test_exhausted_account_fails_over_within_its_pool(sender_env, smtp):
    toml = (smtp_account("small", smtp.port, pools=("team",), quota=1)
            + smtp_account("large", smtp.port, pools=("team",), quota=100))
    settings = sender_env.settings(toml)
    events = [request("small", to=f"t{i}@example.com", pool="team") for i in range(3)]
    with SenderThread(settings):
        sender_env.produce(events)
        sent = sender_env.events("email.sent", expect=3, timeout=30)
    accounts = sorted(e["account_id"] for e in sent)
    assert accounts == ["large", "large", "small"]
    assert {e["message_id"] for e in sent} == {e["message_id"] for e in events}
    assert len(smtp.handler.received) == 3


# PostgreSQL unreachable while messages are handed over: the sender reaches it through
# a TCP proxy in the test; cutting it drops every open connection and refuses new ones.
RETRY_COUNT = 400


class Proxy:
    """Forwards 127.0.0.1:port to PostgreSQL until cut; then refuses and drops everything."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.open = True
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.open = False
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
        self._server.close()


def test_settles_that_fail_are_retried_until_they_land(namespace, tmp_path: Path, admin_kafka,
                                                       registry, admin):
    base = SenderSettings()
    proxy = Proxy((base.postgres.host, base.postgres.port))
    events = [request(to=f"r{i}@example.com", subject=f"n{i}") for i in range(RETRY_COUNT)]
    wanted = {e["message_id"] for e in events}
    failed_before = REGISTRY.get_sample_value("mailbus_sender_settle_errors_total") or 0.0
    try:
        with SmtpServer() as smtp:
            accounts = tmp_path / "accounts.toml"
            accounts.write_text(smtp_account("dev", smtp.port, rate=100, connections=3))
            settings = SenderSettings(
                accounts_file=accounts, kafka={"topic_prefix": namespace}, metrics_port=0,
                poll_seconds=0.2, link_keys_file=tmp_path / "keys.json",
                postgres={"host": "127.0.0.1", "port": proxy.port}, log_level="WARNING")
            # Cut PostgreSQL off while a message is on the wire: the sender gets its
            # 250 after the cut, so that message's settle meets the fault for certain.
            # The cut outlasts the pool's 5 s wait for a connection, so a settle that
            # found no connection fails too rather than waiting the cut out.
            cut = threading.Event()
            accepted = itertools.count(1)

            def cut_at_quarter(_data: bytes) -> None:
                if next(accepted) == RETRY_COUNT // 4:
                    proxy.cut()
                    cut.set()

            smtp.handler.data_rule = cut_at_quarter
            with SenderThread(settings) as thread:
                produce(admin_kafka, namespace + "email.requested", registry, events)
                deadline = time.monotonic() + 120
                assert cut.wait(120), "the sender never reached a quarter of the messages"
                at_cut = len(smtp.handler.received)
                time.sleep(7)
                proxy.open = True
                assert at_cut < RETRY_COUNT, "every message went before the cut; nothing was tested"
                with psycopg.connect(admin.postgres.conninfo()) as conn:
                    while True:
                        states = Counter(dict(conn.execute(
                            "SELECT state, count(*) FROM send_ledger WHERE namespace = %s"
                            " GROUP BY state", (namespace,)).fetchall()))
                        if states["sent"] == RETRY_COUNT:
                            break
                        assert time.monotonic() < deadline, states
                        time.sleep(0.2)
                assert thread.sender is not None
                # Read while the sender runs: an event whose produce the cut
                # interrupted waits in its outbox for the next sweep.
                sent = [registry.decode(m.value())[1]
                        for m in read_all(admin_kafka, namespace + "email.sent",
                                          expect=RETRY_COUNT, settle=3.0, timeout=60)]
            received = Counter(m["X-Mailbus-Message-Id"] for m in smtp.handler.messages())
    finally:
        proxy.close()
    # Settles did fail during the cut (and were retried): the fault was real.
    assert (REGISTRY.get_sample_value("mailbus_sender_settle_errors_total") or 0) > failed_before
    assert set(received) == wanted
    assert {e["message_id"] for e in sent} == wanted
    flagged = {e["message_id"] for e in sent if e["possible_duplicate"]}
    assert {m for m, n in received.items() if n > 1} <= flagged


def test_a_timeout_after_data_is_retried_as_a_possible_duplicate(namespace, tmp_path: Path,
                                                                  admin_kafka, registry):
    with SmtpServer() as smtp:
        handler = smtp.handler
        plain = handler.handle_DATA
        slow = {"left": 1}

        async def handle_DATA(server: Any, session: Any, envelope: Any) -> str:
            reply = await plain(server, session, envelope)  # taken: it is on the server
            if slow["left"]:
                slow["left"] -= 1
                await asyncio.sleep(3)  # and the reply comes after the client gave up
            return reply

        handler.handle_DATA = handle_DATA  # type: ignore[method-assign]
        accounts = tmp_path / "accounts.toml"
        accounts.write_text(smtp_account("dev", smtp.port, connections=1)
                            + "timeout_seconds = 1\n")
        settings = SenderSettings(accounts_file=accounts, kafka={"topic_prefix": namespace},
                                  metrics_port=0, poll_seconds=0.2, retry_base_seconds=0.2,
                                  retry_cap_seconds=0.5, link_keys_file=tmp_path / "k.json")
        event = request(subject="slow reply")
        with SenderThread(settings):
            produce(admin_kafka, namespace + "email.requested", registry, [event])
            deadline = time.monotonic() + 60
            while len(handler.received) < 2:
                assert time.monotonic() < deadline, len(handler.received)
                time.sleep(0.1)
            # Its email.sent follows the second 250, the settle and the outbox produce.
            assert len(read_all(admin_kafka, namespace + "email.sent", expect=1,
                                timeout=60)) == 1
        # Stopped: whatever the sender wrote is in the topic now, all of it read.
        sent = [registry.decode(m.value())[1]
                for m in read_all(admin_kafka, namespace + "email.sent", settle=2.0,
                                  timeout=30)]
    ids = [m["X-Mailbus-Message-Id"] for m in handler.messages()]
    assert ids == [event["message_id"]] * 2  # it did reach the server twice
    assert [e["possible_duplicate"] for e in sent] == [True]  # and its email.sent says so


def test_emitted_events_leave_the_outbox_and_are_not_emitted_again(sender_env, smtp, namespace):
    # Rows of acknowledged events are deleted by the next settle, or by the sweep
    # once the sender is idle; the sweep must never take them for left-behind ones.
    from mailbus.sender import app as sender_app

    settings = sender_env.settings(smtp_account("dev", smtp.port))
    events = [request(to=f"user{i}@example.com") for i in range(30)]

    def left() -> int:  # read as the sender, the one role that may
        with psycopg.connect(settings.postgres.conninfo()) as conn:
            row = conn.execute("SELECT count(*) FROM sender_outbox WHERE namespace = %s",
                               (namespace,)).fetchone()
        return row[0] if row else -1

    with SenderThread(settings):
        sender_env.produce(events)
        assert len(sender_env.events("email.sent", expect=30)) == 30
        deadline = time.monotonic() + sender_app.SWEEP_SECONDS * 2 + 10
        while left() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left() == 0
        time.sleep(sender_app.SWEEP_SECONDS + 1)  # one more sweep over an empty outbox
    sent = sender_env.events("email.sent", settle=1.0)
    delivered = sender_env.events("email.delivered", settle=1.0)
    assert len(sent) == 30 and len({e["event_id"] for e in sent}) == 30
    assert len(delivered) == 30 and len({e["event_id"] for e in delivered}) == 30
