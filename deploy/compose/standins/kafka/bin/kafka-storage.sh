#!/bin/bash
# kafka-storage.sh format|random-uuid|info|version ...: KRaft storage tool.
exec "$(dirname "$0")/kafka-run-class.sh" kafka.tools.StorageTool "$@"
