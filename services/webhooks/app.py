"""`mailbus webhooks`: the wiring of intake, rewinds and dispatch in one process."""

from __future__ import annotations

import asyncio
import logging
import threading

from mailbus import runtime
from mailbus.codec import Registry
from mailbus.db import open_pool
from mailbus.lag import LagReporter
from mailbus.webhooks.dispatch import Dispatcher
from mailbus.webhooks.intake import Intake, Rewinds
from mailbus.webhooks.settings import WebhooksSettings

log = logging.getLogger(__name__)


class Webhooks:
    """The service's parts, built from its settings; nothing connects before serve()."""

    def __init__(self, settings: WebhooksSettings):
        self.settings = settings
        self.registry = Registry.load()
        self.stopping = threading.Event()
        self.intake = Intake(settings, self.registry, self.stopping)
        self.rewinds = Rewinds(settings, self.registry, self.stopping)
        self.lag_config = runtime.consumer_config(settings, settings.group_id, "lag")

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set: two Kafka threads queue, the event loop delivers."""
        settings = self.settings
        threads = [threading.Thread(target=self.intake.run, name="webhooks-intake",
                                    daemon=True),
                   threading.Thread(target=self.rewinds.run, name="webhooks-rewinds",
                                    daemon=True)]
        for thread in threads:
            thread.start()
        lag = LagReporter(self.lag_config, self.intake.group,
                          self.intake.topics).start(settings.lag_seconds)
        pool = open_pool(settings.postgres)
        await pool.open(wait=False)
        log.info("webhooks: namespace %r, topics %s", self.intake.namespace,
                 self.intake.topics)
        try:
            await Dispatcher(settings, pool).run(stop)
        finally:
            self.stopping.set()
            for thread in threads:
                await asyncio.to_thread(thread.join, 30)
            lag.close()
            await pool.close()
            log.info("webhooks stopped")


async def serve(settings: WebhooksSettings, stop: asyncio.Event) -> None:
    """Build the service and run it until `stop` is set."""
    await Webhooks(settings).serve(stop)


def build(settings: WebhooksSettings) -> runtime.Service:
    """The webhooks service wired from its settings."""
    service = Webhooks(settings)
    kafka = {"intake": service.intake.config, "rewinds": service.rewinds.config,
             "lag": service.lag_config}
    return runtime.Service(settings, kafka, lambda: asyncio.run(_until_signalled(service)))


def main(settings: WebhooksSettings | None = None) -> None:
    """`mailbus webhooks`: deliver every outcome to its key's endpoints."""
    runtime.start(WebhooksSettings, build, settings)


async def _until_signalled(service: Webhooks) -> None:
    runtime.metrics_server(service.settings.metrics_host, service.settings.metrics_port)
    stop = asyncio.Event()
    runtime.on_stop(stop.set, asyncio.get_running_loop())
    await service.serve(stop)
