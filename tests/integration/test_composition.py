"""Every service is built in one place from its settings (mailbus/runtime.py), and
every setting docs/configuration.md lists for every service reaches each of them.

For each service, `main()`'s first two steps (load the settings from the
environment, build the service) run here without its loops: the Kafka
configuration each of its clients will use, Faust's for the confirm stream,
the accounts it loaded and the process's logging are read back. Then each
`mailbus <service>`, as a process, is shown to refuse placeholder secrets in
production before it connects to anything.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import certifi
import pytest

from mailbus import logs, runtime
from mailbus.cli import SERVICE_SETTINGS as SETTINGS
from mailbus.cli import SERVICES, service_main
from mailbus.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]
NAMES = sorted(SERVICES)
ACCOUNTS = """
[[accounts]]
id = "composed"
kind = "smtp"
from_address = "composed@mailbus.test"

[accounts.smtp]
host = "127.0.0.1"
port = 2525
tls = "none"
"""
# Services whose work produces events (projector and webhooks only read Kafka).
PRODUCING = {"ingest", "sender", "confirm", "hooks", "replies"}
READS_ACCOUNTS = {"ingest", "sender", "confirm", "replies"}
KAFKA_PASSWORD = "kafka-password-from-var-dir-0123"
PG_PASSWORD = "postgres-password-inline-0123"


def settings_class(name: str) -> type[ServiceSettings]:
    module, _, cls = SETTINGS[name].partition(":")
    found: type[ServiceSettings] = getattr(importlib.import_module(module), cls)
    return found


def build_of(name: str) -> Any:
    module, _, _ = SERVICES[name][0].partition(":")
    return importlib.import_module(module).build


@pytest.fixture
def logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def shared_environment(tmp_path: Path) -> dict[str, str]:
    """A value other than the default for every setting of the 'Every service' tables."""
    var = tmp_path / "var"
    (var / "secrets").mkdir(parents=True)
    # No _FILE given: the password is found under MAILBUS_VAR_DIR, by the principal's name.
    (var / "secrets" / "kafka-principal-7.password").write_text(KAFKA_PASSWORD + "\n")
    ca = tmp_path / "broker-ca.crt"
    ca.write_bytes(Path(certifi.where()).read_bytes())  # any CA bundle: nothing connects
    accounts = tmp_path / "elsewhere.toml"
    accounts.write_text(ACCOUNTS)
    return {
        "MAILBUS_ENV": "local",
        "MAILBUS_VAR_DIR": str(var),
        "MAILBUS_ACCOUNTS_FILE": str(accounts),
        "MAILBUS_ACCOUNTS_POLL_SECONDS": "7.5",
        "MAILBUS_LOG_LEVEL": "WARNING",
        "MAILBUS_LOG_FORMAT": "json",
        "MAILBUS_KAFKA__BOOTSTRAP_SERVERS": "kafka-a.example:9196,kafka-b.example:9196",
        "MAILBUS_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "MAILBUS_KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
        "MAILBUS_KAFKA__USERNAME": "principal-7",
        "MAILBUS_KAFKA__SSL_CA_LOCATION": str(ca),
        "MAILBUS_KAFKA__TOPIC_PREFIX": "composed7.",
        "MAILBUS_KAFKA__DELIVERY_TIMEOUT_MS": "4321",
        "MAILBUS_POSTGRES__HOST": "pg.example",
        "MAILBUS_POSTGRES__PORT": "6543",
        "MAILBUS_POSTGRES__DBNAME": "mailbus_composed",
        "MAILBUS_POSTGRES__USER": "role_7",
        "MAILBUS_POSTGRES__PASSWORD": PG_PASSWORD,
        "MAILBUS_POSTGRES__SSLMODE": "verify-full",
        "MAILBUS_POSTGRES__SSLROOTCERT": str(ca),
        "MAILBUS_POSTGRES__POOL_MIN": "3",
        "MAILBUS_POSTGRES__POOL_MAX": "17",
        # Services' own: nothing listens while building; Faust's folder in tmp.
        "MAILBUS_METRICS_PORT": "0",
        "MAILBUS_DATA_DIR": str(tmp_path / "faust"),
    }


def documented_shared_variables() -> set[str]:
    """The variables of docs/configuration.md's 'Every service' section."""
    text = (REPO / "docs" / "configuration.md").read_text()
    section = text.split("## Every service", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(MAILBUS_[A-Z_]+)`", section, re.MULTILINE))


def environ_only(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key in list(os.environ):
        if key.startswith("MAILBUS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_the_environment_here_sets_every_documented_shared_variable(tmp_path: Path) -> None:
    # Each shared variable the documentation lists is given a non-default value
    # below (MAILBUS_KAFKA__PASSWORD and its _FILE: one way each, in the two tests).
    given = set(shared_environment(tmp_path)) | {"MAILBUS_KAFKA__PASSWORD",
                                                 "MAILBUS_KAFKA__PASSWORD_FILE",
                                                 "MAILBUS_POSTGRES__PASSWORD_FILE"}
    documented = documented_shared_variables()
    assert documented and documented <= given, documented - given
    # The command table and the settings table name the same services.
    assert set(SERVICES) == set(SETTINGS)


def check_librdkafka(name: str, role: str, conf: dict[str, Any]) -> None:
    assert conf["bootstrap.servers"] == "kafka-a.example:9196,kafka-b.example:9196", role
    assert conf["security.protocol"] == "SASL_SSL", role
    assert conf["sasl.mechanisms"] == "SCRAM-SHA-256", role
    assert conf["sasl.username"] == "principal-7", role
    assert conf["sasl.password"] == KAFKA_PASSWORD, role
    assert conf["ssl.ca.location"].endswith("broker-ca.crt"), role
    assert conf["logger"] is logging.getLogger("mailbus.kafka"), role
    assert conf["client.id"].startswith(f"mailbus-{name}"), role
    if "group.id" in conf:  # a consumer: in the namespace, committing by hand
        assert conf["group.id"].startswith("composed7.mailbus-"), role
        assert conf["enable.auto.commit"] is False, role
    else:
        assert conf["message.timeout.ms"] == 4321, role


@pytest.mark.parametrize("name", NAMES)
def test_each_service_is_built_from_every_shared_setting(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        logging_restored: None) -> None:
    environ_only(monkeypatch, shared_environment(tmp_path))
    settings = runtime.load(settings_class(name))  # main()'s first step
    service = build_of(name)(settings)  # and its second; run() is not called

    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert [type(h.formatter) for h in root.handlers] == [logs.JsonFormatter]

    producers = {r for r, c in service.kafka.items() if "group.id" not in c}
    for role, conf in service.kafka.items():
        check_librdkafka(name, role, conf)
    if name == "confirm":
        conf = service.parts["confirm"].app.conf
        assert conf.id == "composed7.mailbus-confirm"
        assert [str(u) for u in conf.broker] == ["kafka://kafka-a.example:9196",
                                                 "kafka://kafka-b.example:9196"]
        credentials = conf.broker_credentials
        assert (credentials.username, credentials.password, credentials.mechanism.value) == (
            "principal-7", KAFKA_PASSWORD, "SCRAM-SHA-256")
        assert credentials.ssl_context is not None
        assert conf.broker_client_id == "mailbus-confirm"
        assert conf.producer_request_timeout == 4.321
        producers.add("faust")
    assert bool(producers) == (name in PRODUCING), producers

    if name in READS_ACCOUNTS and name != "ingest":
        # ingest reads the file in each worker process's lifespan.
        part = next(iter(service.parts.values()))
        directory = getattr(part, "directory", None) or getattr(part, "accounts", None)
        assert directory is not None and list(directory.by_id) == ["composed"]
    assert settings.accounts_poll_seconds == 7.5
    if settings.uses_postgres:
        info = settings.postgres.conninfo()
        for part in ("host=pg.example", "port=6543", "dbname=mailbus_composed", "user=role_7",
                     f"password={PG_PASSWORD}", "sslmode=verify-full"):
            assert part in info, part
        assert (settings.postgres.pool_min, settings.postgres.pool_max) == (3, 17)


@pytest.mark.parametrize("name", NAMES)
def test_each_service_refuses_placeholder_secrets_before_connecting(
        name: str, tmp_path: Path) -> None:
    # Real TLS settings, placeholder passwords: only the secrets are at fault. The
    # broker and database named do not exist; a service that went past its check
    # would hang on them and the timeout below would fail the test.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "kafka.password").write_text("changeme\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILBUS_")}
    env.update({
        "MAILBUS_ENV": "production", "MAILBUS_VAR_DIR": str(tmp_path),
        "MAILBUS_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "MAILBUS_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "MAILBUS_KAFKA__PASSWORD_FILE": str(secrets / "kafka.password"),
        "MAILBUS_POSTGRES__SSLMODE": "verify-full", "MAILBUS_POSTGRES__PORT": "9",
        "MAILBUS_POSTGRES__PASSWORD": "password",
        "MAILBUS_METRICS_PORT": "0",
    })
    done = subprocess.run([sys.executable, "-m", "mailbus", name], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, out[-2000:]
    assert "kafka.password is a placeholder" in out
    uses_postgres = settings_class(name).uses_postgres
    assert ("postgres.password is a placeholder" in out) == uses_postgres
    assert "refusing to start in production" in out


def test_dispatch_reaches_each_service_main() -> None:
    for name in NAMES:
        main = service_main(name)
        assert main.__name__ == "main" and main.__module__ == SERVICES[name][0].split(":")[0]
