"""Integration fixtures: the real broker and PostgreSQL that `make infra` started."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from confluent_kafka.admin import AdminClient

from mailbus import apikeys
from mailbus.ingest.app import server_config
from mailbus.ingest.settings import IngestSettings
from mailbus.provision import provision
from mailbus.settings import ServiceSettings
from tests.support.kafka import drop_namespace, new_prefix

ACCOUNTS = """
[[accounts]]
id = "dev"
kind = "smtp"
from_address = "dev@example.test"
pools = ["default"]
[accounts.smtp]
host = "127.0.0.1"

[[accounts]]
id = "team-a"
kind = "smtp"
from_address = "a@example.test"
pools = ["team"]
[accounts.smtp]
host = "127.0.0.1"

[[accounts]]
id = "team-b"
kind = "smtp"
from_address = "b@example.test"
pools = ["team"]
[accounts.smtp]
host = "127.0.0.1"

[[accounts]]
id = "solo"
kind = "gmail"
from_address = "solo@example.test"
pools = []
[accounts.gmail]
token_file = "/nonexistent/token.json"
"""


@pytest.fixture(scope="session")
def admin() -> ServiceSettings:
    return ServiceSettings(service_name="admin")


@pytest.fixture(scope="session")
def admin_kafka(admin: ServiceSettings) -> dict[str, Any]:
    config = admin.kafka.client_config()
    try:
        AdminClient(config).list_topics(timeout=10)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"the Kafka broker is not reachable ({exc}); run `make infra` first")
    return config


@pytest.fixture
def namespace(admin: ServiceSettings, admin_kafka: dict[str, Any]) -> Iterator[str]:
    """Fresh topics and ACLs under a unique prefix, removed afterwards."""
    prefix = new_prefix()
    provision(admin_kafka, admin.var_dir / "secrets", prefix, users=False)
    yield prefix
    drop_namespace(admin_kafka, prefix)


@pytest.fixture
def accounts_file(tmp_path: Path) -> Path:
    path = tmp_path / "accounts.toml"
    path.write_text(ACCOUNTS)
    return path


@pytest.fixture
def ingest_settings(namespace: str, accounts_file: Path) -> IngestSettings:
    return IngestSettings(accounts_file=accounts_file,
                          kafka={"topic_prefix": namespace, "delivery_timeout_ms": 5000})


@pytest.fixture
def make_key(admin: ServiceSettings) -> Callable[..., tuple[str, str]]:
    """Create an API key in the database; returns (key id, token)."""

    def make(scopes: tuple[str, ...] = ("send", "read"), accounts: list[str] | None = None,
             default_pool: str | None = None) -> tuple[str, str]:
        key = apikeys.generate()
        with psycopg.connect(admin.postgres.conninfo()) as conn:
            conn.execute(
                "INSERT INTO api_keys (id, name, secret_sha256, scopes, accounts, default_pool)"
                " VALUES (%s, 'test', %s, %s, %s, %s)",
                (key.key_id, key.secret_sha256, list(scopes), accounts, default_pool),
            )
        return key.key_id, key.token

    return make


class LiveServer:
    """The ingest app served by uvicorn on a real socket, in a thread."""

    def __init__(self, settings: IngestSettings):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.sock = sock
        self.server = uvicorn.Server(server_config(settings))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        end = time.monotonic() + 30.0
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("ingest app did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def live_ingest(ingest_settings: IngestSettings) -> Iterator[LiveServer]:
    with LiveServer(ingest_settings) as server:
        yield server


@pytest.fixture
def api(live_ingest: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_ingest.url, timeout=30) as client:
        yield client
