"""Attachments from the API to the recipient: the ingest API over a socket, the sender
service, a real SMTP server and the Gmail API emulator driven by the real
google-api-python-client. The delivered MIME is parsed and every file compared byte
for byte."""

from __future__ import annotations

import base64
import hashlib
import os
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import REGISTRY

from mailbus.ingest.settings import IngestSettings
from mailbus.sender.settings import SenderSettings
from tests.integration.conftest import LiveServer
from tests.integration.test_sender_gmail import ME, REFRESH, gmail_account, token_file
from tests.support.gmail_emulator import GmailEmulator
from tests.support.kafka import read_all
from tests.support.sender import SenderThread, produce, request, smtp_account
from tests.support.smtp import SmtpServer


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def files() -> tuple[bytes, bytes]:
    """A PDF-like binary (every byte value, NUL, CR and LF alone, a boundary-like line)
    and a PNG-like image, fresh for each test."""
    pdf = (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + bytes(range(256)) * 64 + b"\r\r\n\n\x00"
           + b"\n--=_mailbus_0\n" + os.urandom(150_000) + b"\n%%EOF")
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(20_000)
    return pdf, png


def post(api: httpx.Client, token: str, pdf: bytes, png: bytes, n: int = 1,
         **extra: Any) -> list[str]:
    """Upload the PDF once; send n messages naming it, each with the PNG inline."""
    sha = api.post("/v1/attachments", content=pdf, headers=auth(token)).json()["id"]
    items = [{"to": [f"r{i}@example.com"], "subject": f"Invoice {i}",
              "html": '<p>Your invoice</p><img src="cid:logo@mailbus">',
              "attachments": [
                  {"id": sha, "filename": "Rechnung März №4711.pdf",
                   "content_type": "application/pdf"},
                  {"filename": "logo.png", "content_type": "image/png",
                   "content_id": "logo@mailbus", "content": base64.b64encode(png).decode()}],
              } | extra for i in range(n)]
    if n == 1:
        r = api.post("/v1/messages", json=items[0], headers=auth(token))
        assert r.status_code == 202, r.text
        return [r.json()["id"]]
    r = api.post("/v1/messages/batch", json={"messages": items}, headers=auth(token))
    assert r.status_code == 202 and r.json()["accepted"] == n, r.text
    return [x["id"] for x in r.json()["results"]]


def assert_delivered(message: EmailMessage, pdf: bytes, png: bytes) -> None:
    """The received message, parsed: the structure, names and bytes sent."""
    assert message.get_content_type() == "multipart/mixed"
    related, attached = message.get_payload()  # type: ignore[misc]
    assert related.get_content_type() == "multipart/related"
    alternative, image = related.get_payload()
    assert [p.get_content_type() for p in alternative.get_payload()] == [
        "text/plain", "text/html"]
    assert 'src="cid:logo@mailbus"' in alternative.get_payload()[1].get_content()
    assert image["Content-ID"] == "<logo@mailbus>" and image.get_content_type() == "image/png"
    assert image.get_payload(decode=True) == png
    assert attached.get_filename() == "Rechnung März №4711.pdf"
    assert attached.get_content_type() == "application/pdf"
    assert attached.get_content_disposition() == "attachment"
    assert attached.get_payload(decode=True) == pdf


def ingest_with(tmp_path: Path, namespace: str, accounts: str) -> IngestSettings:
    path = tmp_path / "ingest-accounts.toml"
    path.write_text(accounts)
    return IngestSettings(accounts_file=path, kafka={"topic_prefix": namespace,
                                                     "delivery_timeout_ms": 5000})


def sender_with(tmp_path: Path, namespace: str, accounts: str, **extra: Any) -> SenderThread:
    path = tmp_path / "sender-accounts.toml"
    path.write_text(accounts)
    return SenderThread(SenderSettings(
        accounts_file=path, kafka={"topic_prefix": namespace}, metrics_port=0,
        retry_base_seconds=0.2, retry_cap_seconds=1.0, poll_seconds=0.2,
        link_keys_file=tmp_path / "keys.json", **extra))


def read_from(source: str) -> float:
    """Files the in-process senders read so far, from "cache" or "database"."""
    return REGISTRY.get_sample_value("mailbus_sender_attachment_files_total",
                                     {"source": source}) or 0.0


def decoded(registry, admin_kafka, topic: str, **kw: Any) -> list[dict[str, Any]]:
    return [registry.decode(m.value())[1] for m in read_all(admin_kafka, topic, **kw)]


def test_files_reach_an_smtp_server_byte_for_byte(tmp_path, namespace, make_key, admin_kafka,
                                                  registry):
    pdf, png = files()
    _, token = make_key()
    read_before = read_from("database")
    with SmtpServer() as smtp:
        accounts = smtp_account("relay", smtp.port)
        with LiveServer(ingest_with(tmp_path, namespace, accounts)) as server, \
                httpx.Client(base_url=server.url, timeout=30) as api, \
                sender_with(tmp_path, namespace, accounts):
            ids = post(api, token, pdf, png, n=3)
            sent = decoded(registry, admin_kafka, namespace + "email.sent", expect=3,
                           timeout=30)
        assert {e["message_id"] for e in sent} == set(ids)
        messages = smtp.handler.messages()
    assert len(messages) == 3
    # Three messages, the same two files: each read from PostgreSQL once.
    assert read_from("database") - read_before == 2
    for message in messages:
        assert_delivered(message, pdf, png)


def test_files_reach_gmail_through_the_api_byte_for_byte(tmp_path, namespace, make_key,
                                                         admin_kafka, registry):
    pdf, png = files()
    _, token = make_key()
    with GmailEmulator() as emu:
        emu.add_user(ME, refresh_token=REFRESH)
        accounts = gmail_account(token_file(tmp_path / "token.json", emu), pools='"default"')
        with LiveServer(ingest_with(tmp_path, namespace, accounts)) as server, \
                httpx.Client(base_url=server.url, timeout=30) as api, \
                sender_with(tmp_path, namespace, accounts,
                            gmail_api_endpoint=emu.api_endpoint, gmail_token_uri=emu.token_uri):
            [message_id] = post(api, token, pdf, png)
            [sent] = decoded(registry, admin_kafka, namespace + "email.sent", expect=1,
                             timeout=30)
        assert sent["message_id"] == message_id and sent["transport"] == "gmail"
        [message] = emu.sent(ME)
    assert_delivered(message, pdf, png)


def test_a_file_no_longer_stored_fails_the_message_naming_it(tmp_path, namespace,
                                                             admin_kafka, registry):
    gone = hashlib.sha256(b"pruned long ago").hexdigest()
    event = request("relay", to="ada@example.test", attachments=[
        {"sha256": gone, "size": 15, "filename": "old.pdf", "content_type": "application/pdf",
         "content_id": None}])
    with SmtpServer() as smtp:
        accounts = smtp_account("relay", smtp.port)
        with sender_with(tmp_path, namespace, accounts):
            produce(admin_kafka, namespace + "email.requested", registry, [event])
            [failed] = decoded(registry, admin_kafka, namespace + "email.failed", expect=1,
                               timeout=30)
        assert smtp.handler.received == []
    assert failed["message_id"] == event["message_id"]
    assert "attachments[0].id" in failed["reason"] and gone in failed["reason"]
    assert decoded(registry, admin_kafka, namespace + "email.sent", settle=0.5) == []


def test_gmail_refuses_a_message_over_its_limit_and_it_fails_for_good(
        tmp_path, namespace, admin_kafka, registry, admin, make_key):
    # Past the API's check (an event produced directly, as a replay of an older
    # installation could): the emulator refuses it as Gmail documents, the sender
    # fails it for good instead of retrying.
    from tests.integration.test_attachments_api import owner

    data = b"%" + os.urandom(27 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    key_id, _ = make_key()
    with owner(admin) as conn:
        conn.execute("INSERT INTO attachment_blobs (sha256, size, content) VALUES (%s, %s, %s)"
                     " ON CONFLICT DO NOTHING", (sha, len(data), data))
        # Referenced, as a file a message names is: the pruning rounds of any ingest
        # serving this database delete a file nothing references.
        conn.execute("INSERT INTO attachment_refs (key_id, sha256, expires_at)"
                     " VALUES (%s, %s, now() + interval '1 hour')", (key_id, sha))
    event = request("g1", to="ada@example.test", attachments=[
        {"sha256": sha, "size": len(data), "filename": "big.pdf",
         "content_type": "application/pdf", "content_id": None}])
    with GmailEmulator() as emu:
        emu.add_user(ME, refresh_token=REFRESH)
        accounts = gmail_account(token_file(tmp_path / "token.json", emu), pools="")
        with sender_with(tmp_path, namespace, accounts, gmail_api_endpoint=emu.api_endpoint,
                         gmail_token_uri=emu.token_uri):
            produce(admin_kafka, namespace + "email.requested", registry, [event])
            [failed] = decoded(registry, admin_kafka, namespace + "email.failed", expect=1,
                               timeout=60)
        assert emu.sent(ME) == []
    assert failed["message_id"] == event["message_id"] and failed["permanent"]
    assert "Message too large" in failed["reason"], failed["reason"]
