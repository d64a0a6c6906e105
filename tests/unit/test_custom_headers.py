"""Caller-chosen headers: the allow-list at the API and in the sender, the values, the caps,
and the delivered bytes read back with the stdlib parser."""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailbus import customheaders
from mailbus.ingest.models import MessageRequest, cross_field_problems, header_problems
from mailbus.sender import headers
from mailbus.sender.compose import ComposeFailed, compose
from tests.unit.test_compose import ACCOUNT, LINKS, NOW, event, well_formed
from tests.unit.test_header_safety import ENCODED, EVIL, FOLDED, INTENDED, LITERAL, REFUSED

BASE = {"to": ["ada@example.org"], "subject": "Hi", "text": "Hello"}
# Every header mailbus writes or a receiver routes by, as a caller might spell it.
OWNED = ["From", "To", "Cc", "Bcc", "Reply-To", "Sender", "Return-Path", "Message-ID", "Date",
         "Subject", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
         "Content-Disposition", "List-Unsubscribe", "List-Unsubscribe-Post", "List-Id",
         "DKIM-Signature", "ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results",
         "Received", "Authentication-Results", "Received-SPF", "Resent-To", "Resent-From",
         "Delivered-To", "Disposition-Notification-To", "In-Reply-To", "References",
         "X-Mailbus-Message-Id", "X-Mailbus-Anything", "X-Spam-Status", "X-Spam-Flag",
         "X-MS-Exchange-Organization-SCL", "X-Microsoft-Antispam", "X-Forefront-Antispam-Report",
         "X-Google-Original-From", "X-Original-To", "X-Originating-IP", "X-Envelope-From",
         "X-Authenticated-Sender", "X-Sender", "X-Forwarded-To", "X-Delivered-To",
         "X-Received", "X-Virus-Scanned", "X-SMTPAPI", "X-SG-EID", "X-SES-CONFIGURATION-SET",
         "X-Mailgun-Variables", "X-PM-Message-Stream", "X-"]


def variants(name: str) -> list[str]:
    """The name in every case form, and with what a sloppy parser strips."""
    return [name, name.lower(), name.upper(), name.swapcase(), f"{name} ", f" {name}",
            f"{name}:", f"{name} :", f"{name}\t", f"{name}\r\n"]


ALLOWED = ["X-Campaign", "x-campaign-id", "X-Entity-Ref-ID", "X-Priority", "X-Mailer",
           "X-Auto-Response-Suppress", "Precedence", "precedence", "Auto-Submitted",
           "X-Author", "X-A1"]
ILLEGAL = ["X Campaign", "X-Camp:aign", "X-Camp\u00e9", "X-Camp_aign", "X-Camp.aign",
           "1-X", "-X-Foo", "X-\u0130", "X-Foo\x00", "X-Foo\u2028", "", "X-" + "a" * 63,
           "X-(comment)", "X-Foo\x7f"]


def names_of(raw: bytes) -> list[str]:
    return [k.lower() for k in email.message_from_bytes(raw, policy=policy.default).keys()]


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def fields_of(body: dict[str, Any]) -> list[str]:
    return [f for f, _ in cross_field_problems(MessageRequest.model_validate({**BASE, **body}))]


# --- the allow-list (one rule, read by the API and the sender) ---
@pytest.mark.parametrize("name", ALLOWED)
def test_allowed_names_pass_both_checks(name: str) -> None:
    assert customheaders.name_problem(name) is None


@pytest.mark.parametrize("name", [v for owned in OWNED for v in variants(owned)] + ILLEGAL)
def test_owned_and_illegal_names_are_refused_by_both_checks(name: str) -> None:
    assert customheaders.name_problem(name) is not None
    value = "yes" if name.lower().strip(" :\t\r\n") != "precedence" else "bulk"
    assert fields_of({"headers": {name: value}}) == [f"headers.{name[:64]}"]
    with pytest.raises(ComposeFailed, match=r"^headers\."):
        compose(event(headers=[{"name": name, "value": value}]), ACCOUNT, None, now=NOW)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=20),
                 st.from_regex(r"[xX]-[A-Za-z0-9 :_.-]{0,20}", fullmatch=True),
                 st.sampled_from([v for owned in OWNED for v in variants(owned)])))
def test_the_api_and_the_sender_agree_on_every_name(name: str) -> None:
    # One rule (mailbus/customheaders.py) on both sides of Kafka: whatever the API
    # takes, the sender writes; whatever it refuses, the sender refuses too.
    value = "bulk" if name.lower() == "precedence" else "no" if (
        name.lower() == "auto-submitted") else "yes"
    accepted = fields_of({"headers": {name: value}}) == []
    try:
        compose(event(headers=[{"name": name, "value": value}]), ACCOUNT, None, now=NOW)
        written = True
    except ComposeFailed:
        written = False
    assert accepted == written == (customheaders.name_problem(name) is None)
    if accepted:
        assert name.isascii() and ":" not in name and " " not in name
        assert name.lower() not in {o.lower() for o in OWNED}


# --- the API's request model ---
def test_the_request_carries_headers_into_the_event() -> None:
    from mailbus.ingest.handlers import requested_event
    req = MessageRequest.model_validate({**BASE, "headers": {"X-Campaign": "spring",
                                                             "Precedence": "bulk"}})
    assert cross_field_problems(req) == []
    ev = requested_event(req, message_id="m", account_id="a", pool=None, key_id="k",
                         idempotency_key=None, now=NOW)
    assert ev["headers"] == [{"name": "X-Campaign", "value": "spring"},
                             {"name": "Precedence", "value": "bulk"}]
    bare = requested_event(MessageRequest.model_validate(BASE), message_id="m",
                           account_id="a", pool=None, key_id="k", idempotency_key=None, now=NOW)
    assert bare["headers"] == []


# TAB is whitespace and folds into a space, as in a subject; every other separator is refused.
@pytest.mark.parametrize("value", [*ENCODED.values(), *REFUSED.values(),
                                   *(v for k, v in FOLDED.items() if k != "tab")])
def test_the_api_refuses_breaking_and_encoded_values_naming_the_header(value: str) -> None:
    assert fields_of({"headers": {"X-Ok": "fine", "X-Bad": value}}) == ["headers.X-Bad"]


def test_the_api_names_each_bad_header_once() -> None:
    problems = header_problems({"X-A": "a\r\nBcc: v@evil.example", "Subject": "x",
                                "x-a": "dup", "Precedence": "urgent", "X-Empty": "  ",
                                "X-Long": "a" * 1001, "X-Fine": "ok"})
    assert [f for f, _ in problems] == ["headers.X-A", "headers.Subject", "headers.x-a",
                                        "headers.Precedence", "headers.X-Empty",
                                        "headers.X-Long"]
    assert "more than once" in dict(problems)["headers.x-a"]
    assert "bulk, junk, list" in dict(problems)["headers.Precedence"]


def test_count_and_size_are_capped() -> None:
    many = {f"X-H{i}": "v" for i in range(21)}
    assert header_problems(many) == [("headers", "at most 20 headers")]
    assert header_problems(dict(list(many.items())[:20])) == []
    big = {f"X-H{i}": "v" * 1000 for i in range(9)}
    assert header_problems(big)[0][0] == "headers"
    assert "8192 bytes" in header_problems(big)[0][1]


def test_very_many_and_very_long_headers_are_refused_in_linear_time() -> None:
    # Quadratic work on any of these would take minutes.
    assert header_problems({f"X-H{i}": "v" for i in range(200_000)})[0][0] == "headers"
    for value in ("=?x" * 400_000, " " * 1_000_000, "\u2028" * 1_000_000):
        assert header_problems({"X-H": value})[0][0] == "headers"
    with pytest.raises(ComposeFailed, match="more than 20"):
        compose(event(headers=[{"name": f"X-H{i}", "value": "v"} for i in range(200_000)]),
                ACCOUNT, None, now=NOW)
    with pytest.raises(ComposeFailed, match="8192 bytes"):
        compose(event(headers=[{"name": "X-H", "value": "=?x" * 400_000}]), ACCOUNT, None,
                now=NOW)


# --- the sender: what leaves, read back ---
def test_custom_headers_leave_after_ours_in_order_and_read_back_exactly() -> None:
    values = {"X-Campaign": "spring-2026", "X-Entity-Ref-ID": "a" * 200,
              "X-Note": "Grüße aus Köln, " * 40, "Precedence": "bulk",
              "X-Spaces": "  two   spaces\tand a tab ", "X-Lookalike": LITERAL["percent"]}
    out = compose(event(headers=[{"name": n, "value": v} for n, v in values.items()]),
                  ACCOUNT, LINKS, now=NOW)
    well_formed(out.raw)
    message = parse(out.raw)
    keys = [k.lower() for k in message.keys()]
    assert keys.index("x-campaign") > keys.index("x-mailbus-message-id")
    assert keys[keys.index("x-campaign"):keys.index("x-campaign") + len(values)] == [
        n.lower() for n in values]
    for name, value in values.items():
        assert message.get_all(name) is not None and len(message.get_all(name)) == 1
        assert str(message[name]) == " ".join(value.split()), name
    # Folded: continuation lines within 78 octets, a first line within the name and 72.
    lines = out.raw.partition(b"\r\n\r\n")[0].decode().split("\r\n")
    custom = [i for i, line in enumerate(lines) if line.split(":")[0] in values]
    for i in custom:
        name = lines[i].split(":")[0]
        assert len(lines[i]) <= len(name) + 72, lines[i]
        j = i + 1
        while j < len(lines) and lines[j].startswith(" "):
            assert len(lines[j]) <= 78, lines[j]
            j += 1
    assert len(custom) == len(values)
    assert out.recipients == ["ada@example.org"]


@pytest.mark.parametrize("label", list(ENCODED))
def test_the_sender_refuses_encoded_words_naming_the_header(label: str) -> None:
    with pytest.raises(ComposeFailed, match=r"^headers\.X-Ref: "):
        compose(event(headers=[{"name": "X-Ref", "value": ENCODED[label]}]), ACCOUNT, None,
                now=NOW)


@pytest.mark.parametrize("label", list(REFUSED))
def test_the_sender_refuses_line_breaks_and_controls_naming_the_header(label: str) -> None:
    with pytest.raises(ComposeFailed, match=r"^headers\.X-Ref: .*control"):
        compose(event(headers=[{"name": "X-Ref", "value": REFUSED[label]}]), ACCOUNT, None,
                now=NOW)


@pytest.mark.parametrize("label", list(FOLDED))
def test_the_sender_folds_unicode_separators_into_a_space(label: str) -> None:
    out = compose(event(headers=[{"name": "X-Ref", "value": FOLDED[label]}]), ACCOUNT, None,
                  now=NOW)
    message = parse(out.raw)
    assert str(message["X-Ref"]) == f"hi {EVIL}"
    assert message["Bcc"] is None and out.recipients == ["ada@example.org"]


@pytest.mark.parametrize("entries, reason", [
    ([{"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"}], "more than once"),
    ([{"name": "X-A", "value": " \t "}], "empty"),
    ([{"name": "X-A", "value": "a" * 1001}], "longer than 1000"),
    ([{"name": "Auto-Submitted", "value": "yes please"}], "auto-generated"),
    ([{"name": "X-A", "value": 5}], "not text"),
])
def test_the_sender_refuses_what_the_api_would(entries: list[dict[str, Any]],
                                                reason: str) -> None:
    with pytest.raises(ComposeFailed, match=reason):
        compose(event(headers=entries), ACCOUNT, None, now=NOW)


def test_the_parse_back_check_covers_custom_values() -> None:
    out = compose(event(headers=[{"name": "X-Ref", "value": "abc"}]), ACCOUNT, None, now=NOW)
    names = [n for n, _ in email.message_from_bytes(out.raw, policy=policy.compat32).items()]
    intended = headers.Intended(names=names, subject="Your receipt",
                                texts={"X-Ref": "abc"},
                                mailboxes={"To": [("Ada Lovelace", "ada@example.org")]})
    headers.check(out.raw, intended)
    with pytest.raises(ComposeFailed, match=r"^headers\.X-Ref: does not decode"):
        headers.check(out.raw.replace(b"X-Ref: abc", b"X-Ref: abd"), intended)
    spilled = out.raw.replace(b"X-Ref: abc\r\n", b"X-Ref: abc\r\nBcc: v@evil.example\r\n")
    with pytest.raises(ComposeFailed, match=r"^headers\.X-Ref: .*Bcc"):
        headers.check(spilled, intended)


_PIECES = st.lists(st.sampled_from(
    [*"=?_qQbB:aZ09 \t\"\\,;<>@()", "\r", "\n", "\r\n", "\0", "\x0b", "\x85", "\u2028",
     "\u2029", "é", "日", "=0D", "=0A", "?=", "=?utf-8?q?", "DQo=", "Bcc: v@e.example"]),
    max_size=30).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.one_of(_PIECES, st.text(max_size=120)))
def test_property_a_custom_value_is_refused_or_leaves_exactly_as_meant(value: str) -> None:
    ev = event(cc=[{"email": "cc@example.org", "name": "Cc"}],
               bcc=[{"email": "bcc@example.org", "name": None}],
               reply_to={"email": "r@example.org", "name": "R"},
               headers=[{"name": "X-Ref", "value": value}])
    api_ok = not header_problems({"X-Ref": value})
    try:
        out = compose(ev, ACCOUNT, None, now=NOW)
    except ComposeFailed as exc:
        assert str(exc).startswith("headers.X-Ref: ")
        assert not api_ok, f"the API takes what the sender refuses: {value!r}"
        return
    assert sorted(names_of(out.raw)) == sorted([*INTENDED, "x-ref"])
    assert str(parse(out.raw)["X-Ref"]) == " ".join(value.split())
    assert out.recipients == ["ada@example.org", "cc@example.org", "bcc@example.org"]
