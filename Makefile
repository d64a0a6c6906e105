# mailbus, natively: `make up` brings the stack up, `make test` runs the suite
# against the same real Kafka and PostgreSQL.
SHELL := /bin/bash
VENV := .venv
PYTEST := $(VENV)/bin/pytest

.PHONY: up down demo install infra test test-unit test-integration test-e2e bench lint clean-var

up:
	@scripts/stack.sh up

down:
	@scripts/stack.sh down

# The seed's promise, measured: 300 messages through the running stack, each confirmed.
demo: up
	$(VENV)/bin/mailbus verify --count 300

install:
	@scripts/stack.sh install

infra:
	@scripts/stack.sh infra

# The suite in two passes (docs/testing.md): first in parallel, XDIST
# workers of pytest-xdist, each test file on one worker (its module fixtures,
# such as a private Dovecot, start once); then the tests marked `serial`,
# alone. Every test isolates itself in a topic namespace of its own, so the
# workers share the one broker and database. XDIST=-n0 runs the first pass in
# a single process. Both passes run even when the first fails; an empty pass
# (pytest's exit status 5) is no failure.
XDIST ?= -n 3 --dist loadfile
define suite
rc=0; \
$(PYTEST) $(XDIST) -m 'not serial' $(1) || { s=$$?; [[ $$s -eq 5 ]] || rc=$$s; }; \
$(PYTEST) -m serial $(1) || { s=$$?; [[ $$s -eq 5 ]] || rc=$$s; }; \
exit $$rc
endef

test: infra
	@$(call suite,tests)

test-unit: install
	$(PYTEST) tests/unit

test-integration: infra
	@$(call suite,tests/integration)

test-e2e: infra
	@$(call suite,tests/e2e)

bench: infra
	@scripts/bench-deps.sh
	$(VENV)/bin/python bench/ingest_throughput.py
	$(VENV)/bin/python bench/sender_throughput.py
	$(VENV)/bin/python bench/replies_throughput.py
	$(VENV)/bin/python bench/hooks_throughput.py

lint: install
	$(VENV)/bin/ruff check mailbus services tests bench
	$(VENV)/bin/mypy mailbus services

# Removes all local state (data, logs, generated credentials). Stops first.
clean-var: down
	rm -rf var

# The image, built and run with podman (scripts/podman.sh) against the native
# Kafka and PostgreSQL: non-root, no secret in any layer, send-and-confirm
# through the containerised services.
.PHONY: image-test
image-test: infra
	@scripts/podman.sh build
	$(PYTEST) tests/containers/image_check.py

# docker-compose.yml brought up for real (tests/containers/compose_check.py),
# from nothing, under a project name and host ports of its own: Debian's
# docker-compose through podman's Docker-compatible API, the third-party
# images replaced by local stand-ins (deploy/compose/standins/). Needs no
# native Kafka or PostgreSQL; the images are cached between runs.
.PHONY: compose-test
compose-test: install
	@scripts/podman.sh compose-setup
	@scripts/podman.sh build
	@scripts/podman.sh standins
	$(PYTEST) tests/containers/compose_check.py

# The suite against Kafka and PostgreSQL from a container engine instead of
# `make infra` (tests/support/containers.py, through testcontainers): the
# images of docker-compose.yml, secured and provisioned as the native ones,
# on free host ports, removed at the end. Docker where DOCKER_HOST (or its
# default socket) is; here podman's Docker-compatible API, on the local
# stand-ins of those images. Nothing is pulled at test time. TESTS picks
# the layers (CI: tests/integration).
TESTS ?= tests
.PHONY: test-containers
test-containers: install
	@if [[ -z "$${DOCKER_HOST:-}" ]] && { command -v podman >/dev/null || \
		[[ ! -S /var/run/docker.sock ]]; }; then scripts/podman.sh standins; fi
	@export MAILBUS_TEST_CONTAINERS=1; $(call suite,$(TESTS))
