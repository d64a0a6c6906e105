#!/bin/sh
# Second step of `docker compose up` (service `init`, as the image's user, once
# Kafka and PostgreSQL are healthy): the same provisioning as the native
# stack's `make infra`, then the development API key, printed.
set -eu
SECRETS=/var/lib/mailbus/secrets

# Before each container got a volume of its own, init wrote into the bootstrap
# volume, which the broker's and the database's containers mount too. Move
# what must survive (the link keys, so that links already mailed still
# verify; the development API key) and delete the rest, which setup below
# replaces with new passwords.
OLD=/run/mailbus/bootstrap
for f in link-keys.json dev-api-key; do
    if [ -f "$OLD/$f" ] && [ ! -f "$SECRETS/$f" ]; then
        cp -p "$OLD/$f" "$SECRETS/$f"
    fi
done
rm -f "$OLD/link-keys.json" "$OLD/dev-api-key" "$OLD"/postgres-mailbus_*.password
for service in ingest sender confirm projector replies hooks; do
    rm -f "$OLD/kafka-$service.password"
done
mailbus setup db
mailbus setup kafka
# The keyring that signs the links in emails (sender) and verifies them (hooks, replies).
python - "$SECRETS/link-keys.json" <<'PY'
import sys
from pathlib import Path

from mailbus.tokens import Keyring

path = Path(sys.argv[1])
if not path.exists():
    Keyring.generate_file(path)
    print(f"links: generated {path}")
PY
mailbus keys ensure --output "$SECRETS/dev-api-key" >/dev/null
echo "mailbus is provisioned. Development API key (all scopes):"
echo "MAILBUS_API_KEY=$(cat "$SECRETS/dev-api-key")"
