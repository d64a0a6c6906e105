"""The confirm stream: a Faust app joining sent and delivered events by message id.

Faust's Stream.join is not implemented, so the join is a changelog-backed
Table keyed by message id. The per-message topics are co-partitioned (same
partition count, keyed by message id), so partition p of every source topic
and of the table's changelog hold the same messages, and Faust assigns them
to the same worker. One agent folds batches of events into the table and
emits a verdict when a message completes; a timer emits the overdue ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import faust
from faust.types import EventT, StreamT

from mailbus import runtime, topics
from mailbus.accounts import Directory, load_accounts
from mailbus.codec import Registry
from mailbus.confirm import join, metrics
from mailbus.confirm.settings import ConfirmSettings
from mailbus.errors import ConfigError, DecodeError
from mailbus.lag import LagReporter
from mailbus.reload import AccountsReloader

log = logging.getLogger(__name__)

# The ACLs give principal `confirm` its consumer group by this name and every
# topic and group prefixed "<it>-", which is how Faust names its changelog
# and leader topics; changing it needs a provisioning change.
APP_NAME = "mailbus-confirm"
TABLE_NAME = "messages"
SOURCES = (topics.SENT, topics.DELIVERED, topics.FAILED, topics.BOUNCED)
YIELD_EVERY = 1000  # table entries the timer scans between yields to the loop


def now_us() -> int:
    """The current time in microseconds since the epoch."""
    return time.time_ns() // 1000


class MessageTable(faust.Table):  # type: ignore[misc]  # faust's Table is untyped here
    """A Table whose changelog partition is the one stored in the value.

    Faust takes a write's changelog partition from the event being processed.
    In a batch (stream.take) that is the batch's last event, not the one that
    changed the key, and in a timer there is none; so every state records the
    partition its events came from, and put/forget write there (not table[k] = v).
    """

    async def on_recovery_completed(self, active_tps: set[Any], standby_tps: set[Any]) -> None:
        """Stop the consumer's flow until Faust has resumed it after recovery."""
        # faust-streaming #596: after recovery Faust resumes and seeks the
        # source partitions while the fetcher still runs, then clears the
        # stream queues (flow_control.resume), then resumes the consumer.
        # Records fetched in between are dropped unprocessed: commits stall at
        # the hole, or the gap logic skips it and the events are lost. This
        # hook runs before that sequence; with the flow stopped, nothing is
        # fetched until its end.
        self.app.consumer.stop_flow()
        await super().on_recovery_completed(active_tps, standby_tps)

    def put(self, key: str, value: join.State) -> Awaitable[Any]:
        """Set a key; the result resolves when the broker acked the changelog record."""
        self.data[key] = value
        return self.send_changelog(value["partition"], key, value)  # type: ignore[no-any-return]

    def forget(self, key: str, partition: int) -> Awaitable[Any]:
        """Drop a key here and, with a tombstone, from the changelog."""
        # `del table[key]` would look for the current event's partition too.
        self.data.pop(key, None)
        return self.send_changelog(  # type: ignore[no-any-return]
            partition, key, None, value_serializer="raw")


def app_config(settings: ConfirmSettings) -> dict[str, Any]:
    """Faust settings: SCRAM credentials (over TLS with SASL_SSL), memory store, no web server."""
    kafka = settings.kafka
    password = kafka.client_config()["sasl.password"]
    return {
        "broker": [f"kafka://{host.strip()}" for host in kafka.bootstrap_servers.split(",")],
        # A context makes Faust ask aiokafka for SASL_SSL; None keeps SASL_PLAINTEXT.
        "broker_credentials": faust.SASLCredentials(
            username=kafka.username, password=password, mechanism=kafka.sasl_mechanism,
            ssl_context=kafka.ssl_context()),
        # RocksDB is not available; the memory store is rebuilt from the
        # changelog on every start and rebalance.
        "store": "memory://",
        "topic_partitions": settings.table_partitions,
        "topic_replication_factor": settings.changelog_replicas,
        "broker_commit_interval": settings.commit_interval_seconds,
        "broker_session_timeout": settings.session_timeout_seconds,
        "broker_client_id": runtime.client_id(settings),
        # aiokafka's request timeout is also when a batch expires unsent: an
        # event waits for the broker's ack this long (MAILBUS_KAFKA__DELIVERY_TIMEOUT_MS),
        # then fails, and the agent sends it again.
        "producer_request_timeout": kafka.delivery_timeout_ms / 1000,
        "broker_heartbeat_interval": min(3.0, settings.session_timeout_seconds / 3),
        # Exactly-once would need TRANSACTIONAL_ID ACLs that `confirm` lacks.
        "processing_guarantee": "at_least_once",
        "consumer_auto_offset_reset": "earliest",
        "web_enabled": False,
        "autodiscover": False,
        "datadir": str(settings.data_dir),
    }


class ConfirmApp:
    """The Faust app with its table, agent and timer; `app` runs in a faust.Worker."""

    def __init__(self, settings: ConfirmSettings, registry: Registry | None = None,
                 accounts: Directory | None = None):
        self.settings = settings
        self.registry = registry or Registry.load()
        if accounts is None and settings.accounts_file is not None:
            accounts = load_accounts(settings.accounts_file)
        self.accounts = accounts or Directory(())
        kafka = settings.kafka
        self.app = faust.App(kafka.topic_prefix + APP_NAME, **app_config(settings))
        # Records are decoded in the agent (raw bytes here), so an undecodable
        # one is skipped there instead of failing inside Faust.
        self.logical = {kafka.topic(name): name for name in SOURCES}
        self.sources = self.app.topic(*self.logical, key_serializer="raw",
                                      value_serializer="raw")
        self.confirmed = self.app.topic(kafka.topic(topics.CONFIRMED), key_serializer="raw",
                                        value_serializer="raw")
        self.table = MessageTable(self.app, name=TABLE_NAME, key_type=str,
                                  partitions=settings.table_partitions,
                                  beacon=self.app.tables.beacon)
        self.app.tables.add(self.table)
        # The agent and the timer both read states and write them back after
        # awaiting the verdicts' acks; the lock keeps them from interleaving.
        self.lock = asyncio.Lock()
        self.agent = self.app.agent(self.sources, name="confirm-join")(self._join)
        self.app.timer(settings.timer_seconds, name="confirm-deadlines")(self.tick)
        self.app.task(self._check_partitions)
        self.app.task(self._reload_accounts)

    async def _join(self, stream: StreamT[bytes]) -> None:
        # take_events is take with the events (for partition and offset);
        # StreamT does not declare it. Acks follow each batch's processing.
        batches = stream.take_events(  # type: ignore[attr-defined]
            self.settings.batch_size, within=self.settings.batch_seconds)
        async for events in batches:
            await self.process(events)

    async def process(self, events: Sequence[EventT]) -> None:
        """Fold a batch of events into the table; emit the verdicts it completes."""
        async with self.lock:
            now = now_us()
            changed: dict[str, join.State] = {}
            emit: list[dict[str, Any]] = []
            for event in events:
                decoded = self._decode(event)
                if decoded is None:
                    continue
                kind, record = decoded
                key = record["message_id"]
                state = changed.get(key) or self.table.get(key)
                step = join.apply(state, kind, record, event.message.partition, now)
                if step.state is not None:
                    changed[key] = step.state
                if step.emit is not None:
                    emit.append(step.emit)
            # Output first, state second: a crash in between re-emits the
            # verdict on replay (same event_id) rather than losing it. Both
            # are acked before the batch is, so a committed offset never runs
            # ahead of the state (Faust's own flush before a commit gives up
            # on its send_soon buffer after 0.1 s).
            await self.emit(emit)
            await self.persist(changed)

    def _decode(self, event: EventT) -> tuple[str, dict[str, Any]] | None:
        message = event.message
        try:
            return self.registry.decode(message.value or b"", self.logical.get(message.topic))
        except DecodeError as exc:
            # Logged and skipped: the confirm principal may not write the
            # dead-letter topics, and the sender's DLQ is not for these.
            log.error("skipping undecodable record %s[%d]@%d: %s", message.topic,
                      message.partition, message.offset, exc)
            return None

    async def emit(self, records: list[dict[str, Any]]) -> None:
        """Send verdicts to email.confirmed and wait for the broker's acks, retrying."""
        pending = [(r["message_id"].encode(), self.registry.encode(topics.CONFIRMED, r))
                   for r in records]
        await self._until_acked("verdict", pending, lambda kv: self.send(*kv))
        metrics.verdicts(records)

    async def persist(self, states: dict[str, join.State],
                      forget: dict[str, int] | None = None) -> None:
        """Write states, and drop keys (key -> partition); wait for the changelog's acks."""
        items = [(k, v, v["partition"]) for k, v in states.items()]
        items += [(k, None, p) for k, p in (forget or {}).items()]

        def write(item: tuple[str, join.State | None, int]) -> Awaitable[Any]:
            key, state, partition = item
            if state is None:
                return self.table.forget(key, partition)
            return self.table.put(key, state)

        await self._until_acked("changelog write", items, write)

    async def _until_acked(self, what: str, items: list[Any],
                           send: Callable[[Any], Awaitable[Any]]) -> None:
        # The producer retries by itself; what fails here failed for good
        # (e.g. a timeout), and skipping it would lose a verdict or a state.
        delay = 0.5
        while items:
            results = await asyncio.gather(*map(send, items), return_exceptions=True)
            failed = [(i, r) for i, r in zip(items, results, strict=True)
                      if isinstance(r, BaseException)]
            if failed:
                log.error("%d %s(s) failed, retrying in %.1f s: %r", len(failed), what, delay,
                          failed[0][1])
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            items = [i for i, _ in failed]

    async def send(self, key: bytes, value: bytes) -> Any:
        """Produce one record to email.confirmed; returns once the broker acked it."""
        return await (await self.confirmed.send(key=key, value=value))  # enqueue, then ack

    async def tick(self) -> None:
        """Emit an unconfirmed verdict for each owned message past its deadline."""
        if self.app.rebalancing or self.app.in_recovery:  # set until the table is recovered
            return
        await self.expire(self.owned_partitions(), now_us())

    async def expire(self, owned: set[int], now: int) -> None:
        """Find overdue and forgettable states in partitions `owned`; act on them."""
        candidates: list[str] = []
        forget_after = self.settings.forget_after_seconds
        # Scan without the lock, yielding now and then; decide again under it.
        for index, (key, state) in enumerate(list(self.table.items())):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            if state["partition"] in owned and (
                    join.overdue(state, key, now, self.within(state)).emit is not None
                    or join.forgettable(state, now, forget_after)):
                candidates.append(key)
        if not candidates:
            return
        async with self.lock:
            changed: dict[str, join.State] = {}
            forget: dict[str, int] = {}
            emit: list[dict[str, Any]] = []
            for key in candidates:
                state = self.table.get(key)
                if state is None:
                    continue
                if join.forgettable(state, now, forget_after):
                    forget[key] = state["partition"]
                    continue
                step = join.overdue(state, key, now, self.within(state))
                if step.state is not None and step.emit is not None:
                    changed[key] = step.state
                    emit.append(step.emit)
            await self.emit(emit)
            await self.persist(changed, forget)
        if emit:
            log.info("%d message(s) unconfirmed past their deadline", len(emit))

    def within(self, state: join.State) -> int:
        """The confirmation deadline, in seconds, of the account a message left from."""
        account = self.accounts.by_id.get(state["account_id"] or "")
        if account is None:
            return self.settings.default_confirm_within_seconds
        return account.confirm_within_seconds

    def owned_partitions(self) -> set[int]:
        """The table partitions this worker is active for (not standby)."""
        changelog = self.table.changelog_topic_name
        return {tp.partition for tp in self.app.assignor.assigned_actives()
                if tp.topic == changelog}

    async def _reload_accounts(self) -> None:
        # Deadlines follow the accounts file as it is now: a new version (on
        # SIGHUP or when the file changes) is swapped in whole, or refused.
        path = self.settings.accounts_file
        if path is not None:
            await AccountsReloader(path, self.accounts, partial(setattr, self, "accounts"),
                                   service="confirm",
                                   poll_seconds=self.settings.accounts_poll_seconds).run()

    async def _check_partitions(self) -> None:
        # The join is only right when every source topic has the table's
        # partition count; Faust does not check it for tables written like ours.
        expected = self.settings.table_partitions
        for name in self.logical:
            found = self.app.consumer.topic_partitions(name)
            if found is not None and found != expected:
                raise ConfigError(f"{name} has {found} partitions, the table {expected}; "
                                  "set table_partitions to the source topics' count")


def build(settings: ConfirmSettings) -> runtime.Service:
    """The confirm stream wired from its settings; Faust connects when the worker runs."""
    confirm = ConfirmApp(settings)
    lag_config = runtime.consumer_config(settings, APP_NAME, "lag")
    return runtime.Service(settings, {"lag": lag_config}, partial(_run, confirm, lag_config),
                           {"confirm": confirm})


def _run(confirm: ConfirmApp, lag_config: dict[str, Any]) -> None:
    settings = confirm.settings
    runtime.metrics_server(settings.metrics_host, settings.metrics_port)
    lag = LagReporter(lag_config, confirm.app.conf.id,
                      list(confirm.logical)).start(settings.lag_seconds)
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    # The service's logging (mailbus/logs.py: text, or JSON on request) stays: mode's
    # Worker would replace the root handlers with its own colored ones, and print a
    # banner to stdout, neither of which a log collector reading JSON can parse.
    worker = faust.Worker(confirm.app, loglevel=settings.log_level,
                          workdir=str(settings.data_dir), override_logging=False,
                          quiet=True)
    # No terminal spinner: at WARNING and above Faust would add one and set the
    # root logger to DEBUG for it, and every debug call of aiokafka and Faust
    # would then build a record only for the handlers to drop it.
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        # mode's Worker always exits through SystemExit; 0 means a clean stop.
        if exc.code not in (0, None):
            raise
    finally:
        lag.close()


def main(settings: ConfirmSettings | None = None) -> None:
    """`mailbus confirm`: run the Faust worker until SIGTERM or SIGINT."""
    # load() refuses placeholder secrets and clear-text Kafka before anything
    # connects, as for every other service.
    runtime.start(ConfirmSettings, build, settings)
