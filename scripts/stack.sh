#!/usr/bin/env bash
# The native stack: install | infra | up | down | status.
#   install  virtualenv + the project (skipped when pyproject.toml is unchanged)
#   infra    Kafka and PostgreSQL running (each also over TLS, with certificates
#            from a local CA made once by scripts/tls.sh) and provisioned
#            (what the tests need)
#   up       infra + the services, waited on until healthy, then a summary
#   down     stops what `up` started, and nothing else
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MAILBUS_VAR="${MAILBUS_VAR:-$REPO/var}"
export MAILBUS_VAR_DIR="$MAILBUS_VAR"
VENV="$REPO/.venv"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
RUN="$MAILBUS_VAR/run"
LOGS="$MAILBUS_VAR/log"
API_PORT="${MAILBUS_PORT:-8080}"
# scripts/kafka.sh's default: the client port + 2.
KAFKA_TLS_PORT="${MAILBUS_KAFKA_TLS_PORT:-$(( ${MAILBUS_KAFKA_PORT:-9092} + 2 ))}"
# Started in this order, stopped in reverse.
SERVICES=(devsmtp ingest sender confirm projector hooks replies webhooks prometheus)

install_python() {
    local stamp="$VENV/.installed" want
    want="$(cat "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return 0; fi
    echo "python: installing mailbus into $VENV"
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e "$REPO[test,dev]"
    echo "$want" > "$stamp"
}

accounts() {
    # A development account, so that a fresh stack routes requests at once;
    # it submits to the development SMTP server on 127.0.0.1:2525. An
    # existing file is the operator's and is never overwritten.
    local file="$MAILBUS_VAR/accounts.toml"
    [[ -f "$file" ]] && return 0
    mkdir -p "$MAILBUS_VAR"
    install -m 600 "$REPO/deploy/accounts.dev.toml" "$file"
    echo "accounts: wrote $file (development account 'dev')"
}

infra() {
    "$REPO/scripts/system-deps.sh"
    install_python
    mkdir -p "$RUN" "$LOGS"
    "$REPO/scripts/kafka.sh" start
    "$REPO/scripts/postgres.sh" start
    "$VENV/bin/mailbus" setup db
    "$VENV/bin/mailbus" setup kafka
    accounts
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_service() {
    local name="$1" pidfile="$RUN/$1.pid"
    if pid_alive "$pidfile"; then echo "$name: already running"; return 0; fi
    # setsid: the service outlives this shell and gets its own process group.
    local cmd=("$VENV/bin/mailbus" "$name")
    # Locally, webhooks may go to plain-http receivers on this machine
    # (docs/configuration.md); production refuses both.
    if [[ "$name" == ingest ]]; then
        cmd=(env "MAILBUS_WEBHOOKS_ALLOW_HTTP=${MAILBUS_WEBHOOKS_ALLOW_HTTP:-true}" "${cmd[@]}")
    elif [[ "$name" == webhooks ]]; then
        cmd=(env "MAILBUS_ALLOW_HTTP=${MAILBUS_ALLOW_HTTP:-true}"
             "MAILBUS_ALLOWED_NETWORKS=${MAILBUS_ALLOWED_NETWORKS:-[\"127.0.0.0/8\",\"::1/128\"]}"
             "${cmd[@]}")
    fi
    if [[ "$name" == prometheus ]]; then
        mkdir -p "$MAILBUS_VAR/prometheus"
        cmd=(prometheus --config.file="$REPO/deploy/prometheus/prometheus.yml"
             --storage.tsdb.path="$MAILBUS_VAR/prometheus" --storage.tsdb.retention.time=45d
             --web.listen-address=127.0.0.1:9090)
    fi
    setsid nohup "${cmd[@]}" >>"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! > "$pidfile"
    echo "$name: started (log $LOGS/$name.log)"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Each service's health check: an HTTP URL that must answer 2xx, or tcp:PORT.
health() {
    case "$1" in
        devsmtp) echo "tcp:2525" ;;
        ingest) echo "http://127.0.0.1:$API_PORT/readyz" ;;
        sender) echo "http://127.0.0.1:${MAILBUS_METRICS_PORT:-9101}/readyz" ;;
        confirm) echo "http://127.0.0.1:9102/metrics" ;;
        projector) echo "http://127.0.0.1:9103/metrics" ;;
        hooks) echo "http://127.0.0.1:8081/readyz" ;;
        replies) echo "http://127.0.0.1:9105/metrics" ;;
        webhooks) echo "http://127.0.0.1:9106/metrics" ;;
        prometheus) echo "http://127.0.0.1:9090/-/ready" ;;
    esac
}

healthy() {
    local check; check="$(health "$1")"
    case "$check" in
        tcp:*) port_open "${check#tcp:}" ;;
        *) curl -fsS -o /dev/null "$check" 2>/dev/null ;;
    esac
}

wait_ready() {
    local name="$1" deadline=$((SECONDS + 60))
    until healthy "$name"; do
        if (( SECONDS > deadline )); then
            echo "$name: not ready after 60 s; last log lines:" >&2
            tail -n 30 "$LOGS/$name.log" >&2; exit 1
        fi
        sleep 0.5
    done
}

stop_service() {
    local name="$1" pidfile="$RUN/$1.pid"
    if ! pid_alive "$pidfile"; then rm -f "$pidfile"; return 0; fi
    local pid; pid="$(cat "$pidfile")"
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    rm -f "$pidfile"
    echo "$name: stopped"
}

up() {
    infra
    "$VENV/bin/mailbus" keys ensure --output "$MAILBUS_VAR/dev-api-key" >/dev/null
    for s in "${SERVICES[@]}"; do start_service "$s"; wait_ready "$s"; done
    cat <<SUMMARY

mailbus is up.
  API          http://127.0.0.1:$API_PORT   (OpenAPI: /docs, /openapi.json)
  API key      $MAILBUS_VAR/dev-api-key   (mode 600; all scopes)
  Kafka        127.0.0.1:${MAILBUS_KAFKA_PORT:-9092} SASL_PLAINTEXT, 127.0.0.1:$KAFKA_TLS_PORT SASL_SSL
               (SCRAM-SHA-512; credentials and the CA, ca.crt, in $MAILBUS_VAR/secrets)
  PostgreSQL   127.0.0.1:${MAILBUS_PG_PORT:-5433} database mailbus (TLS: sslmode=verify-full
               with sslrootcert=$MAILBUS_VAR/secrets/ca.crt)
  Sender       metrics http://127.0.0.1:${MAILBUS_METRICS_PORT:-9101}/metrics; \`mailbus accounts list\`
  Hooks        http://127.0.0.1:8081 (action and unsubscribe links; metrics :9104)
  Replies      reads the mailboxes of accounts with an [accounts.imap] table (metrics :9105)
  Webhooks     delivers events to the endpoints keys register (metrics :9106; http and
               loopback allowed locally)
  Prometheus   http://127.0.0.1:9090 (rules in deploy/prometheus; Grafana dashboards in deploy/grafana)
  Dev mail     SMTP 127.0.0.1:2525, kept in $MAILBUS_VAR/devmail; \`mailbus devmail\` lists it
  Logs         $LOGS/
  Try:  curl -s -H "Authorization: Bearer \$(cat $MAILBUS_VAR/dev-api-key)" \\
          -H 'Content-Type: application/json' http://127.0.0.1:$API_PORT/v1/messages \\
          -d '{"to": ["ada@example.com"], "subject": "Hello", "text": "Hi Ada"}'
SUMMARY
}

down() {
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop_service "${SERVICES[i]}"; done
    "$REPO/scripts/kafka.sh" stop
    "$REPO/scripts/postgres.sh" stop
}

case "${1:-}" in
    install) install_python ;;
    infra) infra ;;
    up) up ;;
    down) down ;;
    *) echo "usage: $0 install|infra|up|down" >&2; exit 2 ;;
esac
