"""Request rates per API key over a real socket: 429 with Retry-After, per key, and recovery."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from mailbus.ingest.settings import IngestSettings
from tests.integration.conftest import LiveServer
from tests.integration.test_ingest_api import MESSAGE, auth, raw_exchange

# The installation's rate: a minute, so that however slowly a loaded machine
# runs the requests, three of them fall in one window. Recovery is shown
# with a key's own one-second window, so waiting it out stays short.
RATE = "3/minute"


@pytest.fixture
def limited(ingest_settings: IngestSettings) -> Iterator[tuple[LiveServer, httpx.Client]]:
    settings = ingest_settings.model_copy(update={"rate_limit": RATE})
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield server, client


def until_allowed(client: httpx.Client, token: str, deadline: float = 10.0) -> httpx.Response:
    """Ask until the key is let through again; fails past the deadline."""
    end = time.monotonic() + deadline
    while True:
        r = client.get("/v1/messages", headers=auth(token))
        if r.status_code != 429 or time.monotonic() > end:
            return r
        time.sleep(0.05)


def until_refused(client: httpx.Client, token: str, most: int = 50) -> httpx.Response:
    """Ask until the key is refused; fails if it never is."""
    for _ in range(most):
        r = client.get("/v1/messages", headers=auth(token))
        if r.status_code == 429:
            return r
    raise AssertionError(f"still served after {most} requests")


def test_the_limit_trips_with_retry_after_and_spares_other_keys(limited, make_key):
    _, client = limited
    _, token = make_key()
    _, other = make_key()
    statuses = [client.post("/v1/messages", json=MESSAGE, headers=auth(token)).status_code
                for _ in range(3)]
    assert statuses == [202, 202, 202]
    r = client.post("/v1/messages", json=MESSAGE, headers=auth(token))
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "/problems/rate-limited" and r.json()["status"] == 429
    # The first request leaves the minute's window in (a little under) 60 s.
    assert 50 <= int(r.headers["retry-after"]) <= 60
    # Reads count as well, and the key stays refused inside the window...
    assert client.get("/v1/messages", headers=auth(token)).status_code == 429
    # ...while another key has its own window.
    assert client.post("/v1/messages", json=MESSAGE, headers=auth(other)).status_code == 202


def test_after_the_window_the_key_is_served_again(limited, make_key, admin):
    _, client = limited
    key_id, token = make_key()
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        conn.execute("UPDATE api_keys SET rate_limit = '2/second' WHERE id = %s", (key_id,))
    refused = until_refused(client, token)
    assert refused.headers["retry-after"] == "1"  # a one-second window frees within 1 s
    # Once the window moved past the oldest request, the key is served again.
    assert until_allowed(client, token).status_code == 200


def test_a_batch_is_one_request(limited, make_key):
    _, client = limited
    _, token = make_key()
    batch = {"messages": [MESSAGE] * 5}
    for _ in range(3):
        r = client.post("/v1/messages/batch", json=batch, headers=auth(token))
        assert r.status_code == 202 and r.json()["accepted"] == 5
    assert client.post("/v1/messages/batch", json=batch, headers=auth(token)).status_code == 429


def test_a_key_over_its_rate_is_refused_before_its_body_is_read(limited, make_key):
    server, client = limited
    _, token = make_key()
    for _ in range(3):
        assert client.get("/v1/messages", headers=auth(token)).status_code == 200
    head = (f"POST /v1/messages/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
            f"{16 * 1024 * 1024}\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    answer = raw_exchange(server.port, head, b'{"messages": [')
    assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
    assert b"\r\nretry-after: " in answer.lower()


def test_a_key_may_carry_its_own_rate(limited, make_key, admin):
    _, client = limited
    key_id, token = make_key()
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        conn.execute("UPDATE api_keys SET rate_limit = '2 per minute' WHERE id = %s", (key_id,))
    assert [client.get("/v1/messages", headers=auth(token)).status_code
            for _ in range(3)] == [200, 200, 429]
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        # More generous than the installation's rate, too: four requests pass.
        conn.execute("UPDATE api_keys SET rate_limit = '10/second' WHERE id = %s", (key_id,))
    assert [client.get("/v1/messages", headers=auth(token)).status_code
            for _ in range(4)] == [200] * 4


@pytest.mark.parametrize("bad", ["lots", "0/second", "5/fortnight", "-1 per minute", "",
                                 "100000/second"])
def test_an_unreadable_key_rate_is_refused_by_the_database(make_key, admin, bad):
    key_id, _ = make_key()
    with psycopg.connect(admin.postgres.conninfo()) as conn, pytest.raises(
            psycopg.errors.CheckViolation):
        conn.execute("UPDATE api_keys SET rate_limit = %s WHERE id = %s", (bad, key_id))


def test_an_unreadable_installation_rate_stops_the_settings():
    with pytest.raises(ValueError, match="rate"):
        IngestSettings(rate_limit="fast")
