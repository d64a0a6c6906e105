"""A cancelled message reaches webhook endpoints as `message.cancelled`; a reschedule does not.

The webhooks service reads email.schedule as the sender's outbox writes it,
and a real HTTP receiver verifies each delivery with `standardwebhooks`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jsonschema
import pytest
from standardwebhooks.webhooks import Webhook

from mailbus.ingest.settings import IngestSettings
from mailbus.settings import REPO_ROOT
from tests.integration.conftest import LiveServer
from tests.support import projector as build
from tests.support.receiver import Receiver
from tests.support.webhooks import WebhooksService, settings_for

SCHEMA = json.loads((REPO_ROOT / "docs" / "webhooks.schema.json").read_text())


@pytest.fixture
def ingest_settings(namespace: str, accounts_file: Any) -> IngestSettings:
    return IngestSettings(accounts_file=accounts_file, webhooks_allow_http=True,
                          kafka={"topic_prefix": namespace, "delivery_timeout_ms": 5000})


@pytest.fixture
def api(ingest_settings: IngestSettings, make_key) -> Iterator[httpx.Client]:
    _, token = make_key(("send", "read", "webhooks"))
    with LiveServer(ingest_settings) as server, httpx.Client(
            base_url=server.url, timeout=30,
            headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


def test_a_cancel_is_delivered_as_message_cancelled(api, namespace, admin_kafka, registry):
    with Receiver() as receiver:
        r = api.post("/v1/webhooks/endpoints", json={
            "url": receiver.url("/hook"), "event_types": ["message.cancelled", "message.sent"]})
        assert r.status_code == 201, r.text
        secret = r.json()["secret"]
        ids = [api.post("/v1/messages", json={"to": ["ada@example.com"], "subject": "Hi",
                                              "text": "Hello"}).json()["id"] for _ in range(2)]
        now = datetime.now(UTC)
        moved = build.scheduled(ids[1], now, "rescheduled", send_at=now + timedelta(days=2))
        cancelled = build.scheduled(ids[0], now)
        # After the reschedule, on its partition (same key): once its delivery
        # arrived, the reschedule was read before it and queued nothing.
        sent = build.sent(ids[1], now + timedelta(days=2))
        build.produce(admin_kafka, namespace, registry, [moved, cancelled])
        build.produce(admin_kafka, namespace, registry, [sent])

        def arrived() -> dict[str, dict[str, Any]]:
            got = [Webhook(secret).verify(d.body, d.headers) for d in receiver.on("/hook")]
            assert len(got) >= 2, got
            return {d["type"]: d for d in got}
        with WebhooksService(settings_for(namespace)):
            docs = build.eventually(arrived)
        assert len(receiver.on("/hook")) == 2
    for doc in docs.values():
        jsonschema.validate(doc, SCHEMA)
    assert sorted(docs) == ["message.cancelled", "message.sent"]
    assert docs["message.sent"]["data"]["message_id"] == ids[1]
    assert docs["message.cancelled"]["data"] == {
        "event_id": cancelled[1]["event_id"], "message_id": ids[0], "account": "dev",
        "key_id": "k1", "reason": "changed plans"}
