#!/bin/bash
# The stand-in's entrypoint: the part of the official image's
# docker-entrypoint.sh that docker-compose.yml relies on (see postgres.Containerfile).
set -Eeo pipefail

# VAR from itself or from the file VAR_FILE names (not both).
file_env() {
    local var=$1 file_var="${1}_FILE" def=${2:-}
    if [[ ${!var:-} && ${!file_var:-} ]]; then
        echo >&2 "error: both $var and $file_var are set (but are exclusive)"; exit 1
    fi
    local val=$def
    if [[ ${!var:-} ]]; then val=${!var}; elif [[ ${!file_var:-} ]]; then val=$(<"${!file_var}"); fi
    export "$var"="$val"
    unset "$file_var"
}

if [[ ${1:0:1} == - ]]; then set -- postgres "$@"; fi
if [[ $1 != postgres ]]; then exec "$@"; fi

file_env POSTGRES_PASSWORD
file_env POSTGRES_USER postgres
file_env POSTGRES_DB "$POSTGRES_USER"
file_env POSTGRES_INITDB_ARGS
: "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
export POSTGRES_HOST_AUTH_METHOD

if [[ $(id -u) == 0 ]]; then
    mkdir -p "$PGDATA"
    chmod 00700 "$PGDATA"
    find "$PGDATA" \! -user postgres -exec chown postgres '{}' +
    # The password now travels in the environment, as in the official image.
    exec gosu postgres "$BASH_SOURCE" "$@"
fi

if [[ ! -s $PGDATA/PG_VERSION ]]; then
    if [[ -z $POSTGRES_PASSWORD && $POSTGRES_HOST_AUTH_METHOD != trust ]]; then
        echo >&2 "error: database is uninitialized and superuser password is not specified"
        exit 1
    fi
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of options
    initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        $POSTGRES_INITDB_ARGS
    printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >>"$PGDATA/pg_hba.conf"
    if [[ $POSTGRES_DB != postgres ]]; then
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
        PGPASSWORD=$POSTGRES_PASSWORD psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" \
            --no-password --dbname postgres -c "CREATE DATABASE \"$POSTGRES_DB\""
        pg_ctl -D "$PGDATA" -m fast -w stop
    fi
    echo "PostgreSQL init process complete; ready for start up."
else
    echo "PostgreSQL Database directory appears to contain a database; Skipping initialization"
fi
unset POSTGRES_PASSWORD
exec "$@"
