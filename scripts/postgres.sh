#!/usr/bin/env bash
# A PostgreSQL cluster of mailbus's own under $MAILBUS_VAR/postgres, from
# Debian's postgresql packages: start | stop | status.
#
# It never touches the system cluster. PostgreSQL refuses to run as root, so
# when we are root the server runs as the `postgres` OS user. Every
# connection, the superuser's included, is password-authenticated over
# 127.0.0.1 (scram-sha-256); the superuser password is generated at first
# start into $MAILBUS_VAR/secrets/postgres-superuser.password (mode 600).
# TLS is on (ssl=on) with a server certificate from the local CA
# (scripts/tls.sh): clients verify it with sslmode=verify-full and
# sslrootcert=$MAILBUS_VAR/secrets/ca.crt. pg_hba stays `host`, not
# `hostssl`: the server listens on loopback only, and which clients must use
# TLS is the clients' own setting (MAILBUS_ENV=production requires it).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR="${MAILBUS_VAR:-$REPO/var}"
PORT="${MAILBUS_PG_PORT:-5433}"
PGHOME="$VAR/postgres"
# As root the server runs as `postgres`, which must be able to reach its data
# directory: a checkout under a private home (/root is 0700) is out of its
# reach, so the cluster then lives under /var/lib/mailbus-postgres instead,
# one per checkout.
LOG="$VAR/log/postgres.log"
mkdir -p "$VAR"
if [[ "$(id -u)" == 0 ]] && ! runuser -u postgres -- test -x "$VAR" 2>/dev/null; then
    PGHOME="/var/lib/mailbus-postgres/$(echo -n "$VAR" | sha256sum | cut -c1-12)"
    LOG="$PGHOME/postgres.log"
fi
DATA="$PGHOME/data"
SOCK="$PGHOME/run"
SECRETS="$VAR/secrets"
SUPERPASS="$SECRETS/postgres-superuser.password"
# Included by postgresql.conf; rewritten on every start, so clusters
# initialised before TLS existed get it too.
TLS_CONF="mailbus-tls.conf"

pgbin() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
    [[ -n "$dir" ]] || { echo "postgres: Debian's postgresql is not installed (apt-get install postgresql)" >&2; exit 1; }
    echo "$dir"
}

as_owner() {
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running() {
    [[ -f "$DATA/postmaster.pid" ]] && as_owner "$(pgbin)/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

init_cluster() {
    local bin; bin="$(pgbin)"
    mkdir -p "$PGHOME" "$VAR/log" "$SOCK"
    install -d -m 700 "$SECRETS"
    if [[ ! -s "$SUPERPASS" ]]; then
        (umask 077; head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$SUPERPASS")
    fi
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres: "$PGHOME" "$SOCK"
        # postgres must read the password file once, for initdb only.
        local tmp; tmp="$(mktemp)"; cp "$SUPERPASS" "$tmp"; chown postgres "$tmp"; chmod 600 "$tmp"
        as_owner "$bin/initdb" -D "$DATA" -U postgres --pwfile="$tmp" \
            --auth-host=scram-sha-256 --auth-local=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
        rm -f "$tmp"
    else
        "$bin/initdb" -D "$DATA" -U postgres --pwfile="$SUPERPASS" \
            --auth-host=scram-sha-256 --auth-local=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    fi
    # Loopback only; the sockets live in our own run dir, not /var/run.
    cat >> "$DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCK'
password_encryption = 'scram-sha-256'
max_connections = 200
shared_buffers = 128MB
fsync = on
CONF
    echo "postgres: initialised a cluster in $DATA"
}

# Puts the server certificate and key into the data dir (the server's user
# must own the key, mode 600, or PostgreSQL refuses it) and the TLS settings
# into an included file. Prints "changed" when a running server must reload.
ensure_tls() {
    MAILBUS_VAR="$VAR" "$REPO/scripts/tls.sh" ensure >&2
    local changed="" f want
    for f in crt key; do
        if ! cmp -s "$SECRETS/postgres-server.$f" "$DATA/server.$f" 2>/dev/null; then
            if [[ "$(id -u)" == 0 ]]; then
                install -m 600 -o postgres -g postgres "$SECRETS/postgres-server.$f" "$DATA/server.$f"
            else
                install -m 600 "$SECRETS/postgres-server.$f" "$DATA/server.$f"
            fi
            changed=1
        fi
    done
    # Relative paths are resolved against the data dir.
    want="ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_min_protocol_version = 'TLSv1.2'"
    if [[ "$(as_owner cat "$DATA/$TLS_CONF" 2>/dev/null)" != "$want" ]]; then
        printf '%s\n' "$want" | as_owner tee "$DATA/$TLS_CONF" >/dev/null
        changed=1
    fi
    if ! as_owner grep -qx "include_if_exists = '$TLS_CONF'" "$DATA/postgresql.conf"; then
        echo "include_if_exists = '$TLS_CONF'" | as_owner tee -a "$DATA/postgresql.conf" >/dev/null
        changed=1
    fi
    [[ -z "$changed" ]] || echo changed
}

start() {
    if running; then
        # ssl and its files are reloadable settings: a running server picks
        # up TLS (or a renewed certificate) without a restart.
        if [[ -n "$(ensure_tls)" ]]; then
            as_owner "$(pgbin)/pg_ctl" -D "$DATA" reload >/dev/null
            echo "postgres: TLS settings reloaded"
        fi
        echo "postgres: already running on 127.0.0.1:$PORT"
        return 0
    fi
    [[ -f "$DATA/PG_VERSION" ]] || init_cluster
    ensure_tls >/dev/null
    mkdir -p "$VAR/log" "$(dirname "$LOG")"; touch "$LOG"
    [[ "$(id -u)" == 0 ]] && chown postgres "$LOG"
    # A pid file left by a killed server would stop pg_ctl; pg_ctl itself
    # checks whether that pid is alive, so a stale file is handled there.
    as_owner "$(pgbin)/pg_ctl" -D "$DATA" -l "$LOG" -o "-p $PORT" -w -t 60 start >/dev/null
    echo "postgres: running on 127.0.0.1:$PORT, TLS with $SECRETS/ca.crt (log $LOG)"
}

stop() {
    if ! running; then echo "postgres: not running"; return 0; fi
    as_owner "$(pgbin)/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null
    echo "postgres: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) if running; then echo "postgres: running on 127.0.0.1:$PORT"; else echo "postgres: not running"; exit 3; fi ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
