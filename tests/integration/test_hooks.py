"""The hooks service over a real socket, against the real broker with the hooks principal."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import REGISTRY

from mailbus.codec import Registry
from mailbus.hooks import pages
from mailbus.hooks.app import server_config
from mailbus.hooks.handlers import address_hash, event_id
from mailbus.hooks.pages import CSP
from mailbus.hooks.settings import HooksSettings
from mailbus.tokens import Keyring, LinkBuilder, sign
from tests.support.kafka import read_all
from tests.support.projector import eventually
from tests.unit.test_tokens import forge

MID = "0b6f3c1e-8a47-4f5e-9d0c-2f1a7e6b5c4d"
ADA = "Ada@Example.org"
SECURITY = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


class HooksServer:
    """The hooks app served by uvicorn on a free port, in a thread."""

    def __init__(self, settings: HooksSettings, keyring: Keyring):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(server_config(settings, keyring))
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        end = time.monotonic() + 30.0
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("hooks app did not start")
            time.sleep(0.05)
        self.client = httpx.Client(base_url=self.url, timeout=30, follow_redirects=False)
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring.generate_file(tmp_path / "link-keys.json")


@pytest.fixture
def links(keyring: Keyring) -> LinkBuilder:
    return LinkBuilder(keyring, "http://hooks.test", timedelta(days=7))


def settings_for(namespace: str, tmp_path: Path, **overrides: Any) -> HooksSettings:
    return HooksSettings(link_keys_file=tmp_path / "link-keys.json", metrics_port=0,
                         kafka={"topic_prefix": namespace, "delivery_timeout_ms": 5000},
                         **overrides)


@pytest.fixture
def hooks(namespace: str, tmp_path: Path, keyring: Keyring) -> Iterator[httpx.Client]:
    with HooksServer(settings_for(namespace, tmp_path), keyring) as client:
        yield client


def path_of(url: str) -> str:
    return url.removeprefix("http://hooks.test")


def now() -> datetime:
    return datetime.now(UTC)


def records(admin_kafka: dict[str, Any], namespace: str, topic: str, registry: Registry
            ) -> list[tuple[bytes, dict[str, Any]]]:
    """Everything in the topic so far (call after an acknowledged POST: it is all there)."""
    return [(m.key(), registry.decode(m.value(), topic)[1])
            for m in read_all(admin_kafka, namespace + topic)]


def assert_secure(response: httpx.Response) -> None:
    for name, value in SECURITY.items():
        assert response.headers.get(name) == value, (name, response.status_code)
    assert "set-cookie" not in response.headers


def test_get_records_nothing_post_records_the_click(hooks, links, namespace, admin_kafka,
                                                      registry):
    path = path_of(links.action_url(MID, ADA, "yes", now=now()))
    page = hooks.get(path, params={"next": "https://evil.test/"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert_secure(page)
    html = page.text
    assert '<html lang="en">' in html and "<title>" in html
    assert '<form method="post"' in html and "<button" in html and "yes" in html
    assert "<script" not in html.lower()

    # A GET of another message's link, then the click: only the click is in Kafka.
    hooks.get(path_of(links.action_url("other-message", ADA, "no", now=now())))
    clicked = hooks.post(path)
    assert clicked.status_code == 200 and "recorded" in clicked.text
    assert_secure(clicked)
    [(key, event)] = records(admin_kafka, namespace, "email.responses", registry)
    assert key == MID.encode()
    assert event["event_id"] == event_id("response", "action", MID, ADA.lower(), "yes")
    assert event["occurred_at"].tzinfo is not None
    event.pop("occurred_at")
    assert event == {
        "event_id": event["event_id"], "message_id": MID, "account_id": None, "kind": "action",
        "recipient": "ada@example.org", "action_id": "yes", "subject": None, "text": None,
        "reliable": True, "source": "hooks",
    }


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_double_click_is_one_event_id(hooks, links, namespace, admin_kafka, registry):
    path = path_of(links.action_url(MID, ADA, "yes", now=now()))
    before = metric("mailbus_hooks_responses_recorded_total", kind="action")
    assert hooks.post(path).status_code == 200
    assert hooks.post(path).status_code == 200
    assert metric("mailbus_hooks_responses_recorded_total", kind="action") == before + 2
    got = records(admin_kafka, namespace, "email.responses", registry)
    assert len(got) == 2 and got[0][1]["event_id"] == got[1][1]["event_id"]


def test_signed_redirect_is_followed_and_nothing_else(hooks, links, namespace, admin_kafka,
                                                        registry):
    target = "https://example.com/thanks?order=42&x=%2F"
    signed = path_of(links.action_url(MID, ADA, "yes", target, now=now()))
    # Browsers check form-action on the redirect after the button's POST: the page
    # names the signed URL's origin, and only it.
    page = hooks.get(signed)
    assert page.headers["content-security-policy"] == pages.csp("https://example.com")
    assert {k: v for k, v in page.headers.items() if k in SECURITY and
            k != "content-security-policy"} == {k: v for k, v in SECURITY.items()
                                                 if k != "content-security-policy"}
    r = hooks.post(signed + "?next=https://evil.test/", data={"next": "https://evil.test/"})
    assert r.status_code == 303 and r.headers["location"] == target
    assert_secure(r)
    iri = path_of(links.action_url(MID, ADA, "yes", "https://example.com/caf\u00e9?q=1",
                                   now=now()))
    assert hooks.post(iri).headers["location"] == "https://example.com/caf%C3%A9?q=1"
    plain = path_of(links.action_url(MID, ADA, "no", now=now()))
    r = hooks.post(plain + "?next=https://evil.test/&url=https://evil.test/",
                   data={"next": "https://evil.test/"})
    assert r.status_code == 200 and "location" not in r.headers
    assert len(records(admin_kafka, namespace, "email.responses", registry)) == 3


def test_a_link_of_a_message_to_several_recipients_records_no_recipient(
        hooks, links, namespace, admin_kafka, registry):
    # Whoever among them clicks, the response is about the message, once per action.
    path = path_of(links.action_url(MID, None, "yes", now=now()))
    assert "yes" in hooks.get(path).text
    assert hooks.post(path).status_code == 200
    assert hooks.post(path).status_code == 200
    got = [e for _, e in records(admin_kafka, namespace, "email.responses", registry)]
    assert [(e["kind"], e["action_id"], e["recipient"]) for e in got] == [
        ("action", "yes", None)] * 2
    assert got[0]["event_id"] == got[1]["event_id"] == event_id("response", "action", MID, "",
                                                                "yes")
    assert records(admin_kafka, namespace, "email.suppressions", registry) == []


def _tampered(token: str) -> str:
    kid_and_payload, _, sig = token.rpartition(".")
    return f"{kid_and_payload}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"


def test_refused_tokens_answer_a_page_and_record_nothing(hooks, keyring, links, tmp_path,
                                                         namespace, admin_kafka, registry):
    good = path_of(links.action_url(MID, ADA, "yes", "https://example.com/", now=now()))
    expired = sign(keyring, message_id=MID, recipient=ADA, action="yes",
                   url="https://example.com/", expires_at=now() - timedelta(seconds=1))
    stranger = Keyring.generate_file(tmp_path / "other.json", kid="k2")
    unknown = sign(stranger, message_id=MID, recipient=ADA, action="yes",
                   expires_at=now() + timedelta(days=1))
    unsubscribe = path_of(links.unsubscribe_url(MID, ADA, now=now())).removeprefix("/u/")
    # Signed with the real key, but an unsubscribe must say whom it suppresses.
    nobody = forge(keyring.keys[keyring.current], keyring.current,
                   {"m": MID, "a": "unsubscribe", "e": int(now().timestamp()) + 3600})
    cases = {
        "/a/" + _tampered(good.removeprefix("/a/")): 400,
        "/a/" + expired: 410,
        "/a/" + unknown: 400,
        "/a/" + "v1.k1." + "A" * 5000 + ".x": 400,
        "/a/not-a-token": 400,
        "/a/" + unsubscribe: 400,  # a genuine token, but made for /u/
        "/u/" + nobody: 400,
    }
    expired_before = metric("mailbus_hooks_tokens_refused_total", reason="expired")
    for path, status in cases.items():
        for method in ("GET", "POST"):
            r = hooks.request(method, path)
            assert r.status_code == status, (method, path[:40], r.status_code)
            assert "location" not in r.headers and "<h1>" in r.text
            assert_secure(r)
    assert metric("mailbus_hooks_tokens_refused_total", reason="expired") == expired_before + 2
    # The sentinel click is acknowledged, so everything produced before it is readable.
    assert hooks.post(path_of(links.action_url("sentinel", ADA, "yes", now=now()))
                      ).status_code == 200
    got = records(admin_kafka, namespace, "email.responses", registry)
    assert [e["message_id"] for _, e in got] == ["sentinel"]


def test_one_click_unsubscribe(hooks, links, namespace, admin_kafka, registry):
    path = path_of(links.unsubscribe_url(MID, ADA, now=now()))
    page = hooks.get(path)
    assert page.status_code == 200 and "ada@example.org" in page.text
    assert 'name="List-Unsubscribe" value="One-Click"' in page.text
    assert_secure(page)
    assert records(admin_kafka, namespace, "email.suppressions", registry) == []

    r = hooks.post(path, content=b"List-Unsubscribe=One-Click",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and "location" not in r.headers
    assert "unsubscribed" in r.text
    assert_secure(r)

    digest = address_hash("ada@example.org")
    [(key, suppression)] = records(admin_kafka, namespace, "email.suppressions", registry)
    assert key == digest.encode()
    suppression.pop("occurred_at")
    assert suppression == {
        "event_id": event_id("suppression", MID, "ada@example.org"), "message_id": MID,
        "address": "ada@example.org", "address_hash": digest, "reason": "unsubscribe",
        "scope": None, "active": True,
    }
    [(key, response)] = records(admin_kafka, namespace, "email.responses", registry)
    assert key == MID.encode()
    assert (response["kind"], response["recipient"], response["action_id"],
            response["reliable"], response["source"]) == (
        "unsubscribe", "ada@example.org", None, True, "hooks")
    assert response["event_id"] == event_id("response", "unsubscribe", MID, "ada@example.org",
                                             "unsubscribe")


def test_errors_and_health_carry_the_security_headers(hooks):
    for r in (hooks.get("/"), hooks.get("/nope"), hooks.put("/a/x"), hooks.get("/healthz"),
              hooks.post("/a/x", content=b"x" * 10_000), hooks.get("/o/x")):
        assert_secure(r)
    assert hooks.get("/nope").status_code == 404
    assert hooks.put("/a/x").status_code == 405
    assert hooks.post("/a/x", content=b"x" * 10_000).status_code == 413
    assert hooks.get("/o/x").status_code == 404  # open tracking is off by default
    assert hooks.get("/healthz").json() == {"status": "ok"}
    # Ready once its producer reached the broker (its first contact may outlast
    # the probe's 2 s on a busy machine); a broker never reached never gets there.
    def answered() -> httpx.Response:
        r = hooks.get("/readyz")
        assert r.status_code == 200, r.text
        return r

    ready = eventually(answered, timeout=30)
    assert ready.status_code == 200 and ready.json()["kafka"] is True


def test_rate_limit_answers_429(namespace, tmp_path, keyring, links):
    settings = settings_for(namespace, tmp_path, rate_per_minute=1, rate_burst=3)
    path = path_of(links.action_url(MID, ADA, "yes", now=now()))
    with HooksServer(settings, keyring) as client:
        statuses = [client.get(path).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        limited = client.get(path)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert_secure(limited)
        assert client.get("/healthz").status_code == 200  # probes are not limited


def test_trusted_proxy_forwarded_address_is_the_limited_one(namespace, tmp_path, keyring,
                                                              links):
    settings = settings_for(namespace, tmp_path, rate_per_minute=1, rate_burst=1,
                            trusted_proxies=["127.0.0.0/8"])
    path = path_of(links.action_url(MID, ADA, "yes", now=now()))
    with HooksServer(settings, keyring) as client:
        def get(client_ip: str) -> int:
            # A client-supplied first hop, then what the proxy appended.
            xff = f"203.0.113.99, {client_ip}"
            return client.get(path, headers={"X-Forwarded-For": xff}).status_code
        assert get("198.51.100.1") == 200
        assert get("198.51.100.1") == 429
        assert get("198.51.100.2") == 200


def test_open_pixel_records_an_unreliable_open(namespace, tmp_path, keyring, admin_kafka,
                                               registry):
    links = LinkBuilder(keyring, "http://hooks.test", timedelta(days=7), open_tracking=True)
    path = path_of(links.open_url(MID, ADA, now=now()))
    with HooksServer(settings_for(namespace, tmp_path, open_tracking=True), keyring) as client:
        for _ in range(2):
            r = client.get(path)
            assert r.status_code == 200 and r.headers["content-type"] == "image/gif"
            assert r.content.startswith(b"GIF89a") and r.headers["cache-control"] == "no-store"
        action = path_of(links.action_url(MID, ADA, "yes", now=now())).removeprefix("/a/")
        assert client.get("/o/" + action).status_code == 400  # an action token is no pixel
    got = records(admin_kafka, namespace, "email.responses", registry)
    assert len(got) == 2 and got[0][1]["event_id"] == got[1][1]["event_id"]
    event = got[0][1]
    assert (event["kind"], event["reliable"], event["recipient"], event["action_id"]) == (
        "open", False, "ada@example.org", None)


def test_kafka_down_is_503_with_retry_after(tmp_path, keyring, links):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    settings = HooksSettings(link_keys_file=tmp_path / "link-keys.json", metrics_port=0,
                             kafka={"bootstrap_servers": f"127.0.0.1:{port}",
                                    "delivery_timeout_ms": 1000})
    with HooksServer(settings, keyring) as client:
        for path in (path_of(links.action_url(MID, ADA, "yes", "https://example.com/",
                                              now=now())),
                     path_of(links.unsubscribe_url(MID, ADA, now=now()))):
            r = client.post(path)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert "location" not in r.headers and "try again" in r.text.lower()
            assert_secure(r)
        assert client.get("/readyz").status_code == 503


def _answer_head(url: str, request: bytes) -> bytes:
    """Send a request head (and no body at all), read the answer's head.

    The head declares a body that never comes: a server that waited for it
    would not answer, and the socket timeout fails the test.
    """
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_oversized_and_rate_limited_posts_are_refused_before_their_body_is_read(
        namespace, tmp_path, keyring, links):
    settings = settings_for(namespace, tmp_path, rate_per_minute=1, rate_burst=1)
    path = path_of(links.unsubscribe_url(MID, ADA, now=now()))
    head = (f"POST {path} HTTP/1.1\r\nHost: hooks.test\r\n"
            f"Content-Length: {1024 * 1024}\r\n\r\n").encode()
    server = HooksServer(settings, keyring)
    with server:
        assert _answer_head(server.url, head).startswith(b"HTTP/1.1 413 ")
        # The burst is spent now: the next request is refused before its size is looked at.
        answer = _answer_head(server.url, head)
        assert answer.startswith(b"HTTP/1.1 429 ")
        assert b"\r\nretry-after: " in answer.lower()
