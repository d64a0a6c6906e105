"""Sender throughput to an SMTP sink, against a bare client loop in the same run.

The sink is Postfix's smtp-sink (Debian's `postfix` package), which accepts
and discards mail as fast as a real server's protocol allows. Rows:

  bare loop   aiosmtplib sending the same message in a loop on 1 and on N
              reused connections: the ceiling for this machine and sink
  mailbus     the sender service (Kafka in, ledger, compose, SMTP, outbox,
              email.sent out) with an account of 1 and of N connections,
              timed from the first record produced to the last one recorded sent

Usage: .venv/bin/python bench/sender_throughput.py [--messages 2000] [--connections 4]
Needs `make infra` (Kafka and PostgreSQL running) and /usr/sbin/smtp-sink.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiosmtplib
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mailbus.codec import Registry  # noqa: E402
from mailbus.provision import provision  # noqa: E402
from mailbus.sender.settings import SenderSettings  # noqa: E402
from mailbus.settings import ServiceSettings  # noqa: E402
from tests.support.kafka import drop_namespace  # noqa: E402
from tests.support.sender import SenderThread, produce, request, smtp_account  # noqa: E402
from tests.support.smtp import free_port  # noqa: E402

BODY = "Hello,\r\n\r\n" + "This is a benchmark message. " * 30 + "\r\n"


def start_sink(port: int) -> subprocess.Popen[bytes]:
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    # -c: count, -u: drop to this user after binding; 1000: listen backlog.
    proc = subprocess.Popen([sink, "-u", "nobody", f"127.0.0.1:{port}", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            asyncio.run(_probe(port))
            return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit("smtp-sink did not start")


async def _probe(port: int) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    await client.quit()


async def bare_loop(port: int, messages: int, connections: int) -> float:
    raw = (f"From: bench@sender.example\r\nTo: ada@example.com\r\nSubject: bench\r\n"
           f"Message-ID: <{uuid.uuid4()}@sender.example>\r\n\r\n{BODY}").encode()
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
               for _ in range(connections)]
    for c in clients:
        await c.connect()
    per = messages // connections
    start = time.perf_counter()

    async def run(client: aiosmtplib.SMTP) -> None:
        for _ in range(per):
            await client.sendmail("bench@sender.example", ["ada@example.com"], raw)

    await asyncio.gather(*(run(c) for c in clients))
    elapsed = time.perf_counter() - start
    for c in clients:
        await c.quit()
    return per * connections / elapsed


def mailbus_run(port: int, messages: int, connections: int, admin: ServiceSettings,
                workdir: Path) -> float:
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    config = admin.kafka.client_config()
    provision(config, admin.var_dir / "secrets", prefix, users=False)
    accounts = workdir / f"accounts-{connections}.toml"
    accounts.write_text(smtp_account("bench", port, rate=100_000, connections=connections))
    settings = SenderSettings(accounts_file=accounts, kafka={"topic_prefix": prefix},
                              metrics_port=0, poll_seconds=0.2,
                              link_keys_file=workdir / "keys.json", log_level="WARNING")
    events = [request("bench", to=f"r{i}@example.com", text=BODY) for i in range(messages)]
    try:
        with SenderThread(settings), psycopg.connect(admin.postgres.conninfo()) as conn:
            start = time.perf_counter()
            produce(config, prefix + "email.requested", Registry.load(), events)
            while True:
                # Cheap to ask (a partial index), so the poll costs the sender nothing.
                done = conn.execute("SELECT count(*) FROM send_ledger WHERE namespace = %s"
                                    " AND state = 'sent'", (prefix,)).fetchone()
                if done and done[0] >= messages:
                    break
                time.sleep(0.1)
            elapsed = time.perf_counter() - start
    finally:
        drop_namespace(config, prefix)
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    admin = ServiceSettings(service_name="admin")
    port = free_port()
    sink = start_sink(port)
    workdir = Path(tempfile.mkdtemp(prefix="mailbus-bench-"))
    rows = []
    try:
        for n in (1, args.connections):
            rows.append(("bare loop", n, asyncio.run(bare_loop(port, args.messages, n))))
        for n in (1, args.connections):
            rows.append(("mailbus", n, mailbus_run(port, args.messages, n, admin, workdir)))
    finally:
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nsender to smtp-sink, {args.messages} messages of {len(BODY)} B body per row,"
          f" {os.cpu_count()} cores")
    print(f"{'path':<10} {'connections':>11} {'msg/s':>9}")
    for path, n, rate in rows:
        print(f"{path:<10} {n:>11} {rate:>9.1f}")
    bare = {n: r for p, n, r in rows if p == "bare loop"}
    ours = {n: r for p, n, r in rows if p == "mailbus"}
    for n in sorted(ours):
        print(f"mailbus/bare loop at {n} connection(s): {ours[n] / bare[n]:.2f}")


if __name__ == "__main__":
    main()
