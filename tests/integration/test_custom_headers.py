"""Caller-chosen headers end to end: the API takes allowed ones into the event and refuses the
others naming each header; the real sender writes them to a real SMTP server, on the event
loop and in the composer process alike, and fails a record that bypasses the API with a bad
one, naming the header, while the others go out."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from fastavro import parse_schema, schemaless_writer

from mailbus.codec import DEFAULT_SCHEMA_DIR, MARKER, Registry
from mailbus.sender.settings import SenderSettings
from tests.integration.test_ingest_api import auth, requested
from tests.support.kafka import read_all
from tests.support.sender import SenderThread, produce, request, smtp_account
from tests.support.smtp import SmtpServer

EVIL = "victim@evil.example"
BASE = {"to": ["ada@example.com"], "subject": "Hi", "text": "Hello"}
GOOD = {"X-Campaign": "spring-2026", "X-Note": "Grüße aus Köln " * 20, "Precedence": "bulk"}
# value (or name) -> the field the 422 names
BAD = {
    "crlf": ({"X-Ref": f"hi\r\nBcc: {EVIL}"}, "headers.X-Ref"),
    "encoded": ({"X-Ref": f"=?utf-8?q?hi=0D=0ABcc:_{EVIL}?="}, "headers.X-Ref"),
    "u2028": ({"X-Ref": f"hi\u2028Bcc: {EVIL}"}, "headers.X-Ref"),
    "owned": ({"bcc": EVIL}, "headers.bcc"),
    "owned with colon": ({"Subject:": "x"}, "headers.Subject:"),
    "reserved prefix": ({"X-Mailbus-Message-Id": "x"}, "headers.X-Mailbus-Message-Id"),
    "case duplicate": ({"X-A": "1", "x-a": "2"}, "headers.x-a"),
    "too many": ({f"X-H{i}": "v" for i in range(21)}, "headers"),
}


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def test_the_api_carries_allowed_headers_and_refuses_the_rest(api, make_key, ingest_settings,
                                                              admin_kafka, registry):
    _, token = make_key()
    ok = api.post("/v1/messages", json={**BASE, "headers": GOOD}, headers=auth(token))
    assert ok.status_code == 202, ok.text
    for label, (given, field) in BAD.items():
        r = api.post("/v1/messages", json={**BASE, "headers": given}, headers=auth(token))
        assert r.status_code == 422, (label, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert [e["field"] for e in r.json()["errors"]] == [field], label
    batch = api.post("/v1/messages/batch", headers=auth(token), json={"messages": [
        {**BASE, "headers": {"X-Batch": "1"}}, {**BASE, "headers": {"Received": "x"}}]})
    assert batch.status_code == 202, batch.text
    results = batch.json()["results"]
    assert [r["status"] for r in results] == ["queued", "rejected"]
    assert results[1]["error"]["errors"][0]["field"] == "messages[1].headers.Received"
    decoded = {e["message_id"]: e for e in (registry.decode(m.value())[1] for m in requested(
        ingest_settings, admin_kafka, expect=2))}
    assert decoded[ok.json()["id"]]["headers"] == [{"name": n, "value": v}
                                                   for n, v in GOOD.items()]
    assert decoded[results[0]["id"]]["headers"] == [{"name": "X-Batch", "value": "1"}]
    assert len(decoded) == 2  # nothing refused reached Kafka


def _v1_bytes(event: dict[str, Any], registry: Registry) -> bytes:
    """What a producer still on email.requested v1 writes (no `headers` field)."""
    schema = json.loads((DEFAULT_SCHEMA_DIR / "email.requested" / "v1.avsc").read_text())
    body = io.BytesIO()
    record = {k: v for k, v in event.items() if k != "headers"}
    schemaless_writer(body, parse_schema(schema, named_schemas={}), record)
    return MARKER + registry.fingerprint("email.requested", 1) + body.getvalue()


@pytest.mark.parametrize("processes", [0, 1], ids=["on the loop", "composer process"])
def test_the_sender_writes_custom_headers_and_fails_bad_ones_alone(
        namespace, tmp_path: Path, smtp, admin_kafka, registry, processes: int):
    path = tmp_path / "accounts.toml"
    path.write_text(smtp_account("dev", smtp.port))
    settings = SenderSettings(accounts_file=path, kafka={"topic_prefix": namespace},
                              metrics_port=0, retry_base_seconds=0.2, retry_cap_seconds=1.0,
                              poll_seconds=0.2, link_keys_file=tmp_path / "keys.json",
                              compose_processes=processes)
    good = request("dev", subject="custom", headers=[{"name": n, "value": v}
                                                     for n, v in GOOD.items()])
    bad = {
        "headers.X-Ref": request("dev", headers=[{"name": "X-Ref",
                                                  "value": f"hi\r\nBcc: {EVIL}"}]),
        "headers.'Bcc'": request("dev", headers=[{"name": "Bcc", "value": EVIL}]),
        "headers.X-Enc": request("dev", headers=[{"name": "X-Enc", "value":
                                                  f"=?utf-8?q?x=0D=0ABcc:_{EVIL}?="}]),
    }
    old = request("dev", subject="from a v1 producer")
    with SenderThread(settings):
        produce(admin_kafka, namespace + "email.requested", registry, [good, *bad.values()])
        producer = Producer({**admin_kafka, "partitioner": "murmur2_random"})
        producer.produce(namespace + "email.requested", _v1_bytes(old, registry), key=b"dev")
        assert producer.flush(30) == 0
        failed = [registry.decode(m.value())[1] for m in read_all(
            admin_kafka, namespace + "email.failed", expect=len(bad), timeout=60)]
        sent = [registry.decode(m.value())[1] for m in read_all(
            admin_kafka, namespace + "email.sent", expect=2, timeout=60)]
    reasons = {f["message_id"]: f for f in failed}
    for named, event in bad.items():
        fail = reasons[event["message_id"]]
        assert fail["permanent"] is True and named in fail["reason"], (named, fail)
    assert {e["message_id"] for e in sent} == {good["message_id"], old["message_id"]}
    received = {r.message["X-Mailbus-Message-Id"]: r for r in smtp.handler.received}
    assert set(received) == {good["message_id"], old["message_id"]}
    wire = received[good["message_id"]]
    assert wire.rcpt_tos == ["ada@example.com"]
    head = wire.data.partition(b"\r\n\r\n")[0]
    assert head.isascii() and all(len(line) <= 998 for line in head.split(b"\r\n"))
    message = message_from_bytes(wire.data, policy=policy.default)
    for name, value in GOOD.items():
        assert message.get_all(name) is not None and len(message.get_all(name)) == 1
        assert str(message[name]) == " ".join(value.split())
    assert not any(k.lower().startswith("x-") and k not in GOOD and k != "X-Mailbus-Message-Id"
                   for k in message.keys())
    plain = message_from_bytes(received[old["message_id"]].data, policy=policy.default)
    assert "X-Campaign" not in plain and str(plain["Subject"]) == "from a v1 producer"
    assert not any(EVIL in r for w in smtp.handler.received for r in w.rcpt_tos)
