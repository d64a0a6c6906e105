"""PostgreSQL: roles and database bootstrap, migrations, connection pools."""

from __future__ import annotations

import logging
import os
import secrets
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from mailbus.settings import PostgresSettings
from mailbus.topics import SERVICES

log = logging.getLogger(__name__)

OWNER_ROLE = "mailbus_owner"
# One login role per service, plus the operator's CLI; each gets only the
# grants the migrations give it.
SERVICE_ROLES = (*(f"mailbus_{s}" for s in SERVICES), "mailbus_admin")
# Serialises concurrent `migrate` runs (two services starting at once).
MIGRATION_LOCK_ID = 0x6D61696C


def ensure_secret_file(path: Path) -> str:
    """Read a generated secret, creating it (mode 600, dir 700) on first use."""
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    # O_EXCL: two bootstraps racing must not write different passwords.
    with open(path, "x", encoding="utf-8", opener=_open_600) as fh:
        fh.write(value)
    return value


def _open_600(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def bootstrap(superuser: PostgresSettings, secrets_dir: Path) -> None:
    """Create the owner and service roles (passwords into secrets_dir) and the database."""
    with psycopg.connect(_conninfo(superuser, "postgres"), autocommit=True) as conn:
        for role in (OWNER_ROLE, *SERVICE_ROLES):
            password = ensure_secret_file(secrets_dir / f"postgres-{role}.password")
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            # Setting the password every time keeps role and file in step.
            conn.execute(
                sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                    sql.SQL(verb), sql.Identifier(role), sql.Literal(password)
                )
            )
        dbname = superuser.dbname if superuser.dbname != "postgres" else "mailbus"
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(dbname), sql.Identifier(OWNER_ROLE)
                )
            )
    # Nobody but the owner may create objects in the public schema.
    with psycopg.connect(_conninfo(superuser, dbname), autocommit=True) as conn:
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        conn.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(sql.Identifier(OWNER_ROLE)))
        conn.execute(
            sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(dbname))
        )
        for role in (OWNER_ROLE, *SERVICE_ROLES):
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                    sql.Identifier(dbname), sql.Identifier(role)
                )
            )


def _conninfo(settings: PostgresSettings, dbname: str) -> str:
    return settings.model_copy(update={"dbname": dbname}).conninfo()


def migration_files() -> list[tuple[str, str]]:
    """(version, SQL text) of every migration shipped with the package, in order."""
    folder = resources.files("mailbus") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


def migrate(owner: PostgresSettings) -> list[str]:
    """Apply pending migrations as the owner role; returns the versions applied."""
    applied: list[str] = []
    with psycopg.connect(owner.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for version, text in migration_files():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(text)  # type: ignore[arg-type]  # trusted: shipped with the package
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                log.info("applied migration %s", version)
                applied.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))
    return applied


def open_pool(settings: PostgresSettings) -> AsyncConnectionPool:
    """An async pool, not yet opened: the caller opens it in its lifespan."""
    return AsyncConnectionPool(
        settings.conninfo(),
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        open=False,
        # A dead server must fail requests fast (503), not hang them.
        timeout=5.0,
        kwargs={"connect_timeout": 3},
    )
