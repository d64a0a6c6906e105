"""Outbound webhooks end to end: the API on a real socket, real Kafka and PostgreSQL, the
webhooks service, and receivers that are real HTTP servers verifying every delivery with the
`standardwebhooks` library, as a customer's endpoint would."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jsonschema
import pytest
from prometheus_client import REGISTRY
from standardwebhooks.webhooks import Webhook

from mailbus.ingest.settings import IngestSettings
from mailbus.settings import REPO_ROOT
from mailbus.webhooks.intake import READ
from tests.integration.conftest import LiveServer
from tests.support import projector as build
from tests.support.receiver import Received, Receiver, https_receiver
from tests.support.webhooks import WebhooksService, settings_for

pytestmark = pytest.mark.integration
SCHEMA = json.loads((REPO_ROOT / "docs" / "webhooks.schema.json").read_text())
ALL_TYPES = ["message.sent", "message.failed", "message.delivered", "message.bounced",
             "message.response", "message.confirmed", "message.unconfirmed"]
eventually = build.eventually


@pytest.fixture
def ingest_settings(namespace: str, accounts_file: Any) -> IngestSettings:
    return IngestSettings(accounts_file=accounts_file, webhooks_allow_http=True,
                          webhooks_max_endpoints=3,
                          kafka={"topic_prefix": namespace, "delivery_timeout_ms": 5000})


@pytest.fixture
def api_url(ingest_settings: IngestSettings) -> Iterator[str]:
    with LiveServer(ingest_settings) as server:
        yield server.url


class Client:
    """One API key's view of the API."""

    def __init__(self, base: str, token: str):
        self.http = httpx.Client(base_url=base, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"})

    def endpoint(self, url: str, types: list[str]) -> dict[str, Any]:
        r = self.http.post("/v1/webhooks/endpoints", json={"url": url, "event_types": types})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def message(self) -> str:
        r = self.http.post("/v1/messages", json={"to": ["ada@example.com"], "subject": "Hi",
                                                 "text": "Hello"})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


@pytest.fixture
def client(api_url: str, make_key: Callable[..., tuple[str, str]]) -> Callable[..., Client]:
    made: list[Client] = []

    def make(scopes: tuple[str, ...] = ("send", "read", "webhooks")) -> Client:
        made.append(Client(api_url, make_key(scopes)[1]))
        return made[-1]

    yield make  # type: ignore[misc]
    for c in made:
        c.http.close()


def verified(received: Received, secret: str) -> dict[str, Any]:
    """The body of a delivery, once the library verified its signature and it fits the schema."""
    doc = Webhook(secret).verify(received.body, received.headers)
    jsonschema.validate(doc, SCHEMA)
    assert received.headers["webhook-id"] == doc["data"]["event_id"]
    return dict(doc)


def test_endpoints_are_an_api_resource_each_key_sees_only_its_own(client) -> None:
    a, b, sender = client(), client(), client(("send", "read"))
    r = sender.http.post("/v1/webhooks/endpoints",
                         json={"url": "https://example.com/h", "event_types": ALL_TYPES})
    assert r.status_code == 403
    assert r.headers["content-type"].startswith("application/problem+json")
    for body, field in [
        ({"url": "ftp://example.com/h", "event_types": ALL_TYPES}, "url"),
        ({"url": "https://u:p@example.com/h", "event_types": ALL_TYPES}, "url"),
        ({"url": "https://example.com/h", "event_types": ["message.opened"]}, "event_types[0]"),
        ({"url": "https://example.com/h", "event_types": []}, "event_types"),
        ({"url": "https://example.com/h", "event_types": ALL_TYPES, "x": 1}, "x"),
        ({"url": "https://example.com/h", "event_types": ALL_TYPES, "description": "a\nb"},
         "description"),
    ]:
        r = a.http.post("/v1/webhooks/endpoints", json=body)
        assert r.status_code == 422, (body, r.text)
        assert [e["field"] for e in r.json()["errors"]] == [field], r.json()
    made = a.endpoint("https://example.com/hook", ["message.sent", "message.delivered"])
    assert made["secret"].startswith("whsec_")
    path = f"/v1/webhooks/endpoints/{made['id']}"
    got = a.http.get(path).json()
    assert "secret" not in got and got["event_types"] == ["message.delivered", "message.sent"]
    assert [e["id"] for e in a.http.get("/v1/webhooks/endpoints").json()["endpoints"]] == [
        made["id"]]
    # Another key: as if it did not exist.
    assert b.http.get("/v1/webhooks/endpoints").json() == {"endpoints": []}
    for method, suffix, body in [("GET", "", None), ("PATCH", "", {"enabled": False}),
                                 ("DELETE", "", None), ("POST", "/test", None),
                                 ("POST", "/rotate-secret", None), ("GET", "/attempts", None),
                                 ("POST", "/replay", {"since": "2026-01-01T00:00:00Z"})]:
        r = b.http.request(method, path + suffix, json=body)
        assert r.status_code == 404, (method, suffix, r.text)
    assert a.http.get(path).json()["enabled"] is True
    # Disable, enable, change.
    off = a.http.patch(path, json={"enabled": False}).json()
    assert (off["enabled"], off["disabled_reason"]) == (False, "disabled through the API")
    on = a.http.patch(path, json={"enabled": True, "description": "orders",
                                  "event_types": ["message.bounced"]}).json()
    assert (on["enabled"], on["disabled_reason"], on["description"], on["event_types"]) == (
        True, None, "orders", ["message.bounced"])
    # Rotation: a new secret, the old one valid for the grace period.
    rotated = a.http.post(path + "/rotate-secret", json={"grace_seconds": 3600}).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != made["secret"]
    until = datetime.fromisoformat(rotated["previous_secret_valid_until"])
    assert timedelta(minutes=59) < until - datetime.now(UTC) <= timedelta(hours=1)
    assert a.http.delete(path).status_code == 204
    assert a.http.get(path).status_code == 404
    # At most webhooks_max_endpoints (3 here) per key.
    for i in range(3):
        a.endpoint(f"https://example.com/{i}", ["message.sent"])
    r = a.http.post("/v1/webhooks/endpoints",
                    json={"url": "https://example.com/4", "event_types": ["message.sent"]})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "url"
    assert "3 endpoints" in r.json()["errors"][0]["message"]


def test_every_event_reaches_its_keys_endpoint_signed_once_per_type_and_key(
        client, namespace: str, admin_kafka: dict[str, Any], registry: Any) -> None:
    a, b = client(), client()
    with Receiver() as receiver:
        ea = a.endpoint(receiver.url("/a"), ["message.sent", "message.delivered"])
        eb = b.endpoint(receiver.url("/b"), ALL_TYPES)
        ma, mb = a.message(), b.message()
        now = datetime.now(UTC)
        events = [build.sent(ma, now), build.delivered(ma, now + timedelta(seconds=1)),
                  build.bounced(ma, now + timedelta(seconds=2)),
                  build.sent(mb, now), build.responded(mb, now + timedelta(seconds=1)),
                  # A message of nobody's key (another producer): no endpoint gets it.
                  build.sent(str(uuid.uuid4()), now)]
        build.produce(admin_kafka, namespace, registry, events)
        with WebhooksService(settings_for(namespace)):
            eventually(lambda: _count(receiver, "/a", 2) and _count(receiver, "/b", 2))
            r = a.http.post(f"/v1/webhooks/endpoints/{ea['id']}/test")
            assert r.status_code == 202
            test_id = r.json()["event_id"]
            eventually(lambda: _count(receiver, "/a", 3))
            attempts = eventually(lambda: _attempts(a, ea["id"], 3))
            # After a rotation, during the grace period, both secrets verify.
            new = a.http.post(f"/v1/webhooks/endpoints/{ea['id']}/rotate-secret").json()
            a.http.post(f"/v1/webhooks/endpoints/{ea['id']}/test")
            eventually(lambda: _count(receiver, "/a", 4))
        rotated = receiver.on("/a")[3]
        assert verified(rotated, new["secret"]) == verified(rotated, ea["secret"])
        got_a = [verified(x, ea["secret"]) for x in receiver.on("/a")[:3]]
        got_b = [verified(x, eb["secret"]) for x in receiver.on("/b")]
    # The events sit on different topics, whose partitions the intake starts
    # reading at different moments: their order across topics is not promised
    # (order within one partition is, tested below). The test call came after both.
    assert sorted((d["type"], d["data"]["event_id"]) for d in got_a[:2]) == sorted([
        ("message.sent", events[0][1]["event_id"]),
        ("message.delivered", events[1][1]["event_id"])])
    assert (got_a[2]["type"], got_a[2]["data"]["event_id"]) == ("webhook.test", test_id)
    assert {d["data"]["message_id"] for d in got_a[:2]} == {ma}
    assert sorted((d["type"], d["data"]["message_id"]) for d in got_b) == [
        ("message.response", mb), ("message.sent", mb)]
    assert [d["data"]["text"] for d in got_b if d["type"] == "message.response"] == ["Yes!"]
    # Every attempt is listed, newest first, with what the endpoint answered.
    assert [x["status_code"] for x in attempts] == [200, 200, 200]
    assert attempts[0]["event_id"] == test_id and attempts[0]["response"] == "ok"
    assert all(x["latency_ms"] >= 0 and x["delivery_state"] == "delivered" for x in attempts)
    # Walking the listing a row at a time visits each attempt once, newest first.
    walked, cursor = [], None
    while True:
        page = a.http.get(f"/v1/webhooks/endpoints/{ea['id']}/attempts",
                          params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        walked += page["attempts"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [x["event_id"] for x in walked][1:] == [x["event_id"] for x in attempts]
    r = a.http.get(f"/v1/webhooks/endpoints/{ea['id']}/attempts", params={"cursor": "nonsense"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "cursor"


def _count(receiver: Receiver, path: str, n: int) -> bool:
    got = len(receiver.on(path))
    assert got >= n, (path, got)
    assert got == n, (path, got, "more than expected")
    return True


def _attempts(c: Client, endpoint_id: str, n: int) -> list[dict[str, Any]]:
    r = c.http.get(f"/v1/webhooks/endpoints/{endpoint_id}/attempts")
    assert r.status_code == 200, r.text
    found = list(r.json()["attempts"])
    assert len(found) == n, found
    return found


def test_failures_are_retried_under_the_same_id_and_a_hanging_endpoint_delays_no_other(
        client, namespace: str, admin_kafka: dict[str, Any], registry: Any) -> None:
    release = threading.Event()
    fast_done = threading.Event()

    def answer(path: str, n: int) -> tuple[int, dict[str, str], bytes, float]:
        if path == "/flaky" and n < 2:  # every event fails twice
            return 503, {}, b"busy", 0.0
        if path == "/hang":
            release.wait(60)  # holds its worker until every fast delivery arrived
        return 200, {}, b"ok", 0.0

    a = client()
    with Receiver(answer) as receiver:
        flaky = a.endpoint(receiver.url("/flaky"), ["message.sent"])
        hang = a.endpoint(receiver.url("/hang"), ["message.sent"])
        fast = a.endpoint(receiver.url("/fast"), ["message.sent"])
        ids = [a.message() for _ in range(4)]
        now = datetime.now(UTC)
        events = [build.sent(m, now + timedelta(milliseconds=i)) for i, m in enumerate(ids)]
        # In one partition: an endpoint gets its queued events in the order they
        # happened, and the intake may queue the events of different partitions in
        # separate polls, the later event first, with a dispatch in between.
        build.produce(admin_kafka, namespace, registry, events, partition=0)
        with WebhooksService(settings_for(namespace, timeout_seconds=90)):
            eventually(lambda: _count(receiver, "/fast", 4))
            # The hanging endpoint still holds its first delivery: the fast
            # one's four went past it.
            assert len(receiver.on("/hang")) == 1
            fast_done.set()
            release.set()
            eventually(lambda: _count(receiver, "/hang", 4))
            eventually(lambda: _count(receiver, "/flaky", 4 * 3))
            flaky_attempts = eventually(lambda: _attempts(a, flaky["id"], 12))
        for path, secret in (("/fast", fast["secret"]), ("/hang", hang["secret"])):
            assert [verified(x, secret)["data"]["event_id"] for x in receiver.on(path)] == [
                e[1]["event_id"] for e in events]
        tries = [verified(x, flaky["secret"]) for x in receiver.on("/flaky")]
    first = events[0][1]["event_id"]
    # Each event failed twice; each retry carried the same webhook-id.
    for event in events:
        assert [d["data"]["event_id"] for d in tries].count(event[1]["event_id"]) == 3
    first_attempts = sorted((x for x in flaky_attempts if x["event_id"] == first),
                            key=lambda x: x["attempt"])
    assert [(x["attempt"], x["status_code"], x["response"]) for x in first_attempts] == [
        (1, 503, "busy"), (2, 503, "busy"), (3, 200, "ok")]


def _gauge(when: str) -> float:
    return REGISTRY.get_sample_value("mailbus_webhooks_deliveries_pending",
                                     {"when": when}) or 0.0


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_an_endpoint_failing_for_the_whole_schedule_is_disabled_and_counted(
        client, namespace: str, admin_kafka: dict[str, Any], registry: Any) -> None:
    a = client()
    with Receiver(lambda path, n: (500, {}, b"down", 0.0)) as receiver:
        down = a.endpoint(receiver.url("/down"), ["message.sent"])
        m = a.message()
        build.produce(admin_kafka, namespace, registry, [build.sent(m, datetime.now(UTC))])
        disabled_before = _metric("mailbus_webhooks_endpoints_disabled_total")
        failed_before = _metric("mailbus_webhooks_deliveries_failed_total")
        schedule = [0.2, 0.2]
        with WebhooksService(settings_for(namespace, retry_schedule_seconds=schedule)):
            def disabled() -> dict[str, Any]:
                got = a.http.get(f"/v1/webhooks/endpoints/{down['id']}").json()
                assert got["enabled"] is False, got
                return dict(got)

            endpoint = eventually(disabled)
            attempts = _attempts(a, down["id"], len(schedule) + 1)
    assert "every attempt failed" in endpoint["disabled_reason"]
    assert [x["status_code"] for x in attempts] == [500] * 3
    assert attempts[0]["delivery_state"] == "failed"
    assert len(receiver.on("/down")) == 3
    assert _metric("mailbus_webhooks_endpoints_disabled_total") == disabled_before + 1
    assert _metric("mailbus_webhooks_deliveries_failed_total") == failed_before + 1


def test_a_revoked_key_gets_no_new_events(client, namespace: str, admin: Any,
                                          admin_kafka: dict[str, Any], registry: Any) -> None:
    import psycopg

    a = client()
    with Receiver() as receiver:
        e = a.endpoint(receiver.url("/a"), ["message.sent", "message.delivered"])
        m = a.message()
        now = datetime.now(UTC)
        build.produce(admin_kafka, namespace, registry, [build.sent(m, now)])
        with WebhooksService(settings_for(namespace)):
            eventually(lambda: _count(receiver, "/a", 1))
            key_id = a.http.headers["Authorization"].removeprefix("Bearer mbk_").split(".")[0]
            with psycopg.connect(admin.postgres.conninfo(), autocommit=True) as conn:
                conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id,))
            build.produce(admin_kafka, namespace, registry,
                          [build.delivered(m, now), build.sent(m, now)])

            def all_read() -> None:
                # Offsets are committed once a batch's deliveries are queued.
                assert build.lag(admin_kafka, namespace, "mailbus-webhooks", READ) == 0

            eventually(all_read)
        with _owner(admin) as conn:
            queued = conn.execute("SELECT event_type FROM webhook_deliveries"
                                  " WHERE endpoint_id = %s", (e["id"],)).fetchall()
        assert queued == [("message.sent",)]
        assert [verified(x, e["secret"])["type"] for x in receiver.on("/a")] == ["message.sent"]


def test_a_refused_target_is_never_dialled_and_the_refusal_is_listed(
        client, namespace: str, admin_kafka: dict[str, Any], registry: Any) -> None:
    # The API takes the URL (its form is fine); the service, whose operator
    # allows no loopback, refuses the address at every attempt.
    a = client()
    with Receiver() as receiver:
        e = a.endpoint(receiver.url("/hook"), ["message.sent"])
        build.produce(admin_kafka, namespace, registry, [build.sent(a.message(),
                                                                     datetime.now(UTC))])
        settings = settings_for(namespace, allowed_networks=[], lag_seconds=0.2,
                                retry_schedule_seconds=[3600])
        with WebhooksService(settings):
            attempts = eventually(lambda: _attempts(a, e["id"], 1))

            def backlog() -> None:
                # Waiting out its backoff (an hour), not due.
                assert _gauge("waiting") == 1 and _gauge("due") == 0

            eventually(backlog)
        assert receiver.on("/hook") == []
    assert attempts[0]["status_code"] is None
    assert attempts[0]["error"].startswith("refused: address 127.0.0.1 is not public")


def test_replay_delivers_again_in_order_with_the_same_ids_beside_live_deliveries(
        client, namespace: str, admin_kafka: dict[str, Any], registry: Any) -> None:
    a, b = client(), client()
    with Receiver() as receiver:
        e = a.endpoint(receiver.url("/a"), ["message.sent", "message.delivered"])
        b.endpoint(receiver.url("/b"), ["message.sent"])
        ma, mb = a.message(), b.message()
        start = datetime.now(UTC) - timedelta(minutes=5)
        older = [build.sent(ma, start - timedelta(hours=1))]  # before `since`
        events = [build.sent(ma, start + timedelta(seconds=1)),
                  build.delivered(ma, start + timedelta(seconds=2)),
                  build.sent(mb, start + timedelta(seconds=3))]
        since = datetime.now(UTC) - timedelta(seconds=1)  # all of them are written after
        build.produce(admin_kafka, namespace, registry, older + events)
        with WebhooksService(settings_for(namespace)):
            eventually(lambda: _count(receiver, "/a", 3) and _count(receiver, "/b", 1))
            r = a.http.post(f"/v1/webhooks/endpoints/{e['id']}/replay",
                            json={"since": since.isoformat()})
            assert r.status_code == 202, r.text
            # A live event meanwhile is delivered in the live lane, once.
            live = build.delivered(ma, datetime.now(UTC))
            build.produce(admin_kafka, namespace, registry, [live])
            live_id = live[1]["event_id"]

            def both_lanes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
                found = list(a.http.get(f"/v1/webhooks/endpoints/{e['id']}/attempts").json()[
                    "attempts"])
                lanes = ([x for x in found if x["replay_id"] is None],
                         [x for x in found if x["replay_id"] is not None])
                assert live_id in {x["event_id"] for x in lanes[0]}
                assert len([x for x in lanes[1] if x["event_id"] != live_id]) >= 3
                return lanes

            eventually(both_lanes)
            live_lane, replay_lane = both_lanes()
        for x in receiver.on("/a"):
            verified(x, e["secret"])
        assert len(receiver.on("/b")) == 1
    mine = [older[0][1]["event_id"], events[0][1]["event_id"], events[1][1]["event_id"]]
    assert sorted(x["event_id"] for x in live_lane) == sorted([*mine, live_id])
    assert {x["replay_id"] for x in replay_lane} == {r.json()["replay_id"]}
    # Records appended since `since` (Kafka's time, when they were written),
    # once each, in the order they happened; only this key's, only the types
    # asked for. The live event is in it when the replay started after it.
    replayed = [x["event_id"] for x in sorted(replay_lane, key=lambda x: x["at"])]
    assert [i for i in replayed if i != live_id] == mine
    assert replayed.count(live_id) <= 1
    assert all(x["status_code"] == 200 for x in live_lane + replay_lane)


def _owner(admin: Any) -> Any:
    import psycopg

    owner = admin.postgres.model_copy(update={
        "user": "mailbus_owner", "password": None,
        "password_file": admin.var_dir / "secrets" / "postgres-mailbus_owner.password"})
    return psycopg.connect(owner.conninfo(), autocommit=True)


def test_settled_deliveries_are_pruned_after_their_retention_and_go_with_their_endpoint(
        client, namespace: str, admin: Any) -> None:
    a = client()
    with Receiver() as receiver:
        e = a.endpoint(receiver.url("/a"), ["message.sent"])
        path = f"/v1/webhooks/endpoints/{e['id']}"
        old = a.http.post(path + "/test").json()["event_id"]
        with WebhooksService(settings_for(namespace)):
            eventually(lambda: _attempts(a, e["id"], 1))
        with _owner(admin) as conn:
            conn.execute("UPDATE webhook_deliveries SET settled_at = now() - interval '31 days'"
                         " WHERE event_id = %s", (old,))
        recent = a.http.post(path + "/test").json()["event_id"]
        with WebhooksService(settings_for(namespace, prune_seconds=0.2)):
            def pruned() -> None:
                found = _attempts(a, e["id"], 1)
                assert found[0]["event_id"] == recent
            eventually(pruned)
        assert len(receiver.on("/a")) == 2
    # Deleting the endpoint takes its queued deliveries and attempts along.
    a.http.post(path + "/test")
    with _owner(admin) as conn:
        def rows() -> tuple[int, int]:
            d = conn.execute("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = %s",
                             (e["id"],)).fetchone()[0]
            t = conn.execute("SELECT count(*) FROM webhook_attempts WHERE endpoint_id = %s",
                             (e["id"],)).fetchone()[0]
            return d, t
        assert rows() == (2, 1)
        assert a.http.delete(path).status_code == 204
        assert rows() == (0, 0)


def test_https_endpoints_are_delivered_to_with_the_operators_ca(
        client, namespace: str, tmp_path: Any) -> None:
    a = client()
    with https_receiver(tmp_path) as (receiver, ca):
        e = a.endpoint(f"https://localhost:{receiver.port}/hook", ["message.sent"])
        a.http.post(f"/v1/webhooks/endpoints/{e['id']}/test")
        settings = settings_for(namespace, allow_http=False, ca_file=ca,
                                allowed_networks=["127.0.0.0/8", "::1/128"])
        with WebhooksService(settings):
            found = eventually(lambda: _attempts(a, e["id"], 1))
        assert (found[0]["status_code"], found[0]["error"]) == (200, None)
        assert verified(receiver.on("/hook")[0], e["secret"])["type"] == "webhook.test"
