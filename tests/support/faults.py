"""Fault injection for the sender's fault tests: a private PostgreSQL cluster, a private
broker, an SMTP server that drops the connection after DATA, and what a run saw."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, TopicPartition

from mailbus import db
from mailbus.codec import Registry
from mailbus.provision import provision
from mailbus.settings import REPO_ROOT, KafkaSettings, PostgresSettings
from tests.support.smtp import Received, ScriptedHandler, free_port

MESSAGE_ID = re.compile(rb"^X-Mailbus-Message-Id:\s*(\S+)", re.MULTILINE | re.IGNORECASE)


def message_id_of(data: bytes) -> str:
    """The mailbus message id a message carries in its X-Mailbus-Message-Id header."""
    match = MESSAGE_ID.search(data)
    assert match, data[:500]
    return match.group(1).decode()


def _as_owner(argv: list[str]) -> list[str]:
    # scripts/postgres.sh runs the server as `postgres` when we are root.
    return ["runuser", "-u", "postgres", "--", *argv] if os.getuid() == 0 else argv


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (scripts/postgres.sh), provisioned like
    `mailbus setup db`: roles, database, migrations. Never the shared cluster."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: as root the server runs as `postgres`,
        # which must be able to reach its data directory.
        self.var = Path(tempfile.mkdtemp(prefix="mailbus-pg-"))
        self.var.chmod(0o755)
        self.port = free_port()
        self.env = {**os.environ, "MAILBUS_VAR": str(self.var),
                    "MAILBUS_PG_PORT": str(self.port)}
        self.secrets = self.var / "secrets"

    @property
    def data_dir(self) -> Path:
        return self.var / "postgres" / "data"

    def _script(self, action: str) -> None:
        subprocess.run([str(REPO_ROOT / "scripts" / "postgres.sh"), action], env=self.env,
                       check=True, timeout=120, capture_output=True)

    def start(self) -> None:
        self._script("start")

    def stop_immediate(self) -> None:
        """`pg_ctl stop -m immediate`: every backend dies at once, no checkpoint."""
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: int(p.parent.name))[-1]
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(self.data_dir),
                                  "-m", "immediate", "-w", "stop"]),
                       check=True, timeout=60, capture_output=True)

    def settings(self, user: str, dbname: str = "mailbus") -> PostgresSettings:
        name = "superuser" if user == "postgres" else user
        return PostgresSettings(port=self.port, dbname=dbname, user=user,
                                password_file=self.secrets / f"postgres-{name}.password")

    def provision(self) -> None:
        db.bootstrap(self.settings("postgres"), self.secrets)
        db.migrate(self.settings(db.OWNER_ROLE))

    def service_env(self, service: str) -> dict[str, str]:
        """What points one service at this cluster, as its own role."""
        role = f"mailbus_{service}"
        return {"MAILBUS_POSTGRES__PORT": str(self.port), "MAILBUS_POSTGRES__USER": role,
                "MAILBUS_POSTGRES__PASSWORD_FILE": str(self.secrets / f"postgres-{role}.password")}

    def close(self) -> None:
        try:
            self._script("stop")
        finally:
            shutil.rmtree(self.var, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            self.start()
            self.provision()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class PrivateBroker:
    """A Kafka broker of the test's own (scripts/kafka.sh on free ports), provisioned for
    one namespace with its own service principals."""

    var: Path
    prefix: str
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.env = {**os.environ, "MAILBUS_VAR": str(self.var),
                    "MAILBUS_KAFKA_PORT": str(self.port),
                    "MAILBUS_KAFKA_CONTROLLER_PORT": str(free_port())}

    def run(self, action: str) -> None:
        subprocess.run([str(REPO_ROOT / "scripts" / "kafka.sh"), action], env=self.env,
                       check=True, timeout=180, capture_output=True)

    def kill(self) -> None:
        """SIGKILL, no clean shutdown: what a crashed broker looks like."""
        pid = int((self.var / "run" / "kafka.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def settings(self, user: str) -> KafkaSettings:
        return KafkaSettings(bootstrap_servers=f"127.0.0.1:{self.port}", username=user,
                             password_file=self.var / "secrets" / f"kafka-{user}.password",
                             topic_prefix=self.prefix)

    def service_env(self, service: str) -> dict[str, str]:
        """What points one service at this broker, as its own principal."""
        return {"MAILBUS_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{self.port}",
                "MAILBUS_KAFKA__PASSWORD_FILE":
                    str(self.var / "secrets" / f"kafka-{service}.password")}

    def __enter__(self) -> PrivateBroker:
        self.run("start")
        try:
            admin = self.settings("admin").client_config()
            # The sender's suppression reader asks for group `mailbus-sender` without the
            # namespace prefix, so the unprefixed grants (`mailbus setup kafka`) are needed too.
            provision(admin, self.var / "secrets")
            provision(admin, self.var / "secrets", self.prefix, users=False)
        except BaseException:
            self.run("stop")
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.run("stop")


class DroppingHandler(ScriptedHandler):
    """Reads a whole message after DATA, then, when `drop` says so, closes the connection
    without a reply: the client cannot know whether the message was taken."""

    def __init__(self, drop: Callable[[str], bool]) -> None:
        super().__init__()
        self.drop = drop
        self.dropped: list[Received] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = envelope.original_content or envelope.content
        if self.drop(message_id_of(data)):
            with self._lock:
                self.dropped.append(Received(envelope.mail_from, list(envelope.rcpt_tos), data))
            # No reply: aiosmtpd's write of the status below goes nowhere.
            server.transport.close()
            return "250 2.0.0 never seen by the client"
        return await super().handle_DATA(server, session, envelope)


class EventLog:
    """Follows a topic from its beginning, accumulating decoded records."""

    def __init__(self, config: dict[str, Any], topic: str, registry: Registry):
        self.registry = registry
        self.events: list[dict[str, Any]] = []
        self.consumer = Consumer({**config, "group.id": f"test-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest"})
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, 0) for p in parts])

    def poll(self, seconds: float = 0.5) -> list[dict[str, Any]]:
        """Read what arrived within `seconds`; returns everything read so far."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msg = self.consumer.poll(0.1)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                # A broker of the test's own may be down for a while: keep waiting.
                if error.code() in (KafkaError._PARTITION_EOF, KafkaError._TRANSPORT,
                                          KafkaError._ALL_BROKERS_DOWN):
                    continue
                raise AssertionError(f"consumer error: {error}")
            self.events.append(self.registry.decode(msg.value() or b"")[1])
        return self.events

    def close(self) -> None:
        self.consumer.close()


@dataclass(repr=False)
class Outcome:
    """What a fault run saw, counted."""

    wanted: set[str]
    on_wire: Counter[str]
    sent: list[dict[str, Any]]
    ledger: dict[str, str]
    status: dict[str, str]

    @property
    def lost(self) -> set[str]:
        return self.wanted - set(self.on_wire)

    @property
    def duplicates(self) -> set[str]:
        return {m for m, n in self.on_wire.items() if n > 1}

    @property
    def flagged(self) -> set[str]:
        return {e["message_id"] for e in self.sent if e["possible_duplicate"]}

    @property
    def without_sent(self) -> set[str]:
        return set(self.on_wire) - {e["message_id"] for e in self.sent}

    @property
    def stuck(self) -> set[str]:
        return {m for m, s in self.ledger.items() if s == "sending"}

    @property
    def not_projected(self) -> set[str]:
        later = {"sent", "delivered", "confirmed", "unconfirmed", "bounced"}
        return {m for m in self.wanted if self.status.get(m) not in later}

    def __repr__(self) -> str:
        return f"Outcome({self.summary()})"

    def report(self, name: str) -> str:
        """Print and return the counts, one line."""
        line = f"{name}: {self.summary()}"
        print(line)
        return line

    def summary(self) -> str:
        return (f"{len(self.wanted)} accepted, {sum(self.on_wire.values())} on the wire,"
                f" lost {len(self.lost)}, duplicates {len(self.duplicates)}"
                f" (flagged {len(self.duplicates & self.flagged)},"
                f" unflagged {len(self.duplicates - self.flagged)}),"
                f" flagged in all {len(self.flagged)}, on the wire without email.sent"
                f" {len(self.without_sent)}, ledger rows sending {len(self.stuck)},"
                f" status not sent or later {len(self.not_projected)}")

    @property
    def good(self) -> bool:
        return not (self.lost or self.without_sent or self.stuck or self.not_projected
                    or self.duplicates - self.flagged)


def ledger_states(conninfo: str, namespace: str, ids: Iterable[str]) -> dict[str, str]:
    """State of each ledger row of these messages."""
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT message_id::text, state FROM send_ledger"
                            " WHERE namespace = %s AND message_id = ANY(%s::uuid[])",
                            (namespace, list(ids))).fetchall()
    return dict(rows)


def statuses(conninfo: str, namespace: str, ids: Iterable[str]) -> dict[str, str]:
    """Projected status of each of these messages."""
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT message_id::text, status FROM message_status"
                            " WHERE namespace = %s AND message_id = ANY(%s::uuid[])",
                            (namespace, list(ids))).fetchall()
    return dict(rows)
