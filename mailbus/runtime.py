"""What every service is built on: settings, logging, the secret check, Kafka clients'
configuration with named defaults, the metrics server, stop signals.

Each service has one `main(settings=None)` that starts with `load()` and takes
its Kafka configuration from `producer_config()` and `consumer_config()`, so a
shared setting (`MAILBUS_KAFKA__DELIVERY_TIMEOUT_MS`, the credentials, the
topic prefix, the log level) reaches every client of every service the same
way; `mailbus <service>` only dispatches to that main.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from mailbus import logs
from mailbus.settings import ServiceSettings

S = TypeVar("S", bound=ServiceSettings)

# Every consumer of a service commits by hand, once what it read is stored
# (the ledger, the projection, the delivery queue): an automatic commit could
# run ahead of that and lose records on a crash.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    # A group's first start reads what the topics still hold rather than
    # skipping everything written before it joined; retention bounds it.
    "auto.offset.reset": "earliest",
}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def load(cls: type[S], settings: S | None = None) -> S:
    """The service's settings (from the environment unless given), logging set up,
    secrets checked: the first step of every main(), before anything connects."""
    settings = settings if settings is not None else cls()
    logs.setup(settings.log_level, settings.log_format)
    settings.check_secrets()
    return settings


@dataclass
class Service:
    """A service wired from its settings, not yet running: its Kafka clients'
    configurations by role (what `run` uses), and `run`, which serves until stopped."""

    settings: ServiceSettings
    kafka: dict[str, dict[str, Any]]
    run: Callable[[], None]
    parts: dict[str, Any] = field(default_factory=dict)


def start(cls: type[S], build: Callable[[S], Service], settings: S | None = None) -> None:
    """What every service's main() does: load() its settings, build it, run it."""
    build(load(cls, settings)).run()


def client_id(settings: ServiceSettings, role: str = "") -> str:
    """The Kafka client.id of one of the service's clients: mailbus-<service>[-<role>]."""
    return f"mailbus-{settings.service_name}" + (f"-{role}" if role else "")


def group_id(settings: ServiceSettings, name: str) -> str:
    """A consumer group in the service's namespace (the prefix its ACLs name)."""
    return settings.kafka.topic_prefix + name


def producer_config(settings: ServiceSettings, role: str = "",
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """librdkafka configuration of a producer of this service (AsyncProducer adds its
    PRODUCER_DEFAULTS under it): credentials, client id, the delivery timeout."""
    return {**settings.kafka.client_config(), "client.id": client_id(settings, role),
            # How long an event may wait for the broker's ack (MAILBUS_KAFKA__DELIVERY_TIMEOUT_MS).
            "message.timeout.ms": settings.kafka.delivery_timeout_ms, **(overrides or {})}


def consumer_config(settings: ServiceSettings, group: str, role: str = "",
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """librdkafka configuration of a consumer of this service in group `group`
    (unprefixed: the namespace is added here), with CONSUMER_DEFAULTS."""
    return {**settings.kafka.client_config(), **CONSUMER_DEFAULTS,
            "group.id": group_id(settings, group), "client.id": client_id(settings, role),
            **(overrides or {})}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds are not worth a log line."""


def metrics_server(host: str, port: int,
                   ready: Callable[[], dict[str, Any]] | None = None) -> WSGIServer | None:
    """Serve the Prometheus exposition in a thread (None when port is 0); with `ready`,
    also /healthz (the process is up) and /readyz (`ready()`'s body, 503 unless its
    status is ok). shutdown() the result to stop."""
    if not port:
        return None
    exposition = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if ready is not None and path in ("/healthz", "/readyz"):
            body = {"status": "ok"} if path == "/healthz" else ready()
            status = "200 OK" if body["status"] == "ok" else "503 Service Unavailable"
            headers = [("Content-Type", "application/json")]
            if body["status"] != "ok":
                headers.append(("Retry-After", "5"))
            start_response(status, headers)
            return [json.dumps(body).encode()]
        return exposition(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def on_stop(stop: Callable[[], None], loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Call `stop` on SIGTERM or SIGINT: from the event loop when given, else from the
    main thread's signal handler (a service whose loop is a thread's)."""
    for sig in STOP_SIGNALS:
        if loop is not None:
            loop.add_signal_handler(sig, stop)
        else:
            signal.signal(sig, lambda *_: stop())
