"""Finding a message: GET /v1/messages by recipient, tag, account, status and time.

Through the live API on a real socket, over the real PostgreSQL, with the
real projector consuming the test's Kafka namespace in a thread: the search
rows are the projector's (migration 0015), so a message is found once its
email.requested is projected, and by account once its email.sent is. Every
test uses addresses and tags of its own, and search rows belong to the
test's namespace, so other tests (and other suites sharing the database)
cannot change what a search finds.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.integration.test_ingest_api import MESSAGE, auth
from tests.integration.test_status_api import at, problem
from tests.support.projector import (
    delivered,
    eventually,
    produce,
    projector_running,
    sent,
    settings_for,
)


@pytest.fixture
def projector(namespace):
    """The projector on the test's namespace for the whole test."""
    with projector_running(settings_for(namespace)) as running:
        yield running


def projected(api, token: str, message_id: str, kind: str = "requested") -> dict[str, Any]:
    """The message as GET shows it, once an event of `kind` is in its timeline."""
    def check() -> dict[str, Any]:
        got = api.get(f"/v1/messages/{message_id}", headers=auth(token))
        assert got.status_code == 200, got.text
        assert kind in [e["kind"] for e in got.json()["timeline"]]
        return got.json()
    return eventually(check)


def send(api, token: str, **fields: Any) -> dict[str, Any]:
    """Accept one message; returns it as GET shows it once projected (and so findable)."""
    r = api.post("/v1/messages", json=MESSAGE | fields, headers=auth(token))
    assert r.status_code == 202, r.text
    return projected(api, token, r.json()["id"])


def walk(api, token: str, **params: Any) -> list[str]:
    """Every id a filtered listing returns, page after page."""
    seen: list[str] = []
    cursor = None
    for _ in range(100):
        query = params | ({"cursor": cursor} if cursor else {})
        r = api.get("/v1/messages", params=query, headers=auth(token))
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["messages"]) <= params.get("limit", 50)
        seen += [m["id"] for m in body["messages"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError("more than 100 pages")


def ids(messages: list[dict[str, Any]]) -> list[str]:
    """Ids newest first, as a listing orders them."""
    return [m["id"] for m in sorted(messages, key=lambda m: (m["requested_at"], m["id"]),
                                    reverse=True)]


def test_each_filter_and_their_combinations(api, make_key, namespace, admin_kafka, registry,
                                            projector):
    _, token = make_key()
    _, other = make_key()
    _, admin = make_key(scopes=("admin",))
    u = uuid.uuid4().hex[:12]
    ada, bob, cat = f"ada.{u}@example.com", f"bob.{u}@example.net", f"cat.{u}@example.org"
    red, blue = f"red-{u}", f"blue-{u}"
    m1 = send(api, token, to=[ada], tags=[red], **{"from": "team-a"})
    m2 = send(api, token, to=[bob], cc=[ada.upper()], tags=[red, blue], **{"from": "team-b"})
    m3 = send(api, token, to=[cat], bcc=[{"email": ada, "name": "Hidden"}], tags=[blue],
              **{"from": "team-a"})
    m4 = send(api, token, to=[f"Bob <{bob}>"], tags=[], **{"from": "team-a"})
    theirs = send(api, other, to=[ada], tags=[red, blue], **{"from": "team-a"})

    # Recipient: to, cc and bcc, the whole address without regard to case.
    assert walk(api, token, recipient=ada) == ids([m1, m2, m3])
    assert walk(api, token, recipient=ada.upper(), limit=1) == ids([m1, m2, m3])
    assert walk(api, token, recipient=f"Ada.{u}@EXAMPLE.com") == ids([m1, m2, m3])
    assert walk(api, token, recipient=bob) == ids([m2, m4])
    assert walk(api, token, recipient=f"ada.{u}@example.co") == []
    assert walk(api, token, recipient=f"da.{u}@example.com") == []
    # Tag: exact, case kept (tags are identifiers the caller chose).
    assert walk(api, token, tag=red) == ids([m1, m2])
    assert walk(api, token, tag=blue, limit=1) == ids([m2, m3])
    assert walk(api, token, tag=red.upper()) == []
    # No filter at all within the test's window.
    since = m1["requested_at"]
    assert walk(api, token, since=since) == ids([m1, m2, m3, m4])
    # Combinations: every filter given must hold.
    assert walk(api, token, recipient=ada, tag=blue) == ids([m2, m3])
    assert walk(api, token, recipient=cat, tag=red) == []
    # Time range: since inclusive, until exclusive, with every driving filter.
    assert walk(api, token, recipient=ada, since=m2["requested_at"]) == ids([m2, m3])
    assert walk(api, token, recipient=ada, until=m2["requested_at"]) == ids([m1])
    assert walk(api, token, tag=blue, since=m2["requested_at"],
                until=m3["requested_at"]) == ids([m2])
    assert walk(api, token, since=m2["requested_at"], until=m4["requested_at"]) == ids([m2, m3])
    # Nothing was sent yet: no message is found by an account.
    assert walk(api, token, account="team-a") == []

    # Another key's messages are never found by this key, whatever the filter...
    assert walk(api, other, recipient=ada) == [theirs["id"]]
    assert walk(api, other, tag=blue) == [theirs["id"]]
    # ...and an admin key finds every key's.
    assert walk(api, admin, recipient=ada) == ids([m1, m2, m3, theirs])
    assert walk(api, admin, tag=red, limit=2) == ids([m1, m2, theirs])

    # Sent (through the accounts the sender reports, not only those asked
    # for), one delivered; m4 stays queued.
    produce(admin_kafka, namespace, registry, [
        sent(m1["id"], at(m1, 1), account="team-a"), sent(m2["id"], at(m2, 1), account="team-b"),
        sent(m3["id"], at(m3, 1), account="team-b"), delivered(m3["id"], at(m3, 2)),
        sent(theirs["id"], at(theirs, 1), account="team-a")])
    for m, t in ((m1, token), (m2, token), (theirs, other)):
        projected(api, t, m["id"], "sent")
    projected(api, token, m3["id"], "delivered")
    assert walk(api, token, account="team-a") == ids([m1])
    assert walk(api, token, account="team-b") == ids([m2, m3])
    assert walk(api, token, recipient=ada, tag=blue, account="team-b") == ids([m2, m3])
    assert walk(api, token, recipient=bob, account="team-b") == ids([m2])
    assert walk(api, token, tag=red, account="team-a") == ids([m1])
    assert walk(api, token, account="team-b", since=since,
                until=m3["requested_at"]) == ids([m2])
    assert walk(api, other, account="team-b") == []
    assert walk(api, other, account="team-a") == [theirs["id"]]
    assert walk(api, admin, recipient=ada, account="team-a") == ids([m1, theirs])
    assert walk(api, admin, recipient=ada, account="team-a", tag=blue) == [theirs["id"]]

    # Status with each driving filter.
    assert walk(api, token, recipient=ada, status="sent") == ids([m1, m2])
    assert walk(api, token, recipient=bob, status="queued") == ids([m4])
    assert walk(api, token, tag=blue, status="delivered") == ids([m3])
    assert walk(api, token, account="team-b", status="sent") == ids([m2])
    assert walk(api, admin, recipient=ada, status="sent") == ids([m1, m2, theirs])


def test_a_key_never_sees_another_keys_messages(api, make_key, namespace, admin_kafka,
                                                registry, projector):
    # Two keys sending to the same address with the same tag through the same
    # account: each finds exactly its own, by every filter and combination.
    keys = [make_key() for _ in range(2)]
    u = uuid.uuid4().hex[:12]
    who, tag = f"shared.{u}@example.com", f"shared-{u}"
    mine: dict[str, list[dict[str, Any]]] = {}
    for _, token in keys:
        mine[token] = [send(api, token, to=[who], tags=[tag]) for _ in range(3)]
    produce(admin_kafka, namespace, registry, [
        sent(m["id"], at(m, 1), account="dev") for ms in mine.values() for m in ms])
    for token, ms in mine.items():
        for m in ms:
            projected(api, token, m["id"], "sent")
    for token, ms in mine.items():
        expected = ids(ms)
        for params in ({"recipient": who}, {"tag": tag}, {"account": "dev"},
                       {"recipient": who, "tag": tag}, {"recipient": who, "account": "dev"},
                       {"recipient": who.upper(), "tag": tag, "account": "dev"}):
            assert walk(api, token, **params, limit=2) == expected, params
            if "account" in params:
                continue
            assert walk(api, token, **params, since=ms[0]["requested_at"]) == expected


def test_a_message_appears_once_projected(api, make_key, namespace):
    # Without a projector nothing is found by recipient, tag or account; the
    # plain listing (the API's own rows) has the message at once.
    _, token = make_key()
    u = uuid.uuid4().hex[:12]
    who, tag = f"later.{u}@example.com", f"later-{u}"
    r = api.post("/v1/messages", json=MESSAGE | {"to": [who], "tags": [tag]},
                 headers=auth(token))
    assert r.status_code == 202, r.text
    assert walk(api, token, recipient=who) == [] and walk(api, token, tag=tag) == []
    assert [m["id"] for m in api.get("/v1/messages", headers=auth(token)).json()["messages"]
            ] == [r.json()["id"]]
    with projector_running(settings_for(namespace)):
        eventually(lambda: _found(api, token, who, r.json()["id"]))
    assert walk(api, token, tag=tag) == [r.json()["id"]]


def _found(api, token: str, who: str, message_id: str) -> None:
    assert walk(api, token, recipient=who) == [message_id]


def test_pages_neither_repeat_nor_skip_while_messages_arrive(api, make_key, projector):
    _, token = make_key()
    _, admin = make_key(scopes=("admin",))
    u = uuid.uuid4().hex[:12]
    who, tag = f"pager.{u}@example.com", f"page-{u}"
    # A batch shares one requested_at: pages must break ties by id.
    batch = api.post("/v1/messages/batch", json={"messages": [
        MESSAGE | {"to": [who], "tags": [tag]}] * 5}, headers=auth(token))
    assert batch.status_code == 202, batch.text
    before = [projected(api, token, r["id"]) for r in batch.json()["results"]]
    before += [send(api, token, to=[who], tags=[tag]) for _ in range(4)]
    expected = ids(before)

    for token_, params in ((token, {"recipient": who}), (token, {"tag": tag}),
                           (admin, {"recipient": who, "tag": tag})):
        seen: list[str] = []
        arrived: list[str] = []
        cursor = None
        while True:
            query = params | {"limit": 2} | ({"cursor": cursor} if cursor else {})
            body = api.get("/v1/messages", params=query, headers=auth(token_)).json()
            seen += [m["id"] for m in body["messages"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
            # Newer messages of the same search arrive between pages.
            arrived.append(send(api, token, to=[who], tags=[tag])["id"])
        assert seen == expected, params
        # The next walk from the top finds them first.
        expected = ids([api.get(f"/v1/messages/{i}", headers=auth(token)).json()
                        for i in [*arrived, *expected]])
        assert walk(api, token_, **params, limit=3) == expected


def _cursor(fields: dict[str, str]) -> str:
    raw = json.dumps(fields, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_a_cursor_cannot_widen_the_scope(api, make_key, projector):
    _, token = make_key()
    _, other = make_key()
    u = uuid.uuid4().hex[:12]
    who, tag = f"scope.{u}@example.com", f"scope-{u}"
    mine = send(api, token, to=[who], tags=[tag])
    theirs = send(api, other, to=[who], tags=[tag])
    page = api.get("/v1/messages", params={"recipient": who, "limit": 1},
                   headers=auth(token)).json()
    assert [m["id"] for m in page["messages"]] == [mine["id"]]
    # A cursor says where a page starts, nothing else: forged ones at the top,
    # the bottom or pointing at another key's message still list only the
    # asking key's messages.
    forged = [_cursor({"t": "9999-01-01T00:00:00+00:00",
                       "id": "ffffffff-ffff-ffff-ffff-ffffffffffff"}),
              _cursor({"t": theirs["requested_at"], "id": theirs["id"]}),
              _cursor({"t": (datetime.fromisoformat(theirs["requested_at"])
                             + timedelta(seconds=1)).isoformat(), "id": theirs["id"]})]
    for cursor in forged:
        for params in ({"recipient": who}, {"tag": tag}, {"account": "dev"}, {}):
            r = api.get("/v1/messages", params=params | {"cursor": cursor, "limit": 500},
                        headers=auth(token))
            assert r.status_code == 200, r.text
            assert theirs["id"] not in {m["id"] for m in r.json()["messages"]}
    # Fields a cursor never has are refused, not obeyed.
    for fields in ({"t": theirs["requested_at"], "id": theirs["id"], "key_id": "x"},
                   {"t": theirs["requested_at"], "id": theirs["id"], "recipient": who},
                   {"t": theirs["requested_at"], "id": "1 OR 1=1"},
                   {"t": "2026-01-01T00:00:00", "id": theirs["id"]}):
        problem(api.get("/v1/messages", params={"tag": tag, "cursor": _cursor(fields)},
                        headers=auth(token)), 422, "cursor")


HOSTILE = [
    ({"recipient": ""}, "recipient"),
    ({"recipient": "no-at-sign"}, "recipient"),
    ({"recipient": "two@at@example.com"}, "recipient"),
    ({"recipient": "a b@example.com"}, "recipient"),
    ({"recipient": "a@example.com\r\nBcc: x@evil.test"}, "recipient"),
    ({"recipient": "a\x00@example.com"}, "recipient"),
    ({"recipient": "x" * 65 + "@example.com"}, "recipient"),
    ({"recipient": "a@" + "b" * 252 + ".c"}, "recipient"),
    ({"recipient": "a@" + "b" * 20_000}, None),  # over the request line: refused early
    ({"tag": ""}, "tag"),
    ({"tag": "x" * 65}, "tag"),
    ({"tag": "a b"}, "tag"),
    ({"tag": "red' OR '1'='1"}, "tag"),
    ({"tag": "%"}, "tag"),
    ({"account": "Team-A"}, "account"),
    ({"account": "team-a; DROP TABLE messages"}, "account"),
    ({"account": "x" * 65}, "account"),
    ({"account": "dev\x00"}, "account"),
    # Percent signs are characters of the value (httpx encodes them): no address.
    ({"recipient": "ada%40example.com"}, "recipient"),
    ({"recipient": "ada@example.com%00"}, "recipient"),
    ({"recipient": "ada@example.com' OR '1'='1"}, "recipient"),
    ({"recipient": "ada@example.com\u2028"}, "recipient"),
    ({"recipient": "a@-example.com"}, "recipient"),  # POST refuses it: no such recipient
    ({"recipient": "a..b@example.com"}, "recipient"),
    ({"recipient": "\u00e9" * 65 + "@example.com"}, "recipient"),  # local part over 64
    ({"recipient": "ada@" + "\u00fc" * 251 + ".de"}, "recipient"),  # over 254 characters
    ({"tag": "\u00fcn\u00efcode"}, "tag"),
    ({"tag": "\u202etag"}, "tag"),
    ({"since": "0001-01-01T00:00:00Z"}, "since"),
    ({"until": "1969-12-31T23:59:59Z"}, "until"),
    ({"until": "2026-03-01T00:00:00"}, "until"),
    ({"until": "1700000000"}, "until"),
    ({"since": "2026-03-02T00:00:00Z", "until": "2026-03-01T00:00:00Z"}, "until"),
    ({"since": "2026-03-01T00:00:00Z", "until": "2026-03-01T00:00:00Z"}, "until"),
    ({"recipient": "a@example.com", "limit": 501}, "limit"),
    ({"tag": "t", "cursor": "x" * 257}, "cursor"),
]


@pytest.mark.parametrize(("params", "field"), HOSTILE)
def test_hostile_filter_values_are_refused_naming_the_parameter(api, make_key, params, field):
    _, token = make_key()
    r = api.get("/v1/messages", params=params, headers=auth(token))
    if field is None:
        assert r.status_code in (400, 414, 422, 431), r.status_code
        return
    body = problem(r, 422, field)
    assert body["type"] == "/problems/validation"


def test_valid_values_with_sql_and_pattern_characters_match_only_themselves(api, make_key,
                                                                             projector):
    _, token = make_key()
    u = uuid.uuid4().hex[:12]
    plain = send(api, token, to=[f"o'brien.{u}@example.com"], tags=[f"a_b.{u}"])
    # LIKE wildcards, quotes and comment markers are plain characters of a value.
    for params in ({"recipient": f"o'brien.{u}@example.com"}, {"tag": f"a_b.{u}"}):
        assert walk(api, token, **params) == [plain["id"]]
    for params in ({"recipient": f"%.{u}@example.com"}, {"recipient": f"_'brien.{u}@example.com"},
                   {"recipient": f"o'brien.{u}'--@example.com"}, {"tag": f"a.b.{u}"},
                   {"tag": f"a_b.{u}:"}, {"tag": f"a_b.{u}"[:-1]}):
        assert walk(api, token, **params) == [], params
    # What is no address POST would take is refused, not searched.
    for value in (f"o'brien.{u}@%", f"o'brien.{u}@example.com'--"):
        problem(api.get("/v1/messages", params={"recipient": value}, headers=auth(token)),
                422, "recipient")


@pytest.mark.parametrize(("query", "field"), [
    ("recipient=ada%2540example.com", "recipient"),  # double-encoded: "%40" stays text
    ("recipient=a%00%40example.com", "recipient"),
    ("recipient=ada%40example.com%0d%0aBcc:x@evil.test", "recipient"),
    ("tag=%E2%80%AEred", "tag"),
    ("tag=red%27%20OR%201=1--", "tag"),
    ("account=dev%3BSELECT", "account"),
    ("until=2026-03-01T00:00:00%2B00:00&since=2026-03-02T00:00:00Z", "until"),
])
def test_raw_percent_encoded_queries_are_refused_naming_the_parameter(api, make_key, query,
                                                                       field):
    _, token = make_key()
    problem(api.get("/v1/messages?" + query, headers=auth(token)), 422, field)


def test_percent_encoded_and_unicode_addresses_find_what_post_stored(api, make_key, projector):
    _, token = make_key()
    u = uuid.uuid4().hex[:8]
    plain = send(api, token, to=[f"ada.{u}@example.com"])
    idn = send(api, token, to=[f"J\u00f6s\u00e9.{u}@B\u00fccher.example"])
    # Encoded in the URL: the decoded address is what is searched.
    r = api.get(f"/v1/messages?recipient=%61da.{u}%40EXAMPLE.com", headers=auth(token))
    assert [m["id"] for m in r.json()["messages"]] == [plain["id"]]
    # The same mailbox in Unicode or in its ASCII (IDNA) domain form, any case.
    for given in (f"j\u00f6s\u00e9.{u}@b\u00fccher.example",
                  f"J\u00d6S\u00c9.{u}@xn--bcher-kva.example",
                  f"jo\u0308se\u0301.{u}@B\u00dcCHER.example"):  # decomposed: NFC as POST
        assert walk(api, token, recipient=given) == [idn["id"]], given
    # A look-alike (Cyrillic a) is another address.
    assert walk(api, token, recipient=f"\u0430da.{u}@example.com") == []


def test_openapi_describes_every_filter(api):
    spec = api.get("/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"]["/v1/messages"]["get"]["parameters"]}
    assert {"recipient", "tag", "account", "status", "since", "until", "limit",
            "cursor"} <= set(params)
    for name in ("recipient", "tag", "account", "until"):
        assert params[name].get("description"), name
    assert params["recipient"]["schema"]["anyOf"][0]["maxLength"] == 254
