#!/usr/bin/env bash
# The project's image with Debian's podman, on a machine with no Docker engine
# and no reachable container registry.
#
#   scripts/podman.sh setup           podman, runc, debootstrap installed (apt); containers.conf
#   scripts/podman.sh base            local debian:bookworm, and a python:3.11-slim stand-in built on it
#   scripts/podman.sh build           the project image (tag $MAILBUS_IMAGE), timed, size printed
#   scripts/podman.sh podman ARGS...  podman with the project's containers.conf
#   scripts/podman.sh compose ARGS... podman-compose (from PyPI) with the same configuration
#   scripts/podman.sh standins        local stand-ins for the compose file's third-party images
#   scripts/podman.sh compose-setup   what `make compose-test` runs the compose file with (apt)
#   scripts/podman.sh lock            requirements.lock again from pyproject.toml (uv, from PyPI)
#
# Podman reads $REPO/.cache/podman/containers.conf (through CONTAINERS_CONF),
# never the system's: `runtime = "runc"` because crun fails on cgroup v1
# hosts like this one, and explicit ulimits because podman's default
# (nofile=1048576) is refused here. The debootstrap tarball is kept in
# .cache/podman/, so a rerun only re-imports it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MAILBUS_CACHE:-$REPO/.cache}/podman"
IMAGE="${MAILBUS_IMAGE:-localhost/mailbus:dev}"
SUITE=bookworm
BASE_TAR="$CACHE/debian-$SUITE-minbase.tar"
export CONTAINERS_CONF="$CACHE/containers.conf"

say() { printf 'podman.sh: %s\n' "$*"; }
die() { printf 'podman.sh: error: %s\n' "$*" >&2; exit 1; }

write_conf() {
    mkdir -p "$CACHE"
    cat >"$CONTAINERS_CONF.tmp" <<'CONF'
# Written by scripts/podman.sh.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
    mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
}

setup() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v newuidmap >/dev/null || missing+=(uidmap)
    command -v slirp4netns >/dev/null || missing+=(slirp4netns)
    if ((${#missing[@]})); then
        ((EUID == 0)) || die "needs root to install ${missing[*]}"
        say "installing ${missing[*]}"
        # Another apt run (a colleague's, unattended-upgrades) holds the lock for a while.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 \
            "${missing[@]}" >/dev/null
    fi
    write_conf
}

# The mirror apt already uses here (deb822 or one-line sources).
debian_mirror() {
    local uri
    uri=$(grep -hsE '^URIs:.*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null |
          head -n1 | awk '{print $2}')
    [[ -n $uri ]] || uri=$(grep -hsE "^deb .*/debian/? +$SUITE " /etc/apt/sources.list \
                           /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 | awk '{print $2}')
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

has_image() { podman image exists "$1"; }

base() {
    setup
    if has_image docker.io/library/python:3.11-slim && [[ ${MAILBUS_REBUILD_BASE:-} != 1 ]]; then
        say "base images ready: localhost/debian:$SUITE, python:3.11-slim (stand-in)"
        return 0
    fi
    if ! has_image localhost/debian:$SUITE && [[ ! -s $BASE_TAR ]]; then
        local root="$CACHE/rootfs.$$" mirror
        mirror=$(debian_mirror)
        say "debootstrap --variant=minbase $SUITE from $mirror (once; cached in $BASE_TAR)"
        rm -rf "$root"
        debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
            { tail -n 20 "$CACHE/debootstrap.log" >&2; rm -rf "$root"; die "debootstrap failed"; }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$BASE_TAR.tmp" .
        mv "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf "$root"
    fi
    if ! has_image localhost/debian:$SUITE; then
        say "importing $BASE_TAR as localhost/debian:$SUITE"
        podman import -q "$BASE_TAR" localhost/debian:$SUITE >/dev/null
    fi
    say "building the python:3.11-slim stand-in (bookworm's Python 3.11)"
    local ctx="$CACHE/standin"
    rm -rf "$ctx"
    mkdir -p "$ctx"
    cp "$REPO/deploy/compose/standins/python.Containerfile" "$ctx/Containerfile"
    # Outbound HTTPS may pass a proxy that re-signs it: the host's CA
    # bundle (and its pip config) go into the stand-in, never into the
    # project's own Dockerfile.
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca-certificates.crt"
    if [[ -f /etc/pip.conf ]]; then cp /etc/pip.conf "$ctx/pip.conf"; else : >"$ctx/pip.conf"; fi
    podman build -q --format docker --network host "${PROXY_ARGS[@]}" \
        -t docker.io/library/python:3.11-slim -t localhost/python:3.11-slim "$ctx" >/dev/null
    rm -rf "$ctx"
    say "base images ready: localhost/debian:$SUITE, python:3.11-slim (stand-in)"
}

# The compose file's third-party images, where no registry is reachable:
# stand-ins built from Debian packages, Maven Central and the Go module proxy
# (deploy/compose/standins/, each file says which part of the real image it
# honours), tagged with the names and tags docker-compose.yml uses. Each
# carries the hash of what it was built from, and is rebuilt only when that
# changes, so a second run costs seconds.
MAILPIT_MODULE=github.com/axllent/mailpit
MAILPIT_VERSION=v1.33.1
declare -A STANDIN_TAGS=(
    [kafka]=docker.io/apache/kafka:4.1.1
    [postgres]=docker.io/library/postgres:16-bookworm
    [prometheus]=docker.io/prom/prometheus:latest
    [mailpit]=docker.io/axllent/mailpit:latest
)
STANDINS="$REPO/deploy/compose/standins"

# Kafka's jars for the stand-in (kafka/pom.xml), fetched once per POM.
standin_kafka_libs() {
    local pom="$STANDINS/kafka/pom.xml" libs="$CACHE/standins/kafka-libs" want
    want=$(sha256sum "$pom" | cut -d' ' -f1)
    if [[ -f $libs/.pom-sha256 && $(<"$libs/.pom-sha256") == "$want" ]]; then return 0; fi
    command -v mvn >/dev/null || die "mvn not found (scripts/system-deps.sh installs it)"
    say "fetching Kafka's jars for the apache/kafka stand-in from Maven Central"
    rm -rf "$libs.tmp"
    mvn -B -q -f "$pom" dependency:copy-dependencies -DoutputDirectory="$libs.tmp" \
        -DincludeScope=runtime >"$CACHE/standins/mvn.log" 2>&1 ||
        { tail -n 30 "$CACHE/standins/mvn.log" >&2; die "maven could not fetch the Kafka jars"; }
    printf '%s\n' "$want" >"$libs.tmp/.pom-sha256"
    rm -rf "$libs"
    mv "$libs.tmp" "$libs"
}

# Mailpit, built from its Go module (static, so it runs on any base).
standin_mailpit_binary() {
    local bin="$CACHE/standins/mailpit-$MAILPIT_VERSION"
    [[ -x $bin ]] && return 0
    command -v go >/dev/null || die "go not found (scripts/system-deps.sh installs it)"
    say "building Mailpit $MAILPIT_VERSION from its Go module (once)"
    local t0=$SECONDS
    rm -rf "$CACHE/standins/gobin"
    CGO_ENABLED=0 GOBIN="$CACHE/standins/gobin" go install -trimpath -ldflags '-s -w' \
        "$MAILPIT_MODULE@$MAILPIT_VERSION" >"$CACHE/standins/go.log" 2>&1 ||
        { tail -n 30 "$CACHE/standins/go.log" >&2; die "Mailpit did not build"; }
    mv "$CACHE/standins/gobin/mailpit" "$bin"
    rm -rf "$CACHE/standins/gobin"
    say "built Mailpit in $((SECONDS - t0)) s"
}

standin() {
    local name=$1 tag=${STANDIN_TAGS[$1]} ctx="$CACHE/standins/ctx-$1" hash have
    # What the image is built from: the base, the stand-in's own files (the
    # Kafka POM among them) and the Mailpit version; known before fetching
    # or building anything, so an up-to-date stand-in costs nothing.
    hash=$( { podman image inspect --format '{{.Id}}' localhost/debian:$SUITE
              echo "$MAILPIT_MODULE@$MAILPIT_VERSION"
              (cd "$STANDINS/$name" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
            } | sha256sum | cut -c1-16)
    have=$(podman image inspect --format '{{index .Labels "mailbus.standin.hash"}}' "$tag" \
           2>/dev/null || true)
    if [[ $have == "$hash" ]]; then
        say "stand-in $tag is up to date"
        return 0
    fi
    rm -rf "$ctx"
    mkdir -p "$ctx"
    cp -r "$STANDINS/$name/." "$ctx/"
    case $name in
        kafka) standin_kafka_libs; cp -r "$CACHE/standins/kafka-libs" "$ctx/libs"
               rm -f "$ctx/libs/.pom-sha256" ;;
        mailpit) standin_mailpit_binary; cp "$CACHE/standins/mailpit-$MAILPIT_VERSION" "$ctx/mailpit" ;;
    esac
    local t0=$SECONDS
    podman build -q --format docker --network host "${PROXY_ARGS[@]}" \
        --label "mailbus.standin=$name" --label "mailbus.standin.hash=$hash" \
        -f "$ctx/$name.Containerfile" -t "$tag" "$ctx" >"$CACHE/standins/build-$name.log" 2>&1 ||
        { tail -n 30 "$CACHE/standins/build-$name.log" >&2; die "stand-in $name did not build"; }
    say "built stand-in $tag in $((SECONDS - t0)) s"
    rm -rf "$ctx"
}

standins() {
    base
    mkdir -p "$CACHE/standins"
    local name t0=$SECONDS
    for name in kafka postgres prometheus mailpit; do standin "$name"; done
    say "stand-ins ready in $((SECONDS - t0)) s"
}

# `make compose-test` runs docker-compose.yml with Debian's docker-compose
# against podman's Docker-compatible API (podman system service): podman 4.3
# (bookworm's) is too old for podman-compose to honour `condition:
# service_healthy`. netavark and aardvark-dns give the compose network its
# names, catatonit is `init: true`.
compose_setup() {
    setup
    local missing=()
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    [[ -x /usr/lib/podman/netavark || -x /usr/libexec/podman/netavark ]] || missing+=(netavark)
    [[ -x /usr/lib/podman/aardvark-dns || -x /usr/libexec/podman/aardvark-dns ]] ||
        missing+=(aardvark-dns)
    [[ -x /usr/libexec/podman/catatonit ]] || missing+=(catatonit)
    if ((${#missing[@]})); then
        ((EUID == 0)) || die "needs root to install ${missing[*]}"
        say "installing ${missing[*]}"
        # A machine's package lists may be older than the mirror: update once and retry.
        local apt=(apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends)
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}" >/dev/null ||
            { apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null &&
              DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}" >/dev/null; }
    fi
}

# Proxies of the environment, passed to builds only when set.
PROXY_ARGS=()
for v in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    if [[ -n ${!v:-} ]]; then PROXY_ARGS+=(--build-arg "$v"); fi
done

build() {
    has_image docker.io/library/python:3.11-slim || base
    local t0=$SECONDS
    say "building $IMAGE from $REPO/Dockerfile"
    # --format docker: OCI images cannot carry a HEALTHCHECK.
    podman build --format docker --network host --layers "${PROXY_ARGS[@]}" -t "$IMAGE" "$REPO" \
        >"$CACHE/build.log" 2>&1 || { tail -n 40 "$CACHE/build.log" >&2; die "build failed"; }
    local size
    size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
    say "built $IMAGE in $((SECONDS - t0)) s, $((size / 1000000)) MB"
}

compose() {
    "$(tool_venv podman-compose 'podman-compose>=1.6')" "$@"
}

tool_venv() {
    local venv="$CACHE/tools-venv"
    [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
    [[ -x $venv/bin/$1 ]] || "$venv/bin/pip" install -q "$2"
    printf '%s\n' "$venv/bin/$1"
}

# The image's lock file: pyproject.toml's dependencies plus what builds the
# project (setuptools, wheel), for Python 3.11 on linux x86_64, with hashes.
lock() {
    local uv header
    uv=$(tool_venv uv uv)
    header=$(sed -n '/^#/p;/^[^#]/q' "$REPO/requirements.lock")
    printf 'setuptools>=69\nwheel\n' | SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt} \
        "$uv" pip compile "$REPO/pyproject.toml" - --python-version 3.11 \
        --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header -q \
        -o "$CACHE/requirements.lock.new"
    { printf '%s\n' "$header"; cat "$CACHE/requirements.lock.new"; } >"$REPO/requirements.lock"
    rm -f "$CACHE/requirements.lock.new"
    say "wrote $REPO/requirements.lock"
}

case "${1:-}" in
    setup) setup ;;
    base) base ;;
    build) setup; build ;;
    podman) shift; write_conf; podman "$@" ;;
    compose) shift; write_conf; compose "$@" ;;
    standins) standins ;;
    compose-setup) compose_setup ;;
    lock) mkdir -p "$CACHE"; lock ;;
    *) echo "usage: $0 setup|base|build|podman ARGS|compose ARGS|standins|compose-setup|lock" >&2; exit 2 ;;
esac
