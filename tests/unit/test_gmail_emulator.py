"""The Gmail emulator's quota arithmetic, mailbox history and error shapes, without a
server: requests go straight to its handler."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.support.gmail_emulator import FakeClock, GmailEmulator, Quota, google_error, rfc3339

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_full_bucket_allows_a_burst_of_two_sends_then_says_when() -> None:
    quota = Quota(units_per_second=250)
    assert quota.take_units(100, T0) is None
    assert quota.take_units(100, T0) is None
    # 50 units left; 50 more accrue at 250/s in 0.2 s.
    assert quota.take_units(100, T0) == at(0.2)
    assert quota.take_units(100, at(0.2)) is None


def test_a_refused_request_spends_nothing() -> None:
    quota = Quota(units_per_second=250)
    quota.take_units(100, T0)
    quota.take_units(100, T0)
    assert quota.take_units(100, T0) is not None
    assert quota.take_units(50, T0) is None  # the 50 left were not spent by the refusal


def test_sending_at_two_and_a_half_per_second_is_sustainable() -> None:
    quota = Quota(units_per_second=250)
    assert all(quota.take_units(100, at(0.4 * i)) is None for i in range(100))


def test_sustained_sending_faster_than_the_rate_runs_out() -> None:
    quota = Quota(units_per_second=250)
    refused = [i for i in range(20) if quota.take_units(100, at(0.3 * i)) is not None]
    assert refused and refused[0] > 2  # the burst allowance first, then refusals


def test_the_bucket_holds_one_second_of_units_however_long_idle() -> None:
    quota = Quota(units_per_second=250)
    quota.take_units(250, T0)
    assert quota.take_units(250, at(3600)) is None
    assert quota.take_units(1, at(3600)) is not None


def test_a_clock_moving_backwards_does_not_mint_units() -> None:
    quota = Quota(units_per_second=250)
    quota.take_units(250, at(10))
    assert quota.take_units(100, at(5)) is not None


def test_rolling_window_frees_each_send_exactly_24_hours_later() -> None:
    quota = Quota(daily_limit=3)
    for i in range(3):
        quota.sends.append(at(i))
    day = timedelta(hours=24)
    assert quota.sending_blocked_until(at(10)) == T0 + day
    assert quota.sending_blocked_until(T0 + day - timedelta(microseconds=1)) == T0 + day
    assert quota.sending_blocked_until(T0 + day) is None  # the first send aged out
    quota.sends.append(T0 + day)
    assert quota.sending_blocked_until(T0 + day) == at(1) + day


def test_under_the_daily_limit_nothing_is_blocked() -> None:
    quota = Quota(daily_limit=2)
    quota.sends.append(T0)
    assert quota.sending_blocked_until(T0) is None


def test_retry_times_are_google_shaped_and_never_early() -> None:
    def stamp(micro: int) -> str:
        return rfc3339(datetime(2023, 3, 7, 18, 3, 15, micro, tzinfo=UTC))

    assert stamp(961000) == "2023-03-07T18:03:15.961Z"
    assert stamp(961001) == "2023-03-07T18:03:15.962Z"
    assert stamp(999999) == "2023-03-07T18:03:16.000Z"


def test_error_envelope_matches_googles() -> None:
    assert google_error(400, "Invalid To header", "invalidArgument") == {"error": {
        "code": 400, "message": "Invalid To header",
        "errors": [{"message": "Invalid To header", "domain": "global",
                    "reason": "invalidArgument"}],
        "status": "INVALID_ARGUMENT"}}
    unauthenticated = google_error(401, "x", "authError", location="Authorization",
                                   locationType="header")["error"]
    assert unauthenticated["status"] == "UNAUTHENTICATED"
    assert unauthenticated["errors"][0]["locationType"] == "header"


def test_fake_clock_starts_now_to_the_millisecond_and_moves_by_hand() -> None:
    clock = FakeClock()
    assert clock().microsecond % 1000 == 0
    assert abs(clock() - datetime.now(UTC)) < timedelta(seconds=5)
    start = clock()
    assert clock.advance(0.4) == start + timedelta(milliseconds=400)
    assert clock.advance(hours=24) - start == timedelta(hours=24, milliseconds=400)


@pytest.mark.parametrize("cost", [100, 5])
def test_units_per_second_scales_the_bucket(cost: int) -> None:
    quota = Quota(units_per_second=15_000 / 60)  # Google's per-minute figure, per second
    spent = 0
    while quota.take_units(cost, T0) is None:
        spent += cost
    assert spent == 250 // cost * cost


ME = "me@example.test"


@pytest.fixture
def emu() -> Iterator[GmailEmulator]:
    emulator = GmailEmulator(now=FakeClock(T0))  # never started: handle() is called directly
    emulator.add_user(ME)
    yield emulator
    emulator.stop()


def call(emu: GmailEmulator, method: str, resource: str, body: dict[str, Any] | None = None,
         **query: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": "Bearer " + emu.issue_token(
        ME, ("https://www.googleapis.com/auth/gmail.modify",))}
    target = f"/gmail/v1/users/me/{resource}?" + urlencode(query, doseq=True)
    return emu.handle(method, target, headers, json.dumps(body or {}).encode())


def raw(subject: str) -> bytes:
    return f"From: a@example.com\r\nTo: {ME}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()


def test_each_added_message_raises_the_history_id_that_the_profile_reports(
        emu: GmailEmulator) -> None:
    start = int(call(emu, "GET", "profile")[1]["historyId"])
    first = emu.deliver(ME, raw("one"))
    status, inserted = call(emu, "POST", "messages", {
        "raw": base64.urlsafe_b64encode(raw("two")).decode(), "labelIds": ["INBOX"]})
    assert status == 200 and inserted["labelIds"] == ["INBOX"]
    profile = call(emu, "GET", "profile")[1]
    assert profile["emailAddress"] == ME and int(profile["historyId"]) == start + 2
    got = call(emu, "GET", f"messages/{first.id}", format="raw")[1]
    assert int(got["historyId"]) == start + 1
    assert got["internalDate"] == str(int(T0.timestamp() * 1000))
    assert base64.urlsafe_b64decode(got["raw"]) == raw("one")


def test_history_lists_added_messages_after_the_start_by_label_in_pages(
        emu: GmailEmulator) -> None:
    start = call(emu, "GET", "profile")[1]["historyId"]
    inbox = [emu.deliver(ME, raw(f"in {n}")) for n in range(3)]
    emu.deliver(ME, raw("sent"), labels=("SENT",))
    query = {"startHistoryId": start, "historyTypes": "messageAdded", "labelId": "INBOX",
             "maxResults": 2}
    status, page = call(emu, "GET", "history", **query)
    assert status == 200 and page["historyId"] == str(inbox[-1].history_id + 1)
    assert [r["messagesAdded"][0]["message"]["id"] for r in page["history"]] == \
        [m.id for m in inbox[:2]]
    assert page["history"][0]["messagesAdded"][0]["message"]["labelIds"] == ["INBOX", "UNREAD"]
    rest = call(emu, "GET", "history", **query, pageToken=page["nextPageToken"])[1]
    assert [r["id"] for r in rest["history"]] == [str(inbox[2].history_id)]
    assert "nextPageToken" not in rest
    caught_up = call(emu, "GET", "history", **query | {"startHistoryId": rest["historyId"]})[1]
    assert "history" not in caught_up


def test_an_expired_start_history_id_is_googles_404(emu: GmailEmulator) -> None:
    start = call(emu, "GET", "profile")[1]["historyId"]
    emu.deliver(ME, raw("one"))
    now = emu.expire_history(ME)
    status, body = call(emu, "GET", "history", startHistoryId=start)
    assert (status, body) == (404, {"error": {
        "code": 404, "message": "Requested entity was not found.",
        "errors": [{"message": "Requested entity was not found.", "domain": "global",
                    "reason": "notFound"}],
        "status": "NOT_FOUND"}})
    assert call(emu, "GET", "history", startHistoryId=now)[0] == 200


def test_listing_filters_by_label_and_received_time_newest_first(emu: GmailEmulator) -> None:
    old = emu.deliver(ME, raw("old"), received=T0 - timedelta(hours=1))
    new = emu.deliver(ME, raw("new"))
    emu.deliver(ME, raw("sent"), labels=("SENT",))
    listed = call(emu, "GET", "messages", labelIds="INBOX")[1]
    assert [m["id"] for m in listed["messages"]] == [new.id, old.id]
    since = int((T0 - timedelta(minutes=1)).timestamp())
    recent = call(emu, "GET", "messages", labelIds="INBOX", q=f"after:{since}")[1]
    assert [m["id"] for m in recent["messages"]] == [new.id]


def test_labels_are_created_once_by_name_ignoring_case(emu: GmailEmulator) -> None:
    system = call(emu, "GET", "labels")[1]["labels"]
    assert {"id": "INBOX", "name": "INBOX", "type": "system"} in system
    status, created = call(emu, "POST", "labels", {
        "name": "Processed", "labelListVisibility": "labelShow", "messageListVisibility": "show"})
    assert status == 200 and created["name"] == "Processed" and created["type"] == "user"
    assert created in call(emu, "GET", "labels")[1]["labels"]
    assert emu.labels(ME) == {"Processed": created["id"]}
    conflict = google_error(409, "Label name exists or conflicts", "aborted")
    assert conflict["error"]["status"] == "ABORTED"
    assert call(emu, "POST", "labels", {"name": "processed"}) == (409, conflict)
    assert call(emu, "POST", "labels", {"name": "Inbox"}) == (409, conflict)
    assert call(emu, "POST", "labels", {"name": ""})[0] == 400
    assert emu.requests["labels.create"] == 4 and emu.requests["labels.list"] == 2


def test_modify_changes_labels_and_records_label_history_not_added_messages(
        emu: GmailEmulator) -> None:
    label = call(emu, "POST", "labels", {"name": "Done"})[1]["id"]
    message = emu.deliver(ME, raw("one"))
    start = call(emu, "GET", "profile")[1]["historyId"]
    status, changed = call(emu, "POST", f"messages/{message.id}/modify",
                           {"addLabelIds": [label], "removeLabelIds": ["UNREAD"]})
    assert status == 200 and changed["labelIds"] == ["INBOX", label]
    assert call(emu, "GET", f"messages/{message.id}", format="minimal")[1]["labelIds"] == \
        ["INBOX", label]
    assert call(emu, "GET", "messages", labelIds=label)[1]["messages"][0]["id"] == message.id
    added_only = {"startHistoryId": start, "historyTypes": "messageAdded", "labelId": "INBOX"}
    assert "history" not in call(emu, "GET", "history", **added_only)[1]
    records = call(emu, "GET", "history", startHistoryId=start)[1]["history"]
    assert [[k for k in r if k not in ("id", "messages")] for r in records] == \
        [["labelsAdded"], ["labelsRemoved"]]
    assert records[0]["labelsAdded"][0]["labelIds"] == [label]
    assert records[1]["labelsRemoved"][0]["labelIds"] == ["UNREAD"]
    # Adding a label the message carries already changes nothing, records nothing.
    profile = call(emu, "GET", "profile")[1]["historyId"]
    assert call(emu, "POST", f"messages/{message.id}/modify", {"addLabelIds": [label]})[0] == 200
    assert call(emu, "GET", "profile")[1]["historyId"] == profile


def test_modify_refusals_are_googles(emu: GmailEmulator) -> None:
    message = emu.deliver(ME, raw("one"))
    assert call(emu, "POST", "messages/0123456789abcdef/modify", {"addLabelIds": ["INBOX"]}) == \
        (404, google_error(404, "Requested entity was not found.", "notFound"))
    assert call(emu, "POST", f"messages/{message.id}/modify", {"addLabelIds": ["Label_9"]}) == \
        (400, google_error(400, "labelId not found", "invalidArgument"))
    assert call(emu, "POST", f"messages/{message.id}/modify", {"removeLabelIds": ["SENT"]}) == \
        (400, google_error(400, "Invalid label: SENT", "invalidArgument"))
    assert call(emu, "POST", f"messages/{message.id}/modify", {})[1]["error"]["message"] == \
        "No label add or removes specified"
    assert emu.messages(ME)[0].label_ids == ["INBOX", "UNREAD"]


def test_modify_needs_the_modify_scope(emu: GmailEmulator) -> None:
    message = emu.deliver(ME, raw("one"))
    headers = {"Authorization": "Bearer " + emu.issue_token(ME)}  # gmail.send + gmail.readonly
    status, body = emu.handle("POST", f"/gmail/v1/users/me/messages/{message.id}/modify",
                              headers, json.dumps({"addLabelIds": ["STARRED"]}).encode())
    assert status == 403 and body["error"]["errors"][0]["reason"] == "insufficientPermissions"
    status, _ = emu.handle("GET", "/gmail/v1/users/me/labels", headers, b"")
    assert status == 200
