"""The sender's decisions, as pure functions: admission, what an outcome means, events."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from mailbus.accounts import Account, Directory
from mailbus.sender.quota import backoff
from mailbus.sender.transport import (
    Accepted,
    AccountExhausted,
    PermanentError,
    SendError,
    TransientError,
    enhanced_status,
)

MAX_REROUTES = 5
_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def is_message_id(value: str) -> bool:
    """Whether a request's message id is a UUID in its hyphenated text form (the ledger's key).

    Narrower than Python's parser, which also takes `urn:uuid:` and braces, so
    that whatever passes is a value PostgreSQL's uuid type takes too.
    """
    return _UUID.fullmatch(value) is not None


def admission(event: dict[str, Any], payload: bytes, partition: int, now: datetime,
              *, replayed: bool = False) -> dict[str, Any]:
    """The ledger row for an arriving email.requested record (`replayed`: from a replay)."""
    send_at = event.get("send_at")
    return {
        "message_id": event["message_id"],
        "account_id": event["account_id"],
        "pool": event.get("pool"),
        "partition": partition,
        "due_at": max(now, send_at) if send_at else now,
        "payload": payload,
        "requested_at": event.get("requested_at"),
        "replayed": replayed,
    }



@dataclass(frozen=True)
class Retry:
    """Queue again; `refund` when nothing was handed over (the attempt does not count)."""

    due_at: datetime
    reason: str
    refund: int = 0


@dataclass(frozen=True)
class Fail:
    """The message has failed for good."""

    reason: str
    permanent: bool
    code: int | None = None
    enhanced_status: str | None = None
    recipient: str | None = None
    dead_letter: bool = False


@dataclass(frozen=True)
class Reroute:
    """Hand the message to another account of its pool."""

    account_id: str
    reason: str


Verdict = Retry | Fail | Reroute


def after_error(err: SendError, *, attempts: int, max_attempts: int, now: datetime,
                retry_base: float, retry_cap: float) -> Verdict:
    """What a failed hand-over means for the message."""
    if isinstance(err, PermanentError):
        return Fail(err.reason, True, err.code, err.enhanced_status, err.recipient)
    if isinstance(err, AccountExhausted):
        wait = err.retry_after if err.retry_after is not None else 60.0
        until = err.until or now + timedelta(seconds=wait)
        return Retry(until, err.reason, refund=1)
    assert isinstance(err, TransientError)
    if attempts >= max_attempts:
        return Fail(f"gave up after {attempts} attempts: {err.reason}", False, err.code,
                    dead_letter=True)
    delay = backoff(attempts, base=retry_base, cap=retry_cap)
    if err.retry_after is not None:
        delay = max(delay, err.retry_after)
    return Retry(now + timedelta(seconds=delay), err.reason)


@dataclass(frozen=True)
class Refused:
    """What the recipients refused at RCPT, while the server took the others, come to."""

    failed: list[Fail]  # refused for good (5xx), or for now with no attempt left
    again: list[str]  # refused for now (4xx): the next attempt is for these only
    retry: Retry | None  # when that attempt is due


def refused(rejected: dict[str, str], *, attempts: int, max_attempts: int, now: datetime,
            retry_base: float, retry_cap: float) -> Refused:
    """Sort a partial hand-over's refused recipients (recipient -> SMTP reply)."""
    failed: list[Fail] = []
    again: list[str] = []
    for recipient, reply in rejected.items():
        code = int(reply[:3]) if reply[:3].isdigit() else None
        if code is not None and 400 <= code < 500:
            if attempts < max_attempts:
                again.append(recipient)
            else:
                failed.append(Fail(f"gave up after {attempts} attempts: {reply}", False, code,
                                   recipient=recipient))
        else:
            failed.append(Fail(reply, reply[:1] == "5", code, enhanced_status(reply[4:]),
                               recipient=recipient))
    retry = None
    if again:
        delay = backoff(attempts, base=retry_base, cap=retry_cap)
        retry = Retry(now + timedelta(seconds=delay),
                      f"refused for now: {rejected[again[0]]}"[:500])
    return Refused(failed, again, retry)


def failover(directory: Directory, pool: str | None, current: str, reroutes: int,
             left: dict[str, int]) -> str | None:
    """The pool member with the most quota left to take a message the current one cannot send.

    `left` maps the accounts this instance knows to their quota left; an
    account it does not know (owned by another instance) is a last resort.
    """
    if pool is None or reroutes >= MAX_REROUTES:
        return None
    members = [a for a in directory.pools.get(pool, ())
               if a != current and left.get(a, -1) != 0]
    if not members:
        return None
    return max(members, key=lambda a: (left.get(a, -1), a))


def retry_exhausted_at(reroutes: int, until: datetime,
                       members_ready: Iterable[datetime | None]) -> datetime:
    """When a pool message that no member could take from an exhausted account goes again.

    Moved MAX_REROUTES times already, it stays on this account: at this
    account's reset (trying sooner would only claim and requeue it again).
    Otherwise as soon as another member may send (one only paused by a rate
    limit can soon), and at the latest at this account's reset.
    """
    if reroutes >= MAX_REROUTES:
        return until
    return min((t for t in members_ready if t is not None), default=until)


def _head(message_id: str, now: datetime) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "message_id": message_id, "occurred_at": now}


def sent_event(message_id: str, requested_at: datetime | None, account: Account,
               accepted: Accepted, *, message_id_header: str, attempt: int,
               possible_duplicate: bool, latency_us: int | None,
               now: datetime) -> dict[str, Any]:
    """The mailbus.EmailSent record."""
    return _head(message_id, now) | {
        "account_id": account.id,
        "transport": account.kind,
        "recipients": accepted.recipients,
        "provider_message_id": accepted.provider_message_id,
        "rfc822_message_id": message_id_header,
        "smtp_response": accepted.response,
        "attempt": attempt,
        "requested_at": requested_at,
        "possible_duplicate": possible_duplicate,
        "send_latency_us": latency_us,
    }


def failed_event(message_id: str, account_id: str, fail: Fail, *, attempt: int,
                 now: datetime) -> dict[str, Any]:
    """The mailbus.EmailFailed record."""
    return _head(message_id, now) | {
        "account_id": account_id,
        "reason": fail.reason,
        "code": fail.code,
        "enhanced_status": fail.enhanced_status,
        "permanent": fail.permanent,
        "recipient": fail.recipient,
        "attempt": attempt,
    }


def delivered_event(message_id: str, account: Account, recipient: str,
                    detail: str | None, now: datetime) -> dict[str, Any]:
    """The mailbus.EmailDelivered record for an account whose SMTP server is the final hop."""
    return _head(message_id, now) | {
        "account_id": account.id,
        "recipient": recipient,
        "evidence": "smtp_final",
        "detail": detail,
    }


def rerouted_request(request: dict[str, Any], account_id: str, now: datetime) -> dict[str, Any]:
    """The email.requested record that moves a message to another account of its pool."""
    return request | {"event_id": str(uuid.uuid4()), "occurred_at": now,
                      "account_id": account_id}


def utcnow() -> datetime:
    """Now, in UTC (the one clock the sender reads)."""
    return datetime.now(UTC)
