"""Header injection end to end: the API refuses it naming the field, and a record that
bypasses the API (a direct Kafka producer) fails permanently in the sender, with nothing
reaching the SMTP server or the Gmail API; look-alike text leaves as text, and what reached
the wire carries exactly the intended headers and recipients. Odd content failures (html
HTMLParser gives up on, a template raising, a template past its deadline) fail their
message alone while the others are sent."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mailbus.sender.settings import SenderSettings
from tests.integration.test_ingest_api import auth, requested
from tests.integration.test_sender_gmail import ME, REFRESH, gmail_account, run_sender, token_file
from tests.support.gmail_emulator import GmailEmulator
from tests.support.kafka import read_all
from tests.support.sender import SenderThread, produce, request, smtp_account
from tests.support.smtp import SmtpServer

EVIL = "victim@evil.example"
ATTACKS = {
    "q": f"=?utf-8?q?hi=0D=0ABcc:_{EVIL}?=",
    "b": "=?utf-8?b?" + base64.b64encode(f"hi\r\nBcc: {EVIL}".encode()).decode() + "?=",
    "mixed case": f"=?UtF-8?q?hi=0d=0aBcc:_{EVIL}?=",
    "split across words": f"=?utf-8?q?hi=0D?= =?utf-8?q?=0ABcc:_{EVIL}?=",
    "glued": f"hello=?utf-8?Q?x=0ABcc:_{EVIL}?=",
    "crlf": f"hi\r\nBcc: {EVIL}",
    "bare lf": f"hi\nBcc: {EVIL}",
    "nul": f"hi\0Bcc: {EVIL}",
}
# Where a value goes in the email.requested record, and what the failure reason names.
FIELDS = {
    "subject": "subject", "template subject": "subject", "to name": "to name",
    "cc name": "cc name", "bcc name": "bcc name", "reply_to name": "reply_to name",
    "to email": "to:", "reply_to email": "reply_to:",
}
LITERAL = ["hi%0D%0ABcc:%20victim@evil.example", "=?utf-8?q?hi=0D=0ABcc:_no end",
           f"hi\u2028Bcc: {EVIL}"]
INTENDED = ["content-transfer-encoding", "content-type", "date", "from", "message-id",
            "mime-version", "reply-to", "subject", "to", "cc", "x-mailbus-message-id"]
RECIPIENTS = ["ada@example.com", "cc@example.com", "bcc@example.com"]
UNCOOPERATIVE = ("{% set words = (range(50000)|list|string)[1:-1].split(', ') %}"
                 "{% for i in range(500) %}{% set s = words|sort|unique|list|sort(reverse=true) %}"
                 "{% endfor %}x")


def hostile(account: str, field: str, value: str) -> dict[str, Any]:
    event = full(account, "ordinary")
    where, _, part = field.partition(" ")
    if field == "subject":
        event["subject"] = value
    elif field == "template subject":
        event["template"] = {"subject": "{{ s }}", "text": "t", "html": None,
                             "variables_json": json.dumps({"s": value})}
    elif where == "reply_to":
        event["reply_to"][part] = value
    else:
        event[where][0][part] = value
    return event


def full(account: str, value: str, **fields: Any) -> dict[str, Any]:
    """A record naming `value` in every display name and as its subject."""
    event = request(account, subject=value, **fields)
    event.update(to=[{"email": "ada@example.com", "name": value}],
                 cc=[{"email": "cc@example.com", "name": value}],
                 bcc=[{"email": "bcc@example.com", "name": value}],
                 reply_to={"email": "r@example.com", "name": value})
    return event


def exactly_intended(raw: bytes, value: str) -> None:
    head = raw.partition(b"\r\n\r\n")[0]
    assert b"\r" not in head.replace(b"\r\n", b"") and b"\n" not in head.replace(b"\r\n", b"")
    assert head.isascii() and b"\0" not in head
    assert not any(line.lower().startswith(b"bcc") for line in head.split(b"\r\n"))
    message = message_from_bytes(raw, policy=policy.default)
    assert sorted(k.lower() for k in message.keys()) == sorted(INTENDED)
    folded = " ".join(value.split())
    assert str(message["Subject"]) == folded
    for name in ("To", "Cc", "Reply-To"):
        assert [a.display_name for a in message[name].addresses] == [folded]
    assert EVIL not in [a.addr_spec for h in ("To", "Cc", "Reply-To")
                        for a in message[h].addresses]


def ledger(message_ids: list[str], admin: Any) -> dict[str, str]:
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        rows = conn.execute("SELECT message_id::text, state FROM send_ledger"
                            " WHERE message_id = ANY(%s::uuid[])", (message_ids,)).fetchall()
    return dict(rows)


def check_failures(failed: list[dict[str, Any]], cases: dict[str, str]) -> None:
    by_id = {f["message_id"]: f for f in failed}
    assert set(by_id) == set(cases)
    for message_id, named in cases.items():
        fail = by_id[message_id]
        assert fail["permanent"] is True, fail
        assert fail["reason"].startswith(("compose: ", "template: ")), fail["reason"]
        assert named in fail["reason"], (named, fail["reason"])


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def test_the_api_refuses_every_header_bound_field_naming_it(api, make_key, ingest_settings,
                                                             admin_kafka, registry):
    _, token = make_key()
    base = {"to": ["ada@example.com"], "subject": "Hi", "text": "Hello"}
    placements = {
        "subject": lambda v: ({**base, "subject": v}, "subject"),
        "template.subject": lambda v: ({**base, "template": {"subject": v, "text": "x"}},
                                       "template.subject"),
        "to": lambda v: ({**base, "to": [f"Ada {v} <ada@example.com>"]}, "to[0]"),
        "cc.name": lambda v: ({**base, "cc": [{"email": "c@example.com", "name": v}]},
                              "cc[0].name"),
        "bcc.name": lambda v: ({**base, "bcc": [{"email": "b@example.com", "name": v}]},
                               "bcc[0].name"),
        "reply_to": lambda v: ({**base, "reply_to": f"{v} <r@example.com>"}, "reply_to"),
        "to.email": lambda v: ({**base, "to": [{"email": f"{v}@example.com"}]}, "to[0].email"),
    }
    attacks = {**ATTACKS, "u2028": f"hi\u2028Bcc: {EVIL}", "nel": f"hi\x85Bcc: {EVIL}"}
    for label, value in attacks.items():
        for field, place in placements.items():
            body, where = place(value)
            r = api.post("/v1/messages", json=body, headers=auth(token))
            assert r.status_code == 422, (label, field, r.status_code, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            fields = [e["field"] for e in r.json()["errors"]]
            assert fields and all(f == where or f.startswith(where + ".") for f in fields), (
                label, field, fields)
    # Percent-encoding is text: accepted, and carried as written.
    ok = api.post("/v1/messages", json={**base, "subject": LITERAL[0]}, headers=auth(token))
    assert ok.status_code == 202, ok.text
    records = requested(ingest_settings, admin_kafka)
    decoded = [registry.decode(m.value())[1] for m in records]
    assert [(e["message_id"], e["subject"]) for e in decoded] == [(ok.json()["id"], LITERAL[0])]


def test_smtp_sends_no_injected_header_and_fails_each_bad_message_alone(
        namespace, tmp_path: Path, smtp, admin_kafka, registry, admin):
    path = tmp_path / "accounts.toml"
    path.write_text(smtp_account("dev", smtp.port))
    settings = SenderSettings(accounts_file=path, kafka={"topic_prefix": namespace},
                              metrics_port=0, retry_base_seconds=0.2, retry_cap_seconds=1.0,
                              poll_seconds=0.2, link_keys_file=tmp_path / "keys.json")
    bad = {(field, label): hostile("dev", field, value)
           for field in FIELDS for label, value in ATTACKS.items()}
    odd = {
        "AssertionError": request("dev", text=None, html="<p>x</p><![foo[ x ]]>"),
        "ZeroDivisionError": request("dev", template={
            "subject": None, "text": "{{ 1 // 0 }}", "html": None, "variables_json": "{}"}),
        "deadline exceeded": request("dev", template={
            "subject": None, "text": UNCOOPERATIVE, "html": None, "variables_json": "{}"}),
    }
    good = [full("dev", value) for value in LITERAL]
    plain = [request("dev", to=f"n{i}@example.com", subject=f"n{i}") for i in range(5)]
    events = [*bad.values(), *odd.values(), *good, *plain]
    with SenderThread(settings):
        produce(admin_kafka, namespace + "email.requested", registry, events)
        failed = [registry.decode(m.value())[1] for m in read_all(
            admin_kafka, namespace + "email.failed", expect=len(bad) + len(odd), timeout=90)]
        sent = [registry.decode(m.value())[1] for m in read_all(
            admin_kafka, namespace + "email.sent", expect=len(good) + len(plain), timeout=60)]
    check_failures(failed, {e["message_id"]: FIELDS[f] for (f, _), e in bad.items()}
                   | {e["message_id"]: kind for kind, e in odd.items()})
    assert {e["message_id"] for e in sent} == {e["message_id"] for e in good + plain}
    received = smtp.handler.received
    assert len(received) == len(good) + len(plain)  # nothing of the bad ones left
    by_subject = {r.message["X-Mailbus-Message-Id"]: r for r in received}
    for event, value in zip(good, LITERAL, strict=True):
        wire = by_subject[event["message_id"]]
        assert wire.rcpt_tos == RECIPIENTS
        exactly_intended(wire.data, value)
    assert not any(EVIL in r for w in received for r in w.rcpt_tos)
    states = ledger([e["message_id"] for e in events], admin)
    assert len(states) == len(events) and set(states.values()) == {"sent", "failed"}


def test_gmail_sends_no_injected_header_or_recipient(namespace, tmp_path: Path, admin_kafka,
                                                     registry, admin):
    attacks = {k: ATTACKS[k] for k in ("q", "b", "split across words", "crlf")}
    with GmailEmulator() as emu:
        emu.add_user(ME, refresh_token=REFRESH)
        accounts = gmail_account(token_file(tmp_path / "token.json", emu), pools="")
        bad = {(field, label): hostile("g1", field, value)
               for field in FIELDS for label, value in attacks.items()}
        odd = request("g1", text=None, html="<![foo[ x ]]>")
        good = [full("g1", value) for value in LITERAL]
        events = [*bad.values(), odd, *good]
        with run_sender(tmp_path, namespace, accounts, emu):
            produce(admin_kafka, namespace + "email.requested", registry, events)
            failed = [registry.decode(m.value())[1] for m in read_all(
                admin_kafka, namespace + "email.failed", expect=len(bad) + 1, timeout=90)]
            sent = [registry.decode(m.value())[1] for m in read_all(
                admin_kafka, namespace + "email.sent", expect=len(good), timeout=60)]
        stored = emu.messages(ME)
    check_failures(failed, {e["message_id"]: FIELDS[f] for (f, _), e in bad.items()}
                   | {odd["message_id"]: "AssertionError"})
    assert {e["message_id"] for e in sent} == {e["message_id"] for e in good}
    assert len(stored) == len(good)  # Gmail was never asked to send a bad one
    by_id = {s.message["X-Mailbus-Message-Id"]: s for s in stored}
    for event, value in zip(good, LITERAL, strict=True):
        copy = by_id[event["message_id"]]
        # The transport names blind copies in a Bcc header for Gmail, which strips it:
        # that one Bcc is ours, and it names the request's bcc recipient only.
        assert sorted(copy.recipients) == sorted(RECIPIENTS)
        bcc = copy.message.get_all("Bcc") or []
        assert [str(b) for b in bcc] == ["bcc@example.com"]
        raw = b"\r\n".join(line for line in copy.raw.split(b"\r\n")
                           if not line.startswith(b"Bcc: "))
        exactly_intended(raw, value)
    states = ledger([e["message_id"] for e in events], admin)
    assert len(states) == len(events) and set(states.values()) == {"sent", "failed"}
