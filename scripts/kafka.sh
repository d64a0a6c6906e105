#!/usr/bin/env bash
# Run mailbus's single-node Apache Kafka broker (KRaft, broker+controller in
# one JVM) natively from jars fetched from Maven Central, secured from the
# first start: SASL/SCRAM-SHA-512 for clients (in clear text on one port, over
# TLS on another), SASL/PLAIN on the controller listener, StandardAuthorizer
# with deny-by-default, loopback only.
#
#   scripts/kafka.sh fetch    download the jars into the cache (once)
#   scripts/kafka.sh start    fetch, configure, format once, start, wait ready
#   scripts/kafka.sh stop     SIGTERM (SIGKILL after 30 s) the broker we started
#   scripts/kafka.sh status   exit 0 if running, 3 if not
#
# Every path and port comes from the environment, so a test can run a second
# broker beside the first:
#   MAILBUS_VAR                    state root (default $REPO/var)
#   MAILBUS_CACHE                  download cache (default $REPO/.cache)
#   MAILBUS_KAFKA_PORT             client listener, 127.0.0.1 (default 9092)
#   MAILBUS_KAFKA_CONTROLLER_PORT  controller listener, 127.0.0.1 (default 9093)
#   MAILBUS_KAFKA_TLS_PORT         SASL_SSL client listener, 127.0.0.1 (default
#                                  the client port + 2, i.e. 9094)
#   MAILBUS_KAFKA_LIBDIR           jar dir (default $MAILBUS_CACHE/kafka-4.1.1/libs)
#   MAILBUS_KAFKA_HEAP_OPTS        JVM heap (default "-Xms256m -Xmx768m")
#   MAILBUS_KAFKA_START_TIMEOUT    seconds to wait for readiness (default 60)
#   MAILBUS_JAVA_HOME              JDK (default /usr/lib/jvm/java-17-openjdk-amd64)
#   MAILBUS_PYTHON                 Python with confluent_kafka for the readiness
#                                  check (default $REPO/.venv/bin/python)
#
# Secrets (generated at first start, re-used afterwards, never printed):
#   $MAILBUS_VAR/secrets/kafka-admin.password       SCRAM superuser `admin`
#   $MAILBUS_VAR/secrets/kafka-controller.password  PLAIN user `controller`
#                                                   (controller listener only)
#   $MAILBUS_VAR/secrets/ca.crt, kafka-broker.pem   the CA clients trust, and the
#                                                   TLS listener's key and chain
#                                                   (made by scripts/tls.sh)
set -euo pipefail

KAFKA_VERSION=4.1.1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MAILBUS_VAR=$(realpath -m "${MAILBUS_VAR:-$REPO/var}")
MAILBUS_CACHE=$(realpath -m "${MAILBUS_CACHE:-$REPO/.cache}")
CLIENT_PORT=${MAILBUS_KAFKA_PORT:-9092}
CONTROLLER_PORT=${MAILBUS_KAFKA_CONTROLLER_PORT:-9093}
# Derived from the client port so that a second broker started with only its
# own client and controller ports (tests do) does not reach for 9094 too.
TLS_PORT=${MAILBUS_KAFKA_TLS_PORT:-$((10#${CLIENT_PORT//[^0-9]/0} + 2))}
LIBDIR=$(realpath -m "${MAILBUS_KAFKA_LIBDIR:-$MAILBUS_CACHE/kafka-$KAFKA_VERSION/libs}")
HEAP_OPTS=${MAILBUS_KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}
START_TIMEOUT=${MAILBUS_KAFKA_START_TIMEOUT:-60}
JAVA_HOME=${MAILBUS_JAVA_HOME:-/usr/lib/jvm/java-17-openjdk-amd64}
PYTHON=${MAILBUS_PYTHON:-$REPO/.venv/bin/python}

POM=$REPO/deploy/kafka/pom.xml
TEMPLATE=$REPO/deploy/kafka/server.properties.in
LOG4J_CONFIG=$REPO/deploy/kafka/log4j2.properties

KAFKA_DIR=$MAILBUS_VAR/kafka
DATA_DIR=$KAFKA_DIR/data
CONFIG=$KAFKA_DIR/server.properties
LOG=$MAILBUS_VAR/log/kafka.log   # log4j (rolled at 20 MB)
OUT=$MAILBUS_VAR/log/kafka.out   # the JVM's own stdout/stderr
PIDFILE=$MAILBUS_VAR/run/kafka.pid
SECRETS=$MAILBUS_VAR/secrets
ADMIN_PW_FILE=$SECRETS/kafka-admin.password
CONTROLLER_PW_FILE=$SECRETS/kafka-controller.password
CA_FILE=$SECRETS/ca.crt
KEYSTORE=$SECRETS/kafka-broker.pem
FETCH_MARKER=$LIBDIR/.mailbus-fetch-complete

# Config, secrets, data and logs are for this user only.
umask 077

say() { printf 'kafka: %s\n' "$*"; }
die() { printf 'kafka: error: %s\n' "$*" >&2; exit 1; }

for port in "$CLIENT_PORT" "$CONTROLLER_PORT" "$TLS_PORT"; do
  if [[ ! $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    die "not a port: $port"
  fi
done
[[ $CLIENT_PORT != "$CONTROLLER_PORT" ]] || die "client and controller port are both $CLIENT_PORT"
[[ $TLS_PORT != "$CLIENT_PORT" && $TLS_PORT != "$CONTROLLER_PORT" ]] ||
  die "the TLS port $TLS_PORT is also the client or controller port"

JAVA=$JAVA_HOME/bin/java
# Kafka's own start scripts set these; G1 with short pauses suits a broker.
# shellcheck disable=SC2206 # the heap options are meant to split into words
JVM_OPTS=(
  $HEAP_OPTS
  -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
  -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$LOG4J_CONFIG"
  "-Dmailbus.kafka.logfile=$LOG"
)

# ---------------------------------------------------------------- fetch ----

fetch() {
  # The marker holds the POM's hash: editing the POM (e.g. a version bump)
  # fetches again instead of mixing old and new jars.
  local want
  want=$(sha256sum "$POM" | cut -d' ' -f1)
  mkdir -p "$(dirname "$LIBDIR")"
  # Two brokers started at once must not download into the same dir together.
  exec 9>"$(dirname "$LIBDIR")/.fetch.lock"
  flock 9
  if [[ -f $FETCH_MARKER && $(<"$FETCH_MARKER") == "$want" ]]; then
    exec 9>&-
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  say "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBDIR"
  local tmp=$LIBDIR.tmp.$$ mvn_log=$LIBDIR.fetch.log
  rm -rf "$tmp"
  # Maven's output is kept for a failure only (Debian's mvn prints stray
  # colour codes even with -q -B).
  if ! JAVA_HOME=$JAVA_HOME mvn -B -q -f "$POM" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" -DincludeScope=runtime >"$mvn_log" 2>&1; then
    tail -n 30 "$mvn_log" >&2
    rm -rf "$tmp"
    die "maven could not fetch the Kafka jars (full output in $mvn_log)"
  fi
  rm -f "$mvn_log"
  printf '%s\n' "$want" >"$tmp/.mailbus-fetch-complete"
  rm -rf "$LIBDIR"
  mv "$tmp" "$LIBDIR"
  exec 9>&-
}

# ---------------------------------------------------------------- state ----

# Prints the pid of the broker this MAILBUS_VAR started, if it is running.
# The pid must still be a java running kafka.Kafka with *our* config: a stale
# pid file whose number was re-used by another process is not ours to kill.
# (A zombie has an empty cmdline, so it counts as gone.)
running_pid() {
  local pid cmdline
  [[ -f $PIDFILE ]] || return 1
  pid=$(<"$PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  [[ $cmdline == *" kafka.Kafka $CONFIG"* ]] || return 1
  printf '%s\n' "$pid"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- start ----

# Creates a random secret once; later starts re-use it. Hex only: the
# password ends up inside a JAAS string and a `--add-scram` argument, where
# quotes, commas, brackets and '=' would need escaping.
ensure_secret() {
  local file=$1 what=$2
  mkdir -p "$SECRETS"
  chmod 700 "$SECRETS"
  if [[ ! -s $file ]]; then
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$file.tmp"
    printf '\n' >>"$file.tmp"
    mv "$file.tmp" "$file"
    say "generated $what password in $file"
  fi
  chmod 600 "$file"
}

read_secret() {
  local value
  value=$(<"$1")
  value=${value//[$'\t\r\n ']/}
  # A hand-written password must still be safe inside the JAAS line.
  [[ $value =~ ^[A-Za-z0-9._~+/-]{16,}$ ]] ||
    die "$1: password must be 16+ characters of [A-Za-z0-9._~+/-]"
  printf '%s' "$value"
}

# Fills the template with bash substitution (not sed) so that the secrets
# never appear on a command line, where `ps` would show them.
write_config() {
  local admin_pw=$1 controller_pw=$2 text
  text=$(<"$TEMPLATE")
  text=${text//@CLIENT_PORT@/$CLIENT_PORT}
  text=${text//@CONTROLLER_PORT@/$CONTROLLER_PORT}
  text=${text//@TLS_PORT@/$TLS_PORT}
  text=${text//@TLS_KEYSTORE@/$KEYSTORE}
  text=${text//@DATA_DIR@/$DATA_DIR}
  text=${text//@ADMIN_PASSWORD@/$admin_pw}
  text=${text//@CONTROLLER_PASSWORD@/$controller_pw}
  if [[ $text =~ @[A-Z_]+@ ]]; then
    die "$TEMPLATE has a placeholder this script does not fill: ${BASH_REMATCH[0]}"
  fi
  mkdir -p "$KAFKA_DIR"
  chmod 700 "$KAFKA_DIR"
  printf '%s\n' "$text" >"$CONFIG.tmp"
  chmod 600 "$CONFIG.tmp"
  mv "$CONFIG.tmp" "$CONFIG"
}

# KRaft refuses to start on an unformatted dir, and formatting is also the
# only moment a SCRAM credential can be written without a running broker
# (KIP-900): `admin` must exist before the first start, since the broker
# itself logs in as admin over the CLIENT listener.
format_if_needed() {
  local admin_pw=$1 cluster_id argfile
  if [[ -f $DATA_DIR/meta.properties ]]; then
    say "data dir $DATA_DIR already formatted"
    return 0
  fi
  # A cluster id is 16 random bytes in URL-safe base64 without padding; one
  # starting with '-' would look like an option to the tools, as Kafka's own
  # Uuid.randomUuid() also avoids.
  cluster_id=-
  while [[ $cluster_id == -* ]]; do
    cluster_id=$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
  done
  mkdir -p "$DATA_DIR"
  # The password goes through a java @argfile (mode 600, deleted at once)
  # rather than the command line.
  argfile=$KAFKA_DIR/format.args
  printf '"%s"\n' kafka.tools.StorageTool format --config "$CONFIG" \
    --cluster-id "$cluster_id" \
    --add-scram "SCRAM-SHA-512=[name=admin,password=$admin_pw]" >"$argfile"
  if ! "$JAVA" -cp "$LIBDIR/*" "${JVM_OPTS[@]}" @"$argfile" >>"$OUT" 2>&1; then
    rm -f "$argfile"
    tail -n 20 "$OUT" >&2
    die "formatting $DATA_DIR failed"
  fi
  rm -f "$argfile"
  say "formatted $DATA_DIR (cluster id $cluster_id, SCRAM-SHA-512 user admin)"
}

# One authenticated round trip as admin on each client listener: proves both
# are up, SCRAM works, the admin credential matches the password file and the
# TLS listener's certificate verifies against our CA for 127.0.0.1. Exit 2
# means the broker refused the password, 3 that the TLS handshake failed.
readiness_check_python() {
  timeout 25 "$PYTHON" - "$CLIENT_PORT" "$TLS_PORT" "$ADMIN_PW_FILE" "$CA_FILE" <<'EOF'
import logging
import sys

from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient

port, tls_port, pw_file, ca_file = sys.argv[1:5]
with open(pw_file, encoding="utf-8") as f:
    password = f.read().strip()
quiet = logging.getLogger("kafka.sh.readiness")
quiet.addHandler(logging.NullHandler())
quiet.propagate = False


def check(listener_port, **tls):
    errors = []
    admin = AdminClient({
        "bootstrap.servers": f"127.0.0.1:{listener_port}",
        "security.protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT",
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "admin",
        "sasl.password": password,
        "error_cb": errors.append,
        "logger": quiet,
        **tls,
    })
    try:
        md = admin.list_topics(timeout=5)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
        admin.poll(0.5)  # serves error_cb
        if any(e.code() == KafkaError._AUTHENTICATION for e in errors):
            sys.exit(2)
        if any(e.code() == KafkaError._SSL for e in errors):
            print(f"TLS: {errors[-1].str()}", file=sys.stderr)
            sys.exit(3)
        print(f"not ready: {exc}", file=sys.stderr)
        sys.exit(1)
    if not md.brokers:
        sys.exit(1)


check(port)
check(tls_port, **{"ssl.ca.location": ca_file})
sys.exit(0)
EOF
}

# Without confluent_kafka we can only see that the port accepts TCP.
readiness_check_port() { port_in_use "$CLIENT_PORT"; }

# Shows what this start wrote (from the given byte offsets) to both logs.
show_logs() {
  local log_offset=$1 out_offset=$2
  {
    echo "--- last lines of $LOG"
    tail -c +"$((log_offset + 1))" "$LOG" 2>/dev/null | tail -n 30
    echo "--- last lines of $OUT"
    tail -c +"$((out_offset + 1))" "$OUT" 2>/dev/null | tail -n 10
  } >&2
}

stop_pid() {
  local pid=$1 waited=0
  kill -TERM "$pid" 2>/dev/null || true
  # Controlled shutdown of a combined node takes a few seconds.
  while running_pid >/dev/null && ((waited < 60)); do
    sleep 0.5
    waited=$((waited + 1))
  done
  if running_pid >/dev/null; then
    say "no exit 30 s after SIGTERM, sending SIGKILL to $pid"
    kill -KILL "$pid" 2>/dev/null || true
    while running_pid >/dev/null; do sleep 0.2; done
  fi
  rm -f "$PIDFILE"
}

start() {
  local pid t0=$SECONDS
  if pid=$(running_pid); then
    say "already running (pid $pid) on 127.0.0.1:$CLIENT_PORT"
    return 0
  fi
  rm -f "$PIDFILE"
  [[ -x $JAVA ]] || die "no java at $JAVA (set MAILBUS_JAVA_HOME)"
  for port in "$CLIENT_PORT" "$CONTROLLER_PORT" "$TLS_PORT"; do
    ! port_in_use "$port" || die "127.0.0.1:$port is already in use"
  done

  fetch
  say "jars in $LIBDIR"

  ensure_secret "$ADMIN_PW_FILE" "Kafka admin"
  ensure_secret "$CONTROLLER_PW_FILE" "Kafka controller"
  local admin_pw controller_pw
  admin_pw=$(read_secret "$ADMIN_PW_FILE")
  controller_pw=$(read_secret "$CONTROLLER_PW_FILE")

  MAILBUS_VAR=$MAILBUS_VAR "$REPO/scripts/tls.sh" ensure
  write_config "$admin_pw" "$controller_pw"
  say "wrote $CONFIG"
  mkdir -p "$(dirname "$LOG")" "$(dirname "$PIDFILE")"

  format_if_needed "$admin_pw"

  # Only log lines written after this offset belong to this start.
  local log_offset=0 out_offset=0
  [[ -f $LOG ]] && log_offset=$(stat -c %s "$LOG")
  printf '=== %s start\n' "$(date -Is)" >>"$OUT"
  out_offset=$(stat -c %s "$OUT")
  # setsid: the broker outlives this shell and its terminal/job group.
  # The inner bash writes its own pid and then execs java, so the pid file
  # names the JVM itself whatever setsid/nohup do about forking.
  # shellcheck disable=SC2016 # $$ and $@ belong to the inner bash
  setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" \
    "$JAVA" -cp "$LIBDIR/*" "${JVM_OPTS[@]}" kafka.Kafka "$CONFIG" \
    >>"$OUT" 2>&1 </dev/null &
  for _ in {1..50}; do [[ -s $PIDFILE ]] && break; sleep 0.1; done
  [[ -s $PIDFILE ]] || die "the broker process did not start (see $OUT)"
  pid=$(<"$PIDFILE")

  local check=readiness_check_port how="TCP port open"
  if [[ -x $PYTHON ]] && "$PYTHON" -c 'import confluent_kafka' 2>/dev/null; then
    check=readiness_check_python how="SCRAM-SHA-512 login as admin, in clear and over TLS"
  fi
  say "started pid $pid, waiting for $how on 127.0.0.1:$CLIENT_PORT and :$TLS_PORT"

  local deadline=$((SECONDS + START_TIMEOUT)) started=0 refused=0 tls_failed=0 rc
  while ((SECONDS < deadline)); do
    if ! running_pid >/dev/null; then
      show_logs "$log_offset" "$out_offset"
      rm -f "$PIDFILE"
      die "broker exited during startup"
    fi
    # The log rolls at 20 MB: when it rolled since the start, read it whole.
    if (( $(stat -c %s "$LOG" 2>/dev/null || echo 0) < log_offset )); then log_offset=0; fi
    # Kafka logs this once the metadata log is replayed, i.e. once the SCRAM
    # credentials and ACLs are loaded; earlier logins could fail spuriously.
    if ((!started)) && grep -q 'Kafka Server started' \
        <(tail -c +"$((log_offset + 1))" "$LOG" 2>/dev/null); then
      started=1
    fi
    if ((started)); then
      rc=0
      $check 2>/dev/null || rc=$?
      if ((rc == 0)); then
        say "ready on 127.0.0.1:$CLIENT_PORT (SASL_PLAINTEXT) and :$TLS_PORT (SASL_SSL; $how ok) after $((SECONDS - t0)) s"
        return 0
      fi
      # Once the server has started its credentials are loaded, so repeated
      # refusals mean the password file no longer matches the data dir.
      if ((rc == 2)) && ((++refused >= 3)); then
        say "stopping pid $pid"
        stop_pid "$pid"
        die "broker refuses the admin password in $ADMIN_PW_FILE (changed since $DATA_DIR was formatted?)"
      fi
      # Repeated handshake failures: a certificate that does not verify now
      # will not verify on a later try either.
      if ((rc == 3)) && ((++tls_failed >= 3)); then
        show_logs "$log_offset" "$out_offset"
        say "stopping pid $pid"
        stop_pid "$pid"
        die "the TLS listener on 127.0.0.1:$TLS_PORT does not verify against $CA_FILE"
      fi
    fi
    sleep 0.5
  done
  show_logs "$log_offset" "$out_offset"
  say "not ready after $START_TIMEOUT s, stopping pid $pid"
  stop_pid "$pid"
  die "broker did not become ready"
}

# ----------------------------------------------------------- stop/status ----

stop() {
  local pid t0=$SECONDS
  if ! pid=$(running_pid); then
    rm -f "$PIDFILE"
    say "not running"
    return 0
  fi
  say "stopping pid $pid"
  stop_pid "$pid"
  say "stopped after $((SECONDS - t0)) s"
}

status() {
  local pid
  if pid=$(running_pid); then
    say "running (pid $pid) on 127.0.0.1:$CLIENT_PORT, state in $MAILBUS_VAR"
    return 0
  fi
  say "not running (state in $MAILBUS_VAR)"
  return 3
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  fetch) fetch; say "jars in $LIBDIR" ;;
  *)
    echo "usage: $0 start|stop|status|fetch" >&2
    exit 2
    ;;
esac
