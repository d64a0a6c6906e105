#!/bin/bash
# kafka-server-start.sh CONFIG: the broker (and controller) of that configuration.
[[ $# -ge 1 ]] || { echo "USAGE: $0 server.properties [--override property=value]*" >&2; exit 1; }
: "${KAFKA_HEAP_OPTS:=-Xmx1G -Xms1G}"
: "${KAFKA_LOG4J_OPTS:=-Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties}"
export KAFKA_HEAP_OPTS KAFKA_LOG4J_OPTS
exec "$(dirname "$0")/kafka-run-class.sh" kafka.Kafka "$@"
