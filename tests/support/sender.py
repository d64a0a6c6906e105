"""Helpers for sender tests: accounts files, request events, the sender in a thread."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Producer

from mailbus.codec import Registry
from mailbus.sender.app import Sender
from mailbus.sender.settings import SenderSettings


def smtp_account(account_id: str, port: int, *, pools: Iterable[str] = ("default",),
                 quota: int = 10_000, rate: float = 500.0, connections: int = 3,
                 evidence: str = "smtp_final") -> str:
    """One [[accounts]] table for an SMTP account on 127.0.0.1:port."""
    pools_toml = ", ".join(f'"{p}"' for p in pools)
    return f"""
[[accounts]]
id = "{account_id}"
kind = "smtp"
from_address = "{account_id}@sender.example"
from_name = "Sender {account_id}"
daily_quota = {quota}
rate_per_second = {rate}
pools = [{pools_toml}]
evidence = "{evidence}"
[accounts.smtp]
host = "127.0.0.1"
port = {port}
tls = "none"
connections = {connections}
"""


def request(account_id: str = "dev", *, to: str = "ada@example.com", pool: str | None = None,
            **fields: Any) -> dict[str, Any]:
    """A valid mailbus.EmailRequested record."""
    now = datetime.now(UTC)
    base: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "message_id": str(uuid.uuid4()), "occurred_at": now,
        "account_id": account_id, "pool": pool, "key_id": "test", "idempotency_key": None,
        "to": [{"email": to, "name": "Ada Lovelace"}], "cc": [], "bcc": [], "reply_to": None,
        "subject": "Hello from the test", "text": "Plain text body", "html": None,
        "template": None, "actions": [], "tags": [], "metadata": {}, "send_at": None,
        "requested_at": now,
    }
    return base | fields


def produce(config: dict[str, Any], topic: str, registry: Registry,
            events: Iterable[dict[str, Any]]) -> None:
    """Append request records keyed by account, as ingest does."""
    producer = Producer({**config, "enable.idempotence": True, "partitioner": "murmur2_random"})
    for event in events:
        producer.produce(topic, registry.encode("email.requested", event),
                         key=event["account_id"].encode())
        producer.poll(0)
    assert producer.flush(30) == 0


class SenderThread:
    """The sender service running in a thread with its own event loop."""

    def __init__(self, settings: SenderSettings):
        self.settings = settings
        self.sender: Sender | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self.sender = Sender(self.settings)
            self._ready.set()
            await self.sender.run()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test
            self.error = exc
            self._ready.set()

    def __enter__(self) -> SenderThread:
        self._thread.start()
        self._ready.wait(60)
        if self.error:
            raise self.error
        return self

    def wait_owning_all(self, timeout: float = 90.0) -> None:
        """Until this sender is ready and owns every partition of email.requested:
        a test whose timing starts here does not count the group join."""
        from mailbus.topics import ACCOUNT_PARTITIONS

        deadline = time.monotonic() + timeout
        while True:
            sender = self.sender
            if self.error:
                raise self.error
            if (sender is not None and sender.readiness()["status"] == "ok"
                    and len(sender.admission.partitions()) == ACCOUNT_PARTITIONS):
                return
            assert time.monotonic() < deadline, "the sender did not take its partitions"
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self._loop and self.sender:
            self._loop.call_soon_threadsafe(self.sender.stop)
        self._thread.join(60)
        assert not self._thread.is_alive(), "sender did not stop"
