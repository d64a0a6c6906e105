"""A recording of a real run, replayed through the real sender, confirm stream and projector.

`tests/fixtures/pipeline.avro` was made by `mailbus record` from the local
stack (`make up`, `mailbus verify --count 12`): its requests and what became
of them (sent, delivered, confirmed). Its requests are replayed into a fresh
namespace where the services run; its outcomes are replayed into another,
where only the projector runs; both projections must agree message by
message, as `mailbus replay-report` compares them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from mailbus import recording, replay, topics
from mailbus.provision import provision
from mailbus.replay_report import compare, outcomes
from tests.support import projector as p
from tests.support.kafka import drop_namespace, new_prefix, read_all
from tests.support.processes import Services
from tests.support.sender import smtp_account
from tests.support.smtp import SmtpServer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pipeline.avro"
OUTCOMES = (topics.REQUESTED, topics.SENT, topics.DELIVERED, topics.CONFIRMED)


@pytest.fixture
def original(admin, admin_kafka) -> Iterator[str]:
    """A namespace holding the recording's own events, as they happened."""
    prefix = new_prefix()
    provision(admin_kafka, admin.var_dir / "secrets", prefix, users=False)
    yield prefix
    drop_namespace(admin_kafka, prefix)


def test_the_recorded_run_replays_to_the_same_outcome(namespace, original, admin, admin_kafka,
                                                      tmp_path: Path):
    meta, _ = recording.read(FIXTURE)
    recorded = list(recording.read(FIXTURE)[1])
    requests = [r for r in recorded if r.topic == topics.REQUESTED]
    assert len(requests) == 12 and set(meta["mailbus.topics"].split(",")) >= set(OUTCOMES)

    replay.run(iter(recorded), admin_kafka, original, names=OUTCOMES, speed=None)
    with p.projector_running(p.settings_for(original)):
        p.eventually(lambda: _projected(admin, original, 12), timeout=90)

    with SmtpServer() as sink:
        accounts = tmp_path / "accounts.toml"
        # The recorded account, pointed nowhere: a replay must never use it.
        accounts.write_text(smtp_account("dev", 9, rate=500))
        env = {"MAILBUS_KAFKA__TOPIC_PREFIX": namespace, "MAILBUS_ACCOUNTS_FILE": str(accounts),
               "MAILBUS_METRICS_PORT": "0", "MAILBUS_LINK_KEYS_FILE": str(tmp_path / "keys"),
               "MAILBUS_POLL_SECONDS": "0.2", "MAILBUS_LOG_LEVEL": "WARNING",
               "MAILBUS_REPLAY_SINK": f"127.0.0.1:{sink.port}"}
        with Services(env, tmp_path) as services:
            for name in ("sender", "confirm", "projector"):
                services.start(name)
            written = replay.run(iter(recorded), admin_kafka, namespace,
                                 names=(topics.REQUESTED,), speed=50.0)
            assert written.written[topics.REQUESTED] == 12
            confirmed = read_all(admin_kafka, namespace + topics.CONFIRMED, expect=12,
                                 timeout=120)
            p.eventually(lambda: _projected(admin, namespace, 12), timeout=90)
            services.check_alive()
        delivered = {m["X-Mailbus-Message-Id"] for m in sink.handler.messages()}

    ids = {r.key for r in recorded if r.topic == topics.CONFIRMED}
    assert len(confirmed) == 12
    assert delivered == {k.decode() for k in ids if k is not None}
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        report = compare(outcomes(conn, original), outcomes(conn, namespace))
    assert report.same, report.differing
    assert report.replayed == report.original and report.replayed[("dev", "confirmed")] == 12


def _projected(admin, namespace: str, count: int) -> None:
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        found = outcomes(conn, namespace)
    assert len(found) == count and {s for _, s in found.values()} == {"confirmed"}, found
