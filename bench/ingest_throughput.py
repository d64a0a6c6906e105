"""Ingest API throughput and latency, against a baseline in the same run.

Each variant serves the real API (uvicorn, real socket) in a process of its
own against the real broker and PostgreSQL, under the same closed-loop load
from wrk: C connections posting single messages for D seconds, then the batch
endpoint. Printed per variant: requests/s, messages/s, latency p50/p95/p99,
and the server's peak RSS.

Variants:
  mailbus   the service as shipped: one shared idempotent producer, linger 5 ms
  baseline  the naive design: a producer created per request and flushed per
            message (what the ingest API must not do)

Usage: .venv/bin/python bench/ingest_throughput.py [--seconds 10] [--concurrency 32]
Needs `make infra` (Kafka and PostgreSQL running) and wrk (Debian's `wrk`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from servers import rss_kib, wait_ready  # noqa: E402

from mailbus import apikeys  # noqa: E402
from mailbus.provision import provision  # noqa: E402
from mailbus.settings import ServiceSettings  # noqa: E402
from tests.support.kafka import drop_namespace  # noqa: E402
from tests.support.sender import smtp_account  # noqa: E402
from tests.support.smtp import free_port  # noqa: E402

MESSAGE = {"to": ["Ada Lovelace <ada@example.com>"], "subject": "Benchmark",
           "text": "Hello " * 50, "html": "<p>" + "Hello " * 50 + "</p>", "tags": ["bench"]}


def load(url: str, token: str, seconds: float, concurrency: int, batch: int,
         workdir: Path) -> dict[str, float]:
    """Closed-loop load from wrk (C, one thread): the generator must not be the bottleneck."""
    body = {"messages": [MESSAGE] * batch} if batch else MESSAGE
    body_file = workdir / "body.json"
    body_file.write_text(json.dumps(body))
    path = "/v1/messages/batch" if batch else "/v1/messages"
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{int(seconds)}s", "--timeout", "30s", "--latency",
         "-s", str(REPO / "bench" / "post.lua"), url + path],
        env={**os.environ, "BENCH_TOKEN": token, "BENCH_BODY_FILE": str(body_file)},
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    requests, duration_us, p50, p95, p99, bad_status, socket_errors = map(int, line.split()[1:])
    elapsed = duration_us / 1e6
    return {"rps": requests / elapsed, "mps": requests * (batch or 1) / elapsed,
            "p50": p50 / 1000, "p95": p95 / 1000, "p99": p99 / 1000,
            "errors": bad_status + socket_errors}


def serve(variant: str, prefix: str, accounts: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MAILBUS_PORT": str(port), "MAILBUS_KAFKA__TOPIC_PREFIX": prefix,
           "MAILBUS_ACCOUNTS_FILE": str(accounts), "MAILBUS_LOG_LEVEL": "WARNING",
           "MAILBUS_POSTGRES__POOL_MAX": "20", "PYTHONPATH": str(REPO),
           # One key carries the whole load: its request rate must not be what is measured.
           "MAILBUS_RATE_LIMIT": "99999/second"}
    return subprocess.Popen([sys.executable, str(REPO / "bench" / "serve.py"), variant], env=env)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100, help="messages per batch request")
    args = parser.parse_args()

    admin = ServiceSettings(service_name="admin")
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    provision(admin.kafka.client_config(), admin.var_dir / "secrets", prefix, users=False)
    key = apikeys.generate()
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        conn.execute("INSERT INTO api_keys (id, name, secret_sha256, scopes) VALUES"
                     " (%s, 'bench', %s, '{send}')", (key.key_id, key.secret_sha256))
    workdir = Path(tempfile.mkdtemp(prefix="mailbus-bench-"))
    accounts = workdir / "accounts.toml"
    accounts.write_text(smtp_account("dev", 2525))  # never sent to: ingest only
    rows = []
    try:
        for variant in ("baseline", "mailbus"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = serve(variant, prefix, accounts, port)
            try:
                wait_ready(url, proc)
                modes = [("single", 0)] + ([("batch", args.batch)] if variant == "mailbus" else [])
                for mode, batch in modes:
                    r = load(url, key.token, args.seconds, args.concurrency, batch, workdir)
                    rows.append((variant, mode, r["rps"], r["mps"], r["p50"], r["p95"],
                                 r["p99"], r["errors"], rss_kib(proc.pid) / 1024))
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        drop_namespace(admin.kafka.client_config(), prefix)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\ningest API under wrk, {args.concurrency} connections, {args.seconds:.0f} s per row,"
          f" {os.cpu_count()} cores")
    print(f"{'variant':<9} {'mode':<7} {'req/s':>8} {'msg/s':>8} {'p50 ms':>8} {'p95 ms':>8}"
          f" {'p99 ms':>8} {'errors':>6} {'peak RSS MiB':>12}")
    for v, mode, rps, mps, p50, p95, p99, err, rss in rows:
        print(f"{v:<9} {mode:<7} {rps:>8.1f} {mps:>8.1f} {p50:>8.1f} {p95:>8.1f} {p99:>8.1f}"
              f" {err:>6} {rss:>12.1f}")
    base = next(r for r in rows if r[0] == "baseline")
    ours = next(r for r in rows if r[0] == "mailbus" and r[1] == "single")
    print(f"\nmailbus/baseline: {ours[2] / base[2]:.1f}x requests/s, "
          f"p99 {ours[6]:.1f} ms vs {base[6]:.1f} ms")


if __name__ == "__main__":
    main()
