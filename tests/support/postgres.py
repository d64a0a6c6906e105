"""The PostgreSQL superuser, for tests that create and drop databases of their own."""

from __future__ import annotations

import os
from pathlib import Path

from mailbus.settings import PostgresSettings, ServiceSettings


def superuser(admin: ServiceSettings) -> PostgresSettings:
    """The cluster's superuser on its `postgres` database, beside the admin's settings
    (MAILBUS_PG_SUPERUSER and MAILBUS_PG_SUPERUSER_PASSWORD_FILE name another)."""
    base = admin.postgres
    return PostgresSettings(
        host=base.host, port=base.port, dbname="postgres", sslmode=base.sslmode,
        sslrootcert=base.sslrootcert, user=os.environ.get("MAILBUS_PG_SUPERUSER", "postgres"),
        password_file=Path(os.environ.get(
            "MAILBUS_PG_SUPERUSER_PASSWORD_FILE",
            admin.var_dir / "secrets" / "postgres-superuser.password")))
