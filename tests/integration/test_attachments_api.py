"""Attachments through the ingest API, against the real broker and PostgreSQL: uploads,
files named by id or carried inline, what one key may name, caps and refusals, expiry."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from mailbus.codec import Registry
from mailbus.db import open_pool
from mailbus.ingest import attachment_rules, attachments
from mailbus.ingest.service import _Connection
from mailbus.ingest.settings import IngestSettings
from tests.integration.conftest import LiveServer
from tests.support.kafka import read_all

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(30_000)


def fresh_pdf() -> bytes:
    """pdf-like bytes no other test has stored (references are per key, files shared)."""
    return b"%PDF-1.7\n" + os.urandom(200_000) + b"\n%%EOF\n"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(api: httpx.Client, token: str, data: bytes) -> httpx.Response:
    return api.post("/v1/attachments", content=data,
                    headers=auth(token) | {"Content-Type": "application/octet-stream"})


def message(*files: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"to": ["ada@example.com"], "subject": "Invoice 4711",
            "html": '<p>Invoice</p><img src="cid:logo">', "attachments": list(files)} | extra


def by_id(sha256: str, filename: str = "invoice.pdf") -> dict[str, Any]:
    return {"id": sha256, "filename": filename, "content_type": "application/pdf"}


def inline_png() -> dict[str, Any]:
    return {"filename": "logo.png", "content_type": "image/png", "content_id": "logo",
            "content": base64.b64encode(PNG).decode()}


def events(settings: IngestSettings, admin_kafka: dict[str, Any], registry: Registry,
           **kw: Any) -> list[dict[str, Any]]:
    return [registry.decode(m.value(), "mailbus.EmailRequested")[1] for m in read_all(
        admin_kafka, settings.kafka.topic("email.requested"), **kw)]


def owner(admin) -> psycopg.Connection[Any]:
    """The tables' owner: no service role may read another's view of them."""
    settings = admin.postgres.model_copy(update={
        "user": "mailbus_owner", "password": None,
        "password_file": admin.var_dir / "secrets" / "postgres-mailbus_owner.password"})
    return psycopg.connect(settings.conninfo(), autocommit=True)


def stored(admin, sha256: str) -> tuple[bytes | None, list[str]]:
    """The bytes stored under a hash, and the keys that hold a live reference to it."""
    with owner(admin) as conn:
        row = conn.execute("SELECT content FROM attachment_blobs WHERE sha256 = %s",
                           (sha256,)).fetchone()
        keys = [k for (k,) in conn.execute(
            "SELECT key_id FROM attachment_refs WHERE sha256 = %s AND expires_at > now()"
            " ORDER BY key_id", (sha256,))]
    return (bytes(row[0]) if row else None), keys


def test_an_upload_and_an_inline_image_reach_the_event_and_the_store(
        api, make_key, ingest_settings, admin_kafka, registry, admin):
    pdf = fresh_pdf()
    key_id, token = make_key()
    r = upload(api, token, pdf)
    assert r.status_code == 201, r.text
    sha = hashlib.sha256(pdf).hexdigest()
    assert r.json()["id"] == sha and r.json()["size"] == len(pdf)
    r = api.post("/v1/messages", json=message(by_id(sha), inline_png()), headers=auth(token))
    assert r.status_code == 202, r.text
    [event] = events(ingest_settings, admin_kafka, registry, expect=1)
    assert event["message_id"] == r.json()["id"]
    assert event["attachments"] == [
        {"sha256": sha, "size": len(pdf), "filename": "invoice.pdf",
         "content_type": "application/pdf", "content_id": None},
        {"sha256": hashlib.sha256(PNG).hexdigest(), "size": len(PNG), "filename": "logo.png",
         "content_type": "image/png", "content_id": "logo"}]
    assert stored(admin, sha) == (pdf, [key_id])
    assert stored(admin, hashlib.sha256(PNG).hexdigest()) == (PNG, [key_id])


def test_a_key_cannot_name_another_keys_file_by_its_hash(api, make_key, ingest_settings,
                                                         admin_kafka, registry, admin):
    pdf = fresh_pdf()
    owner_id, owner = make_key()
    other_id, other = make_key()
    sha = upload(api, owner, pdf).json()["id"]
    never = hashlib.sha256(b"never uploaded by anyone").hexdigest()
    answers = []
    for name in (sha, never):
        r = api.post("/v1/messages", json=message(by_id(name), text="x", html=None),
                     headers=auth(other))
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        answers.append(r.json()["errors"])
    # The same answer whether or not the bytes exist: the hash tells the key nothing.
    assert answers[0] == answers[1] and answers[0][0]["field"] == "attachments[0].id"
    # The file is not referenced by the other key for the attempt...
    assert stored(admin, sha) == (pdf, [owner_id])
    # ...and an admin key is scoped to its own uploads too.
    _, admin_token = make_key(scopes=("admin",))
    r = api.post("/v1/messages", json=message(by_id(sha), text="x", html=None),
                 headers=auth(admin_token))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "attachments[0].id"
    # Sending the same bytes makes them the other key's too: stored once.
    assert upload(api, other, pdf).json()["id"] == sha
    assert stored(admin, sha) == (pdf, sorted([owner_id, other_id]))
    r = api.post("/v1/messages", json=message(by_id(sha), text="x", html=None),
                 headers=auth(other))
    assert r.status_code == 202, r.text
    assert len(events(ingest_settings, admin_kafka, registry, expect=1)) == 1


def test_a_batch_shares_one_upload(api, make_key, ingest_settings, admin_kafka, registry,
                                   admin):
    pdf = fresh_pdf()
    key_id, token = make_key()
    sha = upload(api, token, pdf).json()["id"]
    items = [message(by_id(sha), text=f"n{i}", html=None, to=[f"r{i}@example.com"])
             for i in range(200)]
    items[7]["attachments"] = [by_id(hashlib.sha256(b"not mine").hexdigest())]
    items[9]["attachments"] = [by_id(sha, filename="setup.exe")]
    body = {"messages": items}
    size = len(httpx.Request("POST", "/", json=body).content)
    assert size < len(pdf)  # the batch names the file; it does not carry it
    r = api.post("/v1/messages/batch", json=body, headers=auth(token))
    assert r.status_code == 202, r.text
    summary = r.json()
    assert (summary["accepted"], summary["rejected"]) == (198, 2)
    rejected = {x["index"]: x["error"]["errors"][0]["field"] for x in summary["results"]
                if x["status"] == "rejected"}
    assert rejected == {7: "messages[7].attachments[0].id",
                        9: "messages[9].attachments[0].filename"}
    got = events(ingest_settings, admin_kafka, registry, expect=198)
    assert {e["attachments"][0]["sha256"] for e in got} == {sha} and len(got) == 198
    with owner(admin) as conn:
        assert conn.execute("SELECT count(*) FROM attachment_blobs WHERE sha256 = %s",
                            (sha,)).fetchone() == (1,)
        # Every message pushed the reference out past its own retention.
        (days,) = conn.execute(
            "SELECT extract(epoch FROM expires_at - now()) / 86400 FROM attachment_refs"
            " WHERE key_id = %s AND sha256 = %s", (key_id, sha)).fetchone()
    assert 7.9 < days <= 8.0


@pytest.mark.parametrize(("item", "field"), [
    ({"filename": "a.pdf", "content_type": "application/pdf", "content": "JVBERi0x*"},
     "attachments[0].content"),
    ({"filename": "a.pdf", "content_type": "application/pdf", "content": "JVBE",
      "encoding": "quoted-printable"}, "attachments[0].encoding"),
    ({"filename": "tool.EXE", "content_type": "application/pdf", "content": "JVBE"},
     "attachments[0].filename"),
    ({"filename": "a.pdf", "content_type": "application/x-msdownload", "content": "JVBE"},
     "attachments[0].content_type"),
    ({"filename": "a.pdf\r\nBcc: victim@example.net", "content_type": "application/pdf",
      "content": "JVBE"}, "attachments[0].filename"),
    ({"filename": "a.pdf", "content_type": "application/pdf\nX-Evil: 1", "content": "JVBE"},
     "attachments[0].content_type"),
    ({"filename": "a.pdf", "content_type": "application/pdf", "content": "JVBE",
      "content_id": "x>\r\nBcc: victim@example.net"}, "attachments[0].content_id"),
    ({"filename": "a.pdf", "content_type": "application/pdf",
      "content": base64.b64encode(b"MZ\x90\x00\x03").decode()}, "attachments[0].content"),
])
def test_bad_files_are_422_naming_the_field(api, make_key, item, field, ingest_settings,
                                            admin_kafka, registry):
    _, token = make_key()
    r = api.post("/v1/messages", json=message(item), headers=auth(token))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in r.json()["errors"]] == [field]
    assert events(ingest_settings, admin_kafka, registry, settle=0.5) == []


def test_uploads_refuse_executables_empty_bodies_and_oversize(api, make_key):
    pdf = fresh_pdf()
    _, token = make_key()
    for data in (b"MZ\x90\x00" + pdf, b"\x7fELF\x02\x01", b"#!/bin/sh\n", b""):
        r = upload(api, token, data)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body", r.text
    r = upload(api, token, b"%" * (attachment_rules.MAX_FILE_BYTES + 1))
    assert r.status_code == 413
    _, reader = make_key(scopes=("read",))
    assert upload(api, reader, pdf).status_code == 403


def test_body_caps_take_inline_files_on_messages_only(api, make_key):
    _, token = make_key()
    big = os.urandom(attachment_rules.MAX_INLINE_BYTES - 100)
    item = {"filename": "scan.pdf", "content_type": "application/pdf",
            "content": base64.b64encode(b"%" + big).decode()}
    r = api.post("/v1/messages", json=message(item, text="x", html=None), headers=auth(token))
    assert r.status_code == 202, r.text
    # Over the inline cap: named, and still a 422 (the body cap leaves room for it).
    over = dict(item, content=base64.b64encode(b"%" + big + b"x" * 200).decode())
    r = api.post("/v1/messages", json=message(over, text="x", html=None), headers=auth(token))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "attachments[0].content"
    # Every other route keeps the small cap.
    r = api.post("/v1/webhooks", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                 headers=auth(token) | {"Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_message_too_large_for_a_gmail_account_is_refused_at_the_api(
        tmp_path: Path, namespace, make_key):
    accounts = tmp_path / "accounts.toml"
    accounts.write_text("""
[[accounts]]
id = "relay"
kind = "smtp"
from_address = "relay@example.test"
pools = ["default"]
[accounts.smtp]
host = "127.0.0.1"

[[accounts]]
id = "g1"
kind = "gmail"
from_address = "g1@example.test"
pools = ["gmail"]
[accounts.gmail]
token_file = "/nonexistent"
""")
    settings = IngestSettings(accounts_file=accounts, kafka={"topic_prefix": namespace,
                                                             "delivery_timeout_ms": 5000})
    _, token = make_key()
    data = b"%" + os.urandom(attachment_rules.MAX_TOTAL_BYTES - 1)
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=60) as api:
        sha = upload(api, token, data).json()["id"]
        body = message(by_id(sha), html=None, text="t" * 300_000)
        r = api.post("/v1/messages", json=body | {"from": "g1"}, headers=auth(token))
        assert r.status_code == 422, r.text
        [error] = r.json()["errors"]
        assert error["field"] == "attachments" and "gmail" in error["message"]
        r = api.post("/v1/messages", json=body | {"from": "pool:gmail"}, headers=auth(token))
        assert r.status_code == 422
        r = api.post("/v1/messages", json=body | {"from": "relay"}, headers=auth(token))
        assert r.status_code == 202, r.text
        # One byte more than the documented total: refused for every account.
        r = api.post("/v1/messages", json=message(by_id(sha), inline_png()) | {"from": "relay"},
                     headers=auth(token))
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "attachments"


def test_expired_references_and_unreferenced_files_are_pruned(
        make_key, admin, ingest_settings):
    kept_key, _ = make_key()
    gone_key, _ = make_key()
    kept, gone, shared = (os.urandom(64) for _ in range(3))
    sha = {k: hashlib.sha256(v).hexdigest() for k, v in
           (("kept", kept), ("gone", gone), ("shared", shared))}
    with owner(admin) as conn:
        for data in (kept, gone, shared):
            conn.execute("INSERT INTO attachment_blobs (sha256, size, content)"
                         " VALUES (%s, %s, %s)", (hashlib.sha256(data).hexdigest(), len(data),
                                                 data))
        conn.cursor().executemany("INSERT INTO attachment_refs (key_id, sha256, expires_at)"
                         " VALUES (%s, %s, now() + make_interval(hours => %s))", [
                             (kept_key, sha["kept"], 1), (gone_key, sha["gone"], -1),
                             (gone_key, sha["shared"], -1), (kept_key, sha["shared"], 5)])

    class Store:
        def __init__(self, pool: Any) -> None:
            self.pool = pool

        def connection(self) -> Any:
            return _Connection(self.pool)

    async def prune() -> tuple[int, int]:
        pool = open_pool(ingest_settings.postgres)
        await pool.open()
        try:
            # A batch of 1: the rounds go on until nothing is left.
            return await attachments.prune(Store(pool), 1)  # type: ignore[arg-type]
        finally:
            await pool.close()

    # Every ingest serving the shared database runs the same rounds, so one of
    # another test's may take these rows first: what is asserted is the end state.
    asyncio.run(prune())
    assert stored(admin, sha["kept"]) == (kept, [kept_key])
    assert stored(admin, sha["gone"]) == (None, [])
    assert stored(admin, sha["shared"]) == (shared, [kept_key])


def test_postgresql_down_is_503_and_nothing_is_produced(ingest_settings, make_key,
                                                       admin_kafka, registry):
    from tests.integration.test_sender import Proxy

    base = ingest_settings.postgres
    proxy = Proxy((base.host, base.port))
    _, token = make_key()
    # The key is kept for a minute: what fails below is storing the file, not the key.
    settings = ingest_settings.model_copy(update={
        "key_cache_seconds": 60.0,
        "postgres": base.model_copy(update={"host": "127.0.0.1", "port": proxy.port})})
    item = {"filename": "a.pdf", "content_type": "application/pdf",
            "content": base64.b64encode(fresh_pdf()).decode()}
    try:
        with LiveServer(settings) as server, \
                httpx.Client(base_url=server.url, timeout=60) as api:
            assert api.post("/v1/messages", json=message(text="x", html=None),
                            headers=auth(token)).status_code == 202
            proxy.cut()
            for r in (upload(api, token, fresh_pdf()),
                      api.post("/v1/messages", json=message(item, text="x", html=None),
                               headers=auth(token))):
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/problem+json"
                assert int(r.headers["retry-after"]) > 0
    finally:
        proxy.close()
    assert len(events(ingest_settings, admin_kafka, registry, settle=1.0)) == 1


def test_kafka_down_is_503_and_the_files_wait_for_the_retry(namespace, accounts_file,
                                                            make_key, admin):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    settings = IngestSettings(accounts_file=accounts_file, kafka={
        "topic_prefix": namespace, "bootstrap_servers": f"127.0.0.1:{port}",
        "delivery_timeout_ms": 2000})
    key_id, token = make_key()
    pdf = fresh_pdf()
    item = {"filename": "a.pdf", "content_type": "application/pdf",
            "content": base64.b64encode(pdf).decode()}
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=60) as api:
        r = api.post("/v1/messages", json=message(item, text="x", html=None),
                     headers=auth(token))
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
    # Committed before the event was produced, so a retry finds them; if it never
    # comes, they expire when the message's files would have.
    assert stored(admin, hashlib.sha256(pdf).hexdigest()) == (pdf, [key_id])
