#!/bin/bash
# kafka-broker-api-versions.sh --bootstrap-server HOST:PORT [--command-config FILE]
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.BrokerApiVersionsCommand "$@"
