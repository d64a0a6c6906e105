"""Stored templates without I/O: the compile check, the request's template forms, the
timeline's template entry, and the lookups a worker keeps (with a fake connection)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from mailbus.ingest.handlers import ApiKey, request_digest, requested_event
from mailbus.ingest.models import MessageRequest
from mailbus.ingest.problems import Problem
from mailbus.ingest.templates import CACHE_ENTRIES, TemplateStore, resolved, resolved_batch
from mailbus.templates import TemplateFailed, check, render
from mailbus.timeline import event_row

KEY = ApiKey("k1", frozenset({"send"}), None, None)
NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)


# The compile check: what render() would refuse before running any template code.

@pytest.mark.parametrize(("part", "source", "reason"), [
    ("text", "{% for x in y %}open", "syntax error"),
    ("subject", "{{ 1 +", "syntax error"),
    ("html", "{{ _mailbus_iter }}", "reserved"),
    ("text", "{% set _mailbus_concat = 1 %}", "reserved"),
    ("text", "x" * (512 * 1024 + 1), "longer than"),
    ("text", "{% extends 'base' %}{% block b %}{% endblock %}{% endblock %}", "syntax error"),
    ("text", "{{" * 2000 + "}}" * 2000, ""),  # deep nesting: refused, whatever the reason
])
def test_check_refuses_what_does_not_compile_naming_the_part(part, source, reason):
    with pytest.raises(TemplateFailed) as caught:
        check({part: source})
    assert str(caught.value).startswith(f"{part}: ") and reason in str(caught.value)


def test_check_takes_what_renders_and_runs_nothing():
    template = {"subject": "Hi {{ name }}", "text": "{% for i in items %}{{ i }}{% endfor %}",
                "html": "<p>{{ name }}</p>"}
    check(template)  # no variables given: compiling alone needs none
    assert render(template, '{"name": "Ada", "items": [1, 2]}').text == "12"
    # An escape attempt compiles (attributes are checked as the template runs) and the
    # sandbox refuses it when rendered: the sender fails that message.
    escape = {"text": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}
    check(escape)
    with pytest.raises(TemplateFailed, match="sandbox"):
        render(escape, "{}")


# The request's two forms of a template.

BASE = {"to": ["ada@example.com"]}


def test_a_stored_template_is_named_with_a_version_or_latest():
    for given, version in (({"name": "receipt"}, None), ({"name": "receipt", "version": 3}, 3),
                           ({"name": "receipt", "version": "latest"}, "latest")):
        req = MessageRequest.model_validate(BASE | {"template": given})
        assert req.template is not None
        assert (req.template.name, req.template.version) == ("receipt", version)


@pytest.mark.parametrize(("template", "loc"), [
    ({"name": "receipt", "text": "inline too"}, ("template",)),
    ({"version": 2, "text": "x"}, ("template",)),
    ({"name": "Receipt"}, ("template", "name")),
    ({"name": "a" * 65}, ("template", "name")),
    ({"name": "x\r\nBcc: y"}, ("template", "name")),
    ({"name": "receipt", "version": 0}, ("template", "version")),
    ({"name": "receipt", "version": True}, ("template", "version")),
    ({"name": "receipt", "version": "3"}, ("template", "version")),
    ({"name": "receipt", "version": 2**31}, ("template", "version")),
    ({"name": "receipt", "version": [1]}, ("template", "version")),
])
def test_bad_template_forms_name_one_field(template, loc):
    with pytest.raises(ValidationError) as caught:
        MessageRequest.model_validate(BASE | {"template": template})
    assert [e["loc"] for e in caught.value.errors()] == [loc]


def test_an_inline_template_dumps_and_digests_as_before():
    body = BASE | {"template": {"subject": "s", "text": "t", "variables": {"a": 1}}}
    dumped = MessageRequest.model_validate(body).model_dump(mode="json", by_alias=True)
    assert dumped["template"] == {"subject": "s", "text": "t", "html": None, "variables": {"a": 1}}
    stored = MessageRequest.model_validate(BASE | {"template": {"name": "a", "version": 1}})
    other = MessageRequest.model_validate(BASE | {"template": {"name": "a", "version": 2}})
    assert request_digest(stored.model_dump(mode="json", by_alias=True)) != request_digest(
        other.model_dump(mode="json", by_alias=True))


# Resolving, and the event and timeline it gives.

class FakeCursor:
    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    async def fetchall(self) -> list[dict[str, Any]]:
        return self.rows


class FakeConnection:
    """Answers `find` from a dict of (key, name) -> {version: (subject, text, html)}."""

    def __init__(self, db: dict[tuple[str, str], dict[int, tuple[Any, ...]]]):
        self.db, self.queries = db, 0

    def __call__(self) -> FakeConnection:
        return self

    async def __aenter__(self) -> FakeConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def execute(self, _sql: str, params: dict[str, Any]) -> FakeCursor:
        self.queries += 1
        rows = []
        lookups: Sequence[Any] = list(zip(params["key_ids"], params["names"], params["versions"],
                                          strict=True))
        for i, (key_id, name, version) in enumerate(lookups, start=1):
            versions = self.db.get((key_id, name), {})
            number = max(versions, default=None) if version is None else version
            if number in versions:
                subject, text, html = versions[number]
                rows.append({"i": i, "name": name, "version": number, "subject": subject,
                             "text": text, "html": html, "created_at": NOW})
        return FakeCursor(rows)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(db: FakeConnection, ttl: float, clock: Clock | None = None) -> TemplateStore:
    return TemplateStore(db, "ns.", ttl, clock or Clock())


def test_resolved_fills_the_source_and_the_event_and_timeline_name_the_version():
    db = FakeConnection({("k1", "receipt"): {1: ("S {{ n }}", "T", None), 2: ("S2", "T2", None)}})
    req = MessageRequest.model_validate(BASE | {"template": {"name": "receipt",
                                                             "variables": {"n": 1}}})
    filled = asyncio.run(resolved(store(db, 0), KEY, req))
    event = requested_event(filled, message_id="00000000-0000-4000-8000-000000000001",
                            account_id="dev", pool=None, key_id="k1", idempotency_key=None,
                            now=NOW)
    assert event["template"] == {"subject": "S2", "text": "T2", "html": None,
                                 "variables_json": '{"n": 1}', "name": "receipt", "version": 2}
    row = event_row("mailbus.EmailRequested", event | {"event_id": event["event_id"]})
    assert row.detail["template"] == {"name": "receipt", "version": 2}
    inline = requested_event(MessageRequest.model_validate(BASE | {"template": {"text": "x"}}),
                             message_id=event["message_id"], account_id="dev", pool=None,
                             key_id="k1", idempotency_key=None, now=NOW)
    assert (inline["template"]["name"], inline["template"]["version"]) == (None, None)
    assert "template" not in event_row("mailbus.EmailRequested", inline).detail


@pytest.mark.parametrize(("template", "field"), [
    ({"name": "nothing"}, "messages[3].template.name"),
    ({"name": "receipt", "version": 5}, "messages[3].template.version"),
    ({"name": "theirs"}, "messages[3].template.name"),  # another key's
])
def test_unknown_templates_are_422_naming_the_field(template, field):
    db = FakeConnection({("k1", "receipt"): {1: (None, "T", None)},
                         ("k2", "theirs"): {1: (None, "T", None)}})
    req = MessageRequest.model_validate(BASE | {"template": template})
    with pytest.raises(Problem) as caught:
        asyncio.run(resolved(store(db, 0), KEY, req, "messages[3]."))
    assert caught.value.status == 422 and [e["field"] for e in caught.value.errors] == [field]


def test_lookups_are_kept_for_the_ttl_and_forgotten_on_a_write():
    db = FakeConnection({("k1", "receipt"): {1: (None, "T1", None)}})
    clock = Clock()
    kept = store(db, 5.0, clock)

    async def find() -> Any:
        return await kept.find("k1", "receipt", None)

    assert asyncio.run(find()).text == "T1" and db.queries == 1
    db.db[("k1", "receipt")][2] = (None, "T2", None)
    assert asyncio.run(find()).text == "T1" and db.queries == 1  # within the TTL
    clock.now = 5.0
    assert asyncio.run(find()).text == "T2" and db.queries == 2
    del db.db[("k1", "receipt")]
    kept.forget("k1", "receipt")  # this process deleted it: at once
    assert asyncio.run(find()) is None and db.queries == 3
    assert asyncio.run(find()) is None and db.queries == 4  # an absence is not kept


def test_with_no_ttl_every_lookup_asks_and_the_kept_answers_are_bounded():
    db = FakeConnection({("k1", f"t{i}"): {1: (None, "T", None)}
                         for i in range(CACHE_ENTRIES + 5)})
    uncached = store(db, 0)
    for _ in range(3):
        asyncio.run(uncached.find("k1", "t0", 1))
    assert db.queries == 3
    kept = store(db, 60.0)

    async def all_of_them() -> None:
        for i in range(CACHE_ENTRIES + 5):
            await kept.find("k1", f"t{i}", 1)

    asyncio.run(all_of_them())
    assert len(kept._kept) == CACHE_ENTRIES


def test_requests_that_arrive_together_share_one_lookup():
    db = FakeConnection({("k1", "a"): {1: (None, "A", None)}, ("k2", "b"): {3: (None, "B", None)}})
    kept = store(db, 0)

    async def together() -> list[Any]:
        return await asyncio.gather(*(kept.find(k, n, v) for k, n, v in [
            ("k1", "a", None), ("k2", "b", 3), ("k1", "b", None), ("k2", "a", None),
            ("k1", "a", 1), ("k2", "b", 2)]))

    found = asyncio.run(together())
    assert [f and f.text for f in found] == ["A", "B", None, None, "A", None]
    # Two runs start at once (LOOKUPS_IN_FLIGHT), the four others wait and go together.
    assert db.queries == 3


def test_a_batchs_stored_templates_are_looked_up_together():
    db = FakeConnection({("k1", "receipt"): {1: (None, "T", None)}})
    items = [BASE | {"template": {"name": "receipt"}} for _ in range(200)]
    items[5] = BASE | {"template": {"name": "nothing"}}
    items[6] = {"to": []}
    items[7] = BASE | {"text": "inline"}
    out = asyncio.run(resolved_batch(store(db, 0), KEY, items))
    assert db.queries <= 3  # two runs in flight, everything else in the third
    assert isinstance(out[5], Problem) and [e["field"] for e in out[5].errors] == [
        "messages[5].template.name"]
    assert isinstance(out[6], ValidationError)
    assert isinstance(out[7], MessageRequest) and out[7].text == "inline"
    assert all(isinstance(r, MessageRequest) and r.template and r.template.text == "T"
               and r.template.version == 1 for i, r in enumerate(out) if i not in (5, 6, 7))
