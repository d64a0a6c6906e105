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
from functools import partial
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from mailbus import runtime
from mailbus.ingest.settings import IngestSettings

# prometheus_client's switch: set before a worker imports it, it makes every
# metric write to files in this directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A group commit produces its records in one burst and waits for their acks:
# the group is the batch, so lingering mostly adds to every request's time
# (5 ms, the shared default, was half of a lone request's). 1 ms still lets
# librdkafka put a burst into one produce request rather than a first record
# alone and the rest after it.
INGEST_LINGER_MS = 1


def producer_config(settings: IngestSettings) -> dict[str, Any]:
    """The configuration of the one producer of each ingest process."""
    return runtime.producer_config(settings, overrides={"linger.ms": INGEST_LINGER_MS})


def build(settings: IngestSettings) -> runtime.Service:
    """The ingest API wired from its settings; each process opens its connections
    in the app's lifespan."""
    return runtime.Service(settings, {"producer": producer_config(settings)},
                           partial(run, settings))


def main(settings: IngestSettings | None = None) -> None:
    """`mailbus ingest`: serve the API until SIGTERM or SIGINT."""
    runtime.start(IngestSettings, build, settings)


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

    return create_app(runtime.load(IngestSettings))


def exposition() -> bytes:
    """The Prometheus text of this service: every worker's metrics summed, or this process's."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()
