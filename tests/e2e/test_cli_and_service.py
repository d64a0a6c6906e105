"""The `mailbus` command as an operator runs it: a real service process, keys from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from tests.support.kafka import read_all
from tests.support.smtp import free_port

MAILBUS = [sys.executable, "-m", "mailbus"]



def mailbus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAILBUS, *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


@pytest.fixture
def service(namespace: str, accounts_file: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "MAILBUS_PORT": str(port), "MAILBUS_KAFKA__TOPIC_PREFIX": namespace,
           "MAILBUS_ACCOUNTS_FILE": str(accounts_file)}
    log = (tmp_path / "ingest.log").open("w")
    proc = subprocess.Popen([*MAILBUS, "ingest"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    @retry(stop=stop_after_delay(60), wait=wait_fixed(0.3),
           retry=retry_if_exception_type((httpx.HTTPError, AssertionError)))
    def ready() -> None:
        assert proc.poll() is None, (tmp_path / "ingest.log").read_text()
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200

    try:
        ready()
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_operator_flow(service: str, namespace: str, admin_kafka, registry, tmp_path: Path):
    token_file = tmp_path / "key"
    created = mailbus("keys", "create", "--name", "e2e", "--scopes", "send,read",
                      "--output", str(token_file))
    assert created.returncode == 0, created.stderr
    assert token_file.stat().st_mode & 0o077 == 0
    token = token_file.read_text().strip()
    assert token not in created.stdout  # written to the file, not the terminal
    headers = {"Authorization": f"Bearer {token}"}

    body = {"to": ["ada@example.com"], "subject": "Hello", "text": "Hi Ada"}
    r = httpx.post(f"{service}/v1/messages", json=body, headers=headers)
    assert r.status_code == 202, r.text
    [record] = read_all(admin_kafka, f"{namespace}email.requested", expect=1)
    assert registry.decode(record.value())[1]["message_id"] == r.json()["id"]
    status = httpx.get(f"{service}/v1/messages/{r.json()['id']}", headers=headers).json()
    assert status["status"] == "queued"

    listed = mailbus("keys", "list")
    key_id = token.removeprefix("mbk_").split(".")[0]
    assert key_id in listed.stdout and token.split(".")[1] not in listed.stdout
    assert mailbus("keys", "revoke", key_id).returncode == 0
    assert httpx.post(f"{service}/v1/messages", json=body, headers=headers).status_code == 401
    assert mailbus("keys", "revoke", key_id).returncode == 1  # already revoked


def test_a_rotated_key_keeps_its_id_and_messages_and_its_old_secret_for_the_grace(
        service: str, tmp_path: Path):
    first = tmp_path / "key"
    assert mailbus("keys", "create", "--name", "rotating", "--output", str(first)).returncode == 0
    old = first.read_text().strip()
    key_id = old.removeprefix("mbk_").split(".")[0]
    body = {"to": ["ada@example.com"], "subject": "Hello", "text": "Hi Ada"}

    def post(token: str) -> httpx.Response:
        return httpx.post(f"{service}/v1/messages", json=body,
                          headers={"Authorization": f"Bearer {token}"})

    sent = post(old)
    assert sent.status_code == 202, sent.text
    second = tmp_path / "key2"
    rotated = mailbus("keys", "rotate", key_id, "--grace", "3600", "--output", str(second))
    assert rotated.returncode == 0, rotated.stderr
    assert second.stat().st_mode & 0o077 == 0 and "old secret works until" in rotated.stdout
    new = second.read_text().strip()
    assert new != old and new.startswith(f"mbk_{key_id}.")
    assert new.split(".")[1] not in rotated.stdout
    # Both work during the grace; the new token reads what the old one sent.
    assert post(old).status_code == 202 and post(new).status_code == 202
    got = httpx.get(f"{service}/v1/messages/{sent.json()['id']}",
                    headers={"Authorization": f"Bearer {new}"})
    assert got.status_code == 200, got.text
    listed = mailbus("keys", "list").stdout
    assert key_id in listed and new.split(".")[1] not in listed
    # Rotating again without grace: only the newest secret works, the two before
    # it no longer do.
    third = tmp_path / "key3"
    again = mailbus("keys", "rotate", key_id, "--grace", "0", "--output", str(third))
    assert again.returncode == 0 and "old secret no longer works" in again.stdout
    newest = third.read_text().strip()
    assert [post(t).status_code for t in (old, new, newest)] == [401, 401, 202]
    # Out of range, an unknown key, a revoked key: refused, nothing changed.
    assert mailbus("keys", "rotate", key_id, "--grace", str(8 * 24 * 3600)).returncode != 0
    assert mailbus("keys", "rotate", "aaaaaaaaaa").returncode == 1
    assert mailbus("keys", "revoke", key_id).returncode == 0
    assert mailbus("keys", "rotate", key_id).returncode == 1
    assert post(newest).status_code == 401


def test_bad_scopes_are_refused_by_the_cli():
    r = mailbus("keys", "create", "--name", "x", "--scopes", "send,root")
    assert r.returncode != 0 and "scopes must be among" in (r.stdout + r.stderr)
