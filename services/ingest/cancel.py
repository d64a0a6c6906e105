"""Cancelling and rescheduling a queued message, until the sender claims it.

The sender owns its ledger; the API's role may only call `change_schedule`
(migration 0018, SECURITY DEFINER), which changes the `queued` row and puts
the event in the sender's outbox in one transaction. The sender's outbox
sweep emits it to email.schedule. `verdict` (pure) turns the function's
outcome into the answer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout

from mailbus import queries, topics
from mailbus.ingest.attachments import MESSAGE_RETENTION
from mailbus.ingest.auth import Key
from mailbus.ingest.handlers import ApiKey, require_scope
from mailbus.ingest.models import CancelRequest, RescheduleRequest
from mailbus.ingest.problems import Problem, unavailable

SQL = queries.load_resource(__package__, "cancel.sql")
router = APIRouter()
# Admission follows a 202 within moments; a client asks again after this.
NOT_ADMITTED_RETRY_SECONDS = 1
TOO_LATE_DETAIL = {
    "sending": "the message is being sent",
    "sent": "the message was sent",
    "failed": "the message failed",
    "cancelled": "the message was cancelled",
    "partly_sent": "the message was handed over to some recipients and waits for others",
    "ambiguous": "a send of the message was interrupted and may have reached the server;"
                 " it goes again, flagged as a possible duplicate",
}


class StateProblem(Problem):
    """A problem that also names the message's current state (an extension member)."""

    def __init__(self, status: int, slug: str, title: str, detail: str, state: str | None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, slug, title, detail, headers=headers)
        self.state = state

    def body(self, instance: str | None = None) -> dict[str, Any]:
        doc = super().body(instance)
        if self.state is not None:
            doc["state"] = self.state
        return doc


@dataclass(frozen=True)
class Answer:
    """A successful change: the body of the 200."""

    body: dict[str, Any]


def verdict(message_id: str, outcome: str, state: str | None, due_at: datetime | None
            ) -> Answer:
    """The answer to `change_schedule`'s outcome; raises the problem for a refusal."""
    if outcome in ("cancelled", "already_cancelled"):
        return Answer({"id": message_id, "result": outcome, "status": "cancelled"})
    if outcome == "rescheduled":
        assert due_at is not None
        return Answer({"id": message_id, "result": "rescheduled", "status": "queued",
                       "send_at": due_at.astimezone(UTC).isoformat()})
    if outcome == "not_found":
        raise Problem(404, "not-found", "No such message")
    if outcome == "not_admitted":
        raise StateProblem(
            409, "not-queued-yet", "Not queued yet",
            "the message was accepted and is not in the sender's queue yet (or is moving to"
            " another account of its pool); ask again in a moment", state,
            headers={"Retry-After": str(NOT_ADMITTED_RETRY_SECONDS)})
    if outcome == "too_late":
        detail = TOO_LATE_DETAIL.get(state or "", f"the message is {state}")
        raise StateProblem(409, "too-late", "Too late to change", detail, state)
    raise ValueError(f"unknown outcome {outcome!r}")


def event(message_id: str, account_id: str, key: ApiKey, send_at: datetime | None,
          reason: str | None, now: datetime) -> dict[str, Any]:
    """The email.schedule record of one change (send_at None: a cancel)."""
    return {"event_id": str(uuid.uuid4()), "message_id": message_id, "occurred_at": now,
            "account_id": account_id, "key_id": key.id,
            "change": "cancelled" if send_at is None else "rescheduled",
            "send_at": send_at, "reason": reason}


def _message_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise Problem(404, "not-found", "No such message") from None


async def change(request: Request, key: ApiKey, raw_id: str, send_at: datetime | None,
                 reason: str | None) -> JSONResponse:
    """Ask the ledger for the change, in one transaction; the answer it gave."""
    require_scope(key, "send")
    message_id = _message_id(raw_id)
    ingestor = request.app.state.ingestor
    owner = None if key.is_admin else key.id
    try:
        async with ingestor.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(SQL["message"], {"id": message_id, "key_id": owner})
            row = await cur.fetchone()
            if row is None:
                raise Problem(404, "not-found", "No such message")
            value = ingestor.registry.encode(topics.SCHEDULE, event(
                message_id, row["account_id"], key, send_at, reason, datetime.now(UTC)))
            await cur.execute(SQL["change"], {
                "namespace": request.app.state.namespace, "id": message_id, "key_id": owner,
                "due_at": send_at, "event": value})
            done = await cur.fetchone()
            if done is not None and done["outcome"] == "rescheduled":
                await cur.execute(SQL["keep_files"], {
                    "id": message_id, "expires_at": done["due_at"] + MESSAGE_RETENTION})
    except (PoolTimeout, psycopg.OperationalError) as exc:
        raise unavailable("database unavailable") from exc
    if done is None:
        raise Problem(404, "not-found", "No such message")
    answer = verdict(message_id, done["outcome"], done["state"], done["due_at"])
    return JSONResponse(answer.body)


@router.post("/v1/messages/{message_id}/cancel", tags=["messages"])
async def cancel_message(request: Request, message_id: str, key: Key,
                         body: CancelRequest | None = None) -> JSONResponse:
    """Cancel a queued message (scheduled or waiting for quota) before it is claimed."""
    return await change(request, key, message_id, None, body.reason if body else None)


@router.post("/v1/messages/{message_id}/reschedule", tags=["messages"])
async def reschedule_message(request: Request, message_id: str, key: Key,
                             body: RescheduleRequest) -> JSONResponse:
    """Move a queued message to another time (send_at) before it is claimed."""
    return await change(request, key, message_id, body.send_at, body.reason)
