"""The mailbox readers' state in PostgreSQL: high-water marks and inbound messages.

A reader hands each message over with a MailRef, and moves its mark past it
only after the handler returned: at least once. The handler (the service)
records the message with `record_inbound`, which is idempotent on
(namespace, account, source_ref), so a message handed over twice is stored
once and the caller can tell it is a repeat.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from mailbus import queries
from mailbus.errors import MailbusError

SQL = queries.load_resource(__package__, "queries.sql")
# The text kept of an inbound message; the message itself stays in the mailbox.
TEXT_CAP = 64 * 1024


@dataclass(frozen=True)
class MailRef:
    """Where a raw message handed to the handler came from."""

    account_id: str
    mailbox: str
    source_ref: str  # "imap:<uidvalidity>:<uid>" or "gmail:<id>"
    size: int  # the whole message's size, also when only its headers were fetched
    headers_only: bool = False  # over max_bytes: the raw bytes are (the start of) its header
    received_at: datetime | None = None  # IMAP INTERNALDATE, Gmail internalDate
    uid: int | None = None
    uidvalidity: int | None = None
    gmail_id: str | None = None


Handler = Callable[[bytes, MailRef], Awaitable[None]]


class HandlerFailed(MailbusError):
    """The service's handler raised on a message; the reader's mark stays before it."""


@dataclass(frozen=True)
class Mark:
    """How far a mailbox has been read."""

    uidvalidity: int | None = None
    last_uid: int = 0
    history_id: str | None = None
    last_received_at: datetime | None = None
    resets: int = 0
    reset_at: datetime | None = None
    reset_reason: str | None = None


@dataclass(frozen=True)
class InboundMessage:
    """One row of inbound_messages, as the service classified it."""

    ref: MailRef
    kind: str
    header_message_id: str | None = None
    message_id: uuid.UUID | None = None  # the mailbus message it answers
    sender: str | None = None
    subject: str | None = None
    text: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class MailboxState:
    """mailbox_state and inbound_messages of one installation (namespace)."""

    def __init__(self, pool: AsyncConnectionPool, namespace: str):
        self.pool, self.namespace = pool, namespace

    async def _rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(SQL[name], {"namespace": self.namespace, **params})
            return await cur.fetchall() if cur.description else []

    async def load(self, account_id: str, mailbox: str) -> Mark | None:
        """The stored mark, or None for a mailbox never read."""
        rows = await self._rows("load_mark", {"account_id": account_id, "mailbox": mailbox})
        return Mark(**rows[0]) if rows else None

    async def save_imap(self, account_id: str, mailbox: str, uidvalidity: int,
                        last_uid: int) -> None:
        """Every UID up to last_uid has been handed over."""
        await self._rows("save_imap_mark", {"account_id": account_id, "mailbox": mailbox,
                                            "uidvalidity": uidvalidity, "last_uid": last_uid})

    async def reset_imap(self, account_id: str, mailbox: str, uidvalidity: int,
                         reason: str) -> None:
        """Start the mailbox over under a new UIDVALIDITY, and record why."""
        await self._rows("reset_imap_mark", {"account_id": account_id, "mailbox": mailbox,
                                             "uidvalidity": uidvalidity, "reason": reason})

    async def save_gmail(self, account_id: str, mailbox: str, *, history_id: str | None,
                         received_at: datetime | None = None) -> None:
        """Move the history position (None keeps it) and the newest internalDate handed over."""
        await self._rows("save_gmail_mark", {"account_id": account_id, "mailbox": mailbox,
                                             "history_id": history_id,
                                             "received_at": received_at})

    async def reset_gmail(self, account_id: str, mailbox: str, history_id: str,
                          reason: str) -> None:
        """Replace the history position after a full sync, and record why."""
        await self._rows("reset_gmail_mark", {"account_id": account_id, "mailbox": mailbox,
                                              "history_id": history_id, "reason": reason})

    async def record_inbound(self, message: InboundMessage) -> bool:
        """Store a message read from a mailbox; False when it was stored before."""
        ref = message.ref
        text = message.text[:TEXT_CAP] if message.text is not None else None
        rows = await self._rows("record_inbound", {
            "account_id": ref.account_id, "source_ref": ref.source_ref,
            "header_message_id": message.header_message_id, "received_at": ref.received_at,
            "kind": message.kind, "message_id": message.message_id, "sender": message.sender,
            "subject": message.subject, "text": text,
            "detail": Jsonb({"mailbox": ref.mailbox, "size": ref.size,
                             "headers_only": ref.headers_only, **message.detail})})
        return bool(rows)

    async def known_refs(self, account_id: str, refs: Iterable[str]) -> set[str]:
        """Which of these source refs are already recorded."""
        rows = await self._rows("known_refs", {"account_id": account_id, "refs": list(refs)})
        return {r["source_ref"] for r in rows}

    async def known_message_ids(self, account_id: str, ids: Iterable[str]) -> set[str]:
        """Which of these Message-ID header values were already read from the account."""
        rows = await self._rows("known_message_ids",
                                {"account_id": account_id, "ids": list(ids)})
        return {r["header_message_id"] for r in rows}
