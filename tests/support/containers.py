"""Kafka and PostgreSQL for the suite from a container engine, through testcontainers.

`MAILBUS_TEST_CONTAINERS=1` (or `DOCKER_HOST` set and the variable not `0`)
makes tests/conftest.py start, once per session, the broker and the database
of docker-compose.yml: the same images (read from the file), the same broker
start script (deploy/compose/kafka/start.sh: SASL/SCRAM, ACLs, no access
without one), PostgreSQL with a SCRAM-only superuser. They are then
provisioned exactly as `make infra` provisions the native ones, by `mailbus
setup db` and `mailbus setup kafka`: the per-service principals, roles,
ACLs and migrations. The settings of the tests (and of every service a test
starts) point at them through the environment: `MAILBUS_VAR_DIR` (a private
temporary folder holding the run's credentials), `MAILBUS_KAFKA__BOOTSTRAP_SERVERS`
and `MAILBUS_POSTGRES__PORT`, on free loopback ports of the host.

The engine is `DOCKER_HOST` when set, else podman's Docker-compatible API
(`podman system service` on a socket of this run, as `make compose-test`
does), else Docker's default socket. Nothing is pulled: an image missing
from the engine stops the run with the command that provides it. No reaper
container (Ryuk) either: the containers carry a label of this run and are
removed at the end of the session, also when a test failed or the run was
interrupted.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
# The label every container of a run carries: `mailbus.test-containers=<run id>`.
LABEL = "mailbus.test-containers"
# How long a container may take to accept authenticated clients.
READY_SECONDS = 180.0


class ContainersError(RuntimeError):
    """The containerised Kafka or PostgreSQL could not be started or provisioned."""


def wanted() -> bool:
    """Whether this run takes Kafka and PostgreSQL from a container engine."""
    setting = os.environ.get("MAILBUS_TEST_CONTAINERS", "").strip().lower()
    if setting in ("1", "true", "yes"):
        return True
    if setting in ("0", "false", "no"):
        return False
    return bool(os.environ.get("DOCKER_HOST"))


def run_id_prefix() -> str:
    """MAILBUS_TEST_CONTAINERS_RUN: what begins this run's container names after `mailbus-tc-`.

    A CI script sets it to find, and remove, its own containers after a run
    that could not remove them itself (SIGKILL): `podman ps -a --filter
    name=^mailbus-tc-PREFIX`. Letters, digits and dashes only.
    """
    prefix = os.environ.get("MAILBUS_TEST_CONTAINERS_RUN", "").strip().lower()
    if prefix and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", prefix):
        raise ContainersError(f"MAILBUS_TEST_CONTAINERS_RUN={prefix!r}: letters, digits and"
                              " dashes only, at most 31")
    return f"{prefix}-" if prefix else ""


def compose_images() -> dict[str, str]:
    """The images docker-compose.yml runs Kafka and PostgreSQL from."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return {name: str(services[name]["image"]) for name in ("kafka", "postgres")}


def free_ports(count: int) -> list[int]:
    """Ports free on the host's loopback now, all different."""
    from tests.containers.compose import free_ports as free

    return free(count)


def _listening(port: int) -> bool:
    """Whether something accepts connections on the loopback port (before asking Kafka)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _secret_file(path: Path) -> None:
    # Hex, as deploy/compose/bootstrap.py writes them: the Kafka password ends
    # up inside a JAAS line. Readable by the container's own user (uid 1000
    # in apache/kafka, root in postgres), whatever uid it maps to; the folder
    # above is this run's private temporary folder (0700).
    path.write_text(secrets.token_hex(24) + "\n")
    path.chmod(0o444)


@dataclass
class Stack:
    """The run's Kafka and PostgreSQL containers, their ports and credentials."""

    folder: Path
    run_id: str = field(default_factory=lambda: run_id_prefix() + uuid.uuid4().hex[:10])
    containers: list[Any] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    _engine: Any = None  # tests.containers.compose.PodmanService, when this run started one
    _docker_host: str = ""

    @property
    def var_dir(self) -> Path:
        return self.folder / "var"

    @property
    def bootstrap(self) -> Path:
        """What docker-compose.yml's `secrets` volume holds: the bootstrap passwords."""
        return self.folder / "bootstrap"

    def start(self) -> dict[str, str]:
        """Start, wait for and provision both containers; returns the settings' environment."""
        self._connect_engine()
        # Before testcontainers reads its configuration: no reaper container.
        os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
        from testcontainers.core.config import testcontainers_config

        testcontainers_config.ryuk_disabled = True
        images = compose_images()
        self._check_images(images.values())

        self.bootstrap.mkdir(mode=0o755)
        (self.var_dir / "secrets").mkdir(parents=True, mode=0o700)
        for name in ("kafka-admin.password", "kafka-controller.password",
                     "postgres-superuser.password"):
            _secret_file(self.bootstrap / name)
        # The admin principal's and the superuser's passwords, where the
        # native stack keeps them (var/secrets), for `mailbus setup` and the tests.
        for name in ("kafka-admin.password", "postgres-superuser.password"):
            target = self.var_dir / "secrets" / name
            shutil.copyfile(self.bootstrap / name, target)
            target.chmod(0o600)
        shutil.copyfile(REPO / "deploy" / "accounts.dev.toml", self.var_dir / "accounts.toml")

        kafka_port, pg_port = free_ports(2)
        self._run_kafka(images["kafka"], kafka_port)
        self._run_postgres(images["postgres"], pg_port)
        self.env = {"MAILBUS_VAR_DIR": str(self.var_dir),
                    "MAILBUS_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
                    "MAILBUS_POSTGRES__HOST": "127.0.0.1",
                    "MAILBUS_POSTGRES__PORT": str(pg_port)}
        self._wait_ready()
        self._provision()
        return self.env

    # -- the engine ---------------------------------------------------------------------------

    def _connect_engine(self) -> None:
        host = os.environ.get("DOCKER_HOST", "")
        if not host and shutil.which("podman"):
            from tests.containers.compose import PodmanService

            self._engine = PodmanService(self.folder)
            host = f"unix://{self._engine.socket}"
        elif not host:
            host = "unix:///var/run/docker.sock"
        self._docker_host = host
        os.environ["DOCKER_HOST"] = host

    def _client(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self._docker_host, timeout=300)

    def _check_images(self, images: Any) -> None:
        import docker.errors

        client = self._client()
        try:
            missing = []
            for image in images:
                try:
                    client.images.get(image)
                except docker.errors.ImageNotFound:
                    missing.append(image)
        finally:
            client.close()
        if missing:
            raise ContainersError(
                f"not in the container engine: {', '.join(missing)}. Nothing is pulled at test"
                f" time: `docker pull {' '.join(missing)}` first (without a registry, "
                "`scripts/podman.sh standins` builds local stand-ins under those names)")

    # -- the containers -----------------------------------------------------------------------

    def _container(self, image: str, role: str) -> Any:
        from testcontainers.core.container import DockerContainer

        container = DockerContainer(image)  # the engine of DOCKER_HOST, set above
        container.with_name(f"mailbus-tc-{self.run_id}-{role}")
        container.with_kwargs(labels={LABEL: self.run_id})
        return container

    def _publish(self, container: Any, inside: int, host_port: int) -> None:
        # The host's loopback only, like docker-compose.yml's ports.
        container.ports[f"{inside}/tcp"] = ("127.0.0.1", host_port)

    def _started(self, container: Any) -> None:
        self.containers.append(container)
        container.start()

    def _run_kafka(self, image: str, port: int) -> None:
        # docker-compose.yml's `kafka` service: its command, its start script
        # and configuration, the bootstrap passwords read-only, the EXTERNAL
        # listener published (and advertised) on the host's port.
        kafka = self._container(image, "kafka")
        kafka.with_command(["/bin/bash", "/etc/mailbus/kafka/start.sh"])
        kafka.with_volume_mapping(str(self.bootstrap), "/run/mailbus-secrets", "ro")
        kafka.with_volume_mapping(str(REPO / "deploy" / "compose" / "kafka"),
                                  "/etc/mailbus/kafka", "ro")
        kafka.with_env("KAFKA_HEAP_OPTS", "-Xms256m -Xmx768m")
        kafka.with_env("MAILBUS_KAFKA_EXTERNAL_PORT", str(port))
        self._publish(kafka, 9094, port)
        self._started(kafka)

    def _run_postgres(self, image: str, port: int) -> None:
        # docker-compose.yml's `postgres` service: SCRAM only, the superuser's
        # password from a file.
        pg = self._container(image, "postgres")
        pg.with_volume_mapping(str(self.bootstrap), "/run/mailbus-secrets", "ro")
        pg.with_env("POSTGRES_USER", "postgres")
        pg.with_env("POSTGRES_PASSWORD_FILE", "/run/mailbus-secrets/postgres-superuser.password")
        pg.with_env("POSTGRES_HOST_AUTH_METHOD", "scram-sha-256")
        pg.with_env("POSTGRES_INITDB_ARGS", "--auth-host=scram-sha-256 --auth-local=scram-sha-256")
        self._publish(pg, 5432, port)
        self._started(pg)

    def _wait_ready(self) -> None:
        """Until the admin principal lists topics and the superuser runs a query."""
        import psycopg
        from confluent_kafka.admin import AdminClient

        secrets_dir = self.var_dir / "secrets"
        kafka_port = self.env["MAILBUS_KAFKA__BOOTSTRAP_SERVERS"].rsplit(":", 1)[1]
        admin_pw = (secrets_dir / "kafka-admin.password").read_text().strip()
        kafka_conf = {"bootstrap.servers": self.env["MAILBUS_KAFKA__BOOTSTRAP_SERVERS"],
                      "security.protocol": "SASL_PLAINTEXT", "sasl.mechanisms": "SCRAM-SHA-512",
                      "sasl.username": "admin", "sasl.password": admin_pw}
        pg_conninfo = psycopg.conninfo.make_conninfo(
            host="127.0.0.1", port=self.env["MAILBUS_POSTGRES__PORT"], dbname="postgres",
            user="postgres", password=(secrets_dir / "postgres-superuser.password").read_text()
            .strip(), connect_timeout=5)
        deadline = time.monotonic() + READY_SECONDS
        pending = {"kafka", "postgres"}
        last: dict[str, str] = {}
        while pending:
            for container in self.containers:
                if container.get_wrapped_container().status == "exited":
                    raise ContainersError(f"{container._name} exited:\n{self._logs(container)}")
            if "kafka" in pending and _listening(int(kafka_port)):
                try:
                    AdminClient(kafka_conf).list_topics(timeout=5)
                    pending.discard("kafka")
                except Exception as exc:  # noqa: BLE001 - kept for the error message
                    last["kafka"] = str(exc)
            if "postgres" in pending:
                try:
                    with psycopg.connect(pg_conninfo) as conn:
                        conn.execute("SELECT 1")
                    pending.discard("postgres")
                except psycopg.Error as exc:
                    last["postgres"] = str(exc)
            if pending and time.monotonic() > deadline:
                logs = "\n".join(self._logs(c) for c in self.containers)
                raise ContainersError(f"not ready after {READY_SECONDS:.0f} s: {sorted(pending)}"
                                      f" ({last})\n{logs}")
            if pending:
                time.sleep(1.0)
                for container in self.containers:
                    container.get_wrapped_container().reload()

    def _logs(self, container: Any, chars: int = 3000) -> str:
        try:
            out, err = container.get_logs()
        except Exception as exc:  # noqa: BLE001 - the logs are a courtesy
            return f"{container._name}: no logs ({exc})"
        return f"--- {container._name}\n{(out + err).decode(errors='replace')[-chars:]}"

    def _provision(self) -> None:
        """`make infra`'s provisioning (scripts/stack.sh): `mailbus setup db`, `setup kafka`."""
        mailbus = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "mailbus"
        if not mailbus.exists():
            mailbus = Path(shutil.which("mailbus") or "mailbus")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MAILBUS_")},
               **self.env}
        for step in ("db", "kafka"):
            done = subprocess.run([str(mailbus), "setup", step], env=env, capture_output=True,
                                  text=True, timeout=300, check=False)
            if done.returncode != 0:
                raise ContainersError(f"mailbus setup {step} failed:\n{done.stdout[-3000:]}"
                                      f"\n{done.stderr[-3000:]}")

    # -- the end ------------------------------------------------------------------------------

    def remove(self) -> None:
        """Remove every container of this run (by label, so also one that failed to start)."""
        try:
            if self._docker_host:
                client = self._client()
                try:
                    for row in client.containers.list(all=True, filters={"label":
                                                                         f"{LABEL}={self.run_id}"}):
                        row.remove(force=True, v=True)
                finally:
                    client.close()
        finally:
            self.containers.clear()
            if self._engine is not None:
                self._engine.stop()
                self._engine = None


_STACK: Stack | None = None


def start() -> dict[str, str]:
    """Start the session's containers; they are removed by stop(), or at exit."""
    global _STACK
    folder = Path(tempfile.mkdtemp(prefix="mailbus-tc-"))
    _STACK = Stack(folder)
    atexit.register(stop)
    # A CI timeout's SIGTERM ends the run through the same removal (atexit).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _STACK.start()
    except BaseException:
        stop()
        raise


def stop() -> None:
    global _STACK
    stack, _STACK = _STACK, None
    if stack is None:
        return
    try:
        stack.remove()
    finally:
        shutil.rmtree(stack.folder, ignore_errors=True)
