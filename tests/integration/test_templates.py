"""Stored templates through the API over a real socket, against the real broker and PostgreSQL:
the resource, a message naming one (resolved into its event), other keys, hostile input."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from mailbus.codec import Registry
from mailbus.ingest.settings import IngestSettings
from tests.integration.conftest import LiveServer
from tests.integration.test_ingest_api import MESSAGE, auth, requested
from tests.integration.test_ingest_fastpath import RouteOnly, shape

RECEIPT = {"name": "receipt", "subject": "Receipt {{ order }}",
           "text": "Thank you, {{ customer }}: order {{ order }}.",
           "html": "<p>Thank you, {{ customer }}</p>"}
BY_NAME = {k: v for k, v in MESSAGE.items() if k not in ("subject", "text", "html")}


@pytest.fixture
def ingest_settings(ingest_settings: IngestSettings) -> IngestSettings:
    # The caps' test writes 150 templates at once: no 429 on the way.
    return ingest_settings.model_copy(update={"rate_limit": "10000/second"})


def problem(r: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    if field is not None:
        assert [e["field"] for e in body["errors"]] == [field], body
    return body


def create(api: httpx.Client, token: str, **fields: Any) -> dict[str, Any]:
    r = api.post("/v1/templates", json=RECEIPT | fields, headers=auth(token))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def message(name: str, version: Any = None, **variables: Any) -> dict[str, Any]:
    template: dict[str, Any] = {"name": name, "variables": variables}
    if version is not None:
        template["version"] = version
    return BY_NAME | {"template": template}


def test_create_version_read_list_and_delete(api, make_key):
    _, token = make_key()
    first = create(api, token)
    assert (first["name"], first["version"], first["text"]) == ("receipt", 1, RECEIPT["text"])
    problem(api.post("/v1/templates", json=RECEIPT, headers=auth(token)), 422, "name")
    r = api.post("/v1/templates/receipt/versions", json={"text": "v2 {{ order }}"},
                 headers=auth(token))
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/templates/receipt/versions/2"
    assert (r.json()["version"], r.json()["subject"], r.json()["html"]) == (2, None, None)

    latest = api.get("/v1/templates/receipt", headers=auth(token)).json()
    assert (latest["version"], latest["text"]) == (2, "v2 {{ order }}")
    assert [v["version"] for v in latest["versions"]] == [1, 2]
    one = api.get("/v1/templates/receipt/versions/1", headers=auth(token)).json()
    assert {k: one[k] for k in ("subject", "text", "html")} == {
        k: RECEIPT[k] for k in ("subject", "text", "html")}
    problem(api.get("/v1/templates/receipt/versions/3", headers=auth(token)), 404)
    create(api, token, name="welcome")
    listed = api.get("/v1/templates", headers=auth(token)).json()["templates"]
    assert [(t["name"], t["latest_version"], t["versions"]) for t in listed] == [
        ("receipt", 2, 2), ("welcome", 1, 1)]

    assert api.delete("/v1/templates/receipt", headers=auth(token)).status_code == 204
    problem(api.get("/v1/templates/receipt", headers=auth(token)), 404)
    problem(api.get("/v1/templates/receipt/versions/1", headers=auth(token)), 404)
    problem(api.delete("/v1/templates/receipt", headers=auth(token)), 404)
    problem(api.post("/v1/templates/receipt/versions", json={"text": "x"},
                     headers=auth(token)), 404)
    # A name deleted and created again starts again at version 1.
    assert create(api, token)["version"] == 1
    assert [t["name"] for t in api.get("/v1/templates", headers=auth(token)).json()[
        "templates"]] == ["receipt", "welcome"]


def test_another_keys_template_is_absent_to_every_operation(api, make_key, ingest_settings,
                                                             admin_kafka):
    _, owner = make_key()
    _, other = make_key()
    _, admin = make_key(scopes=("admin",))
    create(api, owner)
    for token in (other, admin):  # an admin key too: templates are per key
        problem(api.get("/v1/templates/receipt", headers=auth(token)), 404)
        problem(api.get("/v1/templates/receipt/versions/1", headers=auth(token)), 404)
        problem(api.post("/v1/templates/receipt/versions", json={"text": "mine now"},
                         headers=auth(token)), 404)
        problem(api.delete("/v1/templates/receipt", headers=auth(token)), 404)
        assert api.get("/v1/templates", headers=auth(token)).json() == {"templates": []}
        problem(api.post("/v1/messages", json=message("receipt", customer="x", order=1),
                         headers=auth(token)), 422, "template.name")
        problem(api.post("/v1/messages", json=message("receipt", 1, customer="x", order=1),
                         headers=auth(token)), 422, "template.version")
    # The other key's template of the same name is its own, and the owner's is untouched.
    create(api, other, text="other {{ order }}")
    got = api.get("/v1/templates/receipt", headers=auth(owner)).json()
    assert (got["version"], got["text"]) == (1, RECEIPT["text"])
    assert requested(ingest_settings, admin_kafka) == []
    # A key without the send scope manages none.
    _, reader = make_key(scopes=("read",))
    problem(api.get("/v1/templates", headers=auth(reader)), 403)
    problem(api.post("/v1/templates", json=RECEIPT, headers=auth(reader)), 403)


@pytest.mark.parametrize(("fields", "field"), [
    ({"name": "../receipt"}, "name"),
    ({"name": "receipt'; DROP TABLE templates; --"}, "name"),
    ({"name": "Receipt"}, "name"),
    ({"name": "r" * 65}, "name"),
    ({"name": ""}, "name"),
    ({"subject": "Hi\r\nBcc: victim@example.com"}, "subject"),
    ({"subject": "=?utf-8?q?hi=0D=0ABcc:_x?="}, "subject"),
    ({"text": "x" * (512 * 1024 + 1), "html": None}, "text"),
    ({"text": "{% for x in y %}unclosed", "html": None}, "text"),
    ({"html": "{{ _mailbus_iter }}"}, "html"),  # the sandbox's own guard, by name
    ({"subject": "{{ 1 +"}, "subject"),
    ({"text": None, "html": None}, "body"),
    ({"owner": "someone"}, "owner"),
])
def test_bad_templates_are_422_naming_the_field(api, make_key, fields, field):
    _, token = make_key()
    problem(api.post("/v1/templates", json=RECEIPT | fields, headers=auth(token)), 422, field)
    assert api.get("/v1/templates", headers=auth(token)).json() == {"templates": []}


def test_a_template_that_takes_too_long_to_compile_is_refused_and_the_api_goes_on(
        api, make_key, ingest_settings, admin_kafka):
    from mailbus.ingest.templates import COMPILE_SECONDS

    _, token = make_key()
    # 512 KiB of expressions: seconds of the parser's CPU, in the compiling process.
    slow = {"name": "slow", "text": "{{ a }}" * (512 * 1024 // 7)}
    # Warm: the producer's first contact with the broker is not what is measured.
    assert api.post("/v1/messages", json=MESSAGE, headers=auth(token)).status_code == 202
    with httpx.Client(base_url=str(api.base_url), timeout=60) as other:
        posted = threading.Thread(target=lambda: answers.append(
            other.post("/v1/templates", json=slow, headers=auth(token))))
        answers: list[httpx.Response] = []
        posted.start()
        time.sleep(0.3)  # let the compile start
        # Meanwhile the API accepts messages, answered before the compile's answer.
        assert api.post("/v1/messages", json=MESSAGE, headers=auth(token)).status_code == 202
        assert posted.is_alive()
        posted.join(60)
    body = problem(answers[0], 422, "text")
    assert f"within {COMPILE_SECONDS:g} s" in body["errors"][0]["message"]
    # The next write gets a fresh process.
    create(api, token)


def test_paths_that_name_no_template_are_404(api, make_key):
    _, token = make_key()
    create(api, token)
    for path in ("/v1/templates/RECEIPT", "/v1/templates/..%2Freceipt",
                 "/v1/templates/receipt%27%20OR%20%271%27=%271", "/v1/templates/" + "r" * 200):
        assert api.get(path, headers=auth(token)).status_code in (404, 422), path
    problem(api.get("/v1/templates/receipt/versions/0", headers=auth(token)), 422, "version")
    problem(api.get("/v1/templates/receipt/versions/x", headers=auth(token)), 422, "version")


def test_caps_on_versions_and_templates(api, make_key):
    from mailbus.ingest.templates import MAX_TEMPLATES, MAX_VERSIONS

    _, token = make_key()
    create(api, token, text="1", html=None)
    for _ in range(MAX_VERSIONS - 1):
        assert api.post("/v1/templates/receipt/versions", json={"text": "again"},
                        headers=auth(token)).status_code == 201
    problem(api.post("/v1/templates/receipt/versions", json={"text": "one more"},
                     headers=auth(token)), 422, "name")
    for i in range(MAX_TEMPLATES - 1):
        create(api, token, name=f"t{i}", text="x", html=None)
    problem(api.post("/v1/templates", json=RECEIPT | {"name": "one-more"},
                     headers=auth(token)), 422, "name")
    # Deleting one makes room again.
    assert api.delete("/v1/templates/t0", headers=auth(token)).status_code == 204
    create(api, token, name="one-more")


def test_a_message_by_stored_template_carries_its_source_name_and_version(
        api, make_key, ingest_settings, admin_kafka, registry: Registry):
    _, token = make_key()
    create(api, token)
    r = api.post("/v1/templates/receipt/versions",
                 json={"subject": RECEIPT["subject"], "text": "v2"}, headers=auth(token))
    assert r.status_code == 201, r.text
    sent = [message("receipt", 1, customer="Ada", order=7), message("receipt", "latest"),
            message("receipt")]
    for body in sent:
        assert api.post("/v1/messages", json=body, headers=auth(token)).status_code == 202
    events = [registry.decode(m.value(), "mailbus.EmailRequested")[1]
              for m in requested(ingest_settings, admin_kafka, expect=3)]
    templates = [e["template"] for e in events]
    assert templates[0] == {
        "subject": RECEIPT["subject"], "text": RECEIPT["text"], "html": RECEIPT["html"],
        "variables_json": '{"customer": "Ada", "order": 7}', "name": "receipt", "version": 1}
    assert [(t["name"], t["version"], t["text"]) for t in templates[1:]] == [
        ("receipt", 2, "v2"), ("receipt", 2, "v2")]
    assert events[0]["subject"] is None and events[0]["text"] is None


def test_unknown_names_versions_and_mixed_forms_are_422(api, make_key, ingest_settings,
                                                         admin_kafka):
    _, token = make_key()
    create(api, token)
    cases = [(message("nothing"), "template.name"), (message("receipt", 2), "template.version"),
             (message("Bad Name"), "template.name"), (message("receipt", 0), "template.version"),
             (message("receipt", "newest"), "template.version"),
             (BY_NAME | {"template": {"name": "receipt", "text": "inline too"}}, "template"),
             (BY_NAME | {"template": {"version": 1, "text": "x"}}, "template")]
    for body, field in cases:
        problem(api.post("/v1/messages", json=body, headers=auth(token)), 422, field)
    batch = {"messages": [message("receipt"), message("nothing")]}
    r = api.post("/v1/messages/batch", json=batch, headers=auth(token))
    assert r.status_code == 202, r.text
    results = r.json()["results"]
    assert results[0]["status"] == "queued" and results[1]["status"] == "rejected"
    assert [e["field"] for e in results[1]["error"]["errors"]] == ["messages[1].template.name"]
    assert len(requested(ingest_settings, admin_kafka, expect=1)) == 1


def test_latest_after_delete_is_refused_even_with_lookups_kept(ingest_settings, make_key):
    settings = ingest_settings.model_copy(update={"key_cache_seconds": 30.0})
    _, token = make_key()
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as api:
        create(api, token)
        assert api.post("/v1/messages", json=message("receipt", customer="a", order=1),
                        headers=auth(token)).status_code == 202
        assert api.post("/v1/messages", json=message("receipt", 1, customer="a", order=1),
                        headers=auth(token)).status_code == 202
        assert api.delete("/v1/templates/receipt", headers=auth(token)).status_code == 204
        problem(api.post("/v1/messages", json=message("receipt"), headers=auth(token)), 422,
                "template.name")
        problem(api.post("/v1/messages", json=message("receipt", 1), headers=auth(token)), 422,
                "template.version")
        # A new version is seen at once by the process that wrote it.
        create(api, token, text="again")
        api.post("/v1/templates/receipt/versions", json={"text": "newer"}, headers=auth(token))
        assert api.get("/v1/templates/receipt", headers=auth(token)).json()["version"] == 2


def test_the_fast_path_and_the_route_answer_alike(ingest_settings: IngestSettings, make_key):
    settings = ingest_settings.model_copy(update={"rate_limit": "10000/second"})
    _, token = make_key()
    with LiveServer(settings) as fast, RouteOnly(settings) as slow, \
            httpx.Client(base_url=fast.url, timeout=30) as a, \
            httpx.Client(base_url=slow.url, timeout=30) as b:
        create(a, token)
        for body in (message("receipt", customer="x", order=1), message("receipt", 1),
                     message("nothing"), message("receipt", 9),
                     BY_NAME | {"template": {"name": "receipt", "html": "x"}}):
            answers = [c.post("/v1/messages", json=body, headers=auth(token)) for c in (a, b)]
            assert shape(answers[0]) == shape(answers[1]), body
