"""Ingest API throughput and latency, against baselines in the same run.

Each variant serves over a real socket (uvicorn, the service's own server
settings) in a process of its own against the real broker and PostgreSQL.
Two loads per variant:

  closed loop  wrk, C connections posting single messages for D seconds
               (then, for the service, the batch endpoint): requests/s
  open loop    `openloop.py`: single messages offered at a fixed rate (500/s
               by default), each latency measured from its scheduled time

Printed per row: requests/s, messages/s, latency p50/p95/p99, the server's
CPU time per request (every process of the variant: where the rest of a
request's time goes is other processes, the broker, PostgreSQL, the load
generator) and its peak RSS (VmHWM, summed over its processes).

Variants:
  bare      a bare FastAPI endpoint parsing and validating the same body with
            the same model, answering 202: no key, no database, no Kafka
  baseline  the naive design: a producer created per request and flushed per
            message (what the ingest API must not do)
  route     with `--route`: the service with its fast path taken out, so FastAPI's
            route answers `POST /v1/messages` (as before services/ingest/fastpath.py)
  mailbus   the service as shipped (one worker), and with `--workers` worker
            processes: key checked, rate counted, body validated, routed, group
            commit (message row, produce, broker's ack, commit) before the 202

Usage: .venv/bin/python bench/ingest_throughput.py [--seconds 10] [--concurrency 64]
       [--rate 500] [--workers 2] [--key-cache 0] [--baseline] [--route]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from openloop import offer  # noqa: E402
from servers import children, namespace_and_key, rss_kib, wait_ready  # noqa: E402

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
    return {"requests": requests, "rps": requests / elapsed,
            "mps": requests * (batch or 1) / elapsed,
            "p50": p50 / 1000, "p95": p95 / 1000, "p99": p99 / 1000,
            "errors": bad_status + socket_errors}


def paced(url: str, token: str, rate: float, seconds: float) -> dict[str, float]:
    """Open-loop single POSTs at `rate`/s (openloop.py)."""
    seen = offer(url, "/v1/messages", {"Authorization": f"Bearer {token}",
                                       "Content-Type": "application/json"},
                 json.dumps(MESSAGE).encode(), rate, seconds)
    answered = len(seen.latencies_ms)
    return {"requests": answered, "rps": answered / seconds, "mps": answered / seconds,
            "p50": seen.percentile(50), "p95": seen.percentile(95),
            "p99": seen.percentile(99), "errors": seen.bad_status + seen.errors,
            "late": seen.late_ms}


def tree(pid: int) -> list[int]:
    """The process and its descendants (uvicorn's workers, their helpers)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            todo += children(p)
        except FileNotFoundError:
            pass
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process tree so far."""
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def peak_rss_mib(pid: int) -> float:
    return sum(rss_kib(p) for p in tree(pid)) / 1024


# The `route` row: the service's app, one process, without the FastPath layer.
ROUTE_SERVER = """
import uvicorn
from mailbus.ingest.app import server_config
from mailbus.ingest.fastpath import FastPath
from mailbus.ingest.settings import IngestSettings

config = server_config(IngestSettings())
config.app.user_middleware = [m for m in config.app.user_middleware if m.cls is not FastPath]
uvicorn.Server(config).run()
"""


def serve(variant: str, prefix: str, accounts: Path, port: int,
          workers: int = 1, key_cache: float = 0.0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MAILBUS_PORT": str(port), "MAILBUS_KAFKA__TOPIC_PREFIX": prefix,
           "MAILBUS_ACCOUNTS_FILE": str(accounts), "MAILBUS_LOG_LEVEL": "WARNING",
           "MAILBUS_POSTGRES__POOL_MAX": "20", "PYTHONPATH": str(REPO),
           "MAILBUS_INGEST_WORKERS": str(workers), "MAILBUS_KEY_CACHE_SECONDS": str(key_cache),
           # One key carries the whole load: its request rate must not be what is measured.
           "MAILBUS_RATE_LIMIT": "99999/second"}
    command = (["-c", ROUTE_SERVER] if variant == "route"
               else [str(REPO / "bench" / "serve.py"), variant])
    return subprocess.Popen([sys.executable, *command], env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100, help="messages per batch request")
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop requests/s")
    parser.add_argument("--workers", type=int, default=2, help="the multi-worker row")
    parser.add_argument("--key-cache", type=float, default=0.0,
                        help="MAILBUS_KEY_CACHE_SECONDS of the service's rows (default: off)")
    parser.add_argument("--baseline", action="store_true",
                        help="add the per-request producer (seconds a request; at 64"
                             " connections it may finish none in a row's time)")
    parser.add_argument("--route", action="store_true",
                        help="add the service without its fast path (FastAPI's route answers"
                             " POST /v1/messages), one process")
    args = parser.parse_args()

    admin, prefix, key = namespace_and_key("{send}")
    workdir = Path(tempfile.mkdtemp(prefix="mailbus-bench-"))
    accounts = workdir / "accounts.toml"
    accounts.write_text(smtp_account("dev", 2525))  # never sent to: ingest only
    # (label, serve.py variant, workers, loads)
    plan: list[tuple[str, str, int, list[str]]] = [("bare", "bare", 1, ["single", "paced"])]
    if args.baseline:
        plan.append(("baseline", "baseline", 1, ["single"]))
    if args.route:
        plan.append(("route", "route", 1, ["single", "paced"]))
    plan.append(("mailbus", "mailbus", 1, ["single", "paced", "batch"]))
    if args.workers > 1:
        plan.append((f"mailbus x{args.workers}", "mailbus", args.workers, ["single", "paced"]))
    rows = []
    try:
        for label, variant, workers, loads in plan:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = serve(variant, prefix, accounts, port, workers, args.key_cache)
            try:
                wait_ready(url, proc)
                load(url, key.token, 2, args.concurrency, 0, workdir)  # warm-up, not counted
                for mode in loads:
                    before = cpu_seconds(proc.pid)
                    if mode == "paced":
                        r = paced(url, key.token, args.rate, args.seconds)
                    else:
                        r = load(url, key.token, args.seconds, args.concurrency,
                                 args.batch if mode == "batch" else 0, workdir)
                    cpu_ms = (cpu_seconds(proc.pid) - before) * 1000 / max(1, r["requests"])
                    rows.append((label, mode, r, cpu_ms, peak_rss_mib(proc.pid)))
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        drop_namespace(admin.kafka.client_config(), prefix)
        shutil.rmtree(workdir, ignore_errors=True)

    load_avg = os.getloadavg()
    print(f"\ningest API, {os.cpu_count()} cores, load average {load_avg[0]:.1f} at the end;"
          f" closed loop: wrk, {args.concurrency} connections, {args.seconds} s per row;"
          f" paced: {args.rate:.0f} requests/s offered, open loop, {args.seconds} s;"
          f" key cache {args.key_cache:g} s")
    print(f"{'variant':<11} {'load':<7} {'req/s':>8} {'msg/s':>8} {'p50 ms':>8} {'p95 ms':>8}"
          f" {'p99 ms':>8} {'errors':>6} {'CPU ms/req':>10} {'peak RSS MiB':>12}")
    for label, mode, r, cpu_ms, rss in rows:
        print(f"{label:<11} {mode:<7} {r['rps']:>8.1f} {r['mps']:>8.1f} {r['p50']:>8.1f}"
              f" {r['p95']:>8.1f} {r['p99']:>8.1f} {r['errors']:>6} {cpu_ms:>10.2f}"
              f" {rss:>12.1f}")
    late = [r["late"] for _, mode, r, _, _ in rows if mode == "paced"]
    print(f"(the open-loop generator fell behind its schedule by at most {max(late):.1f} ms)")
    best = max((r["rps"], label) for label, mode, r, _, _ in rows
               if mode == "single" and label.startswith("mailbus"))
    bare = next(r for label, mode, r, _, _ in rows if label == "bare" and mode == "single")
    print(f"\nsingle POSTs, durable: {best[0]:.1f} requests/s ({best[1]}),"
          f" {best[0] / bare['rps']:.2f} of the bare endpoint's {bare['rps']:.1f}")


if __name__ == "__main__":
    main()
