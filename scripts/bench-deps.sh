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

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || { echo "bench-deps: need root to install ${need[*]}" >&2; exit 1; }
    SUDO=sudo
fi
echo "bench-deps: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
if [[ " ${need[*]} " == *" postfix "* ]]; then
    $SUDO service postfix stop >/dev/null 2>&1 || true
fi
