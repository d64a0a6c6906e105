"""Forged delivery reports and complaints, through `mailbus replies` over real parts.

The messages "of ours" are real email.sent events on Kafka that the real
projector wrote into PostgreSQL; the reports are mailed into a real Dovecot
mailbox; the replies service runs as a process and looks each report up
through `replies_sent_to()` with its own role. A report suppresses, bounces
or complains only for an address the message it names was sent to; every
forged one is kept as unmatched mail with its reason and produces nothing.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from mailbus.replies.events import NOT_A_RECIPIENT, NOT_OURS
from mailbus.replies.settings import RepliesSettings
from mailbus.settings import ServiceSettings
from tests.support import dovecot
from tests.support.kafka import read_all
from tests.support.processes import Services
from tests.support.projector import eventually, produce, projector_running, rows, sent
from tests.support.projector import settings_for as projector_settings
from tests.unit.test_reply_events import arf_raw, dsn_raw

READER = RepliesSettings()
SENDER = ServiceSettings(service_name="sender")
ADA = "ada@example.org"  # the victim: no forged report may suppress her
VARIANTS = ("<ADA@Example.ORG>", "=?utf-8?q?Ada_Lovelace?= <ada@example.org>",
            '"=?utf-8?q?ada=40example=2Eorg?=" <ada@example.org>', "<ada@example.org.>",
            "  <ada@example.org>  ", "=?utf-8?b?YWRhQGV4YW1wbGUub3Jn?=")


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

{server.accounts_table(poll_seconds=1)}"""


def inbound(namespace: str) -> dict[str, tuple[str, str | None, dict[str, Any]]]:
    """Subject -> (kind, message id, detail) of every recorded inbound message."""
    with psycopg.connect(READER.postgres.conninfo()) as conn:
        found = conn.execute(
            "SELECT subject, kind, message_id::text, detail FROM inbound_messages"
            " WHERE namespace = %s", (namespace,)).fetchall()
    return {subject: (kind, mid, detail) for subject, kind, mid, detail in found}


def subject(raw: bytes, text: str) -> bytes:
    """The report with its own Subject, so each is told apart in inbound_messages."""
    head, sep, body = raw.partition(b"\n\n")
    lines = [line for line in head.split(b"\n") if not line.lower().startswith(b"subject:")]
    return b"\n".join([*lines, f"Subject: {text}".encode()]) + sep + body


def ours(mid: str) -> str:
    return f"<{mid}@example.com>"


def decoded(admin_kafka, namespace: str, registry, topic: str, **kw: Any) -> list[dict]:
    return [registry.decode(m.value())[1]
            for m in read_all(admin_kafka, namespace + topic, **kw)]


def hand_over(namespace: str, mid: str) -> None:
    """A ledger row as the sender leaves it after handing a message over (as its role)."""
    with psycopg.connect(SENDER.postgres.conninfo()) as conn:
        conn.execute(
            "INSERT INTO send_ledger (message_id, namespace, account_id, source_partition,"
            " state, due_at, payload, sent_at) VALUES (%s, %s, 'dev', 0, 'sent', now(),"
            " %s, now())", (mid, namespace, b"\x00"))


def test_forged_reports_suppress_nobody_and_genuine_ones_still_do(
        dovecot_server, namespace, admin_kafka, registry, tmp_path: Path):
    server = dovecot_server
    server.clear()
    # to_ada went to the victim; to_bob to the attacker, who thus knows its id.
    to_ada, to_bob, to_carol, to_dave, early = (str(uuid.uuid4()) for _ in range(5))
    now = datetime.now(UTC)
    projector = projector_settings(namespace, metrics_port=0)
    with projector_running(projector):
        produce(admin_kafka, namespace, registry, [
            sent(to_ada, now, recipients=[ADA]),
            sent(to_bob, now, recipients=["bob@attacker.example"]),
            sent(to_carol, now, recipients=["Carol@Example.org", "zoe@example.org"]),
            sent(to_dave, now, recipients=["dave@example.org"])])
        eventually(lambda: _assert(rows(
            "SELECT count(*) FROM message_events WHERE namespace = %s AND kind = 'sent'",
            namespace) == [(4,)]), timeout=60)

    forged = {
        "random uuid": (dsn_raw(None, ADA, mailbus_id=str(uuid.uuid4())), NOT_OURS),
        "random message-id": (dsn_raw(ours(str(uuid.uuid4())), ADA), NOT_OURS),
        "dsn, our message, not its recipient": (dsn_raw(ours(to_bob), ADA), NOT_A_RECIPIENT),
        "dsn, right id, foreign domain": (dsn_raw(f"<{to_ada}@attacker.example>", ADA),
                                          "the DSN names no message of ours"),
        "complaint without reference": (arf_raw(None, ADA),
                                        "the complaint names no message of ours"),
        "complaint, our message, not its recipient": (arf_raw(ours(to_bob), ADA),
                                                      NOT_A_RECIPIENT),
        "dsn, case variant": (dsn_raw(ours(to_bob), "ADA@Example.ORG"), NOT_A_RECIPIENT),
        **{f"complaint variant {i}": (arf_raw(ours(to_bob), variant), None)
           for i, variant in enumerate(VARIANTS)},
    }
    genuine = {
        "genuine bounce": dsn_raw(ours(to_carol), "carol@example.org", mailbus_id=to_carol),
        "genuine complaint": arf_raw(ours(to_dave), "<Dave@Example.org>"),
    }
    for text, (raw, _) in forged.items():
        server.append(subject(raw, text))
    for text, raw in genuine.items():
        server.append(subject(raw, text))
    # Last in the mailbox: a report on a message handed over a moment ago whose
    # email.sent is not projected yet. It waits for the projection.
    hand_over(namespace, early)
    server.append(subject(dsn_raw(ours(early), "erin@example.org"), "early bounce"))

    accounts = tmp_path / "accounts.toml"
    accounts.write_text(accounts_toml(server))
    env = {"MAILBUS_KAFKA__TOPIC_PREFIX": namespace, "MAILBUS_ACCOUNTS_FILE": str(accounts),
           "MAILBUS_LINK_KEYS_FILE": str(tmp_path / "link-keys.json"),
           "MAILBUS_METRICS_PORT": "0"}
    with Services(env, tmp_path) as services:
        services.start("replies")

        def all_but_the_early_one() -> dict[str, tuple[str, str | None, dict[str, Any]]]:
            services.check_alive()
            found = inbound(namespace)
            assert len(found) == len(forged) + len(genuine), sorted(found)
            return found

        found = eventually(all_but_the_early_one, timeout=90)
        # The reader tries the early report, is told to wait, and tries it again.
        eventually(lambda: _assert(services.tail("replies", 200_000).count(
            "ReportTooEarly: message " + early) >= 2), timeout=30)
        assert "early bounce" not in inbound(namespace), services.tail("replies")

        for text, (_, reason) in forged.items():
            kind, mid, detail = found[text]
            assert (kind, mid) == ("unmatched", None), (text, found[text])
            assert detail["reason"] == reason or (
                reason is None and detail["reason"] in (NOT_A_RECIPIENT,
                                                        "the complaint names no recipient")
            ), (text, detail)
        assert found["genuine bounce"][:2] == ("dsn", to_carol)
        assert found["genuine complaint"][:2] == ("complaint", to_dave)

        with projector_running(projector):
            produce(admin_kafka, namespace, registry,
                    [sent(early, datetime.now(UTC), recipients=["erin@example.org"])])
            eventually(lambda: _assert(inbound(namespace).get("early bounce", ("",))[0]
                                       == "dsn"), timeout=60)
        services.check_alive()

    suppressions = decoded(admin_kafka, namespace, registry, "email.suppressions")
    assert sorted((s["address"], s["reason"], s["message_id"]) for s in suppressions) == [
        ("carol@example.org", "hard_bounce", to_carol),
        ("dave@example.org", "complaint", to_dave),
        ("erin@example.org", "hard_bounce", early)]
    bounces = decoded(admin_kafka, namespace, registry, "email.bounced")
    assert sorted((b["recipient"], b["message_id"]) for b in bounces) == [
        ("carol@example.org", to_carol), ("erin@example.org", early)]
    responses = decoded(admin_kafka, namespace, registry, "email.responses")
    assert [(r["kind"], r["message_id"], r["recipient"]) for r in responses] == [
        ("complaint", to_dave, "dave@example.org")]
    assert decoded(admin_kafka, namespace, registry, "email.delivered") == []


def test_the_replies_role_asks_about_recipients_and_reads_nothing_else(namespace):
    mid = str(uuid.uuid4())
    with psycopg.connect(READER.postgres.conninfo()) as conn:
        for table in ("message_events", "send_ledger", "messages", "suppressions"):
            try:
                conn.execute(f"SELECT 1 FROM {table} LIMIT 1")  # noqa: S608 - fixed names
            except psycopg.errors.InsufficientPrivilege:
                conn.rollback()
            else:
                raise AssertionError(f"the replies role reads {table}")
        answer = conn.execute("SELECT * FROM replies_sent_to(%s, %s, %s)",
                              (namespace, mid, [ADA])).fetchall()
    assert answer == [(False, [], None)]
    # No other role may call it.
    with psycopg.connect(ServiceSettings(service_name="ingest").postgres.conninfo()) as conn:
        try:
            conn.execute("SELECT * FROM replies_sent_to(%s, %s, %s)", (namespace, mid, [ADA]))
        except psycopg.errors.InsufficientPrivilege:
            pass
        else:
            raise AssertionError("the ingest role may call replies_sent_to()")


def _assert(condition: bool) -> None:
    assert condition
