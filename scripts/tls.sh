#!/usr/bin/env bash
# The local stack's certificate authority and server certificates, made with
# the openssl CLI into $MAILBUS_VAR/secrets the first time they are needed and
# re-used afterwards (scripts/kafka.sh and scripts/postgres.sh call it on each
# start, so it must be cheap when everything is in place).
#
#   scripts/tls.sh ensure   create what is missing, renew what expires soon
#
#   ca.crt / ca.key                 the CA (key mode 600); clients trust ca.crt
#   kafka-broker.crt / .key / .pem  Kafka's SASL_SSL listener; the .pem is key +
#                                   chain, read by the broker as a PEM keystore
#   postgres-server.crt / .key      PostgreSQL (copied into its data dir)
#
# Server certificates name 127.0.0.1 and localhost (what local clients dial)
# and the compose file's service name (kafka, postgres).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MAILBUS_VAR=$(realpath -m "${MAILBUS_VAR:-$REPO/var}")
SECRETS=$MAILBUS_VAR/secrets
CA_DAYS=3650
# Below Apple's 825-day limit for server certificates; renewed by `ensure`
# once fewer than RENEW_DAYS remain.
LEAF_DAYS=820
RENEW_DAYS=30

umask 077

say() { printf 'tls: %s\n' "$*"; }
die() { printf 'tls: error: %s\n' "$*" >&2; exit 1; }

command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"

serial() { printf '0x%s' "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"; }

# P-256 keys in PKCS#8 (BEGIN PRIVATE KEY): the one key format that Java's
# PEM keystore, libpq's server and OpenSSL all read unencrypted.
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ensure_ca() {
  if [[ -s $SECRETS/ca.key && -s $SECRETS/ca.crt ]] &&
      openssl x509 -in "$SECRETS/ca.crt" -noout -checkend $((RENEW_DAYS * 86400)) >/dev/null; then
    return 0
  fi
  new_key "$SECRETS/ca.key.tmp"
  openssl req -x509 -new -key "$SECRETS/ca.key.tmp" -days "$CA_DAYS" -sha256 \
    -subj "/O=mailbus/CN=mailbus local CA $(date -u +%Y%m%d%H%M%S)" -set_serial "$(serial)" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$SECRETS/ca.crt.tmp"
  mv "$SECRETS/ca.key.tmp" "$SECRETS/ca.key"
  mv "$SECRETS/ca.crt.tmp" "$SECRETS/ca.crt"
  # A new CA invalidates every certificate it did not sign; ensure_leaf
  # notices and issues them again.
  say "generated a CA in $SECRETS/ca.crt"
}

# ensure_leaf NAME SAN: $SECRETS/NAME.{key,crt}, signed by the CA, re-issued
# when missing, expiring, signed by another CA or naming other hosts.
ensure_leaf() {
  local name=$1 san=$2 crt=$SECRETS/$1.crt key=$SECRETS/$1.key ext
  if [[ -s $key && -s $crt ]] &&
      openssl verify -CAfile "$SECRETS/ca.crt" "$crt" >/dev/null 2>&1 &&
      openssl x509 -in "$crt" -noout -checkend $((RENEW_DAYS * 86400)) >/dev/null &&
      [[ $(openssl x509 -in "$crt" -noout -ext subjectAltName 2>/dev/null | tail -n +2 |
           tr -d ' ') == "$(tr -d ' ' <<<"${san//IP:/IP Address:}")" ]]; then
    return 1
  fi
  ext=$(mktemp "$SECRETS/.ext.XXXXXX")
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectAltName=$san" >"$ext"
  new_key "$key.tmp"
  openssl req -new -key "$key.tmp" -subj "/O=mailbus/CN=$name" |
    openssl x509 -req -CA "$SECRETS/ca.crt" -CAkey "$SECRETS/ca.key" -set_serial "$(serial)" \
      -days "$LEAF_DAYS" -sha256 -extfile "$ext" -out "$crt.tmp" 2>/dev/null
  rm -f "$ext"
  mv "$key.tmp" "$key"
  mv "$crt.tmp" "$crt"
  say "issued $crt ($san)"
}

ensure() {
  install -d -m 700 "$SECRETS"
  # kafka.sh and postgres.sh may run at once: one of them issues.
  exec 8>"$SECRETS/.tls.lock"
  flock 8
  ensure_ca
  if ensure_leaf kafka-broker "IP:127.0.0.1, DNS:localhost, DNS:kafka" ||
      [[ ! -s $SECRETS/kafka-broker.pem ]]; then
    cat "$SECRETS/kafka-broker.key" "$SECRETS/kafka-broker.crt" "$SECRETS/ca.crt" \
      >"$SECRETS/kafka-broker.pem.tmp"
    mv "$SECRETS/kafka-broker.pem.tmp" "$SECRETS/kafka-broker.pem"
  fi
  ensure_leaf postgres-server "IP:127.0.0.1, DNS:localhost, DNS:postgres" || true
  # Certificates are public, but like everything under secrets/ they are for
  # this user only (postgres.sh copies the server's into its data dir).
  chmod 600 "$SECRETS"/ca.{key,crt} "$SECRETS"/kafka-broker.{key,crt,pem} \
    "$SECRETS"/postgres-server.{key,crt}
  exec 8>&-
}

case ${1:-} in
  ensure) ensure ;;
  *) echo "usage: $0 ensure" >&2; exit 2 ;;
esac
