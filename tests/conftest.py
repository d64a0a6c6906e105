"""Fixtures shared by every layer: the real broker and PostgreSQL.

By default those `make infra` started natively. With MAILBUS_TEST_CONTAINERS=1
(or DOCKER_HOST set), tests/support/containers.py starts them from the
images of docker-compose.yml through testcontainers, provisions them as
`make infra` does, and points every setting at them through the environment
before the first test is collected; they are removed when the session ends.
Under pytest-xdist (`-n`) that happens once, in the controller: its workers
inherit the environment and share the two containers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from mailbus import apikeys
from mailbus.codec import Registry
from mailbus.ingest.settings import IngestSettings
from mailbus.provision import provision
from mailbus.settings import ServiceSettings
from tests.support import containers, dovecot
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


def _xdist_worker(config: pytest.Config) -> bool:
    """Whether this process is a pytest-xdist worker (its controller owns the containers)."""
    return hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Once per run: in the xdist controller (whose session starts before it
    # spawns its workers, which inherit this environment) or the only process.
    # A worker finds the controller's containers in the environment it inherited.
    if containers.wanted() and not _xdist_worker(session.config):
        os.environ.update(containers.start())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _xdist_worker(session.config):
        containers.stop()


def pytest_report_header(config: pytest.Config) -> list[str]:
    if containers.wanted():
        return ["mailbus: Kafka and PostgreSQL in containers (testcontainers): "
                + ", ".join(containers.compose_images().values())]
    return []


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


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry.load()


@pytest.fixture(scope="module")
def dovecot_server() -> Iterator[dovecot.Dovecot]:
    """A private Debian Dovecot for a module's tests; each test clears the mailbox it uses."""
    started = dovecot.start()
    yield started
    dovecot.stop(started)
