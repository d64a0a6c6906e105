"""Group commit over a real socket: concurrent single POSTs share a transaction, and its fate."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import psycopg
from prometheus_client import REGISTRY

from mailbus.ingest.settings import IngestSettings
from tests.integration.conftest import LiveServer
from tests.integration.test_ingest_api import MESSAGE, auth, requested


def groups() -> tuple[float, float]:
    """(group commits so far, of which carried a single request), from this process's metrics."""
    total = REGISTRY.get_sample_value("mailbus_ingest_group_commit_size_count") or 0.0
    alone = REGISTRY.get_sample_value("mailbus_ingest_group_commit_size_bucket",
                                      {"le": "1.0"}) or 0.0
    return total, alone


def storm(url: str, requests: list[dict[str, Any]]) -> list[httpx.Response]:
    """Every request at once, each on its own connection."""

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(client.post("/v1/messages", **r) for r in requests))

    return asyncio.run(go())


def test_kafka_failing_a_group_answers_503_to_every_member_and_records_nothing(
        ingest_settings: IngestSettings, make_key, admin) -> None:
    key_id, token = make_key()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    # One group at a time, each waiting a second for a broker that is not there:
    # the requests behind the first gather into groups of many.
    down = ingest_settings.model_copy(update={
        "group_commits_in_flight": 1,
        "kafka": ingest_settings.kafka.model_copy(update={
            "bootstrap_servers": f"127.0.0.1:{port}", "delivery_timeout_ms": 1000})})
    before = groups()
    requests = [{"json": {**MESSAGE, "subject": f"n{i}"},
                 "headers": {**auth(token), **({"Idempotency-Key": f"k{i}"} if i % 2 else {})}}
                for i in range(24)]
    with LiveServer(down) as server:
        responses = storm(server.url, requests)
    assert [r.status_code for r in responses] == [503] * 24
    assert all(int(r.headers["retry-after"]) > 0 for r in responses)
    assert {r.headers["content-type"] for r in responses} == {"application/problem+json"}
    total, alone = (a - b for a, b in zip(groups(), before, strict=True))
    assert total < 24 and total - alone >= 1  # at least one group carried several requests
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        assert conn.execute("SELECT count(*) FROM messages WHERE key_id = %s",
                            (key_id,)).fetchone() == (0,)
        # The keyed members' claims stay unanswered, for their retries to reuse.
        assert conn.execute("SELECT count(*), max(status_code) FROM idempotency_keys"
                            " WHERE key_id = %s", (key_id,)).fetchone() == (12, 0)


def test_concurrent_duplicates_in_groups_produce_one_event_each(
        ingest_settings: IngestSettings, make_key, admin, admin_kafka, registry) -> None:
    key_id, token = make_key()
    keyed: list[dict[str, Any]] = [{"json": {**MESSAGE, "subject": f"keyed {i}"},
              "headers": {**auth(token), "Idempotency-Key": f"dup-{i}"}}
             for i in range(10) for _ in range(3)]
    plain: list[dict[str, Any]] = [
        {"json": {**MESSAGE, "subject": f"plain {i}"}, "headers": auth(token)} for i in range(10)]
    mixed = [r for pair in zip(keyed, plain * 3, strict=True) for r in pair]
    before = groups()
    with LiveServer(ingest_settings.model_copy(update={"group_commits_in_flight": 1})) as server:
        responses = storm(server.url, mixed)
        # The same body again later is a replay, whatever group it lands in.
        again = storm(server.url, keyed[:3])
    assert [r.status_code for r in responses + again] == [202] * (len(mixed) + 3)
    total, alone = (a - b for a, b in zip(groups(), before, strict=True))
    assert total - alone >= 1  # groups of several did form
    by_key: dict[str, set[str]] = {}
    for request, response in zip(mixed + keyed[:3], responses + again, strict=True):
        idem = request["headers"].get("Idempotency-Key")
        if idem:
            by_key.setdefault(idem, set()).add(response.json()["id"])
    assert all(len(ids) == 1 for ids in by_key.values()) and len(by_key) == 10
    plain_ids = {r.json()["id"] for q, r in zip(mixed, responses, strict=True)
                 if "Idempotency-Key" not in q["headers"]}
    assert len(plain_ids) == 30  # plain requests are never folded together
    expected = plain_ids | {i for ids in by_key.values() for i in ids}
    events = [registry.decode(m.value())[1]
              for m in requested(ingest_settings, admin_kafka, settle=2.0)]
    assert sorted(e["message_id"] for e in events) == sorted(expected)  # one event each
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        rows = conn.execute("SELECT id::text, subject FROM messages WHERE key_id = %s",
                            (key_id,)).fetchall()
    assert {r[0] for r in rows} == expected and len(rows) == 40
    subjects = {e["message_id"]: e["subject"] for e in events}
    assert all(subjects[mid] == subject for mid, subject in rows)
