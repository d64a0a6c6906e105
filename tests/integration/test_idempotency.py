"""Idempotency-Key: replays, conflicts, and concurrent duplicates against the real stack."""

from __future__ import annotations

import asyncio
import socket

import httpx
import psycopg

from mailbus.ingest.handlers import message_id_for
from tests.integration.conftest import LiveServer
from tests.integration.test_ingest_api import MESSAGE, auth, requested


def test_same_key_same_body_same_id_one_event(api, make_key, ingest_settings, admin_kafka,
                                              registry):
    _, token = make_key()
    headers = {**auth(token), "Idempotency-Key": "order-42"}
    first = api.post("/v1/messages", json=MESSAGE, headers=headers)
    again = api.post("/v1/messages", json=MESSAGE, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    # Same body with its keys in another order is the same request.
    reordered = dict(reversed(list(MESSAGE.items())))
    assert api.post("/v1/messages", json=reordered, headers=headers).json() == first.json()
    events = requested(ingest_settings, admin_kafka)
    assert [registry.decode(m.value())[1]["message_id"] for m in events] == [first.json()["id"]]
    assert registry.decode(events[0].value())[1]["idempotency_key"] == "order-42"


def test_same_key_other_body_is_409(api, make_key, ingest_settings, admin_kafka):
    _, token = make_key()
    headers = {**auth(token), "Idempotency-Key": "k-1"}
    assert api.post("/v1/messages", json=MESSAGE, headers=headers).status_code == 202
    r = api.post("/v1/messages", json={**MESSAGE, "subject": "changed"}, headers=headers)
    assert r.status_code == 409
    assert r.json()["type"] == "/problems/idempotency-conflict"
    assert len(requested(ingest_settings, admin_kafka)) == 1


def test_keys_are_per_api_key(api, make_key, ingest_settings, admin_kafka):
    _, one = make_key()
    _, two = make_key()
    a = api.post("/v1/messages", json=MESSAGE, headers={**auth(one), "Idempotency-Key": "x"})
    b = api.post("/v1/messages", json=MESSAGE, headers={**auth(two), "Idempotency-Key": "x"})
    assert a.json()["id"] != b.json()["id"]
    assert len(requested(ingest_settings, admin_kafka, expect=2)) == 2


def test_bad_idempotency_key_is_422(api, make_key):
    _, token = make_key()
    for bad in (b"x" * 256, b"has space", "ünï".encode()):
        r = api.post("/v1/messages", json=MESSAGE,
                     headers={**auth(token), "Idempotency-Key": bad})
        assert r.status_code == 422
        assert r.json()["errors"][0]["field"] == "Idempotency-Key"


def test_concurrent_duplicates_produce_exactly_one_event(live_ingest, make_key, ingest_settings,
                                                         admin_kafka, registry):
    _, token = make_key()
    headers = {**auth(token), "Idempotency-Key": "race"}

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live_ingest.url, timeout=30) as client:
            return await asyncio.gather(*(
                client.post("/v1/messages", json=MESSAGE, headers=headers) for _ in range(20)))

    responses = asyncio.run(storm())
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    events = requested(ingest_settings, admin_kafka, settle=2.0)
    assert len(events) == 1
    assert registry.decode(events[0].value())[1]["message_id"] == responses[0].json()["id"]


def test_batch_idempotency(api, make_key, ingest_settings, admin_kafka):
    _, token = make_key()
    headers = {**auth(token), "Idempotency-Key": "batch-1"}
    body = {"messages": [MESSAGE, {**MESSAGE, "subject": "second"}]}
    first = api.post("/v1/messages/batch", json=body, headers=headers)
    again = api.post("/v1/messages/batch", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert len(requested(ingest_settings, admin_kafka)) == 2


def test_a_retry_after_a_503_carries_the_ids_of_the_failed_attempt(
        ingest_settings, make_key, admin, admin_kafka, registry):
    """The failed attempt may have reached Kafka unanswered: its retry must name the same ids."""
    key_id, token = make_key()
    headers = {**auth(token), "Idempotency-Key": "after-503"}
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    down = ingest_settings.model_copy(update={"kafka": ingest_settings.kafka.model_copy(
        update={"bootstrap_servers": f"127.0.0.1:{port}", "delivery_timeout_ms": 1000})})
    with LiveServer(down) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/messages", json=MESSAGE, headers=headers)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        [(generation, status)] = conn.execute(
            "SELECT generation, status_code FROM idempotency_keys WHERE key_id = %s",
            (key_id,)).fetchall()
        assert conn.execute("SELECT count(*) FROM messages WHERE key_id = %s",
                            (key_id,)).fetchone() == (0,)  # no message left behind
    assert status == 0  # claimed, never answered
    with LiveServer(ingest_settings) as server, httpx.Client(base_url=server.url,
                                                             timeout=30) as client:
        # Another body is fine too: nothing was answered for the first one.
        r = client.post("/v1/messages", json={**MESSAGE, "subject": "retried"}, headers=headers)
        assert r.status_code == 202
    assert r.json()["id"] == message_id_for(key_id, "after-503", None, str(generation))
    [event] = [registry.decode(m.value())[1]
               for m in requested(ingest_settings, admin_kafka, expect=1)]
    assert event["message_id"] == r.json()["id"] and event["subject"] == "retried"
