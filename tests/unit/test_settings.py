"""Settings: environment, secret files, TLS; production refuses placeholders and clear text."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from psycopg.conninfo import conninfo_to_dict

from mailbus.confirm.settings import ConfirmSettings
from mailbus.confirm.stream import app_config
from mailbus.errors import ConfigError
from mailbus.ingest.settings import IngestSettings
from mailbus.queries import load
from tests.support.tls import make_ca


def test_environment_and_secret_files(monkeypatch, tmp_path: Path):
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-from-a-file-0123456789\n")
    monkeypatch.setenv("MAILBUS_KAFKA__BOOTSTRAP_SERVERS", "broker:9093")
    monkeypatch.setenv("MAILBUS_KAFKA__PASSWORD_FILE", str(secret))
    monkeypatch.setenv("MAILBUS_PORT", "9000")
    settings = IngestSettings()
    conf = settings.kafka.client_config()
    assert conf["bootstrap.servers"] == "broker:9093"
    assert conf["sasl.username"] == "ingest"
    assert conf["sasl.password"] == "s3cr3t-from-a-file-0123456789"
    assert conf["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert settings.port == 9000
    assert settings.postgres.user == "mailbus_ingest"


def test_secrets_never_appear_in_repr(monkeypatch):
    monkeypatch.setenv("MAILBUS_KAFKA__PASSWORD", "very-secret-value-123456")
    settings = IngestSettings()
    assert "very-secret-value-123456" not in repr(settings)
    assert "very-secret-value-123456" not in str(settings.model_dump())


@pytest.mark.parametrize("password", ["changeme", "short", "password"])
def test_placeholder_secrets_refused_outside_local(monkeypatch, password):
    monkeypatch.setenv("MAILBUS_ENV", "production")
    setenv(monkeypatch, TLS)  # so that the secret is the only problem
    monkeypatch.setenv("MAILBUS_KAFKA__PASSWORD", password)
    monkeypatch.setenv("MAILBUS_POSTGRES__PASSWORD", "a-long-enough-real-password")
    with pytest.raises(ConfigError, match=r"^kafka\.password is a placeholder"):
        IngestSettings().check_secrets()
    monkeypatch.setenv("MAILBUS_ENV", "local")
    IngestSettings().check_secrets()  # local development accepts anything


def test_missing_secret_file_is_a_clear_error(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("MAILBUS_KAFKA__PASSWORD_FILE", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="cannot read secret file"):
        IngestSettings().kafka.client_config()


def test_named_queries(tmp_path: Path):
    f = tmp_path / "q.sql"
    f.write_text("-- preamble\n-- name: one\n-- why\nSELECT 1;\n\n-- name: two\nSELECT 2;\n")
    assert load(f) == {"one": "-- why\nSELECT 1;", "two": "SELECT 2;"}


def test_the_example_accounts_file_is_valid_and_reads_mailboxes() -> None:
    from mailbus.accounts import load_accounts
    from mailbus.settings import REPO_ROOT

    directory = load_accounts(REPO_ROOT / "deploy" / "accounts.example.toml")
    assert {a.id: a.reads_mailbox for a in directory.by_id.values()} == {
        "sales-gmail": True, "relay-1": True}


# -- TLS: one mapping for librdkafka, aiokafka and libpq; production requires it --------------

GOOD_SECRETS = {"MAILBUS_KAFKA__PASSWORD": "a-long-enough-real-password",
                "MAILBUS_POSTGRES__PASSWORD": "another-long-real-password"}
TLS = {"MAILBUS_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
       "MAILBUS_POSTGRES__SSLMODE": "verify-full"}


def setenv(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_tls_settings_reach_every_client(monkeypatch, tmp_path: Path):
    ca = make_ca(tmp_path)
    setenv(monkeypatch, {**TLS, "MAILBUS_KAFKA__SSL_CA_LOCATION": str(ca),
                         "MAILBUS_POSTGRES__SSLROOTCERT": str(ca),
                         **GOOD_SECRETS})
    settings = IngestSettings()
    conf = settings.kafka.client_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["ssl.ca.location"] == str(ca)
    context = settings.kafka.ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    # The CA given is the one the context trusts (and the only one, with no system CAs
    # loaded by create_default_context when a cafile is named).
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "stranger CA"),),)]
    info = conninfo_to_dict(settings.postgres.conninfo())
    assert info["sslmode"] == "verify-full"
    assert info["sslrootcert"] == str(ca)


def test_clear_text_is_the_local_default_and_sends_no_tls_options(monkeypatch):
    settings = IngestSettings()
    assert settings.kafka.ssl_context() is None
    assert "ssl.ca.location" not in settings.kafka.client_config()
    assert conninfo_to_dict(settings.postgres.conninfo())["sslmode"] == "prefer"
    assert "sslrootcert" not in conninfo_to_dict(settings.postgres.conninfo())


def test_local_use_trusts_the_stacks_ca_and_production_the_systems(monkeypatch, tmp_path: Path):
    setenv(monkeypatch, {**TLS, "MAILBUS_VAR_DIR": str(tmp_path)})
    local = IngestSettings()
    assert local.kafka.ssl_ca_location == tmp_path / "secrets" / "ca.crt"
    assert local.postgres.sslrootcert == tmp_path / "secrets" / "ca.crt"
    monkeypatch.setenv("MAILBUS_ENV", "production")
    production = IngestSettings()
    assert production.kafka.ssl_ca_location is None
    assert production.postgres.sslrootcert is None


@pytest.mark.parametrize(("change", "named"), [
    ({"MAILBUS_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "MAILBUS_KAFKA__SECURITY_PROTOCOL"),
    ({"MAILBUS_POSTGRES__SSLMODE": "prefer"}, "MAILBUS_POSTGRES__SSLMODE"),
    # `require` encrypts but accepts any certificate: not enough.
    ({"MAILBUS_POSTGRES__SSLMODE": "require"}, "MAILBUS_POSTGRES__SSLMODE"),
    ({"MAILBUS_POSTGRES__SSLMODE": "disable"}, "MAILBUS_POSTGRES__SSLMODE"),
])
def test_production_refuses_to_start_without_tls(monkeypatch, change, named):
    setenv(monkeypatch, {"MAILBUS_ENV": "production", **GOOD_SECRETS, **TLS, **change})
    with pytest.raises(ConfigError, match=named):
        IngestSettings().check_secrets()
    monkeypatch.setenv("MAILBUS_ENV", "local")
    IngestSettings().check_secrets()  # local development may use clear text


@pytest.mark.parametrize("sslmode", ["verify-full", "verify-ca"])
def test_production_starts_with_verified_tls_and_real_secrets(monkeypatch, sslmode):
    setenv(monkeypatch, {"MAILBUS_ENV": "production", **GOOD_SECRETS, **TLS,
                         "MAILBUS_POSTGRES__SSLMODE": sslmode})
    IngestSettings().check_secrets()


def test_production_names_every_problem_at_once(monkeypatch):
    setenv(monkeypatch, {"MAILBUS_ENV": "production", "MAILBUS_KAFKA__PASSWORD": "changeme",
                         "MAILBUS_POSTGRES__PASSWORD": "another-long-real-password"})
    with pytest.raises(ConfigError) as raised:
        IngestSettings().check_secrets()
    message = str(raised.value)
    for named in ("MAILBUS_KAFKA__SECURITY_PROTOCOL", "MAILBUS_POSTGRES__SSLMODE",
                  "kafka.password"):
        assert named in message
    assert "postgres.password" not in message
    assert "changeme" not in message  # the secret itself is never shown


def test_the_confirm_stream_refuses_a_placeholder_secret_in_production(tmp_path: Path):
    # The real command, as an operator starts it: it must stop at once with the
    # setting's name. Without the check it would start a Faust worker that
    # retries an unreachable broker forever, and the timeout fails the test.
    env = {**os.environ, "MAILBUS_ENV": "production", **TLS,
           "MAILBUS_KAFKA__PASSWORD": "changeme",
           "MAILBUS_POSTGRES__PASSWORD": "another-long-real-password",
           "MAILBUS_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9",
           "MAILBUS_METRICS_PORT": "0", "MAILBUS_VAR_DIR": str(tmp_path)}
    mailbus = Path(sys.executable).with_name("mailbus")
    done = subprocess.run([str(mailbus), "confirm"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "kafka.password is a placeholder" in done.stdout
    assert "changeme" not in done.stdout + done.stderr
    assert not (tmp_path / "confirm").exists()  # stopped before Faust made its workdir


def test_the_confirm_stream_passes_tls_to_faust(monkeypatch, tmp_path: Path):
    ca = make_ca(tmp_path)
    setenv(monkeypatch, {"MAILBUS_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
                         "MAILBUS_KAFKA__SSL_CA_LOCATION": str(ca),
                         "MAILBUS_KAFKA__PASSWORD": "x" * 20})
    auth = credentials_to_aiokafka_auth(app_config(ConfirmSettings())["broker_credentials"])
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert auth["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    monkeypatch.setenv("MAILBUS_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    auth = credentials_to_aiokafka_auth(app_config(ConfirmSettings())["broker_credentials"])
    assert auth["security_protocol"] == "SASL_PLAINTEXT" and auth["ssl_context"] is None
