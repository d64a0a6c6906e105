"""Status, timelines, listings and daily reports over a real socket, projected for real."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.integration.test_ingest_api import MESSAGE, auth
from tests.support.projector import (
    confirmed,
    delivered,
    eventually,
    failed,
    lag,
    produce,
    projector_running,
    sent,
    settings_for,
)


def post(api, token: str, **fields: Any) -> dict[str, Any]:
    """Accept one message through the API; returns it as GET shows it."""
    r = api.post("/v1/messages", json=MESSAGE | fields, headers=auth(token))
    assert r.status_code == 202, r.text
    got = api.get(f"/v1/messages/{r.json()['id']}", headers=auth(token))
    assert got.status_code == 200, got.text
    return got.json()


def at(message: dict[str, Any], seconds: float) -> datetime:
    """An instant after the message was accepted."""
    return datetime.fromisoformat(message["requested_at"]) + timedelta(seconds=seconds)


def project_all(namespace, admin_kafka, registry, events) -> None:
    """Produce events, run the projector until it committed everything, stop it."""
    produce(admin_kafka, namespace, registry, events)
    with projector_running(settings_for(namespace)):
        eventually(lambda: _caught_up(admin_kafka, namespace))


def _caught_up(admin_kafka, namespace) -> None:
    assert lag(admin_kafka, namespace) == 0


def problem(r, status: int, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    if field is not None:
        assert [e["field"] for e in body["errors"]] == [field], body
    return body


def test_message_status_and_timeline(api, make_key, namespace, admin_kafka, registry):
    _, token = make_key()
    _, other = make_key()
    _, admin = make_key(scopes=("admin",))
    msg = post(api, token)
    mid = msg["id"]
    assert msg["status"] == "queued" and [e["kind"] for e in msg["timeline"]] == []
    # Produced out of order on purpose: the timeline is ordered by when things happened.
    project_all(namespace, admin_kafka, registry, [
        confirmed(mid, at(msg, 3)), delivered(mid, at(msg, 2), "grace@example.com"),
        sent(mid, at(msg, 1), recipients=["ada@example.com", "grace@example.com"]),
        delivered(mid, at(msg, 2.5), "ada@example.com")])

    got = api.get(f"/v1/messages/{mid}", headers=auth(token)).json()
    assert got["status"] == "confirmed"
    assert {k: got[k] for k in ("id", "account", "pool", "subject", "recipients", "tags",
                                "send_at", "requested_at")} == {
        "id": mid, "account": "dev", "pool": "default", "subject": MESSAGE["subject"],
        "recipients": 3, "tags": ["rsvp"], "send_at": None,
        "requested_at": msg["requested_at"]}
    assert datetime.fromisoformat(got["updated_at"]) > datetime.fromisoformat(msg["updated_at"])
    timeline = got["timeline"]
    assert [e["kind"] for e in timeline] == ["requested", "sent", "delivered", "delivered",
                                             "confirmed"]
    times = [datetime.fromisoformat(e["at"]) for e in timeline]
    assert times == sorted(times) and times[0] == datetime.fromisoformat(msg["requested_at"])
    assert timeline[0]["detail"] == {"pool": "default", "recipients": 3}
    assert timeline[1]["detail"]["smtp_response"] == "250 2.0.0 Ok: queued"
    assert timeline[2]["detail"]["recipient"] == "grace@example.com"
    assert timeline[4]["detail"]["evidence"] == "smtp_final"
    assert all(e["account"] == "dev" for e in timeline)

    problem(api.get(f"/v1/messages/{mid}", headers=auth(other)), 404)
    assert api.get(f"/v1/messages/{mid}", headers=auth(admin)).json() == got
    problem(api.get("/v1/messages/not-a-uuid", headers=auth(token)), 404)
    problem(api.get(f"/v1/messages/{mid}"), 401)
    _, sender = make_key(scopes=("send",))
    problem(api.get(f"/v1/messages/{mid}", headers=auth(sender)), 403)


def test_events_of_the_same_instant_follow_the_pipeline_not_the_projection(
        api, make_key, namespace, admin_kafka, registry):
    _, token = make_key()
    msg = post(api, token)
    mid, same = msg["id"], at(msg, 1)
    # Projected in three runs, latest first: by projection order the timeline
    # would read confirmed, delivered, sent.
    for event in (confirmed(mid, same), delivered(mid, same, "ada@example.com"),
                  sent(mid, same, recipients=["ada@example.com"])):
        project_all(namespace, admin_kafka, registry, [event])
    timeline = api.get(f"/v1/messages/{mid}", headers=auth(token)).json()["timeline"]
    assert [e["kind"] for e in timeline] == ["requested", "sent", "delivered", "confirmed"]
    assert len({e["at"] for e in timeline[1:]}) == 1


def test_admin_sees_a_message_another_producer_wrote(api, make_key, namespace, admin_kafka,
                                                     registry):
    import uuid

    _, admin = make_key(scopes=("admin",))
    _, token = make_key()
    mid = str(uuid.uuid4())
    now = datetime.fromisoformat("2026-03-01T12:00:00+00:00")
    project_all(namespace, admin_kafka, registry, [sent(mid, now, account="solo")])
    got = api.get(f"/v1/messages/{mid}", headers=auth(admin)).json()
    assert (got["status"], got["account"], got["subject"]) == ("sent", "solo", None)
    assert [e["kind"] for e in got["timeline"]] == ["sent"]
    problem(api.get(f"/v1/messages/{mid}", headers=auth(token)), 404)


def test_listing_walks_every_page_once_and_filters(api, make_key, namespace, admin_kafka,
                                                   registry):
    _, token = make_key()
    _, other = make_key()
    _, admin = make_key(scopes=("admin",))
    # A batch shares one requested_at: pages must break ties by id.
    batch = api.post("/v1/messages/batch", json={"messages": [MESSAGE] * 7},
                     headers=auth(token))
    assert batch.status_code == 202, batch.text
    singles = [post(api, token) for _ in range(4)]
    post(api, other)
    everything = [api.get(f"/v1/messages/{r['id']}", headers=auth(token)).json()
                  for r in batch.json()["results"]] + singles
    newest_first = sorted(everything, key=lambda m: (m["requested_at"], m["id"]), reverse=True)

    def walk(key: str, **params: Any) -> list[str]:
        seen, cursor, pages = [], None, 0
        while True:
            query = params | ({"cursor": cursor} if cursor else {})
            r = api.get("/v1/messages", params=query, headers=auth(key))
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["messages"]) <= params.get("limit", 50)
            seen += [m["id"] for m in body["messages"]]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                return seen
            assert pages < 50

    assert walk(token, limit=3) == [m["id"] for m in newest_first]
    assert walk(token, limit=11) == [m["id"] for m in newest_first]
    assert walk(token) == [m["id"] for m in newest_first]
    first = api.get("/v1/messages", params={"limit": 2}, headers=auth(token)).json()
    assert first["messages"][0] | {"timeline": []} == newest_first[0] | {"timeline": []}
    assert "timeline" not in first["messages"][0]

    # since: from the second single on (inclusive).
    since = singles[1]["requested_at"]
    assert walk(token, limit=2, since=since) == [m["id"] for m in reversed(singles[1:])]
    # Admin keys list every key's messages.
    mine = {m["id"] for m in everything}
    assert mine < set(walk(admin, limit=500, since=newest_first[-1]["requested_at"]))

    # status: two of them sent, one of those also delivered.
    a, b = singles[0], singles[2]
    project_all(namespace, admin_kafka, registry, [
        sent(a["id"], at(a, 1)), sent(b["id"], at(b, 1)), delivered(b["id"], at(b, 2)),
        failed(b["id"], at(b, 1), recipient="grace@example.com")])
    assert walk(token, status="sent") == [a["id"]]
    assert walk(token, status="delivered", limit=1) == [b["id"]]
    assert walk(token, status="queued", limit=4) == [
        m["id"] for m in newest_first if m["id"] not in (a["id"], b["id"])]
    assert walk(token, status="confirmed") == []


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"limit": "x"}, "limit"),
    ({"status": "lost"}, "status"),
    ({"since": "2026-03-01T00:00:00"}, "since"), ({"since": "yesterday"}, "since"),
    ({"cursor": "!!"}, "cursor"), ({"cursor": "eyJ0IjoxfQ"}, "cursor"),
])
def test_listing_rejects_bad_parameters(api, make_key, params, field):
    _, token = make_key()
    body = problem(api.get("/v1/messages", params=params, headers=auth(token)), 422, field)
    assert body["type"] == "/problems/validation"


def test_daily_report_per_account_scoped_to_the_key(api, make_key, namespace, admin_kafka,
                                                    registry):
    a_id, a = make_key()
    _, b = make_key()
    _, nobody = make_key(scopes=("read",))
    _, admin = make_key(scopes=("admin",))
    a1, a2 = post(api, a), post(api, a, **{"from": "solo"})
    b1, b2 = post(api, b), post(api, b)
    events = [
        sent(a1["id"], at(a1, 0.001)), delivered(a1["id"], at(a1, 0.002), "ada@example.com"),
        delivered(a1["id"], at(a1, 0.003), "grace@example.com"),
        confirmed(a1["id"], at(a1, 0.004)),
        failed(a2["id"], at(a2, 0.001), account="solo"),
        sent(b1["id"], at(b1, 0.001)), confirmed(b1["id"], at(b1, 0.002), outcome="unconfirmed"),
    ]
    project_all(namespace, admin_kafka, registry, events)
    day = a1["requested_at"][:10]
    assert {m["requested_at"][:10] for m in (a1, a2, b1, b2)} == {day}, "ran across midnight"

    def report(token: str) -> dict[str, Any]:
        r = api.get("/v1/reports/daily", params={"date": day}, headers=auth(token))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["date"] == day
        return {row.pop("account"): row for row in body["accounts"]}

    zero = dict.fromkeys(("requested", "sent", "delivered", "confirmed", "failed", "bounced",
                          "unconfirmed", "quota_used"), 0)
    assert report(a) == {
        "dev": zero | {"requested": 1, "sent": 1, "delivered": 1, "confirmed": 1,
                       "quota_used": 1},
        "solo": zero | {"requested": 1, "failed": 1}}
    assert report(b) == {"dev": zero | {"requested": 2, "sent": 1, "unconfirmed": 1,
                                        "quota_used": 1}}
    assert report(nobody) == {}
    # Admin: the namespace's counters, every key's messages together.
    assert report(admin) == {
        "dev": zero | {"requested": 3, "sent": 2, "delivered": 1, "confirmed": 1,
                       "unconfirmed": 1, "quota_used": 2},
        "solo": zero | {"requested": 1, "failed": 1}}
    other_day = (datetime.fromisoformat(day) - timedelta(days=1)).date().isoformat()
    r = api.get("/v1/reports/daily", params={"date": other_day}, headers=auth(admin))
    assert r.json() == {"date": other_day, "scope": "all", "accounts": []}
    assert a_id  # the key whose messages those are

    for params in ({}, {"date": "2026-02-30"}, {"date": "today"}, {"date": "2026-03-01T00:00"}):
        problem(api.get("/v1/reports/daily", params=params, headers=auth(a)), 422, "date")
    _, sender = make_key(scopes=("send",))
    problem(api.get("/v1/reports/daily", params={"date": day}, headers=auth(sender)), 403)
