"""First step of `docker compose up` (service `secrets`, as root): the bootstrap credentials.

Creates, once, in the `secrets` volume (mounted at /var/lib/mailbus/secrets):
the Kafka superuser `admin` and controller passwords, the PostgreSQL
superuser's and Grafana's admin password; every later start keeps them.
Each file is readable only by the container user that needs it: the broker
(uid 1000 in apache/kafka), PostgreSQL's entrypoint (root), Grafana (472), and
the init service (group 10002). The services themselves (uid 10001) can read
none of these; their own credentials are written by `mailbus setup` in init.

Not named secrets.py: Python puts a script's folder first on sys.path, and a
script of that name would import itself instead of the standard library's
secrets module.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

FOLDER = Path("/var/lib/mailbus/secrets")
MAILBUS_UID = 10001  # the image's user (Dockerfile)
INIT_GID = 10002  # group_add of the init service in docker-compose.yml
KAFKA_UID = 1000  # appuser in apache/kafka
GRAFANA_UID = 472  # grafana in grafana/grafana

# file: (owner uid, group gid, mode)
FILES = {
    "kafka-admin.password": (KAFKA_UID, INIT_GID, 0o440),
    "kafka-controller.password": (KAFKA_UID, KAFKA_UID, 0o400),
    "postgres-superuser.password": (0, INIT_GID, 0o440),
    "grafana-admin.password": (GRAFANA_UID, GRAFANA_UID, 0o400),
}


def main() -> None:
    # The mailbus user owns the folder (init writes the service credentials
    # there); others may pass through to the files given to them, not list it.
    FOLDER.mkdir(parents=True, exist_ok=True)
    os.chown(FOLDER, MAILBUS_UID, MAILBUS_UID)
    FOLDER.chmod(0o711)
    for name, (uid, gid, mode) in FILES.items():
        path = FOLDER / name
        if not path.exists() or not path.read_text().strip():
            # Hex: the Kafka password ends up inside a JAAS line, where quotes
            # and '=' would need escaping.
            path.write_text(secrets.token_hex(24) + "\n")
            print(f"secrets: generated {name}")
        os.chown(path, uid, gid)
        path.chmod(mode)


if __name__ == "__main__":
    main()
