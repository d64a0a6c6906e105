"""The webhooks service in a thread of the test process, on the real broker and database."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from mailbus.webhooks.app import serve
from mailbus.webhooks.settings import WebhooksSettings


def settings_for(namespace: str, **overrides: Any) -> WebhooksSettings:
    """Settings of a test's service: its namespace, loopback receivers, quick rounds."""
    values: dict[str, Any] = {
        "kafka": {"topic_prefix": namespace}, "metrics_port": 0, "allow_http": True,
        "allowed_networks": ["127.0.0.0/8"], "dispatch_seconds": 0.1, "poll_seconds": 0.2,
        "timeout_seconds": 5.0, "retry_schedule_seconds": [0.2, 0.2, 0.2, 0.2, 0.2]}
    return WebhooksSettings(**(values | overrides))


class WebhooksService:
    """`serve()` on an event loop of its own; stopped as SIGTERM would stop it."""

    def __init__(self, settings: WebhooksSettings):
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(serve(self.settings, self.stop))
        except BaseException as exc:  # noqa: BLE001 - reported by __exit__
            self.error = exc

    def __enter__(self) -> WebhooksService:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the webhooks service did not stop"
        if self.error is not None:
            raise self.error
