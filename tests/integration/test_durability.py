"""Nothing accepted is lost: a broker of the test's own is killed and restarted under the API."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from mailbus.ingest.settings import IngestSettings
from mailbus.provision import provision
from mailbus.settings import REPO_ROOT, KafkaSettings
from tests.integration.conftest import LiveServer
from tests.integration.test_ingest_api import MESSAGE, auth
from tests.support.kafka import read_all
from tests.support.smtp import free_port


@dataclass
class Broker:
    env: dict[str, str]
    var: Path
    port: int

    def run(self, action: str) -> None:
        subprocess.run([str(REPO_ROOT / "scripts" / "kafka.sh"), action], env=self.env,
                       check=True, timeout=180, capture_output=True)

    def kill(self) -> None:
        """SIGKILL, no clean shutdown: what a crashed broker looks like."""
        pid = int((self.var / "run" / "kafka.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def settings(self, user: str) -> KafkaSettings:
        return KafkaSettings(bootstrap_servers=f"127.0.0.1:{self.port}", username=user,
                             password_file=self.var / "secrets" / f"kafka-{user}.password",
                             delivery_timeout_ms=3000)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    var = tmp_path / "var"
    port = free_port()
    env = {**os.environ, "MAILBUS_VAR": str(var), "MAILBUS_KAFKA_PORT": str(port),
           "MAILBUS_KAFKA_CONTROLLER_PORT": str(free_port())}
    broker = Broker(env, var, port)
    broker.run("start")
    try:
        provision(broker.settings("admin").client_config(), var / "secrets")
        yield broker
    finally:
        broker.run("stop")


@retry(stop=stop_after_delay(60), wait=wait_fixed(0.5), retry=retry_if_result(lambda ok: not ok))
def _ready(client: httpx.Client) -> bool:
    return client.get("/readyz").status_code == 200


def test_broker_crash_loses_nothing_and_answers_503(own_broker: Broker, accounts_file, make_key,
                                                     admin):
    key_id, token = make_key()
    settings = IngestSettings(accounts_file=accounts_file,
                              kafka=own_broker.settings("ingest").model_dump())
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as api:
        accepted = []
        for i in range(20):
            r = api.post("/v1/messages", json={**MESSAGE, "subject": f"n{i}"}, headers=auth(token))
            assert r.status_code == 202, r.text
            accepted.append(r.json()["id"])

        own_broker.kill()
        r = api.post("/v1/messages", json={**MESSAGE, "subject": "while down"},
                     headers=auth(token))
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/problem+json"
        assert int(r.headers["retry-after"]) > 0
        assert api.get("/readyz").status_code == 503
        # A manual suppression is not accepted either while nothing can hold it.
        _, admin_token = make_key(scopes=("admin",))
        r = api.post("/v1/suppressions", json={"address": "ada@example.com"},
                     headers=auth(admin_token))
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        with psycopg.connect(admin.postgres.conninfo()) as conn:
            rows = conn.execute("SELECT count(*) FROM messages WHERE key_id = %s",
                                (key_id,)).fetchone()
        assert rows == (20,)  # nothing half-done for the refused request

        own_broker.run("start")
        assert _ready(api)
        r = api.post("/v1/messages", json={**MESSAGE, "subject": "after"}, headers=auth(token))
        assert r.status_code == 202
        accepted.append(r.json()["id"])

    from mailbus.codec import Registry

    registry = Registry.load()
    records = read_all(own_broker.settings("admin").client_config(), "email.requested",
                       settle=2.0)
    produced = [registry.decode(m.value())[1] for m in records]
    assert sorted(e["message_id"] for e in produced) == sorted(accepted)
    assert "while down" not in {e["subject"] for e in produced}
