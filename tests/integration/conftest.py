"""Integration fixtures: the ingest app served on a real socket."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from mailbus.ingest.app import server_config
from mailbus.ingest.settings import IngestSettings


class LiveServer:
    """The ingest app served by uvicorn on a real socket, in a thread."""

    def __init__(self, settings: IngestSettings):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.sock = sock
        self.server = uvicorn.Server(server_config(settings))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        end = time.monotonic() + 30.0
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("ingest app did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def live_ingest(ingest_settings: IngestSettings) -> Iterator[LiveServer]:
    with LiveServer(ingest_settings) as server:
        yield server


@pytest.fixture
def api(live_ingest: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_ingest.url, timeout=30) as client:
        yield client
