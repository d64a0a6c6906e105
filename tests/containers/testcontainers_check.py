"""The suite's containerised Kafka and PostgreSQL (tests/support/containers.py), for real.

Each test runs a small pytest session of its own with MAILBUS_TEST_CONTAINERS=1
and tests/conftest.py as its plugin, on podman's Docker-compatible API, and
checks what that session saw and what it left: the settings pointed at the
containers and away from var/, a service principal limited by its ACLs,
and no container of the run left once it ended, after a failing test and
after SIGTERM. Needs podman and the stand-ins (`scripts/podman.sh
standins`); run explicitly (`make test-containers` does not collect it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.containers.podman import REPO, podman
from tests.support.containers import LABEL

INNER = '''
import os
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import KafkaException, Producer

from mailbus.settings import ServiceSettings
from tests.support import containers


def test_inside(admin):
    Path(os.environ["RUN_ID_FILE"]).write_text(containers._STACK.run_id)
    sender = ServiceSettings(service_name="sender")
    repo_var = Path(os.environ["REPO_VAR"]).resolve()
    # Everything the settings read comes from the run's own folder and ports.
    assert sender.var_dir.resolve() != repo_var
    assert not sender.kafka.password_file.resolve().is_relative_to(repo_var)
    assert sender.kafka.bootstrap_servers.rsplit(":", 1)[1] not in ("9092", "9094")
    assert sender.postgres.port != 5433
    # A service role, provisioned by `mailbus setup db`: it may not create tables.
    with psycopg.connect(sender.postgres.conninfo()) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "mailbus_sender"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE not_mine (x int)")
    # A service principal, provisioned by `mailbus setup kafka`: no ACL, no write.
    producer = Producer({**sender.kafka.client_config(), "delivery.timeout.ms": 5000})
    errors = []
    producer.produce("not-a-mailbus-topic", b"x", on_delivery=lambda err, msg: errors.append(err))
    producer.flush(15)
    assert errors and errors[0] is not None
    if os.environ.get("INNER_MODE") == "fail":
        pytest.fail("a failing test: the containers must still go")
    if os.environ.get("INNER_MODE") == "hang":
        Path(os.environ["RUN_ID_FILE"] + ".ready").write_text("")
        import time
        time.sleep(600)
'''


def run_inner(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(INNER)
    run_id_file = tmp_path / "run-id"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MAILBUS_")},
           "MAILBUS_TEST_CONTAINERS": "1", "INNER_MODE": mode,
           "RUN_ID_FILE": str(run_id_file), "REPO_VAR": str(REPO / "var")}
    env.pop("DOCKER_HOST", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", "/dev/null", "-q", str(test_file)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, run_id_file


def left_over(run_id: str) -> list[str]:
    out = podman("ps", "-a", "--filter", f"label={LABEL}={run_id}", "--format", "json").stdout
    return [row["Names"][0] for row in json.loads(out or "[]")]


def test_a_failing_session_leaves_no_container(tmp_path: Path):
    process, run_id_file = run_inner(tmp_path, "fail")
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 1, out
    assert "a failing test: the containers must still go" in out, out
    run_id = run_id_file.read_text()
    assert left_over(run_id) == []


def test_a_terminated_session_leaves_no_container(tmp_path: Path):
    process, run_id_file = run_inner(tmp_path, "hang")
    ready = Path(f"{run_id_file}.ready")
    deadline = time.monotonic() + 600
    while not ready.exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the inner session never got its containers"
        time.sleep(0.5)
    run_id = run_id_file.read_text()
    assert len(left_over(run_id)) == 2  # kafka and postgres, running
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode != 0, out
    assert left_over(run_id) == []
