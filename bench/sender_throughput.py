"""Sender throughput to an SMTP sink, against a bare client loop in the same run.

The sink is Postfix's smtp-sink (Debian's `postfix` package), which accepts
and discards mail as fast as a real server's protocol allows. Rows:

  bare smtplib  the stdlib's smtplib sending prebuilt bytes in a loop on one
                reused connection: what plain Python does at best
  bare loop     aiosmtplib sending the same message in a loop on 1 and on N
                reused connections: the ceiling for this machine and sink
  mailbus       the sender service alone (`mailbus sender` in its own process:
                admission into the ledger, claim, compose, SMTP, settle, outbox,
                email.sent out) with an account of 1 and of N connections, its
                email.requested filled before it starts; timed from the first
                message recorded sent to the last, so the group join and the
                suppression-list load stay out. Its peak RSS (VmHWM) is printed,
                and that of its composer process beside it, and the CPU time
                the sender and its composer used per message while timed: the
                figure other load on the machine moves least.

With --file-kib K every message also carries one stored file of K KiB, the
same for all (a campaign's PDF), and the mailbus rows run at --connections
with the sender's file cache on (MAILBUS_ATTACHMENT_CACHE_MIB, its default)
and off (0): the baseline of the same run.

Usage: .venv/bin/python bench/sender_throughput.py [--messages 4000] [--connections 4]
                                                   [--settling N] [--quick] [--file-kib K]
Needs `make infra` (Kafka and PostgreSQL running) and /usr/sbin/smtp-sink.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from servers import bench_key, children  # noqa: E402

from mailbus.codec import Registry  # noqa: E402
from mailbus.provision import provision  # noqa: E402
from mailbus.settings import ServiceSettings  # noqa: E402
from tests.support.kafka import drop_namespace  # noqa: E402
from tests.support.sender import produce, request, smtp_account  # noqa: E402
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


def bare_smtplib(port: int, messages: int) -> float:
    raw = (f"From: bench@sender.example\r\nTo: ada@example.com\r\nSubject: bench\r\n"
           f"Message-ID: <{uuid.uuid4()}@sender.example>\r\n\r\n{BODY}").encode()
    with smtplib.SMTP("127.0.0.1", port) as client:
        start = time.perf_counter()
        for _ in range(messages):
            client.sendmail("bench@sender.example", ["ada@example.com"], raw)
        return messages / (time.perf_counter() - start)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def mailbus_run(port: int, messages: int, connections: int, admin: ServiceSettings,
                workdir: Path, settling: int | None, file: dict[str, object] | None = None,
                env_extra: dict[str, str] | None = None) -> tuple[float, float, float, float]:
    """(msg/s from the first message sent to the last, peak RSS MiB of the sender and
    of its child processes, the composer's, CPU milliseconds per message the sender and
    its children used meanwhile)."""
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    config = admin.kafka.client_config()
    provision(config, admin.var_dir / "secrets", prefix, users=False)
    accounts = workdir / f"accounts-{connections}.toml"
    accounts.write_text(smtp_account("bench", port, rate=100_000, quota=10_000_000,
                                     connections=connections))
    env = {**os.environ, "MAILBUS_KAFKA__TOPIC_PREFIX": prefix,
           "MAILBUS_ACCOUNTS_FILE": str(accounts), "MAILBUS_METRICS_PORT": "0",
           "MAILBUS_LINK_KEYS_FILE": str(workdir / "keys.json"),
           "MAILBUS_POLL_SECONDS": "0.2", "MAILBUS_LOG_LEVEL": "WARNING"}
    if settling is not None:
        env["MAILBUS_SETTLING_PER_CONNECTION"] = str(settling)
    env.update(env_extra or {})
    files = {"attachments": [file]} if file is not None else {}
    events = [request("bench", to=f"r{i}@example.com", text=BODY, **files)
              for i in range(messages)]
    produce(config, prefix + "email.requested", Registry.load(), events)
    sender = subprocess.Popen([sys.executable, "-m", "mailbus", "sender"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first: float | None = None
    rss = child_rss = float("nan")
    try:
        with psycopg.connect(admin.postgres.conninfo(), autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and sender.poll() is None:
                # Cheap to ask (a partial index), so the poll costs the sender little.
                row = conn.execute("SELECT count(*) FROM send_ledger WHERE namespace = %s"
                                   " AND state = 'sent'", (prefix,)).fetchone()
                done = row[0] if row else 0
                if done and first is None:
                    first, at_first = time.perf_counter(), done
                    pids = [sender.pid, *children(sender.pid)]
                    cpu_first = cpu_seconds(pids)
                if done >= messages:
                    break
                time.sleep(0.05)
            else:
                raise SystemExit("the sender stopped or stalled")
            elapsed = time.perf_counter() - (first or 0.0)
            cpu = cpu_seconds(pids) - cpu_first
            rss = peak_rss_mib(sender.pid)
            child_rss = sum(peak_rss_mib(c) for c in children(sender.pid))
    finally:
        sender.terminate()
        sender.wait(60)
        drop_namespace(config, prefix)
    return (messages - at_first) / elapsed, rss, child_rss, cpu * 1000 / (messages - at_first)


def stored_file(kib: int) -> tuple[dict[str, object], Callable[[], None]]:
    """A file of `kib` KiB stored as the API stores an upload (referenced by a key of
    its own, so no pruning round takes it), its attachment entry, and its removal."""
    key = bench_key(ServiceSettings(service_name="admin"))
    data = b"%PDF-1.7\n" + os.urandom(kib * 1024 - 9)
    sha = hashlib.sha256(data).hexdigest()
    owner = ServiceSettings(service_name="owner").postgres.conninfo()
    with psycopg.connect(owner) as conn:
        conn.execute("INSERT INTO attachment_blobs (sha256, size, content) VALUES (%s, %s, %s)"
                     " ON CONFLICT DO NOTHING", (sha, len(data), data))
        conn.execute("INSERT INTO attachment_refs (key_id, sha256, expires_at)"
                     " VALUES (%s, %s, now() + interval '1 day')", (key.key_id, sha))

    def remove() -> None:
        with psycopg.connect(owner) as conn:
            conn.execute("DELETE FROM attachment_refs WHERE key_id = %s", (key.key_id,))
            conn.execute("DELETE FROM attachment_blobs WHERE sha256 = %s", (sha,))
            conn.execute("DELETE FROM api_keys WHERE id = %s", (key.key_id,))

    return {"sha256": sha, "size": len(data), "filename": "invoice.pdf",
            "content_type": "application/pdf", "content_id": None}, remove


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--settling", type=int, default=None,
                        help="MAILBUS_SETTLING_PER_CONNECTION of the sender (default: its own)")
    parser.add_argument("--quick", action="store_true",
                        help="only bare smtplib and mailbus at --connections")
    parser.add_argument("--file-kib", type=int, default=0,
                        help="one shared stored file of this size in every message; the"
                             " mailbus rows with the sender's file cache on and off")
    args = parser.parse_args()
    admin = ServiceSettings(service_name="admin")
    port = free_port()
    sink = start_sink(port)
    workdir = Path(tempfile.mkdtemp(prefix="mailbus-bench-"))
    rows: list[tuple[str, int, float, tuple[float, float, float] | None]] = []
    counts = (args.connections,) if args.quick else (1, args.connections)
    remove: Callable[[], None] = lambda: None  # noqa: E731
    try:
        if args.file_kib:
            file, remove = stored_file(args.file_kib)
            for label, cache in (("cache off", "0"), ("cache on", None)):
                rate, rss, child, cpu = mailbus_run(
                    port, args.messages, args.connections, admin, workdir, args.settling,
                    file, {"MAILBUS_ATTACHMENT_CACHE_MIB": cache} if cache else {})
                rows.append((f"mailbus, {label}", args.connections, rate, (rss, child, cpu)))
        else:
            rows.append(("bare smtplib", 1, bare_smtplib(port, args.messages), None))
            for n in () if args.quick else counts:
                rows.append(("bare loop", n, asyncio.run(bare_loop(port, args.messages, n)),
                             None))
            for n in counts:
                rate, rss, child, cpu = mailbus_run(port, args.messages, n, admin, workdir,
                                                    args.settling)
                rows.append(("mailbus", n, rate, (rss, child, cpu)))
    finally:
        remove()
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    files = f", one shared {args.file_kib} KiB file each" if args.file_kib else ""
    print(f"\nsender to smtp-sink, {args.messages} messages of {len(BODY)} B body{files} per"
          f" row, {os.cpu_count()} cores, settling per connection "
          f"{'the default' if args.settling is None else args.settling}")
    print(f"{'path':<18} {'connections':>11} {'msg/s':>9} {'peak RSS MiB':>13}"
          f" {'composer MiB':>13} {'CPU ms/msg':>11}")
    for path, n, rate, memory in rows:
        line = f"{path:<18} {n:>11} {rate:>9.1f}"
        if memory is not None:
            line += f" {memory[0]:>13.1f} {memory[1]:>13.1f} {memory[2]:>11.3f}"
        print(line)
    bare = rows[0][2]
    for path, n, rate, _ in rows[1:] if args.file_kib else rows:
        if path.startswith("mailbus"):
            print(f"{path}/{rows[0][0]} at {n} connection(s): {rate / bare:.2f}")


if __name__ == "__main__":
    main()
