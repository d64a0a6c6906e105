"""Idempotency-Key records expire: pruned in batches by ingest, and a reused key is new again."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import psycopg
import pytest
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from mailbus.ingest.service import SQL
from mailbus.ingest.settings import IngestSettings
from mailbus.settings import ServiceSettings
from tests.integration.conftest import LiveServer
from tests.integration.test_ingest_api import MESSAGE, auth, requested

DAY = 86_400


def serve(settings: IngestSettings, **changes: object) -> Iterator[httpx.Client]:
    with LiveServer(settings.model_copy(update=changes)) as server, httpx.Client(
            base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture
def pruning(ingest_settings: IngestSettings) -> Iterator[httpx.Client]:
    """Records kept a day, a pruner that looks often and deletes two per statement."""
    yield from serve(ingest_settings, idempotency_retention_seconds=DAY,
                     idempotency_prune_seconds=0.05, idempotency_prune_batch=2)


@pytest.fixture
def not_pruning(ingest_settings: IngestSettings) -> Iterator[httpx.Client]:
    """Records kept a day, a pruner that never comes round during the test."""
    yield from serve(ingest_settings, idempotency_retention_seconds=DAY,
                     idempotency_prune_seconds=DAY)


def record_ages(key_id: str) -> dict[str, float]:
    """Idempotency-Key -> age in seconds, of the records an API key has."""
    with psycopg.connect(ServiceSettings(service_name="admin").postgres.conninfo()) as conn:
        rows = conn.execute("SELECT idempotency_key, extract(epoch FROM now() - created_at)"
                            " FROM idempotency_keys WHERE key_id = %s", (key_id,)).fetchall()
    return {k: float(age) for k, age in rows}


def age(key_id: str, idempotency_keys: list[str], seconds: int) -> None:
    """Make records older, as the schema owner: the API's roles cannot rewrite history."""
    owner = ServiceSettings(service_name="owner").postgres
    with psycopg.connect(owner.conninfo()) as conn:
        conn.execute("UPDATE idempotency_keys SET created_at = created_at - make_interval("
                     "secs => %s) WHERE key_id = %s AND idempotency_key = ANY(%s)",
                     (seconds, key_id, idempotency_keys))


@retry(stop=stop_after_delay(15), wait=wait_fixed(0.05), retry=retry_if_result(bool),
       retry_error_callback=lambda state: state.outcome.result())  # type: ignore[union-attr]
def expired_left(key_id: str, names: list[str]) -> list[str]:
    """The named records still present; retried until none is (or the deadline passes)."""
    return [k for k in record_ages(key_id) if k in names]


def post(client: httpx.Client, token: str, idem: str) -> str:
    r = client.post("/v1/messages", json=MESSAGE, headers={**auth(token), "Idempotency-Key": idem})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_expired_records_are_pruned_and_their_keys_make_new_messages(
        pruning, make_key, ingest_settings, admin_kafka, registry):
    key_id, token = make_key()
    old = [f"old-{i}" for i in range(5)]  # more than one prune batch
    first = {k: post(pruning, token, k) for k in [*old, "fresh"]}
    age(key_id, old, DAY + 60)
    assert expired_left(key_id, old) == []
    # The pruner went round after the aging, and the fresh record is still there.
    assert set(record_ages(key_id)) == {"fresh"}
    assert post(pruning, token, "fresh") == first["fresh"]
    again = post(pruning, token, "old-0")
    assert again != first["old-0"]
    produced = [registry.decode(m.value())[1]["message_id"]
                for m in requested(ingest_settings, admin_kafka)]
    assert sorted(produced) == sorted([*first.values(), again])


def test_an_expired_record_is_gone_even_before_the_pruner_comes(
        not_pruning, make_key, ingest_settings, admin_kafka, registry):
    key_id, token = make_key()
    first = post(not_pruning, token, "k")
    assert post(not_pruning, token, "k") == first  # unexpired: the same answer
    age(key_id, ["k"], DAY - 60)
    assert post(not_pruning, token, "k") == first  # a minute short of a day: still the same
    age(key_id, ["k"], 120)
    second = post(not_pruning, token, "k")
    assert second != first
    # A new record for the new use of the key: retries of it answer the new id.
    assert record_ages(key_id)["k"] < 60
    assert post(not_pruning, token, "k") == second
    produced = [registry.decode(m.value())[1]["message_id"]
                for m in requested(ingest_settings, admin_kafka)]
    assert produced == [first, second]


def test_an_expired_batch_key_makes_new_messages(not_pruning, make_key):
    key_id, token = make_key()
    headers = {**auth(token), "Idempotency-Key": "b"}
    body = {"messages": [MESSAGE, MESSAGE]}
    first = not_pruning.post("/v1/messages/batch", json=body, headers=headers).json()
    assert not_pruning.post("/v1/messages/batch", json=body, headers=headers).json() == first
    age(key_id, ["b"], DAY + 1)
    second = not_pruning.post("/v1/messages/batch", json=body, headers=headers).json()
    ids = [{r["id"] for r in doc["results"]} for doc in (first, second)]
    assert len(ids[0]) == len(ids[1]) == 2 and not ids[0] & ids[1]


def test_the_prune_walks_the_creation_time_index():
    """However many records there are, a round reads only the expired ones, oldest first."""
    ingest = ServiceSettings(service_name="ingest").postgres
    with psycopg.connect(ingest.conninfo()) as conn:
        # Small test tables make a sequential or bitmap scan and a sort cheapest;
        # what matters is that the statement can walk the index in order instead
        # of sorting the table: with those off, a plan that still sorts could not.
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        conn.execute("SET LOCAL enable_sort = off")
        plan = "\n".join(row[0] for row in conn.execute(
            "EXPLAIN " + SQL["prune_idempotency"], {"retention": DAY, "batch": 1000}))
        conn.rollback()
    assert "idempotency_keys_created" in plan, plan
    assert "Sort" not in plan, plan
