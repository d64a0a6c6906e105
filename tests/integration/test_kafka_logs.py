"""librdkafka's own lines go through Python's logging, not raw to stderr."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from confluent_kafka import Producer

from mailbus.settings import ServiceSettings

pytestmark = pytest.mark.integration


def test_a_broker_that_cannot_be_reached_is_logged_through_python_logging(
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = {**ServiceSettings(service_name="ingest").kafka.client_config(),
            "bootstrap.servers": f"127.0.0.1:{port}"}
    with caplog.at_level(logging.DEBUG, logger="mailbus.kafka"):
        producer = Producer(conf)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(
                r.name == "mailbus.kafka" and str(port) in r.getMessage()
                for r in caplog.records):
            producer.poll(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "mailbus.kafka"]
    assert any(str(port) in line for line in lines), lines
    assert str(port) not in capfd.readouterr().err  # nothing raw on stderr
