"""Responses and the suppression list through the API, projected for real."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

from mailbus.db import open_pool
from mailbus.replies.app import inbound_row
from mailbus.replies.classify import classify_inbound
from mailbus.replies.events import Sent, plan
from mailbus.replies.state import InboundMessage, MailboxState, MailRef
from mailbus.settings import ServiceSettings
from tests.integration.test_ingest_api import auth
from tests.integration.test_status_api import at, post, problem, project_all
from tests.support.projector import bounced, eventually, responded, suppression

CORPUS = Path(__file__).parent.parent / "unit" / "corpus" / "inbound"


def kinds(body: dict) -> list[str]:
    return [r["kind"] for r in body["responses"]]


def test_responses_per_message_and_feed_scoped_to_the_key(api, make_key, namespace,
                                                          admin_kafka, registry):
    _, token = make_key()
    _, other = make_key()
    _, admin = make_key(scopes=("admin",))
    mine, theirs = post(api, token), post(api, other)
    loose = str(uuid.uuid4())  # written straight to Kafka by another producer
    project_all(namespace, admin_kafka, registry, [
        responded(mine["id"], at(mine, 1), "action", action_id="yes", text=None),
        responded(mine["id"], at(mine, 2), "reply", text="See you <b>there</b>"),
        responded(mine["id"], at(mine, 3), "open", reliable=False, source="hooks"),
        responded(theirs["id"], at(theirs, 1), "unsubscribe", source="hooks"),
        responded(loose, datetime.now(UTC), "complaint"),
    ])

    got = api.get(f"/v1/messages/{mine['id']}/responses", headers=auth(token))
    assert got.status_code == 200, got.text
    body = got.json()
    assert sorted(kinds(body)) == ["action", "open", "reply"]
    by_kind = {r["kind"]: r for r in body["responses"]}
    assert by_kind["action"]["action_id"] == "yes"
    assert by_kind["reply"]["text"] == "See you <b>there</b>"  # stored as text, never rendered
    assert by_kind["open"]["reliable"] is False
    assert all(r["message_id"] == mine["id"] and r["recipient"] == "ada@example.com"
               for r in body["responses"])

    # Another key's message is indistinguishable from an unknown one.
    problem(api.get(f"/v1/messages/{mine['id']}/responses", headers=auth(other)), 404)
    problem(api.get(f"/v1/messages/{uuid.uuid4()}/responses", headers=auth(token)), 404)
    # Admin keys see any message's, also one that never came through the API.
    loose_got = api.get(f"/v1/messages/{loose}/responses", headers=auth(admin)).json()
    assert kinds(loose_got) == ["complaint"]

    feed = api.get("/v1/responses", headers=auth(token)).json()
    assert sorted(kinds(feed)) == ["action", "open", "reply"] and feed["next_cursor"] is None
    assert kinds(api.get("/v1/responses?kind=reply", headers=auth(token)).json()) == ["reply"]
    assert kinds(api.get("/v1/responses", headers=auth(other)).json()) == ["unsubscribe"]
    assert sorted(kinds(api.get("/v1/responses", headers=auth(admin)).json())) == [
        "action", "complaint", "open", "reply", "unsubscribe"]
    future = "2999-01-01T00:00:00Z"
    assert api.get("/v1/responses", params={"since": future},
                   headers=auth(admin)).json()["responses"] == []

    # The timeline shows the responses among the message's other events.
    timeline = api.get(f"/v1/messages/{mine['id']}", headers=auth(token)).json()["timeline"]
    assert sorted(e["detail"]["response"] for e in timeline if e["kind"] == "response") == [
        "action", "open", "reply"]


async def record_as_replies(namespace: str, row: InboundMessage) -> None:
    """Store an inbound message as the replies service does, with its database role."""
    pool = open_pool(ServiceSettings(service_name="replies").postgres)
    await pool.open()
    try:
        assert await MailboxState(pool, namespace).record_inbound(row)
    finally:
        await pool.close()


def test_a_delayed_dsn_is_a_timeline_entry_before_the_bounce(api, make_key, namespace,
                                                             admin_kafka, registry):
    _, token = make_key()
    _, other = make_key()
    mine = post(api, token)
    raw = (CORPUS / "delayed_447.eml").read_bytes().replace(
        b"5a0e6d42-9f1b-4c7d-8e65-7d8b9cadbecf", mine["id"].encode())
    inbound = classify_inbound(raw)
    planned = plan(inbound, account_id="dev", source="imap:dev", source_ref="imap:7:1",
                   now=datetime.now(UTC), check_token=lambda _: None,
                   check_tag=lambda _: None, sent=Sent(mine["id"], frozenset({"slow@example.net"})))
    assert (planned.kind, planned.message_id, planned.records) == ("dsn", mine["id"], ())
    ref = MailRef(account_id="dev", mailbox="INBOX", source_ref="imap:7:1", size=len(raw),
                  received_at=at(mine, 60))
    asyncio.run(record_as_replies(namespace, inbound_row(ref, inbound, planned)))

    timeline = api.get(f"/v1/messages/{mine['id']}", headers=auth(token)).json()["timeline"]
    [delayed] = timeline  # the request itself is not projected yet
    assert delayed["kind"] == "delayed"
    assert (datetime.fromisoformat(delayed["at"]), delayed["account"]) == (at(mine, 60), "dev")
    assert delayed["detail"] == {
        "recipient": "slow@example.net", "status_code": "4.4.7",
        "diagnostic": "connect to mx.example.net[198.51.100.9]:25: Connection timed out"}

    # Among the projected events, by time: the bounce that settles it comes after it.
    # Another key still sees nothing.
    project_all(namespace, admin_kafka, registry, [bounced(mine["id"], at(mine, 120))])
    timeline = api.get(f"/v1/messages/{mine['id']}", headers=auth(token)).json()["timeline"]
    assert [e["kind"] for e in timeline] == ["requested", "delayed", "bounced"]
    problem(api.get(f"/v1/messages/{mine['id']}", headers=auth(other)), 404)


def test_feed_pages_without_repeats_or_gaps(api, make_key, namespace, admin_kafka, registry):
    _, token = make_key()
    msg = post(api, token)
    first = [responded(msg["id"], at(msg, i), "action", action_id=f"a{i}") for i in range(5)]
    project_all(namespace, admin_kafka, registry, first)
    seen, cursor = [], None
    while True:
        page = api.get("/v1/responses", params={"limit": 2, **({"cursor": cursor} if cursor
                                                               else {})},
                       headers=auth(token)).json()
        seen += [r["action_id"] for r in page["responses"]]
        cursor = page["next_cursor"]
        if cursor is None:
            last = page
            break
    assert sorted(seen) == [f"a{i}" for i in range(5)] and len(seen) == 5
    # A response recorded later, even one that happened earlier, comes after the last page.
    assert last["responses"], "the last page holds the newest response"
    resume = last["responses"][-1]
    project_all(namespace, admin_kafka, registry,
                [responded(msg["id"], at(msg, 0.5), "action", action_id="late")])
    page1 = api.get("/v1/responses", params={"limit": 5}, headers=auth(token)).json()
    assert page1["next_cursor"] is not None
    after = api.get("/v1/responses", params={"limit": 5, "cursor": page1["next_cursor"]},
                    headers=auth(token)).json()
    assert [r["action_id"] for r in after["responses"]] == ["late"]
    assert resume["action_id"] in [r["action_id"] for r in page1["responses"]]


def test_bad_queries_are_named(api, make_key):
    _, token = make_key()
    problem(api.get("/v1/responses?kind=clicked", headers=auth(token)), 422, "kind")
    problem(api.get("/v1/responses?cursor=bm9wZQ", headers=auth(token)), 422, "cursor")
    problem(api.get("/v1/responses?since=yesterday", headers=auth(token)), 422, "since")
    problem(api.get("/v1/responses?limit=100000", headers=auth(token)), 422, "limit")


def test_suppression_list_is_for_admin_keys(api, make_key, namespace, admin_kafka, registry):
    _, token = make_key()
    _, admin = make_key(scopes=("admin",))
    now = datetime.now(UTC)
    project_all(namespace, admin_kafka, registry, [
        suppression("ada@example.com", now, reason="unsubscribe"),
        suppression("bob@example.com", now, reason="hard_bounce", scope="dev"),
        suppression("eve@example.com", now, reason="complaint", active=False),
    ])
    problem(api.get("/v1/suppressions", headers=auth(token)), 403)
    active = api.get("/v1/suppressions", headers=auth(admin)).json()
    assert sorted((s["address"], s["reason"], s["scope"]) for s in active["suppressions"]) == [
        ("ada@example.com", "unsubscribe", None), ("bob@example.com", "hard_bounce", "dev")]
    one = api.get("/v1/suppressions", params={"address": " ADA@example.com"},
                  headers=auth(admin)).json()
    assert [s["address"] for s in one["suppressions"]] == ["ada@example.com"]
    lifted = api.get("/v1/suppressions", params={"active": "false"}, headers=auth(admin)).json()
    assert [s["address"] for s in lifted["suppressions"]] == ["eve@example.com"]


def test_admins_suppress_and_lift_by_hand(api, make_key, namespace, admin_kafka, registry):
    from tests.support.kafka import read_all
    from tests.support.projector import lag, projector_running, settings_for

    _, token = make_key()
    _, admin = make_key(scopes=("admin",))
    as_admin = {"Authorization": f"Bearer {admin}"}
    problem(api.post("/v1/suppressions", json={"address": "x@example.com"},
                     headers=auth(token)), 403)
    problem(api.post("/v1/suppressions", json={"address": "not an address"},
                     headers=as_admin), 422, "address")
    problem(api.post("/v1/suppressions", json={"address": "x@example.com", "scope": "No Such!"},
                     headers=as_admin), 422, "scope")
    problem(api.post("/v1/suppressions", json={"address": "x@example.com", "extra": 1},
                     headers=as_admin), 422, "extra")
    added = api.post("/v1/suppressions", json={"address": "Mallory@Example.com"},
                     headers=as_admin)
    assert added.status_code == 202, added.text
    assert added.json() == {"address": "mallory@example.com", "scope": None, "active": True,
                            "reason": "manual"}
    scoped = api.post("/v1/suppressions", json={"address": "trent@example.com",
                                                "scope": "dev"}, headers=as_admin)
    assert scoped.status_code == 202, scoped.text
    # 202 means the record is on the topic every sender reads, keyed by the address hash.
    records = read_all(admin_kafka, namespace + "email.suppressions", expect=2)
    assert sorted(registry.decode(r.value())[1]["address"] for r in records) == [
        "mallory@example.com", "trent@example.com"]
    with projector_running(settings_for(namespace)):
        eventually(lambda: _caught_up(admin_kafka, namespace, lag))
        listed = api.get("/v1/suppressions", headers=as_admin).json()["suppressions"]
        assert sorted((s["address"], s["scope"], s["reason"]) for s in listed) == [
            ("mallory@example.com", None, "manual"), ("trent@example.com", "dev", "manual")]
        lifted = api.post("/v1/suppressions", json={"address": "mallory@example.com",
                                                    "active": False}, headers=as_admin)
        assert lifted.status_code == 202
        eventually(lambda: _caught_up(admin_kafka, namespace, lag))
    active = api.get("/v1/suppressions", headers=as_admin).json()["suppressions"]
    assert [s["address"] for s in active] == ["trent@example.com"]


def _caught_up(admin_kafka, namespace, lag) -> None:
    assert lag(admin_kafka, namespace) == 0
