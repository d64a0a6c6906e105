#!/bin/bash
# kafka-run-class.sh of the stand-in: the class on Kafka's jars, with the
# heap of KAFKA_HEAP_OPTS (the distribution's default, -Xmx256M, when unset),
# KAFKA_OPTS, and log4j2 from KAFKA_LOG4J_OPTS (tools log warnings to stderr).
set -euo pipefail
[[ $# -ge 1 ]] || { echo "USAGE: $0 classname [opts]" >&2; exit 1; }
: "${KAFKA_HEAP_OPTS:=-Xmx256M}"
: "${KAFKA_LOG4J_OPTS:=-Dlog4j2.configurationFile=/opt/kafka/config/tools-log4j2.properties}"
# shellcheck disable=SC2086 # options are word lists, as in the distribution's script
exec java $KAFKA_HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
  $KAFKA_LOG4J_OPTS ${KAFKA_OPTS:-} -cp '/opt/kafka/libs/*' "$@"
