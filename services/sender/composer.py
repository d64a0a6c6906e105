"""Composing off the event loop: each claimed batch composed in a worker process.

Composing is CPU-bound Python (address checks, the MIME bytes, the parse-back
check, DKIM's RSA): on the sender's event loop it would compete with SMTP,
settling and admission for one core. A `Composer` hands a worker's claimed
rows to a worker process in one round trip (mailbus.deadline: the process is
killed past its deadline and a fresh one takes the next batch), so the loop
only pickles the payloads and unpickles the finished bytes.

The process composes exactly as compose() does on the loop, from the same
accounts, link keys and DKIM keys, handed to it once when it starts. A row
whose content needs the sandbox (a template, text derived from html) comes
back `None` and goes through the sandbox as before (so does a row with attachments,
whose files the loop fetches); a batch the process could
not finish (late, died, not started) comes back empty and is composed on the
loop, message by message, as without a composer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypeAlias

from mailbus.accounts import Account
from mailbus.codec import Registry
from mailbus.deadline import DeadlinePool, Died, Late, Unavailable
from mailbus.errors import MailbusError
from mailbus.sender.compose import compose, needs_sandbox
from mailbus.sender.dkim import DkimSigner
from mailbus.sender.sandbox import compose_failure
from mailbus.sender.transport import Outgoing
from mailbus.tokens import LinkBuilder

log = logging.getLogger(__name__)
DEADLINE_SECONDS = 60.0


@dataclass(frozen=True)
class Failure:
    """A message that cannot be composed: the email.failed reason, and whether the
    error was unexpected (not one of ours, so the service logs it)."""

    reason: str
    unexpected: bool


@dataclass(frozen=True)
class Setup:
    """What composing needs, handed to each worker process once."""

    accounts: dict[str, Account]
    dkim: dict[str, DkimSigner | None]
    links: LinkBuilder | None


@dataclass(frozen=True)
class Batch:
    account_id: str
    payloads: list[bytes]
    now: datetime


# None: composed on the loop (through the sandbox when its content needs one).
Composed: TypeAlias = Outgoing | Failure | None

_state: tuple[Setup, Registry] | None = None


def _install(setup: Setup) -> None:
    global _state
    _state = (setup, Registry.load())


def compose_batch(batch: Batch) -> list[Composed]:
    """In the worker process: each payload's message, or why it failed."""
    assert _state is not None, "the composer process was started without its setup"
    setup, registry = _state
    account = setup.accounts[batch.account_id]
    dkim = setup.dkim.get(batch.account_id)
    out: list[Composed] = []
    for payload in batch.payloads:
        try:
            request = registry.decode(payload, "mailbus.EmailRequested")[1]
            if needs_sandbox(request) or request.get("attachments"):
                # Files are fetched and composed in the sender's own process: handing
                # megabytes to this process and back would copy them twice more.
                out.append(None)
                continue
            out.append(compose(request, account, setup.links, now=batch.now, dkim=dkim))
        except Exception as exc:  # noqa: BLE001 - whatever it is, this message fails alone
            out.append(Failure(compose_failure(exc), not isinstance(exc, MailbusError)))
    return out


class Composer:
    """Composes batches in `processes` worker processes (started when first needed)."""

    def __init__(self, setup: Setup, *, processes: int = 1,
                 deadline: float = DEADLINE_SECONDS):
        self.pool = DeadlinePool(compose_batch, deadline=deadline, processes=processes,
                                 name="mailbus-composer", setup=partial(_install, setup))

    async def compose(self, account_id: str, payloads: Sequence[bytes], now: datetime
                      ) -> list[Composed] | None:
        """Each payload's outcome in order, or None when the batch was not composed."""
        try:
            result: Any = await self.pool.run(Batch(account_id, list(payloads), now))
        except Unavailable as exc:
            log.warning("composer unavailable (%s); composing on the event loop", exc)
            return None
        if isinstance(result, Late | Died):
            log.error("composer process %s with a batch of %d; composing it on the event loop",
                      "ran late" if isinstance(result, Late) else "died", len(payloads))
            return None
        return list(result)

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()
