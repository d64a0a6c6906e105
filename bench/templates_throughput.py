"""Single POSTs by stored template against the same content sent inline, in the same run.

The service (one worker, as shipped) over a real socket against the real
broker and PostgreSQL, closed loop (wrk, C connections, D seconds per row),
three bodies of the same content: inline (the baseline), a stored template
by explicit version, and by "latest". Each with MAILBUS_KEY_CACHE_SECONDS 0
(every request's template looked up, lookups of requests arriving together
sharing one query) and with `--key-cache` seconds (lookups kept). Printed per
row: requests/s, latency p50/p95/p99, errors, the server's CPU time per
request.

Usage: .venv/bin/python bench/templates_throughput.py [--seconds 10] [--concurrency 64]
       [--key-cache 1]
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
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ingest_throughput import cpu_seconds, serve  # noqa: E402
from servers import namespace_and_key, wait_ready  # noqa: E402

from tests.support.kafka import drop_namespace  # noqa: E402
from tests.support.sender import smtp_account  # noqa: E402
from tests.support.smtp import free_port  # noqa: E402

CONTENT = {"subject": "Benchmark", "text": "Hello " * 50, "html": "<p>" + "Hello " * 50 + "</p>"}
BASE = {"to": ["Ada Lovelace <ada@example.com>"], "tags": ["bench"]}
BODIES = {
    "inline": BASE | CONTENT,
    "stored v1": BASE | {"template": {"name": "bench", "version": 1}},
    "latest": BASE | {"template": {"name": "bench", "version": "latest"}},
}


def load(url: str, token: str, body: dict[str, Any], seconds: int, concurrency: int,
         workdir: Path) -> dict[str, float]:
    """Closed-loop single POSTs from wrk, as ingest_throughput.py's rows."""
    body_file = workdir / "body.json"
    body_file.write_text(json.dumps(body))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "--latency",
         "-s", str(REPO / "bench" / "post.lua"), url + "/v1/messages"],
        env={**os.environ, "BENCH_TOKEN": token, "BENCH_BODY_FILE": str(body_file)},
        capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    requests, duration_us, p50, p95, p99, bad_status, socket_errors = map(int, line.split()[1:])
    return {"requests": requests, "rps": requests / (duration_us / 1e6), "p50": p50 / 1000,
            "p95": p95 / 1000, "p99": p99 / 1000, "errors": bad_status + socket_errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--key-cache", type=float, default=1.0,
                        help="MAILBUS_KEY_CACHE_SECONDS of the rows with lookups kept")
    args = parser.parse_args()

    admin, prefix, key = namespace_and_key("{send}")
    workdir = Path(tempfile.mkdtemp(prefix="mailbus-bench-"))
    accounts = workdir / "accounts.toml"
    accounts.write_text(smtp_account("dev", 2525))  # never sent to: ingest only
    headers = {"Authorization": f"Bearer {key.token}"}
    rows = []
    try:
        for cache in (0.0, args.key_cache):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = serve("mailbus", prefix, accounts, port, 1, cache)
            try:
                wait_ready(url, proc)
                if cache == 0.0:
                    created = httpx.post(url + "/v1/templates", headers=headers,
                                         json={"name": "bench", **CONTENT}, timeout=30)
                    assert created.status_code == 201, created.text
                load(url, key.token, BODIES["inline"], 2, args.concurrency, workdir)  # warm-up
                for label, body in BODIES.items():
                    before = cpu_seconds(proc.pid)
                    r = load(url, key.token, body, args.seconds, args.concurrency, workdir)
                    cpu_ms = (cpu_seconds(proc.pid) - before) * 1000 / max(1, r["requests"])
                    rows.append((label, cache, r, cpu_ms))
                if cache == args.key_cache:  # the last row: the template goes
                    httpx.delete(url + "/v1/templates/bench", headers=headers, timeout=30)
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        drop_namespace(admin.kafka.client_config(), prefix)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nPOST /v1/messages by stored template, {os.cpu_count()} cores, load average"
          f" {os.getloadavg()[0]:.1f} at the end; wrk, {args.concurrency} connections,"
          f" {args.seconds} s per row; one worker")
    print(f"{'body':<10} {'key cache':>9} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
          f" {'errors':>6} {'CPU ms/req':>10}")
    for label, cache, r, cpu_ms in rows:
        print(f"{label:<10} {cache:>8g}s {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f}"
              f" {r['p99']:>8.1f} {r['errors']:>6} {cpu_ms:>10.2f}")


if __name__ == "__main__":
    main()
