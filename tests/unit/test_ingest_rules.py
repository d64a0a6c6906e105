"""Pure rules of the ingest API: validation, routing, ids, keys. No Kafka, no database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from mailbus import apikeys
from mailbus.accounts import Account, Directory, SmtpAccount, pick_account
from mailbus.codec import Registry
from mailbus.ingest.gate import bearer_token
from mailbus.ingest.handlers import (
    ApiKey,
    message_id_for,
    message_row,
    request_digest,
    requested_event,
    require_scope,
    route,
)
from mailbus.ingest.models import MessageRequest, cross_field_problems
from mailbus.ingest.problems import Problem, field_path
from mailbus.ingest.rates import parse_rate, retry_after

BASE = {"to": ["ada@example.com"], "subject": "Hi", "text": "Hello"}


def account(id_: str, *pools: str) -> Account:
    return Account(id=id_, kind="smtp", from_address=f"{id_}@example.test", pools=pools,
                   smtp=SmtpAccount(host="127.0.0.1"))


DIRECTORY = Directory([account("a1", "team", "default"), account("a2", "team"),
                       account("solo")])
ANY_KEY = ApiKey("k", frozenset({"send"}), None, None)


def test_display_name_forms_parse():
    req = MessageRequest.model_validate({**BASE, "to": [
        "Grace Hopper <grace@example.com>", '"Quoted, Name" <q@example.com>',
        {"email": "obj@example.com", "name": "Obj"}, "bare@EXAMPLE.com"]})
    assert [(a.email, a.name) for a in req.to] == [
        ("grace@example.com", "Grace Hopper"), ("q@example.com", "Quoted, Name"),
        ("obj@example.com", "Obj"), ("bare@example.com", None)]


def test_idn_addresses_are_accepted():
    req = MessageRequest.model_validate({**BASE, "to": ["user@bücher.example"]})
    assert req.to[0].email.endswith("bücher.example")


@pytest.mark.parametrize("value", ["a\r\nBcc: x@y.z", "a\nb", "a\x00b", "a\rb"])
@pytest.mark.parametrize("field", ["subject"])
def test_header_breakers_are_refused(field, value):
    with pytest.raises(ValidationError) as exc:
        MessageRequest.model_validate({**BASE, field: value})
    assert exc.value.errors()[0]["loc"] == (field,)


def test_cross_field_rules_name_fields():
    req = MessageRequest.model_validate({"to": ["a@example.com"], "text": None})
    assert dict(cross_field_problems(req)) == {
        "text": "give text, html, or a template with text or html",
        "subject": "give a subject, or a template with a subject"}
    templated = MessageRequest.model_validate({"to": ["a@example.com"], "template": {
        "subject": "Hi {{ name }}", "text": "Hello {{ name }}", "variables": {"name": "Ada"}}})
    assert cross_field_problems(templated) == []


def test_route_by_account_pool_and_default():
    req = MessageRequest.model_validate({**BASE, "from": "solo"})
    assert route(req, ANY_KEY, DIRECTORY) == ("solo", None)
    req = MessageRequest.model_validate({**BASE, "from": "pool:team"})
    account_id, pool = route(req, ANY_KEY, DIRECTORY)
    assert pool == "team" and account_id in {"a1", "a2"}
    assert route(MessageRequest.model_validate(BASE), ANY_KEY, DIRECTORY) == ("a1", "default")


def test_route_respects_key_accounts():
    key = ApiKey("k", frozenset({"send"}), frozenset({"a2"}), "team")
    assert route(MessageRequest.model_validate(BASE), key, DIRECTORY) == ("a2", "team")
    for target in ("solo", "pool:default", "missing"):
        with pytest.raises(Problem) as exc:
            route(MessageRequest.model_validate({**BASE, "from": target}), key, DIRECTORY)
        assert exc.value.status == 422 and exc.value.errors[0]["field"] == "from"


def test_rendezvous_is_stable_and_moves_little():
    pool = [f"acct{i}" for i in range(5)]
    recipients = [f"user{i}@example.com" for i in range(2000)]
    before = {r: pick_account(pool, r) for r in recipients}
    assert before == {r: pick_account(list(reversed(pool)), r.upper()) for r in recipients}
    counts = {a: list(before.values()).count(a) for a in pool}
    assert min(counts.values()) > 2000 / 5 * 0.7  # spread evenly enough
    after = {r: pick_account(pool[:-1], r) for r in recipients}
    moved = [r for r in recipients if before[r] != after[r]]
    assert all(before[r] == "acct4" for r in moved)  # only the removed account's recipients


def test_message_ids():
    assert message_id_for("k", None) != message_id_for("k", None)
    assert message_id_for("k", "abc") == message_id_for("k", "abc")
    assert message_id_for("k", "abc") != message_id_for("other", "abc")
    assert message_id_for("k", "abc", 0) != message_id_for("k", "abc", 1)
    # One use of a key (its generation) keeps its ids; a use after expiry gets new ones.
    assert message_id_for("k", "abc", 0, "g1") == message_id_for("k", "abc", 0, "g1")
    assert message_id_for("k", "abc", 0, "g1") != message_id_for("k", "abc", 0, "g2")


def test_rates_and_retry_after():
    assert parse_rate("100/second").amount == 100
    assert parse_rate("6000 per minute").get_expiry() == 60
    assert parse_rate("3/2 seconds").get_expiry() == 2
    assert parse_rate("99999/second").amount == 99999
    for bad in ("fast", "0/second", "1/fortnight", "1/second; DROP", " 1/second",
                "100000/second"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    assert retry_after(reset_at=100.2, now=100.0) == 1
    assert retry_after(reset_at=159.01, now=100.0) == 60
    assert retry_after(reset_at=99.0, now=100.0) == 1  # never 0: "now" would be a busy loop
    assert bearer_token([(b"authorization", b"bearer  mbk_x.y ")]) == "mbk_x.y"
    assert bearer_token([(b"authorization", b"Basic abc")]) is None
    assert bearer_token([]) is None


def test_request_digest_ignores_key_order():
    assert request_digest({"a": 1, "b": [1, 2]}) == request_digest({"b": [1, 2], "a": 1})
    assert request_digest({"a": 1}) != request_digest({"a": 2})


def test_scopes():
    require_scope(ApiKey("k", frozenset({"admin"}), None, None), "send")
    with pytest.raises(Problem) as exc:
        require_scope(ApiKey("k", frozenset({"read"}), None, None), "send")
    assert exc.value.status == 403


def test_requested_event_encodes_with_the_contract(registry: Registry):
    req = MessageRequest.model_validate({
        **BASE, "reply_to": "Desk <desk@example.com>", "bcc": ["b@example.com"],
        "template": {"subject": "T", "text": "Hi {{ n }}", "variables": {"n": [1, 2]}},
        "actions": [{"id": "yes", "label": "Yes", "url": "https://example.com/y"}],
        "send_at": "2026-12-01T09:00:00+01:00", "metadata": {"k": "v"}, "tags": ["t"]})
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    event = requested_event(req, message_id="m1", account_id="a1", pool=None, key_id="k",
                            idempotency_key="i", now=now)
    name, decoded = registry.decode(registry.encode("email.requested", event))
    assert name == "mailbus.EmailRequested"
    assert decoded["reply_to"] == {"email": "desk@example.com", "name": "Desk"}
    assert decoded["template"]["variables_json"] == '{"n": [1, 2]}'
    assert decoded["send_at"] == datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    assert decoded["requested_at"] == now
    assert message_row(event)["recipients"] == 2


def test_api_key_tokens():
    key = apikeys.generate()
    key_id, secret = apikeys.parse(key.token)  # type: ignore[misc]
    assert key_id == key.key_id and apikeys.matches(secret, key.secret_sha256)
    tampered = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert not apikeys.matches(tampered, key.secret_sha256)
    for bad in ("", "mbk_", "mbk_short.x", key.token + "x", key.token.replace("mbk_", "mbx_")):
        assert apikeys.parse(bad) is None


def test_field_paths():
    assert field_path(("body", "to", 0, "email")) == "to[0].email"
    assert field_path(("body", "from_")) == "from"
    assert field_path(("body",)) == "body"


# Header-bound fields refuse what could end a header line or encode one: a client sends
# Unicode in JSON and never needs an RFC 2047 encoded word, which mail libraries decode
# (CR LF included) when they write the header.
HEADER_ATTACKS = {
    "q": "=?utf-8?q?hi=0D=0ABcc:_victim@evil.example?=",
    "b": "=?utf-8?b?aGkNCkJjYzogdmljdGltQGV2aWwuZXhhbXBsZQ==?=",
    "mixed case": "=?UtF-8?Q?hi=0d=0aBcc:_victim@evil.example?=",
    "glued": "hello=?utf-8?q?x=0ABcc:_victim@evil.example?=",
    "whitespace inside": "=?utf-8?q?x=0A Bcc:_victim@evil.example?=",
    "split across words": "=?utf-8?q?x=0D?= =?utf-8?q?=0ABcc:_victim@evil.example?=",
    "crlf": "hi\r\nBcc: victim@evil.example", "lf": "hi\nBcc: v@evil.example",
    "cr": "hi\rBcc: v@evil.example", "nul": "hi\0x", "u2028": "hi\u2028Bcc: v@evil.example",
    "u2029": "hi\u2029Bcc: v@evil.example", "nel": "hi\x85Bcc: v@evil.example",
    "vt": "hi\x0bx", "c1": "hi\x9bx",
}


def _placed(field: str, value: str) -> tuple[dict, str]:
    """A request with `value` in one header-bound field, and the field the 422 must name."""
    named = f"Ada {value} <ada@example.com>"
    placements: dict[str, tuple[dict, str]] = {
        "subject": ({**BASE, "subject": value}, "subject"),
        "template.subject": ({**BASE, "template": {"subject": value, "text": "x"}},
                             "template.subject"),
        "to (string)": ({**BASE, "to": [named]}, "to[0]"),
        "to.name": ({**BASE, "to": [{"email": "ada@example.com", "name": value}]},
                    "to[0].name"),
        "cc (string)": ({**BASE, "cc": [named]}, "cc[0]"),
        "bcc.name": ({**BASE, "bcc": [{"email": "b@example.com", "name": value}]},
                     "bcc[0].name"),
        "reply_to (string)": ({**BASE, "reply_to": named}, "reply_to"),
        "reply_to.name": ({**BASE, "reply_to": {"email": "r@example.com", "name": value}},
                          "reply_to.name"),
    }
    return placements[field]


HEADER_FIELDS = ["subject", "template.subject", "to (string)", "to.name", "cc (string)",
                 "bcc.name", "reply_to (string)", "reply_to.name"]


@pytest.mark.parametrize("field", HEADER_FIELDS)
@pytest.mark.parametrize("attack", list(HEADER_ATTACKS))
def test_header_bound_fields_refuse_line_breaks_and_encoded_words(field, attack):
    body, where = _placed(field, HEADER_ATTACKS[attack])
    with pytest.raises(ValidationError) as exc:
        MessageRequest.model_validate(body)
    paths = [field_path(e["loc"]) for e in exc.value.errors()]
    assert paths and all(p == where or p.startswith(where + ".") for p in paths), paths


@pytest.mark.parametrize("value", ["=?utf-8?q?x=0D=0ABcc:_v@evil.example?=@example.com",
                                   "x@example.com\r\nBcc: v@evil.example"])
def test_addresses_refuse_encoded_words_and_line_breaks(value):
    with pytest.raises(ValidationError) as exc:
        MessageRequest.model_validate({**BASE, "to": [{"email": value}]})
    assert field_path(exc.value.errors()[0]["loc"]) == "to[0].email"


@pytest.mark.parametrize("value", ["hi%0D%0ABcc:%20victim@evil.example", "2+2=?4",
                                   "=?utf-8?q?no end", "tab\there", "Grüße 日本"])
def test_text_that_only_looks_encoded_is_accepted_as_written(value):
    req = MessageRequest.model_validate({**BASE, "subject": value, "to": [
        {"email": "ada@example.com", "name": value}]})
    assert req.subject == value and req.to[0].name == value


def test_address_strings_parse_linearly_and_are_capped():
    # A lazy regex on "Name <addr>" was quadratic on a long run of spaces.
    for body in ({**BASE, "to": ["a" + " " * 1_000_000 + "<ada@example.com>"]},
                 {**BASE, "to": ["a" + " " * 1_000_000]}):
        with pytest.raises(ValidationError) as exc:
            MessageRequest.model_validate(body)
        assert "at most 512 characters" in str(exc.value)
    ok = MessageRequest.model_validate({**BASE, "to": ["  A  B  <ada@example.com>  ",
                                                       "<b@example.com>"]})
    assert [(a.name, a.email) for a in ok.to] == [("A  B", "ada@example.com"),
                                                  (None, "b@example.com")]
    with pytest.raises(ValidationError):
        MessageRequest.model_validate({**BASE, "to": ["x <y> <c@example.com>"]})
