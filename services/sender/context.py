"""What the account workers share, and how each outcome of a claimed row is recorded.

An outcome is handed to the settler (settle.py), which commits it with others
in one transaction and emits its events; the worker does not wait for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from mailbus import topics
from mailbus.accounts import Account, Directory
from mailbus.codec import Registry
from mailbus.sender import decisions, metrics
from mailbus.sender.attachments import BlobCache
from mailbus.sender.composer import Composer
from mailbus.sender.decisions import Fail, Reroute, Retry
from mailbus.sender.outbox import Outbox, Record
from mailbus.sender.sandbox import ContentSandbox
from mailbus.sender.settle import Outcome, Settler
from mailbus.sender.suppressions import Suppressions
from mailbus.sender.transport import Accepted
from mailbus.tokens import LinkBuilder

log = logging.getLogger(__name__)


@dataclass
class Claimed:
    """A ledger row a worker holds in state `sending`."""

    message_id: str
    payload: bytes
    attempts: int
    ambiguous: bool
    reroutes: int
    partition: int
    pool: str | None
    # Set once the message was handed over for its other recipients: the ones
    # still to send to (refused for now at RCPT). None: all of them.
    pending: tuple[str, ...] | None = None
    # Admitted from a `mailbus replay` record: goes to the replay sink.
    replayed: bool = False
    # The partition's ownership epoch the row was claimed under: its settle
    # lands only while this instance still owns the partition at that epoch.
    epoch: int = 0
    # The request's requested_at, kept in the ledger row: email.sent carries it,
    # so the hot path need not decode the payload for it.
    requested_at: datetime | None = None


class Context:
    """What the workers share: the ledger, the outbox, the clock, the settings."""

    def __init__(self, *, outbox: Outbox, settler: Settler,
                 registry: Registry, directory: Directory, suppressions: Suppressions,
                 links: LinkBuilder | None, owned: Callable[[], dict[int, int]],
                 capacity: Callable[[], dict[str, int]],
                 ready_at: Callable[[str], datetime | None] = lambda _account: None,
                 topic: Callable[[str], str], max_attempts: int, retry_base: float,
                 retry_cap: float, poll_seconds: float, claim_depth: int = 16,
                 settling_per_connection: int = 0,
                 clock: Callable[[], datetime] = decisions.utcnow,
                 sandbox: ContentSandbox | None = None, composer: Composer | None = None,
                 files: BlobCache | None = None):
        self.outbox, self.settler, self.registry = outbox, settler, registry
        self.directory, self.suppressions, self.links = directory, suppressions, links
        self.owned, self.capacity, self.topic = owned, capacity, topic
        self.ready_at = ready_at  # when a pool member may send again (app.Sender._ready_at)
        self.max_attempts, self.retry_base, self.retry_cap = max_attempts, retry_base, retry_cap
        self.poll_seconds, self.clock = poll_seconds, clock
        # Rows an account claims ahead, per connection, and at least.
        self.claim_depth, self.claim_min = claim_depth, 8
        self.settling_per_connection = settling_per_connection
        self.sandbox = sandbox or ContentSandbox()  # its processes start when first needed
        # Composes claimed batches in a worker process; None: on the loop (composer.py).
        self.composer = composer
        # Composing holds the GIL, so more threads would not go faster; its own executor
        # keeps it from queueing behind the Gmail transport's blocking calls.
        self.composer_threads = ThreadPoolExecutor(2, thread_name_prefix="mailbus-compose")
        # Files of recent messages: messages sharing one read it once (attachments.py);
        # None: each reads its own.
        self.files = files

    def close(self) -> None:
        """Stop what the workers started beside the event loop."""
        self.sandbox.close()
        if self.composer is not None:
            self.composer.close()
        self.composer_threads.shutdown(wait=False, cancel_futures=True)

    def decode(self, row: Claimed) -> dict[str, Any]:
        """The request a ledger row holds (it was decoded once already on admission)."""
        return self.registry.decode(row.payload, "mailbus.EmailRequested")[1]

    async def claim(self, account_id: str, epochs: dict[int, int], *, limit: int,
                    pool_only: bool) -> list[Claimed]:
        """Take due rows into `sending`."""
        rows = await self.outbox.ledger.claim(account_id, epochs, limit, pool_only)
        return [Claimed(str(r["message_id"]), bytes(r["payload"]), r["attempts"],
                        r["ambiguous"], r["reroutes"], r["source_partition"], r["pool"],
                        tuple(r["pending_recipients"]) if r["pending_recipients"] is not None
                        else None, r["replayed"], epochs[r["source_partition"]],
                        r["requested_at"])
                for r in rows]

    async def settle(self, row: Claimed, state: str, records: list[Record],
                     **params: Any) -> None:
        """Hand the outcome to the settler; return once it is committed with others."""
        await self.settler.put(Outcome(row.message_id, row.partition, row.epoch, state,
                                       records, params))

    async def requeue(self, row: Claimed, retry: Retry, *, ambiguous: bool = False) -> None:
        """Back to the queue until `retry.due_at`; ambiguous: it may have left already."""
        await self.settle(row, "retry", [], due_at=retry.due_at, error=retry.reason,
                          refund=retry.refund, ambiguous=ambiguous)

    async def sent(self, row: Claimed, account: Account,
                   accepted: Accepted, header: str, *, possible_duplicate: bool,
                   latency_us: int | None) -> None:
        """Record the hand-over and emit email.sent (and what follows from it)."""
        now = self.clock()
        key = row.message_id.encode()
        records = [Record(self.topic(topics.SENT), key, self.registry.encode(
            topics.SENT, decisions.sent_event(
                row.message_id, row.requested_at, account, accepted, message_id_header=header,
                attempt=row.attempts,
                possible_duplicate=possible_duplicate, latency_us=latency_us, now=now)))]
        if account.evidence == "smtp_final":
            records += [Record(self.topic(topics.DELIVERED), key, self.registry.encode(
                topics.DELIVERED, decisions.delivered_event(row.message_id, account, r,
                                                            accepted.response, now)))
                        for r in accepted.recipients]
        refused = decisions.refused(accepted.rejected, attempts=row.attempts,
                                    max_attempts=self.max_attempts, now=now,
                                    retry_base=self.retry_base, retry_cap=self.retry_cap)
        records += self._failed_records(row, account.id, refused.failed, now)
        if refused.retry is not None:
            # Taken for the others, refused for now for these: the same message again,
            # to them only, when the retry is due.
            await self.settle(row, "partial", records,
                                     sent_at=now, due_at=refused.retry.due_at,
                                     pending=refused.again, error=refused.retry.reason)
            metrics.RETRIES.labels(account.id).inc()
        else:
            await self.settle(row, "sent", records,
                                     sent_at=now)
        metrics.SENT.labels(account.id, account.kind).inc()

    def _failed_records(self, row: Claimed, account_id: str, fails: list[Fail],
                        now: datetime) -> list[Record]:
        return [Record(self.topic(topics.FAILED), row.message_id.encode(), self.registry.encode(
            topics.FAILED, decisions.failed_event(row.message_id, account_id, fail,
                                                  attempt=row.attempts, now=now)))
            for fail in fails]

    async def fail(self, row: Claimed, account_id: str, fail: Fail) -> None:
        """Record the failure, emit email.failed, and dead-letter when retries ran out."""
        if row.pending is not None:
            # Handed over for its other recipients already: only these failed, the
            # row stays sent, and nothing is dead-lettered (a replay would mail everyone).
            fails = [replace(fail, recipient=r, dead_letter=False) for r in row.pending]
            await self.settle(row, "sent",
                                     self._failed_records(row, account_id, fails,
                                                          self.clock()))
            for fail in fails:
                metrics.FAILED.labels(account_id, metrics.reason_class(fail.reason),
                                      str(fail.permanent).lower()).inc()
            return
        key = row.message_id.encode()
        records = [Record(self.topic(topics.FAILED), key, self.registry.encode(
            topics.FAILED, decisions.failed_event(row.message_id, account_id, fail,
                                                  attempt=row.attempts, now=self.clock())))]
        if fail.dead_letter:
            records.append(Record(self.topic(topics.REQUESTED_DLQ), account_id.encode(),
                                  row.payload, [("mailbus.reason", fail.reason)]))
            metrics.DEAD_LETTERED.labels("retries_exhausted").inc()
        await self.settle(row, "failed", records,
                                 error=fail.reason)
        metrics.FAILED.labels(account_id, metrics.reason_class(fail.reason),
                              str(fail.permanent).lower()).inc()

    async def reroute(self, row: Claimed, request: dict[str, Any], reroute: Reroute) -> None:
        """Hand the message to another pool account through a new email.requested record."""
        moved = decisions.rerouted_request(request, reroute.account_id, self.clock())
        records = [Record(self.topic(topics.REQUESTED), reroute.account_id.encode(),
                          self.registry.encode(topics.REQUESTED, moved))]
        await self.settle(row, "rerouted", records,
                                 error=reroute.reason)
        metrics.REROUTED.labels(moved["account_id"]).inc()
