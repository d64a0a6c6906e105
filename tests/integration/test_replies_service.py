"""`mailbus replies` as a process: a real Dovecot mailbox in, Kafka events and rows out."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import psycopg

from mailbus.replies.app import Replies
from mailbus.replies.classify import Inbound, classify_inbound
from mailbus.replies.settings import RepliesSettings
from mailbus.tokens import Keyring, LinkBuilder
from tests.support import dovecot
from tests.support.kafka import read_all
from tests.support.processes import Services
from tests.support.projector import eventually, produce, projector_running, sent
from tests.support.projector import rows as projected
from tests.support.projector import settings_for as projector_settings

CORPUS = Path(__file__).parent.parent / "unit" / "corpus" / "inbound"
READER = RepliesSettings()


def accounts_toml(server: dovecot.Dovecot) -> str:
    return f"""
[[accounts]]
id = "dev"
kind = "smtp"
from_address = "news@example.com"

[accounts.smtp]
host = "127.0.0.1"
port = 2525
tls = "none"

{server.accounts_table()}"""


def mail(**headers: str) -> bytes:
    msg = EmailMessage()
    for name, value in headers.items():
        if name != "body":
            msg[name.replace("_", "-")] = value
    msg.set_content(headers.get("body", "Hello"))
    return bytes(msg)


def reply_to(message_id: str, text: str) -> bytes:
    return mail(From="Ada <ada@example.org>", To="news@example.com", Subject="Re: Friday",
                In_Reply_To=f"<{message_id}@example.com>",
                Message_ID=f"<{uuid.uuid4()}@mail.example.org>",
                Date=format_datetime(datetime.now(UTC)),
                body=f"{text}\n\nOn Mon, Ada wrote:\n> Are you coming on Friday?\n")


def inbound_rows(namespace: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(READER.postgres.conninfo()) as conn:
        return conn.execute(
            "SELECT kind, message_id::text, sender FROM inbound_messages WHERE namespace = %s"
            " ORDER BY source_ref", (namespace,)).fetchall()


def decoded(admin_kafka, namespace: str, registry, topic: str, **kw: Any) -> list[dict]:
    return [registry.decode(m.value())[1]
            for m in read_all(admin_kafka, namespace + topic, **kw)]


def test_mailbox_to_events_once_each_and_the_mailbox_untouched(
        dovecot_server, namespace, admin_kafka, registry, tmp_path, api, make_key):
    server = dovecot_server
    server.clear()
    keys = tmp_path / "link-keys.json"
    links = LinkBuilder(Keyring.generate_file(keys), unsubscribe_mailto="unsub@example.com")
    replied, bounced, unsubscribed = (str(uuid.uuid4()) for _ in range(3))
    mailto = links.unsubscribe_mailto(unsubscribed, "carol@example.org", now=datetime.now(UTC))
    assert mailto is not None
    subject = mailto.split("subject=")[1].replace("%2E", ".").replace("%2D", "-")
    expired = LinkBuilder(Keyring.from_file(keys), ttl=timedelta(seconds=1),
                          unsubscribe_mailto="unsub@example.com").unsubscribe_mailto(
        str(uuid.uuid4()), "dave@example.org", now=datetime.now(UTC) - timedelta(days=1))
    assert expired is not None
    bounce = (CORPUS / "postfix_hard_511.eml").read_bytes().replace(
        b"1c6a2f0e-5b7d-4e39-8a21-3f4d5e6a7b8c", bounced.encode())
    # A bounce counts only for a recipient the message was sent to (see test_forged_reports).
    with projector_running(projector_settings(namespace, metrics_port=0)):
        produce(admin_kafka, namespace, registry,
                [sent(bounced, datetime.now(UTC), recipients=["nobody@example.net"])])
        eventually(lambda: _assert(bool(projected("SELECT 1 FROM message_events WHERE namespace"
                                             " = %s AND kind = 'sent'", namespace))))
    for raw in (reply_to(replied, "Yes, count me in!"), bounce,
                mail(From="carol@example.org", To="unsub@example.com", Subject=subject,
                     Message_ID="<u1@example.org>"),
                mail(From="dave@example.org", To="unsub@example.com",
                     Subject=expired.split("subject=")[1], Message_ID="<u2@example.org>"),
                (CORPUS / "spam_unrelated.eml").read_bytes()):
        server.append(raw)
    before = server.mailbox()

    accounts = tmp_path / "accounts.toml"
    accounts.write_text(accounts_toml(server))
    env = {"MAILBUS_KAFKA__TOPIC_PREFIX": namespace, "MAILBUS_ACCOUNTS_FILE": str(accounts),
           "MAILBUS_LINK_KEYS_FILE": str(keys), "MAILBUS_METRICS_PORT": "0"}
    with Services(env, tmp_path) as services:
        services.start("replies")

        def all_recorded() -> None:
            services.check_alive()
            assert len(inbound_rows(namespace)) == 5

        eventually(all_recorded, timeout=60)
        # Mail arriving while it waits (IDLE) is read too.
        services.check_alive()
        server.append(reply_to(replied, "Also bringing a friend."))
        eventually(lambda: _assert(len(inbound_rows(namespace)) == 6), timeout=30)

    responses = decoded(admin_kafka, namespace, registry, "email.responses", expect=3)
    assert sorted((r["kind"], r["message_id"], r["recipient"]) for r in responses) == sorted([
        ("reply", replied, "ada@example.org"), ("reply", replied, "ada@example.org"),
        ("unsubscribe", unsubscribed, "carol@example.org")])
    texts = sorted(r["text"] or "" for r in responses if r["kind"] == "reply")
    assert texts == ["Also bringing a friend.", "Yes, count me in!"]  # quotes stripped
    assert {r["source"] for r in responses} == {"imap:dev"}
    [bounce_event] = decoded(admin_kafka, namespace, registry, "email.bounced", expect=1)
    assert (bounce_event["message_id"], bounce_event["recipient"], bounce_event["bounce_class"],
            bounce_event["status_code"]) == (bounced, "nobody@example.net", "hard", "5.1.1")
    suppressions = decoded(admin_kafka, namespace, registry, "email.suppressions", expect=2)
    assert sorted((s["address"], s["reason"]) for s in suppressions) == [
        ("carol@example.org", "unsubscribe"), ("nobody@example.net", "hard_bounce")]
    rows = inbound_rows(namespace)
    assert sorted(kind for kind, _, _ in rows) == ["dsn", "reply", "reply", "unmatched",
                                                    "unmatched", "unsubscribe"]
    # The expired token and the spam are kept, threaded to nothing.
    assert sorted((s, m) for k, m, s in rows if k == "unmatched") == [
        ("dave@example.org", None), ("winner@promo.example.net", None)]
    # Read-only: nothing moved, nothing flagged \\Seen.
    assert server.mailbox()[:5] == before

    # Admin keys see what was read, unmatched mail included; other keys do not.
    _, admin = make_key(scopes=("admin",))
    _, reader = make_key(scopes=("read",))
    unmatched = api.get("/v1/inbound", params={"kind": "unmatched"},
                        headers={"Authorization": f"Bearer {admin}"}).json()["inbound"]
    assert sorted(m["sender"] for m in unmatched) == ["dave@example.org",
                                                      "winner@promo.example.net"]
    assert all(m["account"] == "dev" and m["message_id"] is None for m in unmatched)
    page = api.get("/v1/inbound", params={"limit": 4},
                   headers={"Authorization": f"Bearer {admin}"}).json()
    rest = api.get("/v1/inbound", params={"limit": 4, "cursor": page["next_cursor"]},
                   headers={"Authorization": f"Bearer {admin}"}).json()
    assert len({m["ref"] for m in page["inbound"] + rest["inbound"]}) == 6
    assert rest["next_cursor"] is None
    assert api.get("/v1/inbound", headers={"Authorization": f"Bearer {reader}"}
                   ).status_code == 403

    # A restart reads nothing twice.
    with Services(env, tmp_path) as services:
        services.start("replies")
        server.append(reply_to(replied, "One more thing."))
        eventually(lambda: _assert(len(inbound_rows(namespace)) == 7), timeout=60)
    again = decoded(admin_kafka, namespace, registry, "email.responses", expect=4)
    assert len(again) == 4 and len({r["event_id"] for r in again}) == 4


def _assert(condition: bool) -> None:
    assert condition


def stalling(raw: bytes, *, domains: tuple[str, ...] = ()) -> Inbound:
    """classify_inbound(), except that mail carrying X-Test-Stall spins the CPU for ever, as a
    pattern that backtracks quadratically over a large body would."""
    if b"\nX-Test-Stall: yes" in raw:
        while True:
            pass
    return classify_inbound(raw, domains=domains)


def test_mail_that_stalls_the_classifier_or_is_too_big_is_kept_unmatched_once_and_skipped(
        dovecot_server, namespace, tmp_path):
    server = dovecot_server
    server.clear()
    replied = str(uuid.uuid4())
    server.append(mail(From="eve@example.org", To="news@example.com", Subject="slow",
                       X_Test_Stall="yes", Message_ID="<stall@example.org>"))
    big = reply_to(replied, "photos" + " attached" * 10_000).replace(b"\n", b"\r\n")
    server.append(big)
    server.append(reply_to(replied, "Yes, count me in!"))
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(accounts_toml(server))
    keys = tmp_path / "link-keys.json"
    Keyring.generate_file(keys)
    settings = RepliesSettings(kafka={"topic_prefix": namespace}, accounts_file=accounts,
                               link_keys_file=keys, metrics_port=0, classify_workers=1,
                               classify_deadline_seconds=1.0, max_message_bytes=64 * 1024)

    def recorded() -> list[tuple[Any, ...]]:
        with psycopg.connect(READER.postgres.conninfo()) as conn:
            return conn.execute(
                "SELECT source_ref, kind, message_id::text, detail FROM inbound_messages"
                " WHERE namespace = %s ORDER BY source_ref", (namespace,)).fetchall()

    async def serve(rows: int) -> Replies:
        """Run the service (in this process, to give it the stalling classifier) until
        `rows` messages are recorded."""
        replies = Replies(settings, classifier=stalling)
        task = asyncio.create_task(replies.run())
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while len(await asyncio.to_thread(recorded)) < rows:
                assert not task.done(), task.exception()
                assert asyncio.get_running_loop().time() < deadline, "timed out"
                await asyncio.sleep(0.1)
        finally:
            replies.stop()
            await asyncio.wait_for(task, 30)
        return replies

    first = asyncio.run(serve(3))
    (stall_ref, stall_kind, stall_mid, stall), (_, big_kind, big_mid, too_big), \
        (_, kind, mid, _) = recorded()
    assert (stall_kind, stall_mid) == ("unmatched", None)
    assert stall["reason"] == "classification did not finish within 1 s"
    assert stall["quarantined"] is True
    # Over max_message_bytes: its header says who sent it, the rest is not acted on.
    assert (big_kind, big_mid, too_big["quarantined"], too_big["headers_only"]) == (
        "unmatched", None, True, True)
    assert too_big["size"] == len(big) > 64 * 1024
    assert too_big["reason"] == f"{len(big)} bytes, over the 65536 byte cap: body not read"
    assert inbound_rows(namespace)[1][2] == "ada@example.org"
    assert (kind, mid) == ("reply", replied)  # the next mail was handled
    assert first.sandbox.abandoned == 1 and first.handled == 3
    with psycopg.connect(READER.postgres.conninfo()) as conn:
        assert conn.execute("SELECT last_uid FROM mailbox_state WHERE namespace = %s",
                            (namespace,)).fetchone() == (3,)

    # A restart does not classify the stalled mail again: the mark is past it.
    server.append(reply_to(replied, "One more thing."))
    second = asyncio.run(serve(4))
    assert second.sandbox.abandoned == 0 and second.handled == 1
    assert [row[0] for row in recorded()].count(stall_ref) == 1
