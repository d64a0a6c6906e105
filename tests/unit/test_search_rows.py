"""What a message is found by: the search rows the projector decides, the API's normalisation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mailbus.ingest.models import Address
from mailbus.ingest.problems import Problem
from mailbus.ingest.status import check_range, driving_first, search_terms
from mailbus.search import (
    MAX_TERMS,
    MAX_VALUE,
    NotAnAddress,
    SearchTerms,
    findable,
    search_address,
)
from mailbus.timeline import EventRow

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MID = str(uuid.uuid4())


def record(**fields: object) -> dict[str, object]:
    return {"key_id": "k1", "requested_at": T0,
            "to": [{"email": "Ada@example.com", "name": "Ada"}],
            "cc": [{"email": "bob@EXAMPLE.net", "name": None}],
            "bcc": [{"email": "ada@example.com", "name": None}], "tags": ["Red", "red"]} | fields


def event(kind: str, account: str | None = None, seconds: float = 0) -> EventRow:
    return EventRow(str(uuid.uuid4()), MID, kind, T0 + timedelta(seconds=seconds), account, {})


def test_recipients_are_folded_whole_and_once_tags_kept_as_given() -> None:
    found = findable(MID, record())
    assert found is not None
    assert found.recipients == ("ada@example.com", "bob@example.net")
    assert found.tags == ("Red", "red")
    assert (found.key_id, found.requested_at) == ("k1", T0)


@pytest.mark.parametrize("fields", [{"key_id": None}, {"key_id": ""}, {"requested_at": None},
                                    {"key_id": "k\x00"}])
def test_no_key_or_time_no_rows(fields: dict[str, object]) -> None:
    # Without a key there is no scope to find the message in.
    assert findable(MID, record(**fields)) is None


def test_values_that_cannot_be_rows_are_left_out_and_rows_are_capped() -> None:
    long = "x" * (MAX_VALUE - 12) + "@example.com"
    found = findable(MID, record(
        to=[{"email": "a\x00b@example.com"}, {"email": "y" * MAX_VALUE + "@example.com"},
            {"email": long}, {"email": None}, "not-a-mapping"],
        cc=[], bcc=[], tags=["", "t\x00", "z" * (MAX_VALUE + 1), "ok", 7]))
    assert found is not None
    assert found.recipients == (long.lower(),) and found.tags == ("ok",)
    many = findable(MID, record(to=[{"email": f"r{i}@example.com"} for i in range(300)],
                                tags=[f"t{i}" for i in range(50)]))
    assert many is not None and len(many.terms()) == MAX_TERMS


def test_requested_then_sent_rows_in_one_batch() -> None:
    req, snt = event("requested", "team-a"), event("sent", "team-b", 1)
    terms = SearchTerms()
    # The sent event comes first in the batch: the requested one still sets the scope first.
    scope = terms.add(MID, (None, None), (), "team-a", [snt, req],
                      {req.event_id: findable(MID, record())})  # type: ignore[dict-item]
    assert scope == ("k1", T0)
    assert terms.rows == {
        ("recipient", "ada@example.com", "k1", T0, MID),
        ("recipient", "bob@example.net", "k1", T0, MID),
        ("tag", "Red", "k1", T0, MID), ("tag", "red", "k1", T0, MID),
        # The account a message is found by is the one that sent it, not the requested one.
        ("account", "team-b", "k1", T0, MID)}
    assert not terms.sent_before
    columns = terms.columns()
    assert columns["fields"] == sorted(columns["fields"])
    assert len(set(map(len, columns.values()))) == 1


def test_sent_alone_waits_for_the_scope_then_comes_from_the_table() -> None:
    early = SearchTerms()
    assert early.add(MID, (None, None), (), None, [event("sent", "team-a")], {}) == (None, None)
    assert not early.rows and not early.sent_before
    req = event("requested", "team-a", -5)
    late = SearchTerms()
    late.add(MID, (None, None), {"sent"}, "team-a", [req],
             {req.event_id: findable(MID, record())})  # type: ignore[dict-item]
    assert late.sent_before == {MID}
    assert not [r for r in late.rows if r[0] == "account"]


def test_the_first_scope_stays() -> None:
    # A rerouted request (or another producer's record) cannot move a message's rows.
    req = event("requested", "team-b")
    terms = SearchTerms()
    other = findable(MID, record(key_id="k2", requested_at=T0 + timedelta(hours=1)))
    scope = terms.add(MID, ("k1", T0), {"requested"}, "team-a", [req, event("sent", None, 2)],
                      {req.event_id: other})  # type: ignore[dict-item]
    assert scope == ("k1", T0)
    assert {(r[2], r[3]) for r in terms.rows} == {("k1", T0)}
    # A sent event without an account: the message's.
    assert ("account", "team-a", "k1", T0, MID) in terms.rows


@pytest.mark.parametrize(("given", "stored"), [
    ("Ada@Example.COM", "ada@example.com"),
    ("ada@example.com", "ada@example.com"),
    # Internationalised: the domain as POST normalises it (IDNA, Unicode form).
    ("ada@XN--BCHER-KVA.example", "ada@bücher.example"),
    ("ada@BÜCHER.example", "ada@bücher.example"),
    # A Unicode local part keeps its letters (NFC), folded.
    ("Jose\u0301@example.com", "josé@example.com"),
])
def test_a_recipient_filter_meets_what_post_stored(given: str, stored: str) -> None:
    assert search_address(given) == stored
    # The stored side: POST's normalisation, then folded the same way.
    assert findable(MID, record(to=[{"email": Address(email=given).email}], cc=[], bcc=[])
                    ).recipients == (stored,)  # type: ignore[union-attr]


@pytest.mark.parametrize("given", ["no-at-sign", "a@b@example.com", "a@-example.com",
                                   "a..b@example.com", "a@example..com", "@example.com"])
def test_what_post_refuses_a_search_refuses(given: str) -> None:
    with pytest.raises(NotAnAddress):
        search_address(given)
    with pytest.raises(Problem) as caught:
        search_terms(given, None, None)
    assert [e["field"] for e in caught.value.errors] == ["recipient"]


def test_the_smallest_filter_drives_ties_keep_the_order() -> None:
    terms = [("recipient", "a"), ("tag", "b"), ("account", "c")]
    assert driving_first(terms, [50, 10, 10_000]) == [terms[1], terms[0], terms[2]]
    assert driving_first(terms, [5, 5, 5]) == terms
    assert search_terms(None, "t", "dev") == [("tag", "t"), ("account", "dev")]


def test_time_bounds() -> None:
    check_range(T0, T0 + timedelta(seconds=1))
    for since, until, field in ((T0, T0, "until"), (T0, T0 - timedelta(1), "until"),
                                (datetime(1969, 12, 31, tzinfo=UTC), None, "since"),
                                (None, datetime(1, 1, 2, tzinfo=UTC), "until")):
        with pytest.raises(Problem) as caught:
            check_range(since, until)
        assert [e["field"] for e in caught.value.errors] == [field]
