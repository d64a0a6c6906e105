"""The hooks service's pure parts: pages, source addresses, rate limits, event records."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest

from mailbus.codec import Registry
from mailbus.hooks import handlers, pages
from mailbus.hooks.guard import route_label
from mailbus.hooks.limiter import RateLimiter, limiter_key, retry_after, source_address
from mailbus.tokens import Claims, TokenExpired, TokenInvalid, UnknownKey

NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
EVIL = '"><script>alert(1)</script><img src=x onerror=alert(1)>'


def claims(action: str = "yes", recipient: str = "ada@example.org",
           url: str | None = None) -> Claims:
    return Claims("m-1", recipient, action, NOW + timedelta(days=1), url, "k1")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


@pytest.mark.parametrize("page", [
    pages.confirm_action("v1.k1.p.s", EVIL), pages.action_recorded(EVIL),
    pages.confirm_unsubscribe("v1.k1.p.s", EVIL), pages.unsubscribed(EVIL),
    pages.refused(400), pages.refused(410), pages.unavailable(10), pages.rate_limited("3"),
    pages.error(404), pages.error(413), pages.error(500),
])
def test_pages_are_accessible_and_escape_everything(page: pages.Page) -> None:
    found = tags(page.html)
    names = [t for t, _ in found]
    assert page.html.startswith("<!DOCTYPE html>") and ("html", {"lang": "en"}) in found
    assert names.count("title") == 1 and names.count("h1") == 1 and "main" in names
    assert not {"script", "img", "link", "iframe"} & set(names)
    for _, attrs in found:
        assert not any(k.startswith("on") for k in attrs)
    if "form" in names:
        form = dict(found)["form"]
        assert form["method"] == "post" and form["action"] == "v1.k1.p.s"
        assert names.count("button") == 1


def test_forms_post_back_one_click_and_label_the_choice() -> None:
    page = pages.confirm_unsubscribe("tok", "ada@example.org")
    assert ("input", {"type": "hidden", "name": "List-Unsubscribe", "value": "One-Click"}) in (
        tags(page.html))
    assert '<button type="submit">Confirm: yes</button>' in pages.confirm_action("t", "yes").html


def test_the_inline_style_is_the_only_one_and_its_hash_is_in_the_policy() -> None:
    html = pages.action_recorded("yes").html
    [style] = re.findall(r"<style>(.*?)</style>", html, re.S)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in pages.CSP
    assert pages.CSP.startswith("default-src 'none'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'")
    assert "unsafe" not in pages.CSP and "style=" not in html


def test_status_headers_and_pixel() -> None:
    unavailable = pages.unavailable(7)
    assert unavailable.headers == {"Retry-After": "7"} and unavailable.status == 503
    assert pages.rate_limited("2").status == 429
    assert pages.refused(410).status == 410 and "expired" in pages.refused(410).html
    assert pages.PIXEL.startswith(b"GIF89a") and len(pages.PIXEL) < 64


PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize("peer, xff, proxies, expected", [
    ("203.0.113.5", ["198.51.100.1"], [], "203.0.113.5"),  # no trusted proxy: the peer
    ("203.0.113.5", ["198.51.100.1"], PROXIES, "203.0.113.5"),  # peer untrusted: XFF ignored
    ("10.0.0.2", ["198.51.100.1"], PROXIES, "198.51.100.1"),
    ("10.0.0.2", ["1.1.1.1, 198.51.100.1, 10.0.0.9"], PROXIES, "198.51.100.1"),  # forged first hop
    ("10.0.0.2", ["1.1.1.1", "198.51.100.1"], PROXIES, "198.51.100.1"),  # repeated headers
    ("10.0.0.2", ["10.0.0.3, 10.0.0.4"], PROXIES, "10.0.0.3"),  # all trusted: the farthest
    ("10.0.0.2", ["garbage, 10.0.0.4"], PROXIES, "10.0.0.4"),  # unreadable: stop there
    ("10.0.0.2", [], PROXIES, "10.0.0.2"),
    ("::ffff:10.0.0.2", ["2001:db8::1"], PROXIES, "2001:db8::1"),
    (None, [], PROXIES, "unknown"),
])
def test_source_address(peer, xff, proxies, expected) -> None:
    assert source_address(peer, xff, proxies) == expected


def test_ipv6_clients_share_their_64() -> None:
    assert limiter_key("2001:db8:1:2:aaaa::1") == limiter_key("2001:db8:1:2:bbbb::2")
    assert limiter_key("2001:db8:1:3::1") != limiter_key("2001:db8:1:2::1")
    assert limiter_key("198.51.100.1") == "198.51.100.1"


def test_token_bucket_refills_and_memory_is_bounded() -> None:
    limiter = RateLimiter(per_minute=60, burst=2, max_keys=100)
    assert [limiter.take("a", 0.0) for _ in range(2)] == [0.0, 0.0]
    wait = limiter.take("a", 0.0)
    assert wait == pytest.approx(1.0) and retry_after(wait) == "1"
    assert limiter.take("b", 0.0) == 0.0  # buckets are per key
    assert limiter.take("a", 1.5) == 0.0  # refilled at one per second
    for i in range(1000):
        limiter.take(f"k{i}", 2.0)
    assert len(limiter) == 100
    assert retry_after(0.01) == "1" and retry_after(2.2) == "3"


def test_route_labels_are_bounded() -> None:
    assert route_label("/a/v1.k1.x.y") == "/a/{token}" and route_label("/o/x") == "/o/{token}"
    assert route_label("/healthz") == "/healthz" and route_label("/wp-admin.php") == "other"


def test_route_check_keeps_tokens_on_their_route() -> None:
    handlers.check_route(claims("yes"), "action")
    handlers.check_route(claims("unsubscribe"), "unsubscribe")
    handlers.check_route(claims("open"), "open")
    for action, route in [("unsubscribe", "action"), ("open", "action"), ("yes", "unsubscribe"),
                          ("yes", "open"), ("unsubscribe", "open")]:
        with pytest.raises(handlers.WrongRoute):
            handlers.check_route(claims(action), route)  # type: ignore[arg-type]


def test_refusals() -> None:
    assert handlers.refusal(TokenExpired("x")) == handlers.Refusal(410, "expired")
    assert handlers.refusal(UnknownKey("x")) == handlers.Refusal(400, "unknown_key")
    assert handlers.refusal(TokenInvalid("x")) == handlers.Refusal(400, "invalid")
    assert handlers.refusal(handlers.WrongRoute("x")).reason == "wrong_route"


def test_records_encode_and_ids_are_deterministic() -> None:
    registry = Registry.load()
    click = handlers.response(claims(), "action", now=NOW)
    again = handlers.response(claims(), "action", now=NOW + timedelta(hours=1))
    assert click.value["event_id"] == again.value["event_id"]
    assert click.value["event_id"] != handlers.response(claims("no"), "action",
                                                        now=NOW).value["event_id"]
    assert (click.topic, click.key, click.value["reliable"]) == ("email.responses", b"m-1", True)
    opened = handlers.response(claims("open"), "open", now=NOW)
    assert opened.value["reliable"] is False and opened.value["action_id"] is None
    suppression, response = handlers.unsubscribe(claims("unsubscribe", "Ada@Example.ORG"),
                                                 now=NOW)
    digest = hashlib.sha256(b"ada@example.org").hexdigest()
    assert (suppression.topic, suppression.key) == ("email.suppressions", digest.encode())
    assert suppression.value["address"] == "ada@example.org"
    assert (response.value["kind"], response.value["action_id"]) == ("unsubscribe", None)
    for record in (click, opened, suppression, response):
        _, decoded = registry.decode(registry.encode(record.topic, record.value), record.topic)
        assert decoded == record.value


@pytest.mark.parametrize(("url", "expected"), [
    ("https://example.com/thanks?x=1", "https://example.com"),
    ("https://Shop.Example.com:8443/a", "https://shop.example.com:8443"),
    ("http://caf\u00e9.example/x", "http://xn--caf-dma.example"),
    ("https://user:pw@example.com/", "https://example.com"),
    ("https://exa mple.com/", None),
    ("https://[::1]/", None),
])
def test_form_target_is_the_signed_urls_origin(url: str, expected: str | None) -> None:
    assert pages.origin(url) == expected


def test_only_an_action_with_a_url_widens_form_action() -> None:
    plain = pages.confirm_action("tok", "yes")
    assert plain.headers == {}
    page = pages.confirm_action("tok", "yes", "https://example.com/thanks")
    assert page.headers == {"Content-Security-Policy": pages.csp("https://example.com")}
    assert "form-action 'self' https://example.com;" in page.headers["Content-Security-Policy"]
    assert "form-action 'self';" in pages.CSP
