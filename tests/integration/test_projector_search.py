"""The projector writes the search rows (message_search, 0015), on the real PostgreSQL.

Batches go through `project` as the projector role, in the order a test
chooses, so the orders Kafka allows but rarely shows (an email.sent projected
before its email.requested) are shown on purpose. Each test has a namespace
of its own; message_search rows are never shared between namespaces.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from mailbus.confirm.projector import ProjectorSettings, project
from mailbus.search import MAX_VALUE, Findable, findable
from mailbus.timeline import event_row
from tests.support.projector import requested, rows, sent

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def ns() -> str:
    return f"t-search-{uuid.uuid4().hex[:10]}."


def batch(ns: str, *events: tuple[str, dict[str, Any]]) -> int:
    """Project events as the projector does: decoded rows and their search terms."""
    decoded, found = [], {}
    for topic, record in events:
        row = event_row("mailbus." + {"email.requested": "EmailRequested",
                                      "email.sent": "EmailSent"}[topic], record)
        decoded.append(row)
        terms: Findable | None = findable(row.message_id, record)
        if row.kind == "requested" and terms is not None:
            found[row.event_id] = terms
    with psycopg.connect(ProjectorSettings().postgres.conninfo(), autocommit=True) as conn:
        return project(conn, ns, decoded, None, found)


def search_rows(ns: str) -> set[tuple[Any, ...]]:
    """Every row of the namespace, read as the API's role reads them."""
    return {tuple(r) for r in rows(
        "SELECT field, value, key_id, requested_at, message_id::text FROM message_search"
        " WHERE namespace = %s", ns)}


def asked(mid: str, key: str = "k-one", **fields: Any) -> tuple[str, dict[str, Any]]:
    topic, record = requested(mid, T0, account="team-a")
    return topic, record | {"key_id": key, "requested_at": T0,
                            "to": [{"email": "Ada@example.com", "name": "Ada"}],
                            "cc": [], "bcc": [{"email": "bob@example.net", "name": None}],
                            "tags": ["invoice"]} | fields


def expected(mid: str, key: str = "k-one", accounts: tuple[str, ...] = ()) -> set[tuple[Any, ...]]:
    return {("recipient", "ada@example.com", key, T0, mid),
            ("recipient", "bob@example.net", key, T0, mid), ("tag", "invoice", key, T0, mid),
            *(("account", a, key, T0, mid) for a in accounts)}


def test_requested_then_sent_in_later_batches(ns: str) -> None:
    mid = str(uuid.uuid4())
    assert batch(ns, asked(mid)) == 1
    assert search_rows(ns) == expected(mid)  # no account before it is sent
    assert batch(ns, sent(mid, T0 + timedelta(seconds=1), account="team-b")) == 1
    assert search_rows(ns) == expected(mid, accounts=("team-b",))
    # A retry sent through the same account adds nothing; through another, a row.
    batch(ns, sent(mid, T0 + timedelta(seconds=2), account="team-b"),
          sent(mid, T0 + timedelta(seconds=3), account="team-c"))
    assert search_rows(ns) == expected(mid, accounts=("team-b", "team-c"))
    scope = rows("SELECT key_id, requested_at FROM message_status"
                 " WHERE namespace = %s AND message_id = %s", ns, mid)
    assert scope == [("k-one", T0)]


def test_sent_projected_before_its_request(ns: str) -> None:
    # email.requested and email.sent are separate topics read in parallel: a
    # lagging partition can deliver the request after the send.
    mid, other = str(uuid.uuid4()), str(uuid.uuid4())
    batch(ns, sent(mid, T0 + timedelta(seconds=1), account="team-b"))
    assert search_rows(ns) == set()
    batch(ns, asked(mid), asked(other, key="k-two"))
    assert search_rows(ns) == expected(mid, accounts=("team-b",)) | expected(other, "k-two")


def test_both_in_one_batch_and_redelivery_writes_nothing_twice(ns: str) -> None:
    mid = str(uuid.uuid4())
    req = asked(mid)
    snt = sent(mid, T0 + timedelta(seconds=1), account="team-a")
    assert batch(ns, snt, req) == 2
    assert batch(ns, snt, req) == 0
    # A rerouted request: same message, key and time, a new event and account.
    rerouted = ("email.requested", req[1] | {"event_id": str(uuid.uuid4()),
                                             "account_id": "team-b"})
    assert batch(ns, rerouted) == 1
    assert search_rows(ns) == expected(mid, accounts=("team-a",))


def test_another_namespace_sees_nothing(ns: str) -> None:
    mid = str(uuid.uuid4())
    batch(ns, asked(mid))
    assert search_rows(ns + "x") == set()


def test_hostile_values_of_another_producer_do_not_stall_the_projector(ns: str) -> None:
    # Producers other than the API may write email.requested: what cannot be
    # an index entry is left out, and the batch (with its neighbours) commits.
    mid, fine = str(uuid.uuid4()), str(uuid.uuid4())
    huge = "a" * 5000 + "@example.com"
    hostile = asked(mid, to=[{"email": huge, "name": None},
                             {"email": "nul\x00@example.com", "name": None},
                             {"email": "ok@example.com", "name": None}],
                    bcc=[], tags=["t" * (MAX_VALUE + 1), "fine"])
    keyless = asked(str(uuid.uuid4()), key=None)
    assert batch(ns, hostile, keyless, asked(fine)) == 3
    assert search_rows(ns) == expected(fine) | {
        ("recipient", "ok@example.com", "k-one", T0, mid), ("tag", "fine", "k-one", T0, mid)}
    # An account id no API could configure, on a sent event: left out too.
    assert batch(ns, sent(mid, T0 + timedelta(seconds=1), account="x" * 5000)) == 1
    assert not [r for r in search_rows(ns) if r[0] == "account"]
