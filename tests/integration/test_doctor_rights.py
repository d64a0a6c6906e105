"""`mailbus doctor` checks each service role's table rights against mailbus/privileges.py.

The rights are changed in a database of the test's own (made by the superuser,
migrated by the owner, dropped afterwards): the migrations grant to the same
roles the services use, but only on that database's tables, so the shared
database the other tests use is never touched."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from mailbus import db, doctor_infra
from mailbus.cli import service_settings
from mailbus.settings import PostgresSettings, ServiceSettings
from tests.support.dns import DnsServer
from tests.support.doctor import run_doctor
from tests.support.postgres import superuser
from tests.support.sender import smtp_account
from tests.support.smtp import SmtpServer


def _owner(admin: ServiceSettings, dbname: str) -> PostgresSettings:
    return admin.postgres.model_copy(update={
        "dbname": dbname, "user": db.OWNER_ROLE, "password": None,
        "password_file": admin.var_dir / "secrets" / f"postgres-{db.OWNER_ROLE}.password"})


@pytest.fixture
def own_database(admin: ServiceSettings) -> Iterator[str]:
    """A database of this test's own, at the shipped migration, dropped afterwards."""
    name = f"mailbus_doctor_{uuid.uuid4().hex[:10]}"
    root = superuser(admin)
    with psycopg.connect(root.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(db.OWNER_ROLE)))
    try:
        db.migrate(_owner(admin, name))
        yield name
    finally:
        with psycopg.connect(root.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


SERVICES = ("ingest", "sender", "projector", "replies", "webhooks")


def doctor(dns: DnsServer) -> tuple[int, dict[tuple[str, str], str], str]:
    args = ["--dns-server", dns.address]
    for service in SERVICES:
        args += ["--service", service]
    return run_doctor(args)


def test_doctor_fails_a_role_missing_a_right_or_holding_one_too_many(
        own_database: str, admin: ServiceSettings, namespace: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = tmp_path / "accounts.toml"
    with SmtpServer() as smtp, DnsServer({}) as dns:
        accounts.write_text(smtp_account("dev", smtp.port))
        for name, value in {"MAILBUS_POSTGRES__DBNAME": own_database,
                            "MAILBUS_KAFKA__TOPIC_PREFIX": namespace,
                            "MAILBUS_ACCOUNTS_FILE": str(accounts)}.items():
            monkeypatch.setenv(name, value)

        _, rows, out = doctor(dns)
        for service in SERVICES:
            assert rows[("postgres rights", service)] == "ok", out
        assert rows[("postgres", "migrations")] == "ok", out

        # The sender can no longer move a row through its states; ingest could delete
        # messages; the hooks role (no database business at all) is not checked here.
        with psycopg.connect(_owner(admin, own_database).conninfo(), autocommit=True) as conn:
            conn.execute("REVOKE UPDATE ON send_ledger FROM mailbus_sender")
            conn.execute("GRANT DELETE ON messages TO mailbus_ingest")
            conn.execute("GRANT UPDATE (subject) ON messages TO mailbus_webhooks")
        code, rows, out = doctor(dns)
    assert code == 1
    assert rows[("postgres rights", "sender")] == "fail", out
    assert rows[("postgres rights", "ingest")] == "fail", out
    assert rows[("postgres rights", "webhooks")] == "fail", out
    assert rows[("postgres rights", "projector")] == rows[("postgres rights", "replies")] == "ok"
    assert rows[("postgres", "sender")] == "ok"  # the login itself is fine

    # The verdicts say what is wrong and the statement that puts it right.
    sender = doctor_infra.table_rights(service_settings("sender"))
    assert sender.verdict == "fail" and "lacks UPDATE" in sender.detail
    assert "send_ledger" in sender.detail and "beyond" not in sender.detail
    assert 'GRANT UPDATE ("message_id",' in sender.fix and 'TO "mailbus_sender";' in sender.fix
    ingest = doctor_infra.table_rights(service_settings("ingest"))
    assert ingest.detail == "mailbus_ingest has beyond its need DELETE on messages"
    assert ingest.fix == 'as the schema owner: REVOKE DELETE ON "messages" FROM "mailbus_ingest";'
    webhooks: Any = doctor_infra.table_rights(service_settings("webhooks"))
    assert "UPDATE (subject) on messages" in webhooks.detail
    assert 'REVOKE UPDATE ("subject") ON "messages"' in webhooks.fix
