#!/bin/bash
# The broker of `docker compose up`, in the apache/kafka image: the same
# single-node KRaft setup as scripts/kafka.sh (SASL/SCRAM-SHA-512 for clients,
# PLAIN on the controller listener, StandardAuthorizer, no access without an
# ACL), its passwords read from the secrets volume, never from the compose file.
set -euo pipefail
umask 077
SECRETS=/run/mailbus-secrets
DATA=/var/lib/kafka/data
CONFIG=/tmp/mailbus-kafka/server.properties
mkdir -p "$(dirname "$CONFIG")"

admin_pw=$(tr -d ' \n\r\t' <"$SECRETS/kafka-admin.password")
controller_pw=$(tr -d ' \n\r\t' <"$SECRETS/kafka-controller.password")
external_port=${MAILBUS_KAFKA_EXTERNAL_PORT:-9094}
[[ $external_port =~ ^[0-9]{1,5}$ ]] ||
  { echo "kafka: MAILBUS_KAFKA_EXTERNAL_PORT must be a port number" >&2; exit 1; }
[[ $admin_pw =~ ^[A-Za-z0-9._~+/-]{16,}$ && $controller_pw =~ ^[A-Za-z0-9._~+/-]{16,}$ ]] ||
  { echo "kafka: the passwords in $SECRETS must be 16+ characters of [A-Za-z0-9._~+/-]" >&2; exit 1; }

# Bash substitution, not sed: the passwords never appear on a command line.
text=$(</etc/mailbus/kafka/server.properties.in)
text=${text//@DATA_DIR@/$DATA}
text=${text//@EXTERNAL_PORT@/$external_port}
text=${text//@ADMIN_PASSWORD@/$admin_pw}
text=${text//@CONTROLLER_PASSWORD@/$controller_pw}
printf '%s\n' "$text" >"$CONFIG"
# For the health check: an authenticated round trip as admin.
printf 'security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="%s";\n' \
  "$admin_pw" >/tmp/mailbus-kafka/admin.properties

# The admin SCRAM credential must exist before the first start, since the
# broker logs in to itself as admin (KIP-900: written when formatting).
if [[ ! -f $DATA/meta.properties ]]; then
  /opt/kafka/bin/kafka-storage.sh format --config "$CONFIG" \
    --cluster-id "$(/opt/kafka/bin/kafka-storage.sh random-uuid)" \
    --add-scram "SCRAM-SHA-512=[name=admin,password=$admin_pw]"
fi
exec /opt/kafka/bin/kafka-server-start.sh "$CONFIG"
