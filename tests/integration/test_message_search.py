"""Finding a message: GET /v1/messages by recipient, tag, account, status and time.

Through the live API on a real socket, over the real PostgreSQL. Every test
uses addresses and tags of its own, so the messages of other tests (and of
other suites sharing the database) cannot change what a search finds.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.integration.test_ingest_api import MESSAGE, auth
from tests.integration.test_status_api import at, problem, project_all
from tests.support.projector import delivered, sent


def send(api, token: str, **fields: Any) -> dict[str, Any]:
    """Accept one message; returns it as GET shows it."""
    r = api.post("/v1/messages", json=MESSAGE | fields, headers=auth(token))
    assert r.status_code == 202, r.text
    got = api.get(f"/v1/messages/{r.json()['id']}", headers=auth(token))
    assert got.status_code == 200, got.text
    return got.json()


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


def test_each_filter_and_their_combinations(api, make_key, namespace, admin_kafka, registry):
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
    # Account, and no filter at all within the test's window.
    since = m1["requested_at"]
    assert walk(api, token, account="team-a", since=since) == ids([m1, m3, m4])
    assert walk(api, token, account="team-b", since=since) == ids([m2])
    assert walk(api, token, since=since) == ids([m1, m2, m3, m4])
    # Combinations: every filter given must hold.
    assert walk(api, token, recipient=ada, tag=blue) == ids([m2, m3])
    assert walk(api, token, recipient=ada, tag=blue, account="team-a") == ids([m3])
    assert walk(api, token, recipient=bob, account="team-b") == ids([m2])
    assert walk(api, token, tag=red, account="team-a") == ids([m1])
    assert walk(api, token, recipient=cat, tag=red) == []
    # Time range: since inclusive, until exclusive, with every driving filter.
    assert walk(api, token, recipient=ada, since=m2["requested_at"]) == ids([m2, m3])
    assert walk(api, token, recipient=ada, until=m2["requested_at"]) == ids([m1])
    assert walk(api, token, tag=blue, since=m2["requested_at"],
                until=m3["requested_at"]) == ids([m2])
    assert walk(api, token, account="team-a", since=since,
                until=m4["requested_at"]) == ids([m1, m3])
    assert walk(api, token, since=m2["requested_at"], until=m4["requested_at"]) == ids([m2, m3])

    # Another key's messages are never found by this key, whatever the filter...
    assert walk(api, other, recipient=ada) == [theirs["id"]]
    assert walk(api, other, tag=blue) == [theirs["id"]]
    assert walk(api, other, account="team-b", since=since) == []
    # ...and an admin key finds every key's.
    assert walk(api, admin, recipient=ada) == ids([m1, m2, m3, theirs])
    assert walk(api, admin, tag=red, limit=2) == ids([m1, m2, theirs])
    assert walk(api, admin, recipient=ada, account="team-a", tag=blue) == ids([m3, theirs])
    admin_window = walk(api, admin, account="team-b", since=since, limit=500)
    assert m2["id"] in admin_window and m1["id"] not in admin_window

    # Status with each driving filter, once the projection moved some along.
    project_all(namespace, admin_kafka, registry, [
        sent(m1["id"], at(m1, 1)), sent(m3["id"], at(m3, 1)), delivered(m3["id"], at(m3, 2))])
    assert walk(api, token, recipient=ada, status="sent") == ids([m1])
    assert walk(api, token, recipient=ada, status="queued") == ids([m2])
    assert walk(api, token, tag=blue, status="delivered") == ids([m3])
    assert walk(api, token, account="team-a", since=since, status="queued") == ids([m4])
    assert walk(api, admin, recipient=ada, status="queued") == ids([m2, theirs])


def test_pages_neither_repeat_nor_skip_while_messages_arrive(api, make_key):
    _, token = make_key()
    _, admin = make_key(scopes=("admin",))
    u = uuid.uuid4().hex[:12]
    who, tag = f"pager.{u}@example.com", f"page-{u}"
    # A batch shares one requested_at: pages must break ties by id.
    batch = api.post("/v1/messages/batch", json={"messages": [
        MESSAGE | {"to": [who], "tags": [tag]}] * 5}, headers=auth(token))
    assert batch.status_code == 202, batch.text
    before = [api.get(f"/v1/messages/{r['id']}", headers=auth(token)).json()
              for r in batch.json()["results"]]
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


def test_a_cursor_cannot_widen_the_scope(api, make_key):
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


def test_valid_values_with_sql_and_pattern_characters_match_only_themselves(api, make_key):
    _, token = make_key()
    u = uuid.uuid4().hex[:12]
    plain = send(api, token, to=[f"o'brien.{u}@example.com"], tags=[f"a_b.{u}"])
    # LIKE wildcards, quotes and comment markers are plain characters of a value.
    for params in ({"recipient": f"o'brien.{u}@example.com"}, {"tag": f"a_b.{u}"}):
        assert walk(api, token, **params) == [plain["id"]]
    for params in ({"recipient": f"o'brien.{u}@%"}, {"recipient": f"%.{u}@example.com"},
                   {"recipient": f"o'brien.{u}@example.com'--"}, {"tag": f"a.b.{u}"},
                   {"tag": f"a_b.{u}:"}):
        assert walk(api, token, **params) == [], params
