"""The account workers as the accounts file says: what each is built of, and how one leaves.

An edited accounts file is put in force in two steps. `prepare` builds what
each added or changed account needs (its transport, DKIM signer, replay sink,
tagged reply address) before anything changes: when any of it fails, the
edit is refused whole and the accounts in force stay. Then `retire` takes a
removed or changed account's worker out: it stops claiming, the rows it holds
settle, and its transports close. A changed account's new worker starts only
after that, so two workers of one account never hold rows at once, and no row
is lost: what nobody claimed waits in the ledger.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from mailbus.accounts import Account, SmtpAccount
from mailbus.errors import ConfigError
from mailbus.logs import event
from mailbus.sender.compose import ComposeFailed, tagged_reply_address
from mailbus.sender.dkim import DkimSigner
from mailbus.sender.settings import SenderSettings
from mailbus.sender.smtp import SmtpTransport
from mailbus.sender.transport import Transport
from mailbus.sender.worker import AccountWorker
from mailbus.tokens import Keyring

log = logging.getLogger(__name__)
# How long a retiring worker's deliveries may run before each reminder line:
# it waits for them all the same (a transport's own timeouts end them).
DRAIN_SECONDS = 20.0


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


def check_reply_tags(account: Account, keyring: Keyring) -> None:
    """A from address too long to tag fails here, once, not on every message."""
    if account.reply_tags:
        try:
            tagged_reply_address(account, keyring, str(uuid.uuid4()))
        except ComposeFailed as exc:
            raise ConfigError(f"account {account.id}: {exc}") from exc


@dataclass
class Parts:
    """What one account's worker is built of (its budget is loaded from the ledger later)."""

    account: Account
    transport: Transport
    dkim: DkimSigner | None
    replay: tuple[Account, Transport] | None


def prepare(accounts: Iterable[Account], settings: SenderSettings, keyring: Keyring
            ) -> dict[str, Parts]:
    """Each account's parts; ConfigError naming the account when one cannot be built.

    Nothing connects here: transports open their connections on first use.
    """
    out: dict[str, Parts] = {}
    for account in accounts:
        try:
            check_reply_tags(account, keyring)
            out[account.id] = Parts(
                account, transport_for(account, settings), dkim_for(account),
                None if settings.replay_to_real_accounts else replay_sink_for(account, settings))
        except ConfigError:
            raise
        except (OSError, ValueError) as exc:  # a key or password file unreadable, a bad key
            raise ConfigError(f"account {account.id}: {type(exc).__name__}: {exc}") from exc
    return out


async def retire(worker: AccountWorker, task: asyncio.Task[None], why: str) -> None:
    """Stop the worker claiming, let the rows it holds settle, close its transports.

    The worker is cancelled only between steps: a step cancelled mid-claim
    would leave the rows it claimed `sending` with nobody delivering them.
    So its context is swapped for one that owns no partition; the worker's
    next step asks what it owns, which means the step before has handed
    every row it claimed to a delivery, and then it is cancelled.
    """
    account_id = worker.account.id
    between_steps = asyncio.Event()

    def owns_nothing() -> dict[int, int]:
        between_steps.set()
        return {}

    stopping = copy.copy(worker.ctx)  # shares the ledger, the settler and the outbox
    stopping.owned = owns_nothing
    worker.ctx = stopping
    worker.wake.set()
    waiting = asyncio.create_task(between_steps.wait())
    await asyncio.wait([waiting, task], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    task.cancel()
    await asyncio.gather(task, waiting, return_exceptions=True)
    held = len(worker._inflight)  # the deliveries it started
    while worker._inflight:
        await worker.drain(timeout=DRAIN_SECONDS)
        if worker._inflight:
            event(log, logging.WARNING, f"account {account_id}: still settling before its"
                  " transport closes", account=account_id, in_flight=len(worker._inflight))
    await worker.transport.close()
    if worker.replay is not None:
        await worker.replay[1].close()
    event(log, logging.INFO, f"account {account_id}: worker stopped ({why}); "
          f"{held} delivery(ies) in flight settled, transport closed", account=account_id,
          reason=why, settled=held)
