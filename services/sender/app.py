"""Wiring of the sender: builds everything in one place and runs until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from contextlib import suppress
from datetime import datetime, timedelta
from typing import Any

import uvloop

from mailbus import topics
from mailbus.accounts import Account, Directory, SmtpAccount, load_accounts
from mailbus.codec import Registry
from mailbus.db import open_pool
from mailbus.errors import ConfigError
from mailbus.lag import LagReporter
from mailbus.producer import AsyncProducer
from mailbus.sender import metrics
from mailbus.sender.admit import Admission
from mailbus.sender.compose import ComposeFailed, tagged_reply_address
from mailbus.sender.composer import Composer, Setup
from mailbus.sender.context import Context
from mailbus.sender.dkim import DkimSigner
from mailbus.sender.handlers import utcnow
from mailbus.sender.outbox import Outbox
from mailbus.sender.quota import Budget, Exhausted
from mailbus.sender.settings import SenderSettings
from mailbus.sender.settle import Settler
from mailbus.sender.smtp import SmtpTransport
from mailbus.sender.suppressions import SuppressionFeed, SuppressionReader, Suppressions
from mailbus.sender.transport import Transport
from mailbus.sender.worker import AccountWorker
from mailbus.tokens import LinkBuilder, load_keyring

log = logging.getLogger(__name__)
SWEEP_SECONDS = 10.0
WATCH_SECONDS = 0.5


def transport_for(account: Account, settings: SenderSettings) -> Transport:
    """The account's transport."""
    if account.kind == "smtp":
        return SmtpTransport(account)
    from mailbus.sender.gmail import GmailTransport

    return GmailTransport.from_account(account, api_endpoint=settings.gmail_api_endpoint,
                                       token_uri=settings.gmail_token_uri)


def replay_sink_for(account: Account, settings: SenderSettings) -> tuple[Account, Transport]:
    """The account as replayed requests see it: same identity, the replay sink as its server.

    The sink is the final hop, so its acceptance is the delivery evidence.
    """
    host, _, port = settings.replay_sink.rpartition(":")
    sink = account.model_copy(update={
        "kind": "smtp", "evidence": "smtp_final", "gmail": None,
        "smtp": SmtpAccount(host=host, port=int(port), tls="none",
                            connections=account.smtp.connections if account.smtp else 2)})
    return sink, SmtpTransport(sink)


def dkim_for(account: Account) -> DkimSigner | None:
    """The account's DKIM signer, when its SMTP settings name a key."""
    cfg = account.smtp
    if cfg is None or cfg.dkim_key_file is None:
        return None
    if not cfg.dkim_selector:
        raise ConfigError(f"account {account.id}: dkim_key_file needs dkim_selector")
    domain = cfg.dkim_domain or account.from_address.rpartition("@")[2]
    return DkimSigner.from_file(cfg.dkim_selector, domain, cfg.dkim_key_file)


def link_builder(settings: SenderSettings) -> LinkBuilder:
    """Signed links to the hooks service; the local stack makes its key on first use."""
    assert settings.link_keys_file is not None
    keyring = load_keyring(settings.link_keys_file, create=settings.env == "local")
    return LinkBuilder(keyring, settings.hooks_base_url,
                       timedelta(days=settings.link_ttl_days), settings.unsubscribe_mailto,
                       open_tracking=settings.open_tracking)


class Sender:
    """The running service."""

    def __init__(self, settings: SenderSettings, directory: Directory | None = None):
        settings.check_secrets()
        assert settings.accounts_file is not None
        self.settings = settings
        self.directory = directory or load_accounts(settings.accounts_file)
        self.registry = Registry.load()
        self.links = link_builder(settings)
        for account in self.directory.by_id.values():
            if account.reply_tags:  # a from address too long to tag fails here, not per message
                try:
                    tagged_reply_address(account, self.links.keyring, str(uuid.uuid4()))
                except ComposeFailed as exc:
                    raise ConfigError(f"account {account.id}: {exc}") from exc
        self.suppressions = Suppressions()
        # This instance, as the owner of the partitions it takes over, and the
        # ownership epoch of each (migration 0013): claims and settles carry it.
        self.instance = str(uuid.uuid4())
        self.epochs: dict[int, int] = {}
        self._settler_task: asyncio.Task[None] | None = None
        self.workers: dict[str, AccountWorker] = {}
        self._worker_tasks: dict[str, asyncio.Task[None]] = {}
        self._admission_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()

    def topic(self, name: str) -> str:
        """The real topic name (with the configured prefix)."""
        return self.settings.kafka.topic(name)

    def _capacity(self) -> dict[str, int]:
        """Quota left per account, 0 for one parked or exhausted now."""
        now = utcnow()
        return {a: 0 if isinstance(w.budget.decide(now), Exhausted) else w.budget.left(now)
                for a, w in self.workers.items()}

    def _composer(self) -> Composer | None:
        """The composer processes, started now so the first batch does not wait for them."""
        if not self.settings.compose_processes:
            return None
        accounts = self.directory.by_id
        composer = Composer(Setup(dict(accounts), {a: dkim_for(acc) for a, acc in
                                                   accounts.items()}, self.links),
                            processes=self.settings.compose_processes)
        if accounts:
            warm = asyncio.create_task(composer.compose(next(iter(accounts)), [], utcnow()))
            self._tasks.append(warm)
        return composer

    def _ready_at(self, account_id: str) -> datetime | None:
        """When the account may send again (now, unless parked or out of quota);
        None for an account this instance does not run."""
        worker = self.workers.get(account_id)
        if worker is None:
            return None
        now = utcnow()
        decision = worker.budget.decide(now)
        return decision.until if isinstance(decision, Exhausted) else now

    def _wake_all(self) -> None:
        for worker in self.workers.values():
            worker.wake.set()

    async def run(self) -> None:
        """Start every part, run until stop(), then shut down in order."""
        s = self.settings
        kafka = s.kafka.client_config()
        probes = (metrics.serve(s.metrics_host, s.metrics_port, self.readiness)
                  if s.metrics_port else None)
        self.pool = open_pool(s.postgres)
        await self.pool.open(wait=True, timeout=30)
        self.producer = AsyncProducer(kafka, **{"client.id": "mailbus-sender"})
        self.outbox = Outbox(self.pool, self.producer, s.kafka.topic_prefix, self.instance)
        self.settler = Settler(self.pool, s.kafka.topic_prefix, self.instance, self.outbox.emit,
                               window=s.settle_window_seconds)
        self._settler_task = asyncio.create_task(self.settler.run())
        self.feed = SuppressionFeed(lambda: SuppressionReader(
            kafka, self.topic(topics.SUPPRESSIONS), self.registry, self.suppressions,
            s.kafka.topic_prefix + s.group_id))
        self.admission = Admission(
            config=kafka, group_id=s.kafka.topic_prefix + s.group_id,
            topic=self.topic(topics.REQUESTED), dlq_topic=self.topic(topics.REQUESTED_DLQ),
            registry=self.registry, directory=self.directory, ledger=self.outbox.ledger,
            producer=self.producer, on_change=self._wake_all, on_assign=self._take_over)
        # Workers see no partition, so claim nothing, while the suppression
        # list is not loaded or not followed: who may be mailed is unknown.
        ctx = Context(pool=self.pool, outbox=self.outbox, settler=self.settler,
                      registry=self.registry,
                      directory=self.directory, suppressions=self.suppressions,
                      links=self.links, owned=self._sendable,
                      capacity=self._capacity, ready_at=self._ready_at, topic=self.topic,
                      max_attempts=s.max_attempts, retry_base=s.retry_base_seconds,
                      retry_cap=s.retry_cap_seconds, poll_seconds=s.poll_seconds,
                      claim_depth=s.claim_depth,
                      settling_per_connection=s.settling_per_connection,
                      composer=self._composer())
        now = utcnow()
        for account in self.directory.by_id.values():
            budget = Budget(account.daily_quota, account.rate_per_second)
            budget.load(await self.outbox.ledger.sent_in_window(account.id), now)
            replay = None if s.replay_to_real_accounts else replay_sink_for(account, s)
            self.workers[account.id] = AccountWorker(ctx, account, transport_for(account, s),
                                                     budget, dkim_for(account), replay)
            metrics.QUOTA_LIMIT.labels(account.id).set(account.daily_quota)
        self._worker_tasks = {a: asyncio.create_task(w.run()) for a, w in self.workers.items()}
        self.lag = LagReporter(kafka, s.kafka.topic_prefix + s.group_id,
                               [self.topic(topics.REQUESTED)])
        self._admission_task = asyncio.create_task(self.admission.run())
        self._tasks += [asyncio.create_task(t) for t in (
            self.feed.run(), self._sweep(), self._gauges(), self._prune(), self._watch())]
        log.info("sender started: %d account(s); sending waits for the suppression list",
                 len(self.workers))
        await self._stop.wait()
        self.feed.stop()
        self.admission.stop()
        with suppress(Exception):
            await asyncio.wait_for(self._admission_task, 10)
        # Every account's in-flight messages finish at once, not one account after another.
        await asyncio.gather(*(w.drain(timeout=20) for w in self.workers.values()))
        for task in [*self._tasks, *self._worker_tasks.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._worker_tasks.values(),
                             return_exceptions=True)
        ctx.close()
        await self.settler.flush(timeout=10)
        self._settler_task.cancel()
        await asyncio.gather(self._settler_task, return_exceptions=True)
        await self.outbox.drain()
        for worker in self.workers.values():
            await worker.transport.close()
        self.admission.close()
        await asyncio.to_thread(self.lag.close)
        await asyncio.to_thread(self.feed.close)
        self.producer.close()
        await self.pool.close()
        if probes is not None:
            probes.shutdown()
            probes.server_close()
        log.info("sender stopped")

    def _sendable(self) -> dict[int, int]:
        """Partitions workers may claim from, with their epochs: none while suppressions
        are not ready."""
        if not self.feed.ready():
            return {}
        return {p: self.epochs[p] for p in self.admission.partitions() if p in self.epochs}

    def readiness(self) -> dict[str, Any]:
        """What /readyz answers (called from the probe server's thread)."""
        feed, admission = getattr(self, "feed", None), getattr(self, "admission", None)
        task = self._admission_task
        return metrics.readiness(
            suppressions=feed is not None and feed.ready(),
            admission=admission is not None and admission.healthy
            and task is not None and not task.done(),
            workers=[bool(self._worker_tasks)]
            + [not t.done() for t in self._worker_tasks.values()]
            + [self._settler_task is not None and not self._settler_task.done()])

    async def _watch(self) -> None:
        """Restart a part that ended on its own; publish and log readiness changes."""
        was: dict[str, Any] | None = None
        while True:
            for account_id, task in list(self._worker_tasks.items()):
                if task.done():
                    log.error("account %s: worker ended (%s); restarting", account_id,
                              task.exception() if not task.cancelled() else "cancelled")
                    self._worker_tasks[account_id] = asyncio.create_task(
                        self.workers[account_id].run())
            if (self._admission_task is not None and self._admission_task.done()
                    and not self._stop.is_set()):
                task = self._admission_task
                log.error("admission ended (%s); restarting",
                          task.exception() if not task.cancelled() else "cancelled")
                self._admission_task = asyncio.create_task(self.admission.run())
            now = self.readiness()
            metrics.READY.set(now["status"] == "ok")
            for part in ("suppressions", "admission", "workers"):
                metrics.COMPONENT_UP.labels(part).set(now[part])
            if now != was:
                if now["status"] == "ok":
                    log.info("sender ready: %d suppression(s) loaded", len(self.suppressions))
                else:
                    log.warning("sender not ready: %s",
                                ", ".join(k for k, v in now.items() if v is False))
                was = now
            await asyncio.sleep(WATCH_SECONDS)

    async def _prune(self) -> None:
        """Retention: delete settled rows and clear payloads past their time, in batches."""
        s = self.settings
        while True:
            await asyncio.sleep(s.ledger_prune_seconds)
            try:
                while True:
                    rows, payloads = await self.outbox.ledger.prune(
                        keep_seconds=s.ledger_retention_hours * 3600,
                        payload_seconds=s.ledger_payload_retention_hours * 3600,
                        batch=s.ledger_prune_batch)
                    metrics.LEDGER_PRUNED.labels("rows").inc(rows)
                    metrics.LEDGER_PRUNED.labels("payloads").inc(payloads)
                    if rows or payloads:
                        log.info("ledger: pruned %d row(s), cleared %d payload(s)",
                                 rows, payloads)
                    if max(rows, payloads) < s.ledger_prune_batch:
                        break
            except Exception:
                log.exception("ledger prune failed; retried next round")

    def stop(self) -> None:
        """Begin an orderly shutdown."""
        self._stop.set()

    async def _take_over(self, partitions: list[int]) -> None:
        """Before working newly assigned partitions: settle what a previous owner left."""
        epochs, recovered = await self.outbox.ledger.take_over(partitions)
        self.epochs.update(epochs)
        if recovered:
            log.warning("partitions %s: %d message(s) left mid-send re-queued as possible"
                        " duplicates", partitions, recovered)
        emitted = await self.outbox.sweep(partitions, min_age_seconds=0)
        if emitted:
            log.info("partitions %s: emitted %d event(s) left in the outbox", partitions, emitted)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                emitted = await self.outbox.sweep(self.admission.partitions())
                if emitted:
                    log.info("outbox: re-emitted %d event(s)", emitted)
            except Exception:
                log.exception("outbox sweep failed")

    async def _gauges(self) -> None:
        while True:
            now = utcnow()
            for account_id, worker in self.workers.items():
                metrics.QUOTA_USED.labels(account_id).set(worker.budget.used(now))
                metrics.QUOTA_LEFT.labels(account_id).set(worker.budget.left(now))
                if isinstance(worker.transport, SmtpTransport):
                    metrics.SMTP_CONNECTIONS.labels(account_id).set(
                        worker.transport.open_connections)
            try:
                await asyncio.to_thread(self.lag.refresh)
            except Exception:
                log.exception("consumer lag not measured")
            await asyncio.sleep(5)


def main(settings: SenderSettings) -> None:
    """`mailbus sender`: serve metrics and probes, run until SIGTERM or SIGINT."""

    async def serve() -> None:
        sender = Sender(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sender.stop)
        await sender.run()

    # uvloop: the sender's loop turns over a future, a socket write and a read per
    # SMTP command and per settle; libuv's are a good deal cheaper than asyncio's own.
    uvloop.run(serve())
