"""`mailbus replies`: read every account's mailbox, turn what comes back into events.

One reader per account with a mailbox (IMAP: `ImapReader`; Gmail:
`GmailReader`) hands each new message to `Replies.handle`, which

1. skips it when `inbound_messages` already holds it (a message handed over
   again after a crash was fully handled before);
2. classifies it (`classify.py`, pure, in a worker process under a deadline:
   `sandbox.py`; mail past the deadline or over the size cap is kept as
   unmatched with its reason, never classified again) and plans its records
   (`events.py`, pure): bounces, delivery evidence, responses, suppressions;
3. produces them and waits for the broker's acks;
4. records the message in `inbound_messages` (unmatched mail included).

Only then does the reader move its mark past the message. A failure in steps 2 to 4
raises, so the reader hands the same message over again later: nothing read
is lost, and the derived event ids make the repeat harmless. The mailbox
itself is never changed unless the account asks for a processed folder.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from contextlib import suppress
from datetime import UTC, datetime
from functools import partial

from mailbus import runtime, tokens
from mailbus.accounts import Account, Directory, load_accounts
from mailbus.codec import Registry
from mailbus.db import open_pool
from mailbus.logs import event
from mailbus.producer import AsyncProducer
from mailbus.reload import AccountsReloader, changes
from mailbus.replies import metrics
from mailbus.replies.classify import Inbound, classify_inbound
from mailbus.replies.events import Plan, plan
from mailbus.replies.gmail_inbox import GmailReader
from mailbus.replies.imap import ImapReader
from mailbus.replies.sandbox import Classify, Sandbox, quarantine
from mailbus.replies.sent import SentMessages
from mailbus.replies.settings import RepliesSettings
from mailbus.replies.state import InboundMessage, MailboxState, MailRef
from mailbus.replytag import verify_tag
from mailbus.tokens import UNSUBSCRIBE, Keyring, TokenError

log = logging.getLogger(__name__)


def token_check(keyring: Keyring, token: str) -> tuple[str, str] | None:
    """(message id, recipient) of a genuine, unexpired unsubscribe token; else None."""
    try:
        claims = tokens.verify(keyring, token, now=datetime.now(UTC))
    except TokenError:
        return None
    if claims.action != UNSUBSCRIBE or claims.recipient is None:
        return None
    return claims.message_id, claims.recipient


def sending_domains(account: Account) -> tuple[str, ...]:
    """The domains our Message-IDs carry for this account (its From address's)."""
    return (account.from_address.rpartition("@")[2].lower(),)


class Replies:
    """The running service: one reader per mailbox, one handler for all of them."""

    def __init__(self, settings: RepliesSettings, directory: Directory | None = None,
                 classifier: Classify = classify_inbound):
        assert settings.accounts_file is not None and settings.link_keys_file is not None
        self.settings = settings
        self.producer_config = runtime.producer_config(settings)
        self.directory = directory or load_accounts(settings.accounts_file)
        self.registry = Registry.load()
        self.keyring = tokens.load_keyring(settings.link_keys_file,
                                           create=settings.env == "local")
        self.classifier = classifier  # what the workers run; tests put a slow one here
        self.readers: dict[str, ImapReader | GmailReader] = {}
        self.handled = 0  # messages newly handled, since start
        self.kinds: Counter[str] = Counter()  # by kind, since the last summary
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()

    async def handle(self, account: Account, raw: bytes, ref: MailRef) -> None:
        """Classify one inbound message, produce what it means, record it.

        Raises when any step fails (Kafka or PostgreSQL down): the reader then
        keeps its mark before the message and hands it over again later.
        """
        try:
            await self._handle(account, raw, ref)
        except Exception:
            metrics.ERRORS.labels(account.id).inc()
            raise

    async def _handle(self, account: Account, raw: bytes, ref: MailRef) -> None:
        if await self.state.known_refs(account.id, [ref.source_ref]):
            return
        inbound = await self._classify(account, raw, ref)
        source = f"{account.kind if account.imap is None else 'imap'}:{account.id}"
        planned = plan(inbound, account_id=account.id, source=source,
                       source_ref=ref.source_ref, now=datetime.now(UTC),
                       check_token=partial(token_check, self.keyring),
                       check_tag=partial(verify_tag, self.keyring),
                       sent=await self.sent.for_report(inbound,
                                                       partial(verify_tag, self.keyring)))
        await asyncio.gather(*(
            self.producer.produce(self.settings.kafka.topic(r.topic),
                                  self.registry.encode(r.topic, r.value), key=r.key.encode())
            for r in planned.records))
        await self.state.record_inbound(inbound_row(ref, inbound, planned))
        self.handled += 1
        self.kinds[planned.kind] += 1
        _count(account.id, planned)
        event(log, logging.INFO, f"account {account.id}: mail handled as {planned.kind}",
              account=account.id, ref=ref.source_ref, kind=planned.kind,
              message_id=planned.message_id or "-", events=len(planned.records))

    async def _classify(self, account: Account, raw: bytes, ref: MailRef) -> Inbound:
        """The verdict on one mail; unmatched with the reason when it is too big or too slow."""
        inbound = await self.sandbox.classify_inbound(raw, domains=sending_domains(account))
        if ref.headers_only:  # the header only tells who sent what: kept, not acted on
            cap = self.settings.max_message_bytes
            inbound = quarantine(f"{ref.size} bytes, over the {cap} byte cap: body not read",
                                 None if inbound.quarantined else inbound)
            cause = "size"
        else:
            cause = "deadline"
        if inbound.quarantined:
            metrics.QUARANTINED.labels(account.id, cause).inc()
            log.warning("account %s: %s quarantined as unmatched: %s", account.id,
                        ref.source_ref, inbound.reason)
        return inbound

    def _reader(self, account: Account) -> ImapReader | GmailReader:
        s = self.settings
        handler = partial(self.handle, account)
        if account.imap is not None:
            return ImapReader(account, state=self.state, handler=handler,
                              max_bytes=s.max_message_bytes, fetch_budget=s.imap_fetch_budget_bytes)
        return GmailReader(account, state=self.state, handler=handler,
                           max_bytes=s.max_message_bytes, api_endpoint=s.gmail_api_endpoint,
                           token_uri=s.gmail_token_uri)

    async def run(self) -> None:
        """Read every mailbox until stop()."""
        s = self.settings
        self.pool = open_pool(s.postgres)
        await self.pool.open(wait=True, timeout=30)
        self.state = MailboxState(self.pool, s.kafka.topic_prefix)
        self.sandbox = Sandbox(s.classify_deadline_seconds, s.classify_workers,
                               target=self.classifier)
        self.sent = SentMessages(self.pool, s.kafka.topic_prefix)
        self.producer = AsyncProducer(self.producer_config)
        for account in self.directory.by_id.values():
            if account.reads_mailbox:
                self._start(account)
        metrics.MAILBOXES.set(len(self.readers))
        log.info("replies running: %d mailbox(es) of %d account(s)", len(self.readers),
                 len(self.directory))
        assert s.accounts_file is not None
        reloader = AccountsReloader(s.accounts_file, self.directory, self.apply,
                                    service="replies", poll_seconds=s.accounts_poll_seconds)
        reloader.start()
        summary = (asyncio.create_task(self._summaries(s.log_summary_seconds))
                   if s.log_summary_seconds else None)
        try:
            await self._stop.wait()
        finally:
            await reloader.stop()
            if summary is not None:
                summary.cancel()
            for reader in self.readers.values():
                reader.stop()
            for task in list(self.tasks.values()):
                with suppress(Exception):
                    await asyncio.wait_for(task, 30)
            self.producer.close()
            self.sandbox.close()
            await self.pool.close()
            log.info("replies stopped")

    def stop(self) -> None:
        """Ask run() to stop the readers (each finishes the message in hand) and return."""
        self._stop.set()

    def _start(self, account: Account, after: asyncio.Task[None] | None = None) -> None:
        reader = self.readers[account.id] = self._reader(account)

        async def run() -> None:
            if after is not None:  # the old reader of this mailbox finishes its message first
                with suppress(Exception):
                    await after
            await reader.run()

        self.tasks[account.id] = asyncio.create_task(run(), name=f"reader-{account.id}")

    def apply(self, new: Directory) -> None:
        """Put a reloaded accounts file in force: readers of changed mailboxes start afresh.

        An unchanged account keeps its reader (and its connection); a removed or
        changed one's reader stops after the message in hand, and a changed or
        added one's starts once the old one has stopped, so one mailbox never
        has two readers.
        """
        diff = changes(self.directory, new)
        self.directory = new
        for account_id in (*diff["removed"], *diff["changed"]):
            reader = self.readers.pop(account_id, None)
            if reader is not None:
                reader.stop()
        for account_id in (*diff["added"], *diff["changed"]):
            account = new.by_id[account_id]
            if account.reads_mailbox:
                old = self.tasks.get(account_id)
                self._start(account, after=old if old is not None and not old.done() else None)
            else:
                self.tasks.pop(account_id, None)
        for account_id in diff["removed"]:
            self.tasks.pop(account_id, None)
        metrics.MAILBOXES.set(len(self.readers))

    async def _summaries(self, every: float) -> None:
        """One line per period: what was handled, and which mailboxes are failing."""
        while True:
            await asyncio.sleep(every)
            kinds, self.kinds = self.kinds, Counter()
            failing = sorted(a for a, r in self.readers.items() if not r.connected)
            event(log, logging.INFO,
                  f"replies summary: {sum(kinds.values())} mail(s) handled in the last "
                  f"{every:g} s; {len(self.readers) - len(failing)} of {len(self.readers)} "
                  "mailbox(es) reading", window_seconds=every, handled=sum(kinds.values()),
                  **{f"handled_{k}": n for k, n in sorted(kinds.items())},
                  mailboxes=len(self.readers), not_reading=",".join(failing) or "-",
                  **{f"error_{a}": self.readers[a].last_error for a in failing
                     if self.readers[a].last_error})


def inbound_row(ref: MailRef, inbound: Inbound, planned: Plan) -> InboundMessage:
    """The inbound_messages row for one classified, planned message."""
    return InboundMessage(
        ref=ref, kind=planned.kind, header_message_id=inbound.header_message_id,
        message_id=uuid.UUID(planned.message_id) if planned.message_id else None,
        sender=inbound.sender, subject=inbound.subject, text=inbound.text,
        detail={"classified_as": inbound.kind, **planned.detail,
                **({"quarantined": True} if inbound.quarantined else {})})


def _count(account_id: str, planned: Plan) -> None:
    metrics.INBOUND.labels(account_id, planned.kind).inc()
    for record in planned.records:
        value = record.value
        if record.topic.endswith("email.responses"):
            metrics.RESPONSES.labels(value["kind"]).inc()
            if value["kind"] == "unsubscribe":
                metrics.UNSUBSCRIBES.labels(account_id).inc()
        elif record.topic.endswith("email.bounced"):
            metrics.BOUNCES.labels(account_id, value["bounce_class"]).inc()
        elif record.topic.endswith("email.suppressions"):
            metrics.SUPPRESSED.labels(value["reason"]).inc()


def build(settings: RepliesSettings) -> runtime.Service:
    """The mailbox reader wired from its settings; it connects when it runs."""
    replies = Replies(settings)

    async def serve() -> None:
        runtime.on_stop(replies.stop, asyncio.get_running_loop())
        await replies.run()

    def run() -> None:
        runtime.metrics_server(settings.metrics_host, settings.metrics_port)
        asyncio.run(serve())

    return runtime.Service(settings, {"producer": replies.producer_config}, run,
                           {"replies": replies})


def main(settings: RepliesSettings | None = None) -> None:
    """`mailbus replies`: serve metrics, read mailboxes until SIGTERM or SIGINT."""
    runtime.start(RepliesSettings, build, settings)
