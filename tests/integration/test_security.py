"""Least privilege on the broker and in PostgreSQL, proven with the services' own credentials."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from mailbus.settings import ServiceSettings


def _consume_error(config: dict, topic: str) -> KafkaError | None:
    """The broker's refusal to let this principal read the topic, or None if it reads."""
    consumer = Consumer({**config, "group.id": f"probe-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        # READ implies DESCRIBE: a topic the principal may not describe is
        # refused at the metadata request, and librdkafka never fetches it.
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            return meta.error
        # assign() fetches without joining a group: this asks the broker for
        # READ on the topic alone.
        consumer.assign([TopicPartition(topic, 0, 0)])
        for _ in range(50):
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            # librdkafka looks up the throwaway group's coordinator too; that
            # refusal says nothing about the topic.
            if err is not None and err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED \
                    and msg.topic() is None:
                continue
            return err
        return None
    finally:
        consumer.close()


def _produce_error(config: dict, topic: str) -> KafkaError | None:
    producer = Producer({**config, "message.timeout.ms": 5000})
    errors: list[KafkaError | None] = []
    # A key: the compacted suppressions topic refuses records without one.
    producer.produce(topic, b"probe", key=b"probe",
                     on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(10)
    return errors[0] if errors else None


def test_ingest_may_write_requested_and_suppressions_and_nothing_else(namespace):
    ingest = ServiceSettings(service_name="ingest", kafka={"topic_prefix": namespace}).kafka
    conf = ingest.client_config()
    err = _consume_error(conf, ingest.topic("email.requested"))
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    err = _produce_error(conf, ingest.topic("email.sent"))
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert _produce_error(conf, ingest.topic("email.requested")) is None
    # Manual suppressions (admin keys): written, never read back.
    assert _produce_error(conf, ingest.topic("email.suppressions")) is None
    err = _consume_error(conf, ingest.topic("email.suppressions"))
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_the_probes_see_what_a_principal_may_do(namespace):
    # The same probes with the sender's credentials, which may read and write
    # email.requested: a probe that only ever saw refusals would prove nothing.
    sender = ServiceSettings(service_name="sender", kafka={"topic_prefix": namespace}).kafka
    conf = sender.client_config()
    assert _produce_error(conf, sender.topic("email.requested")) is None
    assert _consume_error(conf, sender.topic("email.requested")) is None


def test_unauthenticated_and_wrong_password_are_refused(admin):
    base = admin.kafka.client_config()
    wrong = {**base, "sasl.username": "ingest", "sasl.password": "not-the-password"}
    producer = Producer({**wrong, "message.timeout.ms": 3000})
    errors: list = []
    producer.produce("email.requested", b"x", on_delivery=lambda e, _m: errors.append(e))
    producer.flush(6)
    assert errors and errors[0] is not None
    plain = {"bootstrap.servers": base["bootstrap.servers"], "security.protocol": "PLAINTEXT",
             "message.timeout.ms": 3000}
    producer = Producer(plain)
    errors.clear()
    producer.produce("email.requested", b"x", on_delivery=lambda e, _m: errors.append(e))
    producer.flush(6)
    assert errors and errors[0] is not None


def test_ingest_database_role_is_least_privileged():
    ingest = ServiceSettings(service_name="ingest").postgres
    with psycopg.connect(ingest.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM api_keys").fetchone()
        for statement in ("UPDATE api_keys SET name = name",
                          "DELETE FROM messages",
                          "INSERT INTO api_keys (id, name, secret_sha256, scopes)"
                          " VALUES ('x', 'x', '\\x00', '{admin}')",
                          "CREATE TABLE evil (id int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_secret_files_are_private(admin):
    secrets = admin.var_dir / "secrets"
    assert secrets.stat().st_mode & 0o077 == 0
    files = list(secrets.iterdir())
    assert files
    for f in files:
        assert f.stat().st_mode & 0o077 == 0, f
