"""The whole pipeline, API to email.confirmed, against a bare SMTP loop in the same run.

Every service runs as its own process (`python -m mailbus ingest|sender|confirm|
projector`) against the broker and PostgreSQL of `make infra`, in a fresh
namespace, with one SMTP account (rate and quota raised) whose server is
Postfix's smtp-sink. Phases:

  baseline    one smtplib connection sending the same prebuilt message bytes
              to the same sink in a loop: the ceiling of the wire alone
  throughput  N messages posted to /v1/messages/batch by a few client threads
              (`--mode batch`, the default), or one message per POST to
              /v1/messages over `--post-connections` keep-alive connections
              (`--mode single`, openloop.post_all); msg/s from the first
              request to the last email.confirmed seen
  latency     100 messages/s offered (single POSTs on a schedule) for a while;
              p50/p99 from the request to its email.confirmed being read

Printed as well: each service process's peak RSS (VmHWM, its children apart).

Usage: .venv/bin/python bench/pipeline_throughput.py [--messages 20000] [--clients 4]
       [--mode batch|single] [--post-connections 32]
Needs `make infra` (Kafka and PostgreSQL running) and /usr/sbin/smtp-sink
(Debian's `postfix`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, TopicPartition

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from openloop import post_all  # noqa: E402
from servers import children, namespace_and_key, rss_kib, wait_ready  # noqa: E402

from mailbus.codec import Registry  # noqa: E402
from tests.support.kafka import drop_namespace  # noqa: E402
from tests.support.smtp import free_port  # noqa: E402

SERVICES = ("ingest", "sender", "confirm", "projector")
MESSAGE = {"to": ["Ada Lovelace <ada@example.com>"], "subject": "Benchmark",
           "text": "Hello " * 50, "html": "<p>" + "Hello " * 50 + "</p>", "tags": ["bench"]}
ACCOUNT = """
[[accounts]]
id = "dev"
kind = "smtp"
from_address = "dev@sender.example"
daily_quota = 100000000
rate_per_second = 100000
pools = ["default"]
evidence = "smtp_final"
[accounts.smtp]
host = "127.0.0.1"
port = {port}
tls = "none"
connections = {connections}
"""


def start_sink(port: int) -> subprocess.Popen[bytes]:
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    # -u: drop to this user after binding; 1000: listen backlog.
    proc = subprocess.Popen([sink, "-u", "nobody", f"127.0.0.1:{port}", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit("smtp-sink did not start")


def baseline(port: int, count: int) -> float:
    """msg/s of one reused connection sending prebuilt bytes."""
    data = (b"From: dev@sender.example\r\nTo: ada@example.com\r\nSubject: Benchmark\r\n"
            b"Message-ID: <bench@sender.example>\r\n\r\n" + b"Hello " * 50 + b"\r\n")
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        start = time.perf_counter()
        for _ in range(count):
            smtp.sendmail("dev@sender.example", ["ada@example.com"], data)
        return count / (time.perf_counter() - start)


class Confirmed:
    """Follows email.confirmed: when each message's `confirmed` verdict was read."""

    def __init__(self, config: dict[str, Any], topic: str):
        self.at: dict[str, float] = {}
        self.other: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._registry = Registry.load()
        self._consumer = Consumer({**config, "group.id": f"bench-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                   "fetch.wait.max.ms": 10})
        parts = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._consumer.poll(0.05)
            if msg is None or msg.error():
                continue
            now = time.time()
            event = self._registry.decode(msg.value() or b"")[1]
            with self._lock:
                if event["outcome"] == "confirmed":
                    self.at.setdefault(event["message_id"], now)
                else:
                    self.other[event["message_id"]] = event["outcome"]

    def wait(self, ids: Iterable[str], timeout: float, check: Any) -> float:
        """Until every id is confirmed; returns when the last one was read."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                missing = wanted - self.at.keys()
                if not missing:
                    return max(self.at[m] for m in wanted)
                failed = wanted & self.other.keys()
            if failed:
                raise SystemExit(f"{len(failed)} messages not confirmed: {self.other}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(missing)} of {len(wanted)} not confirmed in {timeout} s")
            check()
            time.sleep(0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


class Stack:
    """The four services as processes, one shared environment."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for name in SERVICES:
            with (self.logs / f"{name}.log").open("ab") as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "mailbus", name], env=self.env, stdout=log,
                    stderr=subprocess.STDOUT)

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def post_batches(client: httpx.Client, count: int, batch: int, clients: int) -> tuple[
        list[str], float]:
    """Post `count` messages in batches from `clients` threads; (ids, first request time)."""
    sizes = [min(batch, count - i) for i in range(0, count, batch)]
    first = time.time()

    def post(size: int) -> list[str]:
        r = client.post("/v1/messages/batch", json={"messages": [MESSAGE] * size})
        body = r.json()
        if r.status_code != 202 or body["rejected"]:
            raise SystemExit(f"the API answered {r.status_code}: {r.text[:500]}")
        return [x["id"] for x in body["results"]]

    with ThreadPoolExecutor(clients) as pool:
        ids = [i for chunk in pool.map(post, sizes) for i in chunk]
    return ids, first


def post_singles(url: str, token: str, count: int, connections: int) -> tuple[list[str], float]:
    """Post `count` messages one per request over `connections` connections; (ids, first)."""
    first = time.time()
    answers = post_all(url, "/v1/messages", {"Authorization": f"Bearer {token}",
                                             "Content-Type": "application/json"},
                       json.dumps(MESSAGE).encode(), count, connections)
    refused = [(status, body) for status, body in answers if status != 202]
    if refused:
        raise SystemExit(f"{len(refused)} refused, first: {refused[0][0]} {refused[0][1][:500]!r}")
    return [json.loads(body)["id"] for _, body in answers], first


def offer(client: httpx.Client, rate: float, seconds: float) -> dict[str, float]:
    """Single POSTs at `rate` per second on a fixed schedule; id -> request time."""
    count = int(rate * seconds)
    start = time.time() + 0.5
    sent: dict[str, float] = {}

    def post(n: int) -> None:
        time.sleep(max(0.0, start + n / rate - time.time()))
        at = time.time()
        r = client.post("/v1/messages", json=MESSAGE)
        if r.status_code != 202:
            raise SystemExit(f"the API answered {r.status_code}: {r.text[:500]}")
        sent[r.json()["id"]] = at

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(post, range(count)))
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=4, help="threads posting batches")
    parser.add_argument("--batch", type=int, default=100, help="messages per batch request")
    parser.add_argument("--connections", type=int, default=8, help="the account's SMTP pool")
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument("--mode", choices=("batch", "single"), default="batch",
                        help="how the throughput phase posts: batches, or one message a request")
    parser.add_argument("--post-connections", type=int, default=32,
                        help="connections posting single messages (--mode single)")
    args = parser.parse_args()

    admin, prefix, key = namespace_and_key("{send,read}")
    workdir = Path(tempfile.mkdtemp(prefix="mailbus-bench-"))
    sink_port, api_port = free_port(), free_port()
    sink = start_sink(sink_port)
    accounts = workdir / "accounts.toml"
    accounts.write_text(ACCOUNT.format(port=sink_port, connections=args.connections))
    env = {**os.environ, "MAILBUS_KAFKA__TOPIC_PREFIX": prefix,
           "MAILBUS_ACCOUNTS_FILE": str(accounts), "MAILBUS_METRICS_PORT": "0",
           "MAILBUS_LINK_KEYS_FILE": str(workdir / "keys.json"), "MAILBUS_LOG_LEVEL": "WARNING",
           "MAILBUS_PORT": str(api_port), "MAILBUS_POSTGRES__POOL_MAX": "20",
           # One key carries the whole load: its request rate must not be what is measured.
           "MAILBUS_RATE_LIMIT": "99999/second"}
    stack = Stack(env, workdir)
    confirmed = Confirmed(admin.kafka.client_config(), prefix + "email.confirmed")
    url = f"http://127.0.0.1:{api_port}"
    try:
        base = baseline(sink_port, min(args.messages, 5000))
        stack.start()
        wait_ready(url, stack.procs["ingest"])
        headers = {"Authorization": f"Bearer {key.token}"}
        limits = httpx.Limits(max_connections=32)
        with httpx.Client(base_url=url, headers=headers, timeout=60, limits=limits) as client:
            # Warm-up: every service up and through its first round before timing.
            ids, _ = post_batches(client, 50, 50, 1)
            confirmed.wait(ids, 180, stack.check)

            if args.mode == "single":
                ids, first = post_singles(url, key.token, args.messages, args.post_connections)
            else:
                ids, first = post_batches(client, args.messages, args.batch, args.clients)
            posted = time.time()
            last = confirmed.wait(ids, max(300.0, args.messages / 20), stack.check)
            throughput = args.messages / (last - first)

            sent = offer(client, 100.0, args.latency_seconds)
            confirmed.wait(sent, 180, stack.check)
            latencies = sorted((confirmed.at[m] - t) * 1000 for m, t in sent.items())
        stack.check()
        rss = {name: rss_kib(proc.pid) / 1024 for name, proc in stack.procs.items()}
        rss_children = {name: sum(rss_kib(c) for c in children(proc.pid)) / 1024
                        for name, proc in stack.procs.items()}
    finally:
        stack.stop()
        confirmed.close()
        sink.terminate()
        sink.wait(10)
        drop_namespace(admin.kafka.client_config(), prefix)
        shutil.rmtree(workdir, ignore_errors=True)

    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"\npipeline, API to email.confirmed, one SMTP account of {args.connections}"
          f" connections to smtp-sink, {os.cpu_count()} cores")
    print(f"baseline (one smtplib connection, prebuilt bytes): {base:.1f} msg/s")
    how = (f"one per POST over {args.post_connections} connections" if args.mode == "single"
           else f"{args.clients} clients x batches of {args.batch}")
    print(f"throughput: {args.messages} messages, {how}: {throughput:.1f} msg/s (posting took"
          f" {posted - first:.1f} s, last confirmed {last - first:.1f} s after the first"
          " request)")
    print(f"latency at 100 msg/s offered for {args.latency_seconds:.0f} s ({len(latencies)}"
          f" messages): p50 {statistics.median(latencies):.0f} ms, p99 {p99:.0f} ms")
    print("peak RSS MiB: " + ", ".join(
        f"{n} {v:.1f}" + (f" (+ {rss_children[n]:.1f} in its child processes)"
                          if rss_children.get(n) else "") for n, v in rss.items()))


if __name__ == "__main__":
    main()
