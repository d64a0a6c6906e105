"""The examples in Go, Node.js and Java against the real broker and pipeline.

Each language's producer writes one email.requested (as principal `ingest`)
for account `dev`; a sender delivers it to a test SMTP server, the confirm
stream emits the verdict, and that language's consumer decodes it. The
examples are built once per module, their caches under .cache/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from mailbus.codec import Registry
from mailbus.producer import PRODUCER_DEFAULTS, AsyncProducer
from mailbus.provision import provision
from mailbus.settings import ServiceSettings
from mailbus.topics import CONFIRMED, GRANTS
from tests.support.kafka import drop_namespace, new_prefix
from tests.support.processes import Services
from tests.support.sender import request, smtp_account
from tests.support.smtp import SmtpServer
from tests.unit.test_contract_vectors import readme_vectors

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CACHE = ROOT / ".cache"
BUILD_TIMEOUT = 600  # a cold cache downloads modules, packages and jars
# Go 1.21 or newer fetches the 1.26 toolchain go.mod asks for from the module proxy.
TOOLS = {"go": "Go 1.21+", "node": "Node.js 18+", "npm": "npm", "mvn": "Maven",
         "javac": "a JDK 17 (openjdk-17-jdk-headless)", "java": "a JDK 17"}


@dataclass
class Built:
    """Per language, the producer and consumer command lines."""

    commands: dict[str, tuple[list[str], list[str]]]
    env: dict[str, str]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _build_go(out: Path, env: dict[str, str]) -> None:
    _run(["go", "build", "-mod=readonly", "-o", str(out) + "/", "./produce", "./consume"],
         EXAMPLES / "go", env)


def _build_node(out: Path, env: dict[str, str]) -> None:
    _run(["npm", "ci", "--cache", str(CACHE / "npm"), "--prefer-offline", "--no-audit",
          "--no-fund"], EXAMPLES / "node", env)


def _build_java(out: Path, env: dict[str, str]) -> None:
    classpath = out / "classpath.txt"
    _run(["mvn", "-q", "-B", f"-Dmaven.repo.local={CACHE / 'maven'}",
          "dependency:build-classpath", f"-Dmdep.outputFile={classpath}"], EXAMPLES / "java", env)
    sources = sorted(str(p) for p in (EXAMPLES / "java").glob("*.java"))
    _run(["javac", "-cp", classpath.read_text().strip(), "-d", str(out), *sources],
         EXAMPLES / "java", env)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The three examples, built in parallel."""
    missing = [need for tool, need in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the examples need {', '.join(missing)} (scripts/system-deps.sh)")
    out = tmp_path_factory.mktemp("examples")
    env = {**os.environ, "GOMODCACHE": str(CACHE / "go" / "mod"),
           "GOCACHE": str(CACHE / "go" / "build"), "GOPATH": str(CACHE / "go"),
           "GOFLAGS": "-modcacherw"}
    dirs = {lang: out / lang for lang in ("go", "node", "java")}
    for path in dirs.values():
        path.mkdir()
    with ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(build, dirs[lang], env) for lang, build in
                (("go", _build_go), ("node", _build_node), ("java", _build_java))]
        for job in jobs:
            job.result()
    java = ["java", "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp",
            f"{dirs['java']}:{(dirs['java'] / 'classpath.txt').read_text().strip()}"]
    return Built(commands={
        "go": ([str(dirs["go"] / "produce")], [str(dirs["go"] / "consume")]),
        "node": (["node", str(EXAMPLES / "node" / "produce.js")],
                 ["node", str(EXAMPLES / "node" / "consume.js")]),
        "java": ([*java, "Produce"], [*java, "Consume"]),
    }, env={**os.environ, "MAILBUS_SCHEMAS": str(ROOT / "schemas")})


@dataclass
class Pipeline:
    """A namespace with a sender (to a test SMTP server) and a confirm stream running."""

    prefix: str
    smtp: SmtpServer
    services: Services
    secrets: Path
    bootstrap: str


@pytest.fixture(scope="module")
def pipeline(admin: ServiceSettings, admin_kafka: dict[str, Any],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    prefix = new_prefix()
    secrets = admin.var_dir / "secrets"
    provision(admin_kafka, secrets, prefix, users=False)
    tmp = tmp_path_factory.mktemp("pipeline")
    try:
        with SmtpServer() as smtp:
            accounts = tmp / "accounts.toml"
            accounts.write_text(smtp_account("dev", smtp.port))
            env = {"MAILBUS_KAFKA__TOPIC_PREFIX": prefix, "MAILBUS_ACCOUNTS_FILE": str(accounts),
                   "MAILBUS_METRICS_PORT": "0", "MAILBUS_LINK_KEYS_FILE": str(tmp / "keys"),
                   "MAILBUS_DATA_DIR": str(tmp / "faust"), "MAILBUS_POLL_SECONDS": "0.2",
                   "MAILBUS_LOG_LEVEL": "WARNING"}
            with Services(env, tmp) as services:
                for name in ("sender", "confirm"):
                    services.start(name)
                yield Pipeline(prefix, smtp, services, secrets, admin.kafka.bootstrap_servers)
                _stop(services)
    finally:
        drop_namespace(admin_kafka, prefix)
        groups = [prefix + g for g in ("mailbus-sender", "mailbus-confirm", "mailbus-example")]
        admin_client = AdminClient(admin_kafka)
        for future in admin_client.delete_consumer_groups(groups, request_timeout=10).values():
            # Never joined, already gone, or a member's session not expired yet.
            with contextlib.suppress(KafkaException, TimeoutError):
                future.result(12)


def _stop(services: Services) -> None:
    """Stop the services, killing any still running after 10 s (Services waits 30 s each)."""
    for proc in services.procs.values():
        proc.terminate()
    for proc in services.procs.values():
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _reader() -> str:
    """A service principal that may read email.confirmed; None of them has a group to lend."""
    return next(name for name, grant in GRANTS.items() if CONFIRMED in grant.read)


def _client_env(built: Built, pipeline: Pipeline, principal: str, **extra: str) -> dict[str, str]:
    return {**built.env, "MAILBUS_BOOTSTRAP": pipeline.bootstrap,
            "MAILBUS_USERNAME": principal,
            "MAILBUS_PASSWORD_FILE": str(pipeline.secrets / f"kafka-{principal}.password"),
            "MAILBUS_TOPIC_PREFIX": pipeline.prefix, **extra}


def _lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _requested(admin_kafka: dict[str, Any], topic: str, partition: int, offset: int) -> bytes:
    consumer = Consumer({**admin_kafka, "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        msg = consumer.poll(20)
        assert msg is not None and msg.error() is None, msg and msg.error()
        return msg.value() or b""
    finally:
        consumer.close()


@pytest.mark.parametrize("language", ["go", "node", "java"])
def test_example_request_is_sent_and_its_verdict_decoded(
        language: str, built: Built, pipeline: Pipeline, admin_kafka: dict[str, Any],
        registry: Registry) -> None:
    produce, consume = built.commands[language]
    to = f"{language}@example.com"
    done = subprocess.run(produce, env=_client_env(built, pipeline, "ingest",
                                                   MAILBUS_ACCOUNT="dev", MAILBUS_TO=to),
                          capture_output=True, text=True, timeout=120, check=False)
    [produced] = _lines(done)
    message_id = produced["message_id"]
    uuid.UUID(message_id)
    # The partition Kafka's Java client picks for the key, as the README states it.
    assert produced["partition"] == int(readme_vectors()["partition"]["partition"])

    # The project's codec reads the record as the example wrote it.
    value = _requested(admin_kafka, pipeline.prefix + "email.requested",
                       produced["partition"], produced["offset"])
    name, event = registry.decode(value)
    assert (name, event["message_id"], event["account_id"]) == (
        "mailbus.EmailRequested", message_id, "dev")
    assert [a["email"] for a in event["to"]] == [to]

    # kafkajs only consumes in a group, and no service grant has one to lend
    # to a third party: its consumer runs as admin. The others join no group
    # and read as a service principal that may read email.confirmed.
    reader = "admin" if language == "node" else _reader()
    done = subprocess.run([*consume, message_id],
                          env=_client_env(built, pipeline, reader, MAILBUS_TIMEOUT="90",
                                          MAILBUS_GROUP=pipeline.prefix + "mailbus-example"),
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        pipeline.services.check_alive()
    [verdict] = _lines(done)
    assert (verdict["message_id"], verdict["account_id"], verdict["outcome"],
            verdict["evidence"]) == (message_id, "dev", "confirmed", "smtp_final")
    assert verdict["sent_to_delivered_us"] >= 0

    received = [r for r in pipeline.smtp.handler.received
                if r.message["X-Mailbus-Message-Id"] == message_id]
    assert len(received) == 1
    assert received[0].rcpt_tos == [to]


def test_project_producer_puts_key_dev_on_the_readme_partition(
        pipeline: Pipeline, registry: Registry) -> None:
    vector = readme_vectors()["partition"]
    settings = ServiceSettings(service_name="ingest")

    async def send() -> int:
        producer = AsyncProducer(settings.kafka.client_config())
        try:
            event = request(vector["key"], to="partition@example.com")
            msg = await producer.produce(pipeline.prefix + "email.requested",
                                         registry.encode("email.requested", event),
                                         key=vector["key"].encode())
            return int(msg.partition() or 0)
        finally:
            producer.close()

    assert PRODUCER_DEFAULTS["partitioner"] == "murmur2_random"
    assert asyncio.run(send()) == int(vector["partition"])


def test_kafkajs_partitioners_as_the_readme_says(built: Built) -> None:
    vector = readme_vectors()["partition"]
    script = (
        "const {Partitioners} = require('kafkajs');"
        f"const parts = Array.from({{length: {int(vector['partitions'])}}},"
        " (_, i) => ({partitionId: i, leader: 0}));"
        "for (const make of [Partitioners.DefaultPartitioner, Partitioners.LegacyPartitioner])"
        f" console.log(make()({{topic: 't', partitionMetadata: parts,"
        f" message: {{key: {json.dumps(vector['key'])}}}}}));"
    )
    done = subprocess.run(["node", "-e", script], cwd=EXAMPLES / "node", capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [vector["partition"], vector["kafkajs-legacy-partition"]]
