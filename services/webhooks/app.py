"""`mailbus webhooks`: the wiring of intake, rewinds and dispatch in one process."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

from prometheus_client import start_http_server

from mailbus.codec import Registry
from mailbus.db import open_pool
from mailbus.lag import LagReporter
from mailbus.webhooks.dispatch import Dispatcher
from mailbus.webhooks.intake import Intake, Rewinds
from mailbus.webhooks.settings import WebhooksSettings

log = logging.getLogger(__name__)


async def serve(settings: WebhooksSettings, stop: asyncio.Event) -> None:
    """Run until `stop` is set: two Kafka threads queue, the event loop delivers."""
    registry = Registry.load()
    stopping = threading.Event()
    intake = Intake(settings, registry, stopping)
    threads = [threading.Thread(target=intake.run, name="webhooks-intake", daemon=True),
               threading.Thread(target=Rewinds(settings, registry, stopping).run,
                                name="webhooks-rewinds", daemon=True)]
    for thread in threads:
        thread.start()
    lag = LagReporter(settings.kafka.client_config(), intake.group,
                      intake.topics).start(settings.lag_seconds)
    pool = open_pool(settings.postgres)
    await pool.open(wait=False)
    log.info("webhooks: namespace %r, topics %s", intake.namespace, intake.topics)
    try:
        await Dispatcher(settings, pool).run(stop)
    finally:
        stopping.set()
        for thread in threads:
            await asyncio.to_thread(thread.join, 30)
        lag.close()
        await pool.close()
        log.info("webhooks stopped")


def main(settings: WebhooksSettings) -> None:
    """`mailbus webhooks`: deliver every outcome to its key's endpoints."""
    settings.check_secrets()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    asyncio.run(_until_signalled(settings))


async def _until_signalled(settings: WebhooksSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)
