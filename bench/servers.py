"""What the benchmarks share: a namespace and key of their own, waiting for a server process,
its peak memory."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import httpx
import psycopg

from mailbus import apikeys
from mailbus.provision import provision
from mailbus.settings import ServiceSettings


def namespace_and_key(scopes: str = "{send}") -> tuple[ServiceSettings, str, apikeys.NewKey]:
    """The admin's settings, a fresh provisioned topic prefix and an API key with `scopes`
    (a PostgreSQL array literal), for one run."""
    admin = ServiceSettings(service_name="admin")
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    provision(admin.kafka.client_config(), admin.var_dir / "secrets", prefix, users=False)
    return admin, prefix, bench_key(admin, scopes)


def bench_key(admin: ServiceSettings, scopes: str = "{send}") -> apikeys.NewKey:
    """A new API key named 'bench' with `scopes` (a PostgreSQL array literal)."""
    key = apikeys.generate()
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        conn.execute("INSERT INTO api_keys (id, name, secret_sha256, scopes) VALUES"
                     " (%s, 'bench', %s, %s)", (key.key_id, key.secret_sha256, scopes))
    return key


def rss_kib(pid: int) -> int:
    """Peak resident set size of a process, KiB (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    """The process's children (the sender's composer, say)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    """Until GET {url}/readyz answers 200; exits when the server dies or takes 60 s."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("server not ready in 60 s")
