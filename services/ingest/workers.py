"""Serving the ingest API: one process, or several worker processes on one port.

With `MAILBUS_INGEST_WORKERS` above 1, uvicorn binds the port once and
spawns that many worker processes that accept on it; each builds its own
settings from the same environment, and its own app, connection pool,
producer and group commits. What each keeps in memory is its own: a key's
request-rate window (so a key may make up to N times its rate across N
workers; divide the rate to keep the sum) and its metrics, which Prometheus'
multiprocess mode writes to a directory of this run that every worker's
/metrics reads whole, so a scrape sees the service, not whichever worker
answered it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from mailbus import logs
from mailbus.ingest.settings import IngestSettings

# prometheus_client's switch: set before a worker imports it, it makes every
# metric write to files in this directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def server_options(settings: IngestSettings) -> dict[str, Any]:
    """How uvicorn serves the app, with one worker or several."""
    return {
        "host": settings.host, "port": settings.port,
        "log_level": settings.log_level.lower(), "access_log": False,
        # uvicorn's lines go through the process's handler: text or JSON as configured.
        "log_config": None,
        # No proxy is trusted by default and the server does not name itself.
        "proxy_headers": False, "server_header": False, "lifespan": "on",
    }


def run(settings: IngestSettings) -> None:
    """Serve until stopped: in this process, or in `settings.ingest_workers` workers."""
    from mailbus.ingest.app import server_config

    if settings.ingest_workers == 1:
        uvicorn.Server(server_config(settings)).run()
        return
    with tempfile.TemporaryDirectory(prefix="mailbus-ingest-metrics-") as directory:
        os.environ[MULTIPROC_ENV] = directory
        uvicorn.run("mailbus.ingest.workers:worker_app", factory=True,
                    workers=settings.ingest_workers, **server_options(settings))


def worker_app() -> FastAPI:
    """The app of one worker process, from the environment (uvicorn's factory)."""
    from mailbus.ingest.app import create_app

    settings = IngestSettings()
    logs.setup(settings.log_level, settings.log_format)
    return create_app(settings)


def exposition() -> bytes:
    """The Prometheus text of this service: every worker's metrics summed, or this process's."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()
