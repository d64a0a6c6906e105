"""Hooks service throughput and latency, against a baseline in the same run.

Each row serves an app with uvicorn (real socket) in a fresh process of its
own, under the same closed-loop load from wrk (one thread, C connections, D
seconds) cycling through 100 signed action links. Printed per row:
requests/s, latency p50/p95/p99, answers outside 2xx plus socket errors, and
the server's peak RSS.

Rows:
  mailbus GET   `mailbus hooks` as shipped: GET /a/<token>, the confirmation
                page (token verified, nothing recorded)
  mailbus POST  the click: token verified, one Avro event produced to the real
                broker and acknowledged before the answer
  baseline      a minimal uvicorn+FastAPI app answering the same paths with
                static HTML pages of the same sizes: no verification, no
                Kafka, no guard middleware

The hooks service runs against its own freshly provisioned topic prefix,
with its per-address rate limit at the maximum settings allow (wrk is one
address); the prefix is dropped at the end.

Usage: .venv/bin/python bench/hooks_throughput.py [--seconds 10] [--concurrency 32]
Needs `make infra` (Kafka running) and wrk (Debian's `wrk`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from servers import rss_kib, wait_ready  # noqa: E402

from mailbus.provision import provision  # noqa: E402
from mailbus.settings import ServiceSettings  # noqa: E402
from mailbus.tokens import Keyring, LinkBuilder  # noqa: E402
from tests.support.kafka import drop_namespace, read_all  # noqa: E402
from tests.support.smtp import free_port  # noqa: E402

LINKS = 100
# The hooks settings' upper bounds: wrk's one address must not be throttled.
RATE_MAX = "100000"

def signed_paths(keyring: Keyring, base_url: str) -> list[str]:
    """Action links as the sender signs them: one message and recipient each."""
    links = LinkBuilder(keyring, base_url, timedelta(days=7))
    now = datetime.now(UTC)
    return [urlsplit(links.action_url(str(uuid.uuid4()), f"reader{i}@example.org", "attend",
                                      now=now)).path for i in range(LINKS)]


def serve_hooks(port: int, prefix: str, keys: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MAILBUS_PORT": str(port), "MAILBUS_KAFKA__TOPIC_PREFIX": prefix,
           "MAILBUS_LINK_KEYS_FILE": str(keys), "MAILBUS_METRICS_PORT": "0",
           "MAILBUS_RATE_PER_MINUTE": RATE_MAX, "MAILBUS_RATE_BURST": RATE_MAX,
           "MAILBUS_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "mailbus", "hooks"], env=env)


def serve_baseline(port: int, get_bytes: int, post_bytes: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--baseline-server", str(port),
                             str(get_bytes), str(post_bytes)])


def baseline_server(port: int, get_bytes: int, post_bytes: int) -> None:
    """A minimal FastAPI app: the same routes, static pages of the given sizes."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse

    def page(size: int) -> str:
        head, tail = "<!doctype html><html><body><p>", "</p></body></html>\n"
        return head + "x" * (size - len(head) - len(tail)) + tail

    get_page, post_page = page(get_bytes), page(post_bytes)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/a/{token}")
    async def confirm(token: str) -> HTMLResponse:
        return HTMLResponse(get_page)

    @app.post("/a/{token}")
    async def click(token: str) -> HTMLResponse:
        return HTMLResponse(post_page)

    @app.get("/readyz")
    async def ready() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                server_header=False, proxy_headers=False)

def load(url: str, method: str, paths_file: Path, seconds: int,
         concurrency: int) -> dict[str, float]:
    """Closed-loop load from wrk (C, one thread): the generator must not be the bottleneck."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s",
         "-s", str(REPO / "bench" / "hooks.lua"), url],
        env={**os.environ, "BENCH_METHOD": method, "BENCH_PATHS_FILE": str(paths_file)},
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    requests, duration_us, p50, p95, p99, non2xx, socket_errors = map(int, line.split()[1:])
    return {"requests": requests, "rps": requests / (duration_us / 1e6), "p50": p50 / 1000,
            "p95": p95 / 1000, "p99": p99 / 1000, "non2xx": non2xx, "socket": socket_errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--baseline-server", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        baseline_server(*args.baseline_server)
        return

    admin = ServiceSettings(service_name="admin")
    admin_kafka = admin.kafka.client_config()
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    provision(admin_kafka, admin.var_dir / "secrets", prefix, users=False)
    workdir = Path(tempfile.mkdtemp(prefix="mailbus-bench-"))
    keys = workdir / "link-keys.json"
    paths = signed_paths(Keyring.generate_file(keys), "http://127.0.0.1")
    paths_file = workdir / "paths.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    rows: list[tuple[str, str, dict[str, float], float]] = []
    sizes: dict[str, int] = {}
    posted = 0  # POSTs answered 2xx by the hooks service, the check request included
    try:
        for variant in ("mailbus", "baseline"):
            for method in ("GET", "POST"):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                proc = (serve_hooks(port, prefix, keys) if variant == "mailbus"
                        else serve_baseline(port, sizes["GET"], sizes["POST"]))
                try:
                    wait_ready(url, proc)
                    # One request by hand first: the page must be the real one.
                    answer = httpx.request(method, url + paths[0], timeout=30)
                    if answer.status_code != 200:
                        raise SystemExit(f"{variant} {method}: {answer.status_code}")
                    if variant == "mailbus":
                        sizes[method] = len(answer.content)
                        posted += method == "POST"
                    r = load(url, method, paths_file, args.seconds, args.concurrency)
                    if variant == "mailbus" and method == "POST":
                        posted += int(r["requests"] - r["non2xx"])
                    rows.append((variant, method, r, rss_kib(proc.pid) / 1024))
                finally:
                    proc.terminate()
                    proc.wait(30)
        recorded = len(read_all(admin_kafka, f"{prefix}email.responses", settle=3.0,
                                timeout=120))
    finally:
        drop_namespace(admin_kafka, prefix)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nhooks service under wrk, {args.concurrency} connections, {args.seconds} s per row,"
          f" {os.cpu_count()} cores; pages: GET {sizes['GET']} B, POST {sizes['POST']} B")
    print(f"{'variant':<9} {'request':<7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
          f" {'non-2xx':>7} {'sock err':>8} {'peak RSS MiB':>12}")
    for variant, method, r, rss in rows:
        print(f"{variant:<9} {method:<7} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f}"
              f" {r['p99']:>8.1f} {r['non2xx']:>7} {r['socket']:>8} {rss:>12.1f}")
    print(f"\nclicks on {prefix}email.responses: {recorded} records for {posted} POSTs answered"
          " 2xx (wrk abandons the requests in flight when it stops; their clicks are recorded)")
    result = {(v, m): r for v, m, r, _ in rows}
    for method in ("GET", "POST"):
        ours, base = result[("mailbus", method)], result[("baseline", method)]
        print(f"mailbus/baseline {method}: {ours['rps'] / base['rps']:.2f}x requests/s, "
              f"p99 {ours['p99']:.1f} ms vs {base['p99']:.1f} ms")


if __name__ == "__main__":
    main()
