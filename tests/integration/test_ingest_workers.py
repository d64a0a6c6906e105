"""`mailbus ingest` with several worker processes: one port, one service's metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from tests.integration.test_ingest_api import MESSAGE, auth, requested
from tests.support.smtp import free_port

WORKERS = 2


def workers_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.fixture
def service(namespace: str, accounts_file: Path, tmp_path: Path
            ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {**os.environ, "MAILBUS_PORT": str(port), "MAILBUS_KAFKA__TOPIC_PREFIX": namespace,
           "MAILBUS_ACCOUNTS_FILE": str(accounts_file), "MAILBUS_INGEST_WORKERS": str(WORKERS)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = tmp_path / "ingest.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mailbus", "ingest"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    @retry(stop=stop_after_delay(60), wait=wait_fixed(0.3),
           retry=retry_if_exception_type((httpx.HTTPError, AssertionError)))
    def ready() -> None:
        assert proc.poll() is None, log_path.read_text()
        assert len(workers_of(proc.pid)) >= WORKERS
        # Fresh connections land on either worker: each must be ready.
        for _ in range(6):
            assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200

    try:
        ready()
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)


def accepted(metrics: str) -> float:
    pattern = r'^mailbus_ingest_requests_total\{[^}]*route="/v1/messages"[^}]*status="202"[^}]*\}' \
              r" ([0-9.e+]+)$"
    return sum(float(m) for m in re.findall(pattern, metrics, re.MULTILINE))


def test_workers_share_the_port_and_every_scrape_counts_the_whole_service(
        service, make_key, ingest_settings, admin_kafka, registry) -> None:
    url, proc = service
    _, token = make_key()
    ids = []
    for i in range(30):
        # A connection per request, so the kernel spreads them over the workers.
        r = httpx.post(f"{url}/v1/messages", json={**MESSAGE, "subject": f"w{i}"},
                       headers=auth(token), timeout=30)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    events = [registry.decode(m.value())[1]
              for m in requested(ingest_settings, admin_kafka, expect=30)]
    assert sorted(e["message_id"] for e in events) == sorted(ids)
    # Whichever worker answers the scrape, it counts every worker's requests.
    scrapes = [accepted(httpx.get(f"{url}/metrics", timeout=5).text) for _ in range(8)]
    assert scrapes == [30.0] * 8
    # The requests were spread: more than one worker wrote request metrics of its own.
    directory = next(
        value for child in workers_of(proc.pid)
        for name, _, value in (entry.partition("=") for entry in Path(
            f"/proc/{child}/environ").read_text().split("\0"))
        if name == "PROMETHEUS_MULTIPROC_DIR")
    pids = {int(m) for m in re.findall(r"^counter_(\d+)\.db$", "\n".join(
        p.name for p in Path(directory).iterdir()), re.MULTILINE)}
    assert len(pids & set(workers_of(proc.pid))) == WORKERS
