"""The webhooks service's pure parts: signatures, payloads, retries, giving up, the URL guard."""

from __future__ import annotations

import ipaddress
import json
import uuid
from datetime import UTC, datetime, timedelta

import jsonschema
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from mailbus import webhook_signing as signing
from mailbus.codec import Registry
from mailbus.settings import REPO_ROOT
from mailbus.timeline import event_row
from mailbus.webhook_events import EVENT_TYPES, event_of, ping_event
from mailbus.webhook_guard import Policy, Refused, check_address, check_addresses, check_url
from mailbus.webhooks.rules import DEFAULT_SCHEDULE, after_attempt, should_disable, succeeded
from tests.support import projector as build

SCHEMA = json.loads((REPO_ROOT / "docs" / "webhooks.schema.json").read_text())
NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def test_deliveries_verify_with_the_standard_webhooks_library() -> None:
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    body = b'{"type":"message.sent","timestamp":"2026-03-01T09:00:00+00:00","data":{}}'
    event_id = str(uuid.uuid4())
    ts = int(datetime.now(UTC).timestamp())
    headers = signing.headers([secret], event_id, ts, body)
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    # Tampered body, another secret, or an old timestamp: refused.
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"sent", b"fail"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)
    stale = signing.headers([secret], event_id, ts - 3600, body)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, stale)


def test_during_a_rotation_both_secrets_verify() -> None:
    old, new = signing.new_secret(), signing.new_secret()
    body = b"{}"
    headers = signing.headers([new, old], "e1", int(datetime.now(UTC).timestamp()), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(body, headers)
    Webhook(old).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)


def _every_kind(message_id: str) -> list[tuple[str, dict]]:
    return [build.sent(message_id, NOW), build.failed(message_id, NOW, "ada@example.com"),
            build.delivered(message_id, NOW), build.bounced(message_id, NOW),
            build.responded(message_id, NOW), build.responded(message_id, NOW, "action",
                                                             action_id="yes"),
            build.confirmed(message_id, NOW), build.confirmed(message_id, NOW, "unconfirmed"),
            build.scheduled(message_id, NOW)]


def test_every_event_type_has_a_body_the_documented_schema_accepts(registry: Registry) -> None:
    message_id = str(uuid.uuid4())
    seen = set()
    for topic, record in _every_kind(message_id):
        # Through the wire format, as the service reads it.
        name, decoded = registry.decode(registry.encode(topic, record))
        event = event_of(event_row(name, decoded))
        assert event is not None
        doc = json.loads(event.body)
        jsonschema.validate(doc, SCHEMA, format_checker=jsonschema.FormatChecker())
        assert doc["type"] == event.event_type
        assert doc["data"]["event_id"] == record["event_id"] == event.event_id
        assert doc["data"]["message_id"] == message_id
        seen.add(event.event_type)
    assert seen == set(EVENT_TYPES)
    test = ping_event(str(uuid.uuid4()), str(uuid.uuid4()), NOW)
    jsonschema.validate(json.loads(test.body), SCHEMA)


def test_the_schema_refuses_what_the_documentation_does_not_promise() -> None:
    # A schema that accepts anything would prove nothing.
    bad = [{"type": "message.sent", "timestamp": "now", "data": {}},
           {"type": "message.sent", "timestamp": NOW.isoformat(),
            "data": {"event_id": "x", "message_id": "y", "account": None}},
           {"type": "message.opened", "timestamp": NOW.isoformat(), "data": {}},
           {"type": "message.delivered", "timestamp": NOW.isoformat(),
            "data": {"event_id": str(uuid.uuid4()), "message_id": str(uuid.uuid4()),
                     "account": "dev", "evidence": "smtp_final", "surprise": 1}}]
    for doc in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, SCHEMA, format_checker=jsonschema.FormatChecker())


def test_a_requested_event_is_no_webhook(registry: Registry) -> None:
    name, decoded = registry.decode(registry.encode(*build.requested(str(uuid.uuid4()), NOW)))
    assert event_of(event_row(name, decoded)) is None


def test_retries_follow_the_schedule_for_over_a_day_then_fail() -> None:
    assert sum(DEFAULT_SCHEDULE) > 86_400
    at = NOW
    for attempt in range(1, len(DEFAULT_SCHEDULE) + 1):
        outcome = after_attempt(attempt, False, at)
        assert outcome.state == "pending"
        assert outcome.next_attempt_at == at + timedelta(seconds=DEFAULT_SCHEDULE[attempt - 1])
        at = outcome.next_attempt_at
    assert at - NOW > timedelta(days=1)
    last = after_attempt(len(DEFAULT_SCHEDULE) + 1, False, at)
    assert (last.state, last.next_attempt_at) == ("failed", None)
    assert after_attempt(3, True, NOW).state == "delivered"


def test_only_2xx_is_success() -> None:
    assert [succeeded(c) for c in (200, 204, 299)] == [True] * 3
    assert [succeeded(c) for c in (None, 199, 301, 302, 400, 410, 500)] == [False] * 7


def test_an_endpoint_is_disabled_only_when_nothing_reached_it_since_the_failure_began() -> None:
    since = NOW - timedelta(days=1)
    assert should_disable(None, since)
    assert should_disable(since - timedelta(seconds=1), since)
    assert not should_disable(since + timedelta(hours=3), since)


STRICT = Policy()
LOCAL = Policy(allow_http=True, allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))


@pytest.mark.parametrize("url", [
    "http://example.com/hook",              # plain http, not allowed here
    "ftp://example.com/hook", "file:///etc/passwd", "gopher://example.com/",
    "https://user:pw@example.com/hook",      # credentials in the URL
    "https://example.com@10.0.0.1/hook",     # the userinfo trick
    "https:///hook", "https://", "https://exa mple.com/",
    "https://example.com/\r\nX-Injected: 1", "https://example.com:99999/",
    "https://" + "a" * 2050 + ".com/",
])
def test_urls_refused(url: str) -> None:
    with pytest.raises(Refused):
        check_url(url, STRICT)


def test_urls_accepted_keep_host_port_and_query() -> None:
    t = check_url("https://Hooks.Example.com:8443/in?x=1#frag", STRICT)
    assert (t.scheme, t.host, t.port, t.path) == ("https", "hooks.example.com", 8443, "/in?x=1")
    assert t.host_header == "hooks.example.com:8443"
    assert check_url("https://bücher.example/", STRICT).host == "xn--bcher-kva.example"
    assert check_url("http://127.0.0.1:8080", LOCAL).path == "/"


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1",                      # loopback
    "10.0.0.1", "172.16.5.4", "192.168.1.1", "fd00::1",    # private
    "169.254.169.254", "fe80::1",                          # link-local, cloud metadata
    "fd00:ec2::254", "100.100.100.200",                    # AWS v6 and Alibaba metadata
    "100.64.0.1",                                          # shared (CGNAT)
    "::ffff:127.0.0.1", "::ffff:10.1.2.3",                 # IPv4-mapped
    "0.0.0.0", "::", "224.0.0.1", "ff02::1", "240.0.0.1",  # noqa: S104 - unspecified, multicast, reserved
    "192.0.2.10", "198.18.0.1",                            # documentation, benchmarking
])
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(Refused):
        check_address(ipaddress.ip_address(address), STRICT)


def test_allowed_networks_open_only_what_they_name() -> None:
    check_address(ipaddress.ip_address("127.0.0.1"), LOCAL)
    check_address(ipaddress.ip_address("::ffff:127.0.0.1"), LOCAL)
    for address in ("10.0.0.1", "169.254.169.254", "::1"):
        with pytest.raises(Refused):
            check_address(ipaddress.ip_address(address), LOCAL)
    # The unspecified address reaches this host on Linux: never, even if listed.
    everything = Policy(allowed_networks=(ipaddress.ip_network("0.0.0.0/0"),))
    with pytest.raises(Refused):
        check_address(ipaddress.ip_address("0.0.0.0"), everything)  # noqa: S104


def test_a_name_is_refused_if_any_of_its_addresses_is() -> None:
    check_address(ipaddress.ip_address("93.184.216.34"), STRICT)
    assert check_addresses(["93.184.216.34"], STRICT) == "93.184.216.34"
    with pytest.raises(Refused):
        check_addresses(["93.184.216.34", "10.0.0.1"], STRICT)
    with pytest.raises(Refused):
        check_addresses([], STRICT)


def test_production_refuses_plain_http_and_a_schedule_shorter_than_a_day() -> None:
    from mailbus.errors import ConfigError
    from mailbus.ingest.settings import IngestSettings
    from mailbus.webhooks.settings import WebhooksSettings

    WebhooksSettings(env="production")  # the defaults pass
    with pytest.raises(ConfigError, match="MAILBUS_ALLOW_HTTP"):
        WebhooksSettings(env="production", allow_http=True)
    with pytest.raises(ConfigError, match="MAILBUS_RETRY_SCHEDULE_SECONDS"):
        WebhooksSettings(env="production", retry_schedule_seconds=[60, 3600])
    with pytest.raises(ConfigError, match="MAILBUS_WEBHOOKS_ALLOW_HTTP"):
        IngestSettings(env="production", webhooks_allow_http=True)
    WebhooksSettings(allow_http=True, retry_schedule_seconds=[0.1])  # local use may
