#!/bin/sh
# Second step of `docker compose up` (service `init`, as the image's user, once
# Kafka and PostgreSQL are healthy): the same provisioning as the native
# stack's `make infra`, then the development API key, printed.
set -eu
SECRETS=/var/lib/mailbus/secrets

# Before each container got a volume of its own, init wrote into the bootstrap
# volume: keep signing with the link keys found there, so that links already
# mailed still verify.
if [ ! -f "$SECRETS/link-keys.json" ] && [ -f /run/mailbus/bootstrap/link-keys.json ]; then
    cp /run/mailbus/bootstrap/link-keys.json "$SECRETS/link-keys.json"
    chmod 600 "$SECRETS/link-keys.json"
fi
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
