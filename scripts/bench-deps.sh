#!/usr/bin/env bash
# Debian packages the benchmarks need beyond the test suite's, installed when
# missing: wrk (the HTTP load generator) and Postfix, for its smtp-sink (the
# SMTP server the sender benchmarks deliver to; Postfix itself is left
# unconfigured and stopped). Needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
command -v wrk >/dev/null || need+=(wrk)
[[ -x /usr/sbin/smtp-sink ]] || need+=(postfix)
((${#need[@]})) || exit 0

source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"
APT_PRESEED="postfix postfix/main_mailer_type select No configuration" \
    apt_install bench-deps "${need[@]}"
if [[ " ${need[*]} " == *" postfix "* ]]; then
    $SUDO service postfix stop >/dev/null 2>&1 || true
fi
