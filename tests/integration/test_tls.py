"""TLS to Kafka (the SASL_SSL listener) and to PostgreSQL (ssl=on), against the running stack.

The stack's CA and server certificates are the ones `make infra` generated
(scripts/tls.sh); a second CA made here stands for a man in the middle.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from psycopg.conninfo import make_conninfo

from mailbus import topics
from mailbus.confirm.settings import ConfirmSettings
from mailbus.confirm.stream import APP_NAME, app_config
from mailbus.ingest.settings import IngestSettings
from mailbus.producer import AsyncProducer
from mailbus.sender.settings import SenderSettings
from mailbus.settings import KafkaSettings, PostgresSettings, ServiceSettings
from tests.support.tls import make_ca

pytestmark = pytest.mark.integration


def tls_listener(var_dir: Path) -> str | None:
    """host:port of the running broker's SASL_SSL listener, from the config it was started with.

    scripts/kafka.sh writes server.properties on every start (and only then),
    so the file describes the broker that is running.
    """
    config = var_dir / "kafka" / "server.properties"
    if not config.is_file():
        return None
    for line in config.read_text(encoding="utf-8").splitlines():
        if line.startswith("advertised.listeners="):
            for listener in line.split("=", 1)[1].split(","):
                name, _, address = listener.partition("://")
                if name == "CLIENT_TLS":
                    return address
    return None


@pytest.fixture(scope="module")
def tls_bootstrap(admin: ServiceSettings) -> str:
    address = tls_listener(admin.var_dir)
    if address is None:
        pytest.skip("the running broker has no SASL_SSL listener (started before scripts/kafka.sh"
                    " had one): `scripts/kafka.sh stop && make infra` adds it")
    return address


@pytest.fixture(scope="module")
def ca(admin: ServiceSettings) -> Path:
    path = admin.var_dir / "secrets" / "ca.crt"
    assert path.is_file(), f"{path} is missing although the broker has a TLS listener"
    return path


@pytest.fixture(scope="module")
def stranger_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ca(tmp_path_factory.mktemp("stranger"))


def over_tls(namespace: str, bootstrap: str, **kafka: Any) -> dict[str, Any]:
    return {"topic_prefix": namespace, "bootstrap_servers": bootstrap,
            "security_protocol": "SASL_SSL", **kafka}


def test_produce_and_consume_over_sasl_ssl_as_configured_for_production(
        namespace: str, tls_bootstrap: str, ca: Path, admin: ServiceSettings):
    secrets = admin.var_dir / "secrets"
    # Production settings, CA named explicitly: they pass the production check
    # and work against the real listener.
    ingest = IngestSettings(env="production", kafka=over_tls(namespace, tls_bootstrap,
                                                             ssl_ca_location=ca),
                            postgres={"sslmode": "verify-full", "sslrootcert": ca})
    ingest.check_secrets()
    sender = SenderSettings(kafka=over_tls(namespace, tls_bootstrap))  # local: the stack's CA
    assert sender.kafka.ssl_ca_location == secrets / "ca.crt"
    topic = ingest.kafka.topic(topics.REQUESTED)
    value = uuid.uuid4().bytes

    async def produce() -> None:
        producer = AsyncProducer(ingest.kafka.client_config())
        try:
            await producer.produce(topic, value=value, key=b"acct")
        finally:
            assert producer.close() == 0

    asyncio.run(produce())
    consumer = Consumer({**sender.kafka.client_config(),
                         "group.id": sender.kafka.topic("mailbus-sender"),
                         "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        got = None
        while got is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None:
                assert msg.error() is None, msg.error()
                got = msg
        assert got is not None, "nothing consumed over SASL_SSL in 30 s"
        assert got.value() == value and got.key() == b"acct"
        consumer.commit(message=got, asynchronous=False)
    finally:
        consumer.close()


def test_the_confirm_streams_faust_client_speaks_tls(namespace: str, tls_bootstrap: str,
                                                     admin_kafka: dict[str, Any]):
    # The confirm stream's own settings, turned into aiokafka's options the way
    # Faust does it: a verdict written and a sent event read, over SASL_SSL.
    settings = ConfirmSettings(kafka=over_tls(namespace, tls_bootstrap))
    auth = credentials_to_aiokafka_auth(app_config(settings)["broker_credentials"])
    assert auth["security_protocol"] == "SASL_SSL"
    sent = settings.kafka.topic(topics.SENT)
    value = uuid.uuid4().bytes
    seed = Producer(admin_kafka)
    seed.produce(sent, value=value, key=b"m1")
    assert seed.flush(10) == 0

    async def round_trip() -> bytes:
        producer = AIOKafkaProducer(bootstrap_servers=tls_bootstrap, **auth)
        await producer.start()
        try:
            await producer.send_and_wait(settings.kafka.topic(topics.CONFIRMED), b"v", key=b"m1")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(sent, bootstrap_servers=tls_bootstrap,
                                    group_id=settings.kafka.topic(APP_NAME),
                                    auto_offset_reset="earliest", **auth)
        await consumer.start()
        try:
            record = await asyncio.wait_for(consumer.getone(), 30)
            return bytes(record.value)
        finally:
            await consumer.stop()

    assert asyncio.run(round_trip()) == value


def test_a_broker_certificate_the_client_does_not_trust_is_refused(
        tls_bootstrap: str, stranger_ca: Path, admin: ServiceSettings):
    errors: list[KafkaError] = []
    config = {**admin.kafka.model_copy(update={
        "bootstrap_servers": tls_bootstrap, "security_protocol": "SASL_SSL",
        "ssl_ca_location": stranger_ca}).client_config(), "error_cb": errors.append}
    client = AdminClient(config)
    with pytest.raises(KafkaException):
        client.list_topics(timeout=5)
    client.poll(0.5)  # serves error_cb
    assert any(e.code() == KafkaError._SSL and "certificate verify failed" in e.str()
               for e in errors), [e.str() for e in errors]


def handshake(address: str, context: ssl.SSLContext, server_hostname: str) -> None:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=server_hostname):
        pass


def test_the_python_clients_check_the_chain_and_the_host_name(
        tls_bootstrap: str, ca: Path, stranger_ca: Path):
    trusted = KafkaSettings(security_protocol="SASL_SSL", ssl_ca_location=ca).ssl_context()
    assert trusted is not None
    # Every name the certificate carries for local clients verifies...
    handshake(tls_bootstrap, trusted, "127.0.0.1")
    handshake(tls_bootstrap, trusted, "localhost")
    # ...a name it does not carry does not, even from the right CA...
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(tls_bootstrap, trusted, "mailbus.invalid")
    # ...and neither does another CA.
    stranger = KafkaSettings(security_protocol="SASL_SSL",
                             ssl_ca_location=stranger_ca).ssl_context()
    assert stranger is not None
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(tls_bootstrap, stranger, "127.0.0.1")


def test_the_tls_port_speaks_nothing_but_tls(tls_bootstrap: str, admin: ServiceSettings):
    errors: list[KafkaError] = []
    config = {**admin.kafka.model_copy(update={"bootstrap_servers": tls_bootstrap})
              .client_config(), "error_cb": errors.append}
    assert config["security.protocol"] == "SASL_PLAINTEXT"
    client = AdminClient(config)
    with pytest.raises(KafkaException):
        client.list_topics(timeout=5)
    client.poll(0.5)  # serves error_cb
    assert errors, "a clear-text client got no error from the TLS port"


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_tls(admin: ServiceSettings) -> None:
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        row = conn.execute("SHOW ssl").fetchone()
    if row is None or row[0] != "on":
        pytest.skip("the running PostgreSQL has ssl=off (started before scripts/postgres.sh"
                    " turned it on): `make infra` reloads it with TLS")


def tls_postgres(admin: ServiceSettings, **update: Any) -> PostgresSettings:
    return admin.postgres.model_copy(update={"sslmode": "verify-full", **update})


def test_postgres_verify_full_connects_over_tls(pg_tls: None, admin: ServiceSettings, ca: Path):
    for settings in (tls_postgres(admin, sslrootcert=ca),
                     # the certificate names localhost too
                     tls_postgres(admin, sslrootcert=ca, host="localhost"),
                     # local use defaults sslrootcert to the stack's CA
                     ServiceSettings(service_name="admin", postgres=PostgresSettings(
                         sslmode="verify-full", port=admin.postgres.port)).postgres):
        assert settings.sslrootcert == ca
        with psycopg.connect(settings.conninfo()) as conn:
            row = conn.execute("SELECT ssl, version FROM pg_stat_ssl"
                               " WHERE pid = pg_backend_pid()").fetchone()
        assert row is not None and row[0] is True and row[1] in ("TLSv1.2", "TLSv1.3")


def test_postgres_refuses_a_server_certificate_from_another_ca(
        pg_tls: None, admin: ServiceSettings, stranger_ca: Path):
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(tls_postgres(admin, sslrootcert=stranger_ca).conninfo(),
                        connect_timeout=5)


def test_postgres_verify_full_checks_the_host_name(pg_tls: None, admin: ServiceSettings,
                                                   ca: Path):
    # hostaddr dials the real server; host is the name the certificate must carry.
    conninfo = make_conninfo(tls_postgres(admin, sslrootcert=ca).conninfo(),
                             host="mailbus.invalid", hostaddr="127.0.0.1")
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(conninfo, connect_timeout=5)
    # verify-ca checks the chain only, which is why production accepts it
    # only as the weaker of the two.
    with psycopg.connect(make_conninfo(conninfo, sslmode="verify-ca"), connect_timeout=5):
        pass
