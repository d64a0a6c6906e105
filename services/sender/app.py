"""Wiring of the sender: builds everything in one place and runs until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import suppress
from datetime import datetime, timedelta
from typing import Any

import uvloop

from mailbus import runtime, topics
from mailbus.accounts import Directory, load_accounts
from mailbus.codec import Registry
from mailbus.db import open_pool
from mailbus.lag import LagReporter
from mailbus.logs import event
from mailbus.producer import AsyncProducer
from mailbus.reload import AccountsReloader, changes
from mailbus.sender import metrics
from mailbus.sender.admit import Admission
from mailbus.sender.attachments import BlobCache
from mailbus.sender.composer import DEADLINE_SECONDS as COMPOSER_DEADLINE
from mailbus.sender.composer import Composer, Setup
from mailbus.sender.context import Context
from mailbus.sender.decisions import utcnow
from mailbus.sender.dkim import DkimSigner
from mailbus.sender.outbox import Outbox
from mailbus.sender.quota import Budget, Exhausted
from mailbus.sender.roster import (
    Parts,
    check_reply_tags,
    prepare,
    retire,
)
from mailbus.sender.settings import SenderSettings
from mailbus.sender.settle import Settler
from mailbus.sender.smtp import SmtpTransport
from mailbus.sender.suppressions import SuppressionFeed, SuppressionReader, Suppressions
from mailbus.sender.worker import AccountWorker
from mailbus.tokens import LinkBuilder, load_keyring

log = logging.getLogger(__name__)
SWEEP_SECONDS = 10.0
WATCH_SECONDS = 0.5


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
        assert settings.accounts_file is not None
        self.settings = settings
        # Every Kafka client of the sender, by role; the suppression reader joins no
        # group but librdkafka wants one even for assigned partitions: the
        # namespace's own (the one its ACLs name), though nothing is committed to it.
        self.kafka = {
            "producer": runtime.producer_config(settings),
            "admission": runtime.consumer_config(settings, settings.group_id),
            "suppressions": runtime.consumer_config(settings, settings.group_id, "suppressions"),
            "lag": runtime.consumer_config(settings, settings.group_id, "lag"),
        }
        self.directory = directory or load_accounts(settings.accounts_file)
        self.registry = Registry.load()
        self.links = link_builder(settings)
        for account in self.directory.by_id.values():
            check_reply_tags(account, self.links.keyring)
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
        # Edits of the accounts file the reloader accepted, applied one after another.
        self._switches: asyncio.Queue[tuple[dict[str, list[str]], dict[str, Parts]]] = \
            asyncio.Queue()
        self.dkims: dict[str, DkimSigner | None] = {}
        self._old_composers: list[Composer] = []

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
        composer = Composer(Setup(dict(accounts), {a: self.dkims.get(a) for a in accounts},
                                  self.links),
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
        kafka = self.kafka
        probes = runtime.metrics_server(s.metrics_host, s.metrics_port, self.readiness)
        self.pool = open_pool(s.postgres)
        await self.pool.open(wait=True, timeout=30)
        self.producer = AsyncProducer(kafka["producer"])
        self.outbox = Outbox(self.pool, self.producer, s.kafka.topic_prefix, self.instance)
        self.settler = Settler(self.pool, s.kafka.topic_prefix, self.instance, self.outbox.emit,
                               window=s.settle_window_seconds, outbox=self.outbox)
        self._settler_task = asyncio.create_task(self.settler.run())
        self.feed = SuppressionFeed(lambda: SuppressionReader(
            kafka["suppressions"], self.topic(topics.SUPPRESSIONS), self.registry,
            self.suppressions))
        self.admission = Admission(
            config=kafka["admission"], group_id=kafka["admission"]["group.id"],
            topic=self.topic(topics.REQUESTED), dlq_topic=self.topic(topics.REQUESTED_DLQ),
            registry=self.registry, directory=self.directory, ledger=self.outbox.ledger,
            producer=self.producer, on_change=self._wake_all, on_assign=self._take_over)
        parts = prepare(self.directory.by_id.values(), s, self.links.keyring)
        self.dkims = {a: p.dkim for a, p in parts.items()}
        # Workers see no partition, so claim nothing, while the suppression
        # list is not loaded or not followed: who may be mailed is unknown.
        self.ctx = ctx = Context(
            outbox=self.outbox, settler=self.settler, registry=self.registry,
            directory=self.directory, suppressions=self.suppressions,
            links=self.links, owned=self._sendable,
            capacity=self._capacity, ready_at=self._ready_at, topic=self.topic,
            max_attempts=s.max_attempts, retry_base=s.retry_base_seconds,
            retry_cap=s.retry_cap_seconds, poll_seconds=s.poll_seconds,
            claim_depth=s.claim_depth,
            settling_per_connection=s.settling_per_connection,
            files=BlobCache(s.attachment_cache_mib * 1024 * 1024) if s.attachment_cache_mib
            else None,
            composer=self._composer())
        for part in parts.values():
            await self._start_worker(part)
        self.lag = LagReporter(kafka["lag"], kafka["lag"]["group.id"],
                               [self.topic(topics.REQUESTED)])
        self._admission_task = asyncio.create_task(self.admission.run())
        self._tasks += [asyncio.create_task(t) for t in (
            self.feed.run(), self._sweep(), self._gauges(), self._prune(), self._watch(),
            self._switch_accounts())]
        if s.log_summary_seconds:
            self._tasks.append(asyncio.create_task(self._summaries(s.log_summary_seconds)))
        assert s.accounts_file is not None
        self.reloader = reloader = AccountsReloader(
            s.accounts_file, self.directory, self.apply_accounts, service="sender",
            poll_seconds=s.accounts_poll_seconds)
        reloader.start()
        log.info("sender started: %d account(s); sending waits for the suppression list",
                 len(self.workers))
        await self._stop.wait()
        await reloader.stop()
        # An edit being applied finishes: a retiring worker's rows settle first.
        with suppress(TimeoutError):
            await asyncio.wait_for(self._switches.join(), 30)
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
        for composer in self._old_composers:
            composer.close()
        await self.settler.flush(timeout=10)
        self._settler_task.cancel()
        await asyncio.gather(self._settler_task, return_exceptions=True)
        await self.outbox.drain()
        for worker in self.workers.values():
            await worker.transport.close()
            if worker.replay is not None:
                await worker.replay[1].close()
        self.admission.close()
        await asyncio.to_thread(self.lag.close)
        await asyncio.to_thread(self.feed.close)
        self.producer.close()
        await self.pool.close()
        if probes is not None:
            probes.shutdown()
            probes.server_close()
        log.info("sender stopped")

    async def _start_worker(self, parts: Parts) -> None:
        """Run the account's worker, its budget loaded from the last 24 h of the ledger."""
        account = parts.account
        budget = Budget(account.daily_quota, account.rate_per_second)
        budget.load(await self.outbox.ledger.sent_in_window(account.id), utcnow())
        worker = AccountWorker(self.ctx, account, parts.transport, budget, parts.dkim,
                               parts.replay)
        self.workers[account.id] = worker
        self._worker_tasks[account.id] = asyncio.create_task(worker.run())
        metrics.QUOTA_LIMIT.labels(account.id).set(account.daily_quota)

    def apply_accounts(self, new: Directory) -> None:
        """Put an edited accounts file (or rotated SMTP passwords) in force
        (AccountsReloader calls this).

        Raises ConfigError, and changes nothing, when an added or changed
        account cannot be built (a DKIM key, a password or token file). Else
        admission and pool failover see the new accounts at once, and the
        workers follow in `_switch_accounts`.
        """
        diff = changes(self.directory, new)
        # A password file rewritten in place leaves the accounts file as it was: on
        # SIGHUP the account is rebuilt all the same, with the new password.
        rotated = [a for a, w in self.workers.items()
                   if a in new.by_id and a not in diff["changed"]
                   and isinstance(w.transport, SmtpTransport) and w.transport.password_changed()]
        for account_id in rotated:
            event(log, logging.INFO, f"account {account_id}: password file changed; its"
                  " transport is built again", account=account_id)
        diff["changed"] = sorted({*diff["changed"], *rotated})
        fresh = prepare([new.by_id[a] for a in (*diff["added"], *diff["changed"])],
                        self.settings, self.links.keyring)
        self.directory = self.ctx.directory = new
        # Requests for an added account are admitted from now on; for a removed
        # one they are dead-lettered, as for any unknown account.
        self.admission._directory = new  # its one reference to the accounts
        for account_id in diff["removed"]:
            self.dkims.pop(account_id, None)
        self.dkims.update({a: p.dkim for a, p in fresh.items()})
        if fresh and self.ctx.composer is not None:
            # Composer processes hold the accounts they were started with. A batch
            # already in the old ones finishes within their deadline before they stop.
            old, self.ctx.composer = self.ctx.composer, self._composer()
            self._old_composers.append(old)
            loop = asyncio.get_running_loop()
            loop.call_later(COMPOSER_DEADLINE + 5, self._close_composer, old)
        self._switches.put_nowait((diff, fresh))

    def _close_composer(self, composer: Composer) -> None:
        if composer in self._old_composers:
            self._old_composers.remove(composer)
            composer.close()

    async def _switch_accounts(self) -> None:
        """Apply each accepted edit in turn: old workers retire, then new ones start."""
        while True:
            diff, fresh = await self._switches.get()
            try:
                leaving = {a: (self.workers.pop(a), self._worker_tasks.pop(a))
                           for a in (*diff["removed"], *diff["changed"]) if a in self.workers}
                await asyncio.gather(*(self._replace(a, leaving.get(a), fresh.get(a))
                                       for a in {*leaving, *fresh}))
                for account_id in diff["removed"]:
                    for gauge in (metrics.QUOTA_LIMIT, metrics.QUOTA_USED, metrics.QUOTA_LEFT,
                                  metrics.SMTP_CONNECTIONS):
                        with suppress(KeyError):
                            gauge.remove(account_id)
            finally:
                self._switches.task_done()

    async def _replace(self, account_id: str,
                       old: tuple[AccountWorker, asyncio.Task[None]] | None,
                       new: Parts | None) -> None:
        if old is not None:
            await retire(*old, "changed in the accounts file" if new is not None
                         else "removed from the accounts file")
        while new is not None:
            try:
                await self._start_worker(new)
                event(log, logging.INFO, f"account {account_id}: worker started"
                      f" ({'changed' if old is not None else 'added'} in the accounts file)",
                      account=account_id, kind=new.account.kind)
                return
            except Exception:  # the ledger unreachable: the rows wait, try again
                log.exception("account %s: worker not started; retrying", account_id)
                await asyncio.sleep(1.0)

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

    async def _summaries(self, every: float) -> None:
        """One line per period and per busy or failing account: what it handled, how its
        transport is; then one line for the whole sender."""
        before = metrics.handled()
        while True:
            await asyncio.sleep(every)
            now, counts = utcnow(), metrics.handled()
            delta = {key: n - before.get(key, 0) for key, n in counts.items()}
            before = counts
            total: dict[str, int] = dict.fromkeys(metrics.HANDLED, 0)
            idle = []
            for account_id, worker in sorted(self.workers.items()):
                mine = {what: int(delta.get((account_id, what), 0))
                        for what in metrics.HANDLED}
                for what, n in mine.items():
                    total[what] += n
                health = getattr(worker.transport, "health", None)
                failing = health is not None and health.failing
                if not any(mine.values()) and not failing:
                    idle.append(account_id)
                    continue
                why = f"; transport failing: {health.last_error}" if failing and health else ""
                event(log, logging.WARNING if failing else logging.INFO,
                      f"account {account_id}: {mine['sent']} sent, {mine['failed']} failed,"
                      f" {mine['retried']} to retry in the last {every:g} s{why}",
                      account=account_id, window_seconds=every, **mine,
                      quota_left=worker.budget.left(now),
                      transport="failing" if failing else "ok")
            event(log, logging.INFO,
                  f"sender summary: {total['sent']} sent, {total['failed']} failed,"
                  f" {total['retried']} to retry in the last {every:g} s;"
                  f" {len(self.workers)} account(s)", window_seconds=every, **total,
                  accounts=len(self.workers), idle=",".join(idle) or "-")

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


def build(settings: SenderSettings) -> runtime.Service:
    """The sender wired from its settings (accounts, links, Kafka configuration);
    it connects when it runs."""
    sender = Sender(settings)

    async def serve() -> None:
        runtime.on_stop(sender.stop, asyncio.get_running_loop())
        await sender.run()

    # uvloop: the sender's loop turns over a future, a socket write and a read per
    # SMTP command and per settle; libuv's are a good deal cheaper than asyncio's own.
    return runtime.Service(settings, sender.kafka, lambda: uvloop.run(serve()),
                           {"sender": sender})


def main(settings: SenderSettings | None = None) -> None:
    """`mailbus sender`: serve metrics and probes, run until SIGTERM or SIGINT."""
    runtime.start(SenderSettings, build, settings)
