"""`POST /v1/messages` below FastAPI (fastpath.py) answers exactly as the FastAPI route.

Two servers on the same namespace, key table, broker and PostgreSQL: the
service as built, and the same app with the fast path taken out, so the
route answers everything. Every request is sent to both and the answers
compared: status, headers and body, byte for byte except the random message
id (and what its length moves).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from mailbus.codec import Registry
from mailbus.ingest.app import create_app
from mailbus.ingest.fastpath import FastPath
from mailbus.ingest.settings import IngestSettings
from mailbus.ingest.workers import server_options
from tests.integration.conftest import LiveServer
from tests.integration.test_ingest_api import INVALID, MESSAGE, ascii_json, auth, requested


class RouteOnly(LiveServer):
    """The ingest app without the fast path: FastAPI's route answers every request."""

    def __init__(self, settings: IngestSettings):
        super().__init__(settings)
        app = create_app(settings)
        app.user_middleware = [m for m in app.user_middleware if m.cls is not FastPath]
        self.server = uvicorn.Server(uvicorn.Config(app, **server_options(settings)))


@pytest.fixture
def servers(ingest_settings: IngestSettings) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    # Both servers take every request of this module's keys: no 429 between them.
    settings = ingest_settings.model_copy(update={"rate_limit": "10000/second"})
    with LiveServer(settings) as fast, RouteOnly(settings) as slow, \
            httpx.Client(base_url=fast.url, timeout=30) as a, \
            httpx.Client(base_url=slow.url, timeout=30) as b:
        yield a, b


def shape(r: httpx.Response) -> tuple[int, list[tuple[str, str]], Any]:
    """An answer with its message id (if any) replaced, everything else as sent."""
    body: Any = r.content
    headers = [(k, v) for k, v in r.headers.multi_items() if k != "date"]
    if r.headers.get("content-type", "").endswith("json"):
        body = r.json()
        if isinstance(body, dict) and "id" in body:
            message_id = body["id"]
            body = r.content.replace(message_id.encode(), b"<id>")
            headers = [(k, v.replace(message_id, "<id>")) for k, v in headers]
    return r.status_code, headers, body


def both(clients: tuple[httpx.Client, httpx.Client], label: str = "", **request: Any
         ) -> httpx.Response:
    fast, slow = (c.post("/v1/messages", **request) for c in clients)
    assert shape(fast) == shape(slow), label or request
    return fast


def test_valid_and_invalid_bodies_answer_alike(servers, make_key, ingest_settings,
                                               admin_kafka, registry: Registry):
    _, token = make_key()
    ok = both(servers, json=MESSAGE, headers=auth(token))
    assert ok.status_code == 202 and ok.headers["location"] == f"/v1/messages/{ok.json()['id']}"
    for label, body, _field in INVALID:
        sent = ascii_json(body)
        r = both(servers, label, content=sent["content"],
                 headers={**auth(token), **sent["headers"]})
        assert r.status_code == 422, label
    # Nothing but the two valid messages reached Kafka.
    assert len(requested(ingest_settings, admin_kafka)) == 2


RAW = {
    "not json": b"{not json",
    "empty": b"",
    "an array": json.dumps([MESSAGE]).encode(),
    "a string": b'"hello"',
    "trailing data": json.dumps(MESSAGE).encode() + b" x",
    "a lone surrogate escape": json.dumps({**MESSAGE, "text": "\ud800x"}).encode(),
    "invalid UTF-8": json.dumps(MESSAGE).encode()[:-2] + b'\xff"}',
    "UTF-16": json.dumps(MESSAGE).encode("utf-16"),
    "a BOM": b"\xef\xbb\xbf" + json.dumps(MESSAGE).encode(),
    "NaN in variables": json.dumps({**MESSAGE, "template": {"variables": {"x": float("nan")}}}
                                   ).encode(),
    "duplicate keys": json.dumps(MESSAGE).encode()[:-1] + b', "to": ["bad"]}',
    "deep nesting": json.dumps({**MESSAGE, "metadata": {"a": "[" * 300 + "]" * 300}}).encode()[
        :-2] + b"}}",
    "deep variables": (json.dumps({k: v for k, v in MESSAGE.items()})[:-1]
                       + ', "template": {"variables": {"x": ' + "[" * 300 + "]" * 300
                       + "}}}").encode(),
}


@pytest.mark.parametrize("content_type", [
    "application/json", "Application/JSON; charset=utf-8", None, "text/plain",
    "application/x-www-form-urlencoded", "application/problem+json"])
def test_raw_bodies_and_content_types_answer_alike(servers, make_key, content_type):
    _, token = make_key()
    headers = auth(token)
    if content_type is not None:
        headers["Content-Type"] = content_type
    for label, raw in {"valid": json.dumps(MESSAGE).encode(), **RAW}.items():
        r = both(servers, label, content=raw, headers=headers)
        assert r.status_code in (202, 422), (label, r.status_code, r.text)


def test_scope_idempotency_key_and_routing_answer_alike(servers, make_key):
    _, reader = make_key(scopes=("read",))
    _, token = make_key()
    _, solo = make_key(accounts=["solo"])
    # The body is checked before the scope, the scope before the Idempotency-Key.
    assert both(servers, json=MESSAGE, headers=auth(reader)).status_code == 403
    assert both(servers, json={**MESSAGE, "to": []}, headers=auth(reader)).status_code == 422
    bad_idem = {**auth(token), "Idempotency-Key": "has space"}
    assert both(servers, json=MESSAGE, headers=bad_idem).status_code == 422
    assert both(servers, json=MESSAGE,
                headers={**auth(reader), "Idempotency-Key": "has space"}).status_code == 403
    assert both(servers, json={**MESSAGE, "from": "dev"}, headers=auth(solo)).status_code == 422
    assert both(servers, json={**MESSAGE, "from": "nobody"}, headers=auth(token)).status_code \
        == 422


def test_idempotency_across_both_paths(servers, make_key):
    fast, slow = servers
    _, token = make_key()
    headers = {**auth(token), "Idempotency-Key": "order-1"}
    first = fast.post("/v1/messages", json=MESSAGE, headers=headers)
    assert first.status_code == 202
    # The route replays what the fast path recorded, and the reverse.
    for client in (slow, fast):
        again = client.post("/v1/messages", json=MESSAGE, headers=headers)
        assert (again.status_code, again.json()) == (202, first.json())
        assert again.headers["location"] == first.headers["location"]
    other = {**MESSAGE, "subject": "another"}
    assert shape(fast.post("/v1/messages", json=other, headers=headers)) == shape(
        slow.post("/v1/messages", json=other, headers=headers))
    assert fast.post("/v1/messages", json=other, headers=headers).status_code == 409


def test_fast_path_keeps_metrics_headers_and_openapi(servers, make_key):
    fast, _ = servers
    _, token = make_key()
    r = fast.post("/v1/messages", json=MESSAGE, headers=auth(token))
    assert r.status_code == 202
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    metrics = fast.get("/metrics").text
    assert ('mailbus_ingest_requests_total{method="POST",route="/v1/messages",status="202"}'
            in metrics)
    assert "post" in fast.get("/openapi.json").json()["paths"]["/v1/messages"]


def test_the_fast_path_sits_inside_the_gate_and_the_body_cap(ingest_settings):
    """Its requests pass the key check, the rate and the cap first (outermost first)."""
    order = [m.cls.__name__ for m in create_app(ingest_settings).user_middleware]
    assert order[-3:] == ["Gate", "BodyLimit", "FastPath"], order
