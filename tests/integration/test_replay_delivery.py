"""A replay never mails real people: replayed requests go to the replay sink, and replays
of messages this database already sent are sent again in their own namespace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from mailbus import replay
from mailbus.codec import Registry
from mailbus.provision import provision
from mailbus.sender.settings import SenderSettings
from tests.support.kafka import drop_namespace, new_prefix, read_all
from tests.support.sender import SenderThread, request, smtp_account
from tests.support.smtp import SmtpServer

pytestmark = pytest.mark.integration


@pytest.fixture
def real() -> Iterator[SmtpServer]:
    """The account's own server: what a real account's relay would be."""
    with SmtpServer() as server:
        yield server


@pytest.fixture
def sink() -> Iterator[SmtpServer]:
    """The replay sink (the development SMTP server, in the local stack)."""
    with SmtpServer() as server:
        yield server


def produce(config: dict[str, Any], prefix: str, registry: Registry,
            events: list[dict[str, Any]], *, replayed: bool) -> None:
    producer = Producer({**config, "enable.idempotence": True, "partitioner": "murmur2_random"})
    for i, event in enumerate(events):
        headers = [(replay.SOURCE_HEADER, f"email.requested/0/{i}".encode())] if replayed else []
        producer.produce(prefix + "email.requested", registry.encode("email.requested", event),
                         key=event["account_id"].encode(), headers=headers)
    assert producer.flush(30) == 0


def settings(prefix: str, tmp_path: Path, real: SmtpServer, sink: SmtpServer,
             **overrides: Any) -> SenderSettings:
    path = tmp_path / "accounts.toml"
    path.write_text(smtp_account("dev", real.port))
    return SenderSettings(accounts_file=path, kafka={"topic_prefix": prefix}, metrics_port=0,
                          poll_seconds=0.2, link_keys_file=tmp_path / "link-keys.json",
                          replay_sink=f"127.0.0.1:{sink.port}", **overrides)


def sent(config: dict[str, Any], prefix: str, registry: Registry, expect: int
         ) -> list[dict[str, Any]]:
    return [registry.decode(m.value())[1]
            for m in read_all(config, prefix + "email.sent", expect=expect, timeout=60)]


def ids(server: SmtpServer) -> set[str]:
    return {m["X-Mailbus-Message-Id"] for m in server.handler.messages()}


def test_replayed_requests_go_to_the_sink_and_the_rest_to_the_account(
        namespace, admin_kafka, registry, tmp_path, real, sink):
    live = [request(to=f"live{i}@example.com") for i in range(3)]
    replayed = [request(to=f"replayed{i}@example.com") for i in range(4)]
    with SenderThread(settings(namespace, tmp_path, real, sink)):
        produce(admin_kafka, namespace, registry, live, replayed=False)
        produce(admin_kafka, namespace, registry, replayed, replayed=True)
        events = sent(admin_kafka, namespace, registry, expect=7)
    assert ids(real) == {e["message_id"] for e in live}
    assert ids(sink) == {e["message_id"] for e in replayed}
    # The sink is the final hop: a replay confirms without any real mailbox.
    delivered = read_all(admin_kafka, namespace + "email.delivered", expect=7)
    assert len(delivered) == 7 and len(events) == 7


def test_a_replay_in_another_namespace_sends_messages_this_database_already_sent(
        namespace, admin, admin_kafka, registry, tmp_path, real, sink):
    messages = [request(to=f"p{i}@example.com") for i in range(3)]
    with SenderThread(settings(namespace, tmp_path, real, sink)):
        produce(admin_kafka, namespace, registry, messages, replayed=False)
        sent(admin_kafka, namespace, registry, expect=3)

    other = new_prefix()
    try:
        provision(admin_kafka, admin.var_dir / "secrets", other, users=False)
        with SenderThread(settings(other, tmp_path, real, sink)):
            produce(admin_kafka, other, registry, messages, replayed=True)
            again = sent(admin_kafka, other, registry, expect=3)
    finally:
        drop_namespace(admin_kafka, other)
    assert {e["message_id"] for e in again} == {e["message_id"] for e in messages}
    assert ids(real) == ids(sink) == {e["message_id"] for e in messages}
    assert len(real.handler.received) == len(sink.handler.received) == 3


def test_replays_reach_real_accounts_only_when_the_operator_says_so(
        namespace, admin_kafka, registry, tmp_path, real, sink):
    replayed = [request(to="someone@example.com")]
    with SenderThread(settings(namespace, tmp_path, real, sink, replay_to_real_accounts=True)):
        produce(admin_kafka, namespace, registry, replayed, replayed=True)
        sent(admin_kafka, namespace, registry, expect=1)
    assert ids(real) == {replayed[0]["message_id"]} and not sink.handler.received
