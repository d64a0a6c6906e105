"""Webhook deliveries per second to a local receiver, beside a bare HTTP client loop.

A receiver (uvicorn, a minimal ASGI app in a process of its own) answers
every POST 200 and counts what it got. Rows, in the same run:

  baseline  an httpx.AsyncClient loop per endpoint posting the same bodies
            to the same receiver: no Kafka, no database, no signing, no
            address check; the ceiling of HTTP on this machine
  mailbus   the webhooks service as shipped (in this process): E endpoints
            of an admin key, N `email.sent` events on the real broker read
            by the intake, queued in PostgreSQL, claimed, signed, checked
            and delivered; timed from producing the events (the service
            running and warmed up by one event) to the last delivery the
            receiver counted (E x N deliveries)

Usage: .venv/bin/python bench/webhooks_throughput.py [--events 500] [--endpoints 4]
Needs `make infra` (Kafka and PostgreSQL running, `mailbus setup db` and
`mailbus setup kafka` of this checkout applied).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mailbus import apikeys  # noqa: E402
from mailbus import webhook_signing as signing  # noqa: E402
from mailbus.codec import Registry  # noqa: E402
from mailbus.provision import provision  # noqa: E402
from mailbus.settings import ServiceSettings  # noqa: E402
from mailbus.timeline import event_row  # noqa: E402
from mailbus.webhook_events import event_of  # noqa: E402
from tests.support import projector as build  # noqa: E402
from tests.support.kafka import drop_namespace  # noqa: E402
from tests.support.smtp import free_port  # noqa: E402
from tests.support.webhooks import WebhooksService, settings_for  # noqa: E402

RECEIVER = """
import sys, uvicorn
count = 0
async def app(scope, receive, send):
    global count
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["method"] == "POST":
        count += 1
    body = str(count).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False)
"""


def count(base: str) -> int:
    return int(httpx.get(base + "/count", timeout=10).text)


async def baseline(base: str, bodies: list[bytes], endpoints: int) -> float:
    async def loop(path: str) -> None:
        async with httpx.AsyncClient(trust_env=False) as client:
            for body in bodies:
                r = await client.post(base + path, content=body,
                                      headers={"Content-Type": "application/json"})
                r.raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(loop(f"/e{i}") for i in range(endpoints)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--endpoints", type=int, default=4)
    args = parser.parse_args()
    admin = ServiceSettings(service_name="admin")
    kafka = admin.kafka.client_config()
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    provision(kafka, admin.var_dir / "secrets", prefix, users=False)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    registry = Registry.load()
    try:
        for _ in range(100):
            try:
                count(base)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        now = datetime.now(UTC)
        events = [build.sent(str(uuid.uuid4()), now) for _ in range(args.events)]
        bodies = []
        for topic, record in events:
            name, decoded = registry.decode(registry.encode(topic, record))
            event = event_of(event_row(name, decoded))
            assert event is not None
            bodies.append(event.body.encode())
        total = args.events * args.endpoints

        before = count(base)
        base_seconds = asyncio.run(baseline(base, bodies, args.endpoints))
        assert count(base) - before == total

        key = apikeys.generate()
        with psycopg.connect(admin.postgres.conninfo(), autocommit=True) as conn:
            conn.execute("INSERT INTO api_keys (id, name, secret_sha256, scopes)"
                         " VALUES (%s, 'bench', %s, %s)",
                         (key.key_id, key.secret_sha256, ["admin"]))
        ingest = ServiceSettings(service_name="ingest")
        with psycopg.connect(ingest.postgres.conninfo(), autocommit=True) as conn:
            for i in range(args.endpoints):
                conn.execute(
                    "INSERT INTO webhook_endpoints (id, namespace, key_id, all_messages, url,"
                    " event_types, secret) VALUES (%s, %s, %s, true, %s, %s, %s)",
                    (str(uuid.uuid4()), prefix, key.key_id, f"{base}/w{i}",
                     ["message.sent"], signing.new_secret()))
        with WebhooksService(settings_for(prefix, dispatch_seconds=0.05,
                                          max_endpoints_in_flight=args.endpoints)):
            # One event first: the consumer has joined its group and every
            # endpoint has its connection before the clock starts.
            before = count(base)
            build.produce(kafka, prefix, registry, [build.sent(str(uuid.uuid4()), now)])
            while count(base) - before < args.endpoints:
                time.sleep(0.05)
            before = count(base)
            start = time.perf_counter()
            build.produce(kafka, prefix, registry, events)
            while count(base) - before < total:
                time.sleep(0.05)
            mailbus_seconds = time.perf_counter() - start
        print(f"{total} deliveries ({args.events} events x {args.endpoints} endpoints)")
        print("| row | deliveries/s | seconds |")
        print("|---|---|---|")
        print(f"| baseline (httpx loop per endpoint) | {total / base_seconds:.0f} |"
              f" {base_seconds:.2f} |")
        print(f"| mailbus webhooks (Kafka -> PostgreSQL -> signed POST) |"
              f" {total / mailbus_seconds:.0f} | {mailbus_seconds:.2f} |")
    finally:
        receiver.terminate()
        receiver.wait(10)
        drop_namespace(kafka, prefix)


if __name__ == "__main__":
    main()
