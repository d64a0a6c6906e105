#!/usr/bin/env bash
# Debian packages the native stack and its tests need, installed when missing:
# JDK 17 (Kafka), Maven (fetches Kafka from Maven Central), PostgreSQL,
# Prometheus, curl, openssl (the local CA), Dovecot (the replies tests' IMAP
# server), and the toolchains that build examples/ (javac, node and npm, go).
# Needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
[[ -x /usr/lib/jvm/java-17-openjdk-amd64/bin/java ]] || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need+=(maven)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v prometheus >/dev/null || need+=(prometheus)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v runuser >/dev/null || need+=(util-linux)
[[ -x /usr/sbin/dovecot ]] || need+=(dovecot-imapd)
command -v javac >/dev/null || need+=(openjdk-17-jdk-headless)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
# Debian's Go may be older than examples/go/go.mod asks for: Go 1.21 and later
# fetch the toolchain it names from the Go module proxy by themselves.
command -v go >/dev/null || need+=(golang-go)
((${#need[@]})) || exit 0

source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"
apt_install system-deps "${need[@]}"
# Debian starts a system Prometheus on install; the stack runs its own.
if [[ " ${need[*]} " == *" prometheus "* ]]; then
    $SUDO service prometheus stop >/dev/null 2>&1 || true
fi
