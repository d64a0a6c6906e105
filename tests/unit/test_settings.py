"""Settings: environment mapping, secrets from files, refusal of placeholders."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailbus.errors import ConfigError
from mailbus.ingest.settings import IngestSettings
from mailbus.queries import load


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
    monkeypatch.setenv("MAILBUS_KAFKA__PASSWORD", password)
    monkeypatch.setenv("MAILBUS_POSTGRES__PASSWORD", "a-long-enough-real-password")
    with pytest.raises(ConfigError, match=r"kafka\.password"):
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
