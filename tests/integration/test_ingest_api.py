"""The ingest API over a real socket, against the real broker and PostgreSQL."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from mailbus.codec import Registry
from mailbus.ingest import attachment_rules
from mailbus.ingest.settings import IngestSettings
from tests.integration.conftest import LiveServer
from tests.support.kafka import read_all
from tests.support.projector import eventually

MESSAGE = {
    "to": ["Ada Lovelace <ada@example.com>", "grace@example.com"],
    "cc": [{"email": "cc@example.com", "name": "Cee"}],
    "subject": "Are you coming on Friday? \u2013 ünïcode",
    "text": "plain body",
    "html": "<p>html body</p>",
    "actions": [{"id": "yes", "label": "Yes"}, {"id": "no", "label": "No"}],
    "tags": ["rsvp"],
    "metadata": {"event": "friday"},
}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def requested(settings: IngestSettings, admin_kafka: dict[str, Any], **kw: Any) -> list[Any]:
    return read_all(admin_kafka, settings.kafka.topic("email.requested"), **kw)


def test_posted_message_is_in_kafka_as_posted(api, make_key, ingest_settings, admin_kafka,
                                              registry: Registry):
    key_id, token = make_key()
    r = api.post("/v1/messages", json=MESSAGE, headers=auth(token))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued"
    assert r.headers["location"] == f"/v1/messages/{body['id']}"

    [msg] = requested(ingest_settings, admin_kafka, expect=1)
    assert msg.key() == b"dev"  # keyed by sender account: the default pool's only member
    _, event = registry.decode(msg.value(), "mailbus.EmailRequested")
    assert event["message_id"] == body["id"]
    assert event["account_id"] == "dev" and event["pool"] == "default"
    assert event["key_id"] == key_id
    assert [(a["email"], a["name"]) for a in event["to"]] == [
        ("ada@example.com", "Ada Lovelace"), ("grace@example.com", None)]
    assert event["cc"] == [{"email": "cc@example.com", "name": "Cee"}]
    assert event["subject"] == MESSAGE["subject"]
    assert (event["text"], event["html"]) == ("plain body", "<p>html body</p>")
    assert [a["id"] for a in event["actions"]] == ["yes", "no"]
    assert event["tags"] == ["rsvp"] and event["metadata"] == {"event": "friday"}
    assert event["occurred_at"].tzinfo is not None

    got = api.get(f"/v1/messages/{body['id']}", headers=auth(token))
    assert got.status_code == 200
    assert got.json()["status"] == "queued" and got.json()["recipients"] == 3


@pytest.mark.parametrize("header", [
    None, "Bearer", "Bearer mbk_nope", "Basic abc", "Bearer mbk_aaaaaaaaaa." + "x" * 43,
])
def test_missing_or_wrong_key_is_401(api, header):
    headers = {"Authorization": header} if header else {}
    r = api.post("/v1/messages", json=MESSAGE, headers=headers)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_wrong_secret_of_a_real_key_is_401(api, make_key):
    _, token = make_key()
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert api.post("/v1/messages", json=MESSAGE, headers=auth(forged)).status_code == 401


def test_revoked_key_is_401(api, make_key, admin):
    import psycopg

    key_id, token = make_key()
    assert api.post("/v1/messages", json=MESSAGE, headers=auth(token)).status_code == 202
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id,))
    assert api.post("/v1/messages", json=MESSAGE, headers=auth(token)).status_code == 401


def test_with_the_key_cache_a_revoked_key_is_401_within_its_time(ingest_settings, make_key,
                                                                 admin):
    import psycopg

    key_id, token = make_key()
    ttl = 1.0
    settings = ingest_settings.model_copy(update={"key_cache_seconds": ttl})
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as api:
        assert api.post("/v1/messages", json=MESSAGE, headers=auth(token)).status_code == 202
        with psycopg.connect(admin.postgres.conninfo()) as conn:
            conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id,))
        revoked = time.monotonic()
        statuses = []
        while time.monotonic() - revoked < ttl + 1.0:
            statuses.append(api.post("/v1/messages", json=MESSAGE,
                                     headers=auth(token)).status_code)
            if statuses[-1] == 401:
                break
        # Refused within the cache time (and a second of slack for a loaded machine).
        assert statuses[-1] == 401 and set(statuses[:-1]) <= {202}, statuses
        assert api.post("/v1/messages", json=MESSAGE, headers=auth(token)).status_code == 401


def test_a_key_deleted_by_hand_after_it_was_cached_fails_no_one_else(
        ingest_settings, make_key, admin_kafka, registry: Registry):
    # The API only revokes keys; an operator may still DELETE a new key's row
    # while the key cache vouches for it. A single message shares its transaction
    # with others' (group commit): it is accepted beside them, its event is in
    # Kafka, and its row is left out. A batch writes its rows before producing:
    # it is refused and produces nothing.
    import psycopg

    from mailbus.settings import ServiceSettings

    gone_id, gone = make_key()
    _, other = make_key()
    settings = ingest_settings.model_copy(update={"key_cache_seconds": 60.0})
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as api:
        # Cached: an authenticated read writes nothing the key's row would be kept for.
        assert api.get("/v1/messages?limit=1", headers=auth(gone)).status_code == 200
        with psycopg.connect(ServiceSettings(service_name="owner").postgres.conninfo()) as conn:
            assert conn.execute("DELETE FROM api_keys WHERE id = %s", (gone_id,)).rowcount == 1
        single = api.post("/v1/messages", json=MESSAGE, headers=auth(gone))
        theirs = api.post("/v1/messages", json=MESSAGE, headers=auth(other))
        batch = api.post("/v1/messages/batch", json={"messages": [MESSAGE]}, headers=auth(gone))
        assert single.status_code == 202 and theirs.status_code == 202, (single.text, theirs.text)
        assert batch.status_code == 401 and batch.json()["type"] == "/problems/unauthorized"
        assert api.get(f"/v1/messages/{theirs.json()['id']}",
                       headers=auth(other)).status_code == 200
    ids = {registry.decode(m.value())[1]["message_id"]
           for m in requested(ingest_settings, admin_kafka, settle=1.0)}
    assert ids == {single.json()["id"], theirs.json()["id"]}
    with psycopg.connect(ServiceSettings(service_name="owner").postgres.conninfo()) as conn:
        rows = conn.execute("SELECT id::text FROM messages WHERE id = ANY(%s::uuid[])",
                            ([single.json()["id"], theirs.json()["id"]],)).fetchall()
    assert rows == [(theirs.json()["id"],)]


def test_with_the_key_cache_a_rotated_keys_new_secret_works_at_once(ingest_settings,
                                                                    make_key, tmp_path):
    import subprocess
    import sys

    key_id, old = make_key()
    settings = ingest_settings.model_copy(update={"key_cache_seconds": 60.0})
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as api:
        assert api.post("/v1/messages", json=MESSAGE, headers=auth(old)).status_code == 202
        out = tmp_path / "token"
        rotated = subprocess.run(
            [sys.executable, "-m", "mailbus", "keys", "rotate", key_id, "--output", str(out)],
            capture_output=True, text=True, timeout=60, check=False)
        assert rotated.returncode == 0, rotated.stderr
        new = out.read_text().strip()
        # The kept row knows only the old secret: the new one is looked up, not refused.
        assert api.post("/v1/messages", json=MESSAGE, headers=auth(new)).status_code == 202
        assert api.post("/v1/messages", json=MESSAGE, headers=auth(old)).status_code == 202
        wrong = new[:-4] + ("AAAA" if not new.endswith("AAAA") else "BBBB")
        assert api.post("/v1/messages", json=MESSAGE, headers=auth(wrong)).status_code == 401


def test_scopes_are_enforced(api, make_key):
    _, reader = make_key(scopes=("read",))
    r = api.post("/v1/messages", json=MESSAGE, headers=auth(reader))
    assert r.status_code == 403 and r.json()["type"] == "/problems/forbidden"
    _, sender = make_key(scopes=("send",))
    sent = api.post("/v1/messages", json=MESSAGE, headers=auth(sender))
    assert sent.status_code == 202
    assert api.get(f"/v1/messages/{sent.json()['id']}", headers=auth(sender)).status_code == 403


def test_a_key_reads_only_its_own_messages(api, make_key):
    _, mine = make_key()
    _, other = make_key()
    _, admin_token = make_key(scopes=("admin",))
    message_id = api.post("/v1/messages", json=MESSAGE, headers=auth(mine)).json()["id"]
    assert api.get(f"/v1/messages/{message_id}", headers=auth(mine)).status_code == 200
    r = api.get(f"/v1/messages/{message_id}", headers=auth(other))
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert api.get(f"/v1/messages/{message_id}", headers=auth(admin_token)).status_code == 200
    assert api.get("/v1/messages/not-a-uuid", headers=auth(mine)).status_code == 404


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("bad address", {**MESSAGE, "to": ["not-an-address"]}, "to[0]"),
    ("bad cc address", {**MESSAGE, "cc": ["a@@b"]}, "cc[0]"),
    ("CRLF in subject", {**MESSAGE, "subject": "hi\r\nBcc: victim@example.com"}, "subject"),
    ("LF in display name", {**MESSAGE, "to": ["Evil\nBcc: x@y.z <a@example.com>"]}, "to[0]"),
    ("NUL in reply-to", {**MESSAGE, "reply_to": {"email": "a@example.com", "name": "a\x00b"}},
     "reply_to.name"),
    ("CR in action label", {**MESSAGE, "actions": [{"id": "y", "label": "Y\rX"}]},
     "actions[0].label"),
    ("subject too long", {**MESSAGE, "subject": "s" * 999}, "subject"),
    ("too many recipients", {**MESSAGE, "to": [f"u{i}@example.com" for i in range(101)]}, "to"),
    ("too many in total", {**MESSAGE, "to": [f"u{i}@example.com" for i in range(60)],
                           "bcc": [f"b{i}@example.com" for i in range(41)]}, "to"),
    ("no recipients", {**MESSAGE, "to": []}, "to"),
    ("no body", {k: v for k, v in MESSAGE.items() if k not in ("text", "html")}, "text"),
    ("no subject", {k: v for k, v in MESSAGE.items() if k != "subject"}, "subject"),
    ("body too large", {**MESSAGE, "html": None, "text": "x" * (600 * 1024)}, "text"),
    ("unknown field", {**MESSAGE, "bogus": 1}, "bogus"),
    ("unknown account", {**MESSAGE, "from": "nobody"}, "from"),
    ("unknown pool", {**MESSAGE, "from": "pool:nowhere"}, "from"),
    ("bad from", {**MESSAGE, "from": "Evil <x@y.z>"}, "from"),
    ("bad tag", {**MESSAGE, "tags": ["has space"]}, "tags[0]"),
    ("naive send_at", {**MESSAGE, "send_at": "2026-12-01T09:00:00"}, "send_at"),
    ("send_at too far", {**MESSAGE, "send_at": "2099-01-01T00:00:00Z"}, "send_at"),
    ("non-https action url", {**MESSAGE, "actions": [{"id": "go", "label": "Go",
                                                      "url": "javascript:alert(1)"}]},
     "actions[0].url"),
    # JSON escapes of UTF-16 surrogates that pair with nothing: parsers give a
    # string no UTF-8 encoder takes (Kafka's Avro, PostgreSQL, the wire).
    ("lone high surrogate", {**MESSAGE, "text": "\ud800x"}, "text"),
    ("lone low surrogate", {**MESSAGE, "subject": "a\udfff"}, "subject"),
    ("reversed pair", {**MESSAGE, "text": "\ude00\ud83d"}, "text"),
    ("lone surrogate in a name", {**MESSAGE, "to": [{"email": "a@example.com",
                                                     "name": "\udbff"}]}, "to[0].name"),
    ("lone surrogate in a key", {**MESSAGE, "metadata": {"\ud800": "v"}}, "metadata"),
]


def ascii_json(body: Any) -> dict[str, Any]:
    """Request arguments sending `body` as JSON with every non-ASCII character
    escaped (httpx's json= writes UTF-8, which cannot carry a lone surrogate)."""
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


def test_each_invalid_request_is_422_naming_the_field_and_produces_nothing(
        api, make_key, ingest_settings, admin_kafka, registry):
    _, token = make_key()
    for label, body, field in INVALID:
        sent = ascii_json(body)
        r = api.post("/v1/messages", content=sent["content"],
                     headers={**auth(token), **sent["headers"]})
        assert r.status_code == 422, (label, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json", label
        problem = r.json()
        assert problem["status"] == 422 and problem["type"] == "/problems/validation", label
        fields = [e["field"] for e in problem["errors"]]
        # The field the client wrote, or a part of it (`to[0]` -> `to[0].email`).
        assert any(f == field or f.startswith((field + ".", field + "[")) for f in fields), (
            label, fields)
    # Nothing was produced: the topic holds exactly the one valid message sent now.
    ok = api.post("/v1/messages", json=MESSAGE, headers=auth(token))
    assert ok.status_code == 202
    records = requested(ingest_settings, admin_kafka)
    assert [registry.decode(m.value())[1]["message_id"] for m in records] == [ok.json()["id"]]


def test_malformed_json_and_oversized_bodies(api, make_key):
    _, token = make_key()
    headers = {**auth(token), "Content-Type": "application/json"}
    r = api.post("/v1/messages", content=b"{not json", headers=headers)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    # The cap of POST /v1/messages leaves room for inline attachments' base64.
    cap = IngestSettings().max_body_bytes + attachment_rules.INLINE_BODY_BYTES
    big = b'{"to": ["a@example.com"], "subject": "x", "text": "' + b"x" * cap + b'"}'
    r = api.post("/v1/messages", content=big, headers=headers)
    assert r.status_code == 413 and r.json()["type"] == "/problems/too-large"

    def chunks():  # no Content-Length: the cap still holds
        yield b'{"to": ["a@example.com"], "subject": "x", "text": "'
        for _ in range(cap // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    r = api.post("/v1/messages", content=chunks(), headers=headers)
    assert r.status_code == 413


def test_key_limited_to_accounts(api, make_key, ingest_settings, admin_kafka, registry):
    _, token = make_key(accounts=["team-a"])
    r = api.post("/v1/messages", json={**MESSAGE, "from": "solo"}, headers=auth(token))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "from"
    r = api.post("/v1/messages", json={**MESSAGE, "from": "pool:default"}, headers=auth(token))
    assert r.status_code == 422  # 'dev' is the only member and not allowed
    ids = []
    for i in range(6):
        r = api.post("/v1/messages", json={**MESSAGE, "from": "pool:team",
                                           "to": [f"user{i}@example.com"]}, headers=auth(token))
        assert r.status_code == 202
        ids.append(r.json()["id"])
    events = [registry.decode(m.value())[1] for m in requested(ingest_settings, admin_kafka,
                                                               expect=6)]
    assert {e["account_id"] for e in events} == {"team-a"}


def test_pool_keeps_a_recipient_on_one_account(api, make_key, ingest_settings, admin_kafka,
                                               registry):
    _, token = make_key(default_pool="team")
    for _ in range(3):
        for who in ("x@example.com", "y@example.com", "z@example.com", "w@example.com"):
            body = {**MESSAGE, "to": [who], "cc": []}
            assert api.post("/v1/messages", json=body, headers=auth(token)).status_code == 202
    events = [registry.decode(m.value())[1] for m in requested(ingest_settings, admin_kafka,
                                                               expect=12)]
    by_recipient: dict[str, set[str]] = {}
    for e in events:
        by_recipient.setdefault(e["to"][0]["email"], set()).add(e["account_id"])
        assert e["pool"] == "team"
    assert all(len(accounts) == 1 for accounts in by_recipient.values())
    assert set().union(*by_recipient.values()) <= {"team-a", "team-b"}


def test_batch_answers_per_item(api, make_key, ingest_settings, admin_kafka, registry):
    _, token = make_key()
    items = [MESSAGE, {**MESSAGE, "to": ["broken"]}, {**MESSAGE, "subject": "two"},
             {**MESSAGE, "extra": True}]
    r = api.post("/v1/messages/batch", json={"messages": items}, headers=auth(token))
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (2, 2)
    statuses = [x["status"] for x in body["results"]]
    assert statuses == ["queued", "rejected", "queued", "rejected"]
    assert body["results"][1]["error"]["errors"][0]["field"] == "messages[1].to[0].email"
    assert body["results"][3]["error"]["errors"][0]["field"] == "messages[3].extra"
    produced = {registry.decode(m.value())[1]["message_id"]
                for m in requested(ingest_settings, admin_kafka)}
    assert produced == {body["results"][0]["id"], body["results"][2]["id"]}


def test_batch_limits(api, make_key):
    _, token = make_key()
    r = api.post("/v1/messages/batch", json={"messages": [MESSAGE] * 1001}, headers=auth(token))
    assert r.status_code in (413, 422)
    small = {"to": ["a@example.com"], "subject": "s", "text": "t"}
    r = api.post("/v1/messages/batch", json={"messages": [small] * 1001}, headers=auth(token))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "messages"
    r = api.post("/v1/messages/batch", json={"messages": [{"to": ["bad"]}]}, headers=auth(token))
    assert r.status_code == 422 and r.json()["rejected"] == 1
    # A body that is not text is refused whole, naming the item's field.
    broken = [small, {**small, "text": "\ud800"}]
    sent = ascii_json({"messages": broken})
    r = api.post("/v1/messages/batch", content=sent["content"],
                 headers={**auth(token), **sent["headers"]})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "messages[1].text"


def test_health_readiness_metrics_openapi(api, make_key):
    assert api.get("/healthz").json() == {"status": "ok"}
    # Ready once its producer reached the broker (its first contact may outlast
    # the probe's 2 s on a busy machine); a broker never reached never gets there.
    def answered() -> httpx.Response:
        r = api.get("/readyz")
        assert r.status_code == 200, r.text
        return r

    ready = eventually(answered, timeout=30)
    assert ready.status_code == 200 and ready.json() == {
        "status": "ok", "kafka": True, "postgres": True}
    _, token = make_key()
    api.post("/v1/messages", json=MESSAGE, headers=auth(token))
    metrics = api.get("/metrics").text
    assert 'mailbus_ingest_messages_accepted_total{account="dev",pool="default"}' in metrics
    spec = api.get("/openapi.json").json()
    assert "/v1/messages" in spec["paths"] and "/v1/messages/batch" in spec["paths"]


def test_responses_carry_no_secrets_and_safe_headers(api, make_key):
    _, token = make_key()
    r = api.post("/v1/messages", json={**MESSAGE, "to": ["bad"]}, headers=auth(token))
    assert token not in r.text
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    assert "server" not in r.headers



def raw_exchange(port: int, head: bytes, body_start: bytes) -> bytes:
    """Send a request's head and the first bytes of its body, then read the answer's head.

    The body declared in the head is far longer than what is sent: a server
    that read (or waited for) the body before answering never answers, and
    the socket timeout fails the test.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head + body_start)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.parametrize("path,declared", [
    ("/v1/messages", 1024 * 1024), ("/v1/messages/batch", 16 * 1024 * 1024),
    ("/v1/suppressions", 1024 * 1024)])
@pytest.mark.parametrize("authorization", [
    None, "Bearer mbk_nope", "Bearer mbk_aaaaaaaaaa." + "x" * 43, "forged"])
def test_key_is_checked_before_the_body_is_read(live_ingest, make_key, path, declared,
                                               authorization):
    if authorization == "forged":  # a real key id with a wrong secret
        _, token = make_key(scopes=("send", "read", "admin"))
        authorization = "Bearer " + token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n"
            + (f"Authorization: {authorization}\r\n" if authorization else "") + "\r\n").encode()
    answer = raw_exchange(live_ingest.port, head, b'{"messages": [')
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 401 Unauthorized", answer[:200]
    assert b"content-type: application/problem+json" in rest.lower()
    assert b"www-authenticate: bearer" in rest.lower()


def test_a_valid_key_still_gets_its_body_read(live_ingest, make_key):
    _, token = make_key()
    body = json.dumps(MESSAGE).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    answer = raw_exchange(live_ingest.port, head, body)
    assert answer.startswith(b"HTTP/1.1 202 "), answer[:200]


def test_database_down_at_the_gate_is_503_before_the_body_is_read(ingest_settings, make_key):
    _, token = make_key()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    down = ingest_settings.model_copy(update={"postgres": ingest_settings.postgres.model_copy(
        update={"port": port})})
    head = (f"POST /v1/messages/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
            f"{16 * 1024 * 1024}\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    with LiveServer(down) as server:
        answer = raw_exchange(server.port, head, b'{"messages": [')
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert b"content-type: application/problem+json" in answer.lower()
    assert b"\r\nretry-after: " in answer.lower()
