"""Reading what recipients answered: replies, clicks, unsubscribes, complaints, opens.

Responses are events like any other (email.responses, projected into
message_events by the projector); these routes page through them in the
order mailbus recorded them, scoped like every read: a key sees responses to
its own messages, admin keys see the installation's. The suppression list,
which spans every key's recipients, and the inbound mail the readers kept
(unmatched mail included) are for admin keys only; admins also suppress an
address by hand, or lift a suppression (a bounce that was a mistake), through
the same compacted topic every sender reads.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from mailbus import queries, topics
from mailbus.accounts import ACCOUNT_ID_PATTERN
from mailbus.errors import UnavailableError
from mailbus.ingest.auth import Key
from mailbus.ingest.handlers import require_scope
from mailbus.ingest.models import no_header_breaks
from mailbus.ingest.problems import Problem, unavailable
from mailbus.ingest.status import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    Since,
    _namespace,
    _rows,
    page_of,
    position,
)

SQL = queries.load_resource(__package__, "responses.sql")
router = APIRouter()
ResponseKind = Literal["reply", "auto_reply", "action", "unsubscribe", "complaint", "open",
                       "unknown"]
# Pages ascend: the first starts before the oldest possible row.
FEED_START = {"t": "-infinity", "id": "00000000-0000-0000-0000-000000000000"}
SUPPRESSIONS_START = {"t": "infinity", "h": "g", "s": ""}  # "g": after every hex hash
INBOUND_START = {"t": "infinity", "a": "\uffff", "r": ""}
InboundKind = Literal["dsn", "complaint", "auto_reply", "reply", "unsubscribe", "unmatched"]
_RESPONSE_FIELDS = ("recipient", "action_id", "subject", "text", "reliable", "source")


def response_body(row: dict[str, Any]) -> dict[str, Any]:
    """One response as the API shows it."""
    detail = row["detail"] or {}
    return {"id": str(row["event_id"]), "message_id": str(row["message_id"]),
            "kind": detail.get("response", "unknown"), "at": row["occurred_at"],
            "recorded_at": row["projected_at"], "account": row["account_id"],
            **{f: detail.get(f) for f in _RESPONSE_FIELDS}}


async def _feed(request: Request, key: Any, *, message_id: str | None, kind: str | None,
                since: datetime | None, limit: int, cursor: str | None) -> dict[str, Any]:
    after = position(cursor, FEED_START)
    params = {"namespace": _namespace(request), "key_id": key.id, "kind": kind,
              "message_id": message_id, "since": since or "-infinity",
              "after_at": after["t"], "after_id": after["id"], "limit": limit + 1}
    async with _rows(request) as cur:
        await cur.execute(SQL["feed_all" if key.is_admin else "feed_for_key"], params)
        rows = await cur.fetchall()
    page, after_last = page_of(rows, limit, lambda r: {"t": r["projected_at"].isoformat(),
                                                     "id": str(r["event_id"])})
    return {"responses": [response_body(r) for r in page], "next_cursor": after_last}


@router.get("/v1/responses", tags=["responses"])
async def list_responses(
    request: Request, key: Key,
    kind: ResponseKind | None = None,
    since: Since | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    """Responses to this key's messages (admin keys: all), in the order they were recorded.

    Keep `next_cursor` and ask again later for what came since; it is null
    when this page reached the newest response.
    """
    require_scope(key, "read")
    return await _feed(request, key, message_id=None, kind=kind, since=since, limit=limit,
                       cursor=cursor)


@router.get("/v1/messages/{message_id}/responses", tags=["responses"])
async def message_responses(
    request: Request, message_id: str, key: Key,
    kind: ResponseKind | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    """The responses to one message this key sent (admin keys: any), oldest recorded first."""
    require_scope(key, "read")
    try:
        message_id = str(uuid.UUID(message_id))
    except ValueError:
        raise Problem(404, "not-found", "No such message") from None
    async with _rows(request) as cur:
        await cur.execute(SQL["owns_message"], {
            "message_id": message_id, "namespace": _namespace(request),
            "key_id": None if key.is_admin else key.id})
        if await cur.fetchone() is None:
            raise Problem(404, "not-found", "No such message")
    return await _feed(request, key, message_id=message_id, kind=kind, since=None, limit=limit,
                       cursor=cursor)


@router.get("/v1/suppressions", tags=["suppressions"])
async def list_suppressions(
    request: Request, key: Key,
    address: Annotated[str | None, Query(max_length=320)] = None,
    active: bool | None = True,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> dict[str, Any]:
    """Admin keys: who may not be mailed (and, with active=false, who was lifted), newest first."""
    require_scope(key, "admin")
    after = position(cursor, SUPPRESSIONS_START)
    digest = topics.address_hash(address) if address else None
    params = {"namespace": _namespace(request), "active": active, "address_hash": digest,
              "after_at": after["t"], "after_hash": after["h"], "after_scope": after["s"],
              "limit": limit + 1}
    async with _rows(request) as cur:
        await cur.execute(SQL["suppressions"], params)
        rows = await cur.fetchall()
    page, after_last = page_of(rows, limit, lambda r: {"t": r["updated_at"].isoformat(),
                                                     "h": r["address_hash"], "s": r["scope"]})
    return {"suppressions": [{
        "address": r["address"], "scope": r["scope"] or None, "reason": r["reason"],
        "active": r["active"], "message_id": str(r["message_id"]) if r["message_id"] else None,
        "at": r["occurred_at"], "updated_at": r["updated_at"]} for r in page],
        "next_cursor": after_last}


@router.get("/v1/inbound", tags=["responses"])
async def list_inbound(
    request: Request, key: Key,
    kind: InboundKind | None = None,
    account: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> dict[str, Any]:
    """Admin keys: every message the mailbox readers read, newest first (unmatched too)."""
    require_scope(key, "admin")
    after = position(cursor, INBOUND_START)
    params = {"namespace": _namespace(request), "kind": kind, "account": account,
              "after_at": after["t"], "after_account": after["a"], "after_ref": after["r"],
              "limit": limit + 1}
    async with _rows(request) as cur:
        await cur.execute(SQL["inbound"], params)
        rows = await cur.fetchall()
    page, after_last = page_of(rows, limit, lambda r: {"t": r["recorded_at"].isoformat(),
                                                     "a": r["account_id"],
                                                     "r": r["source_ref"]})
    return {"inbound": [{
        "account": r["account_id"], "ref": r["source_ref"], "kind": r["kind"],
        "message_id": str(r["message_id"]) if r["message_id"] else None,
        "header_message_id": r["header_message_id"], "sender": r["sender"],
        "subject": r["subject"], "text": r["text"], "received_at": r["received_at"],
        "recorded_at": r["recorded_at"], "detail": r["detail"]} for r in page],
        "next_cursor": after_last}


class SuppressionChange(BaseModel):
    """Suppress an address (active) or lift its suppression, for all accounts or one."""

    model_config = ConfigDict(extra="forbid")
    address: str = Field(max_length=320, json_schema_extra={"format": "email"})
    scope: str | None = Field(default=None, pattern=ACCOUNT_ID_PATTERN)
    active: StrictBool = True

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        no_header_breaks(value)
        try:  # syntax only, as for recipients
            return validate_email(value, check_deliverability=False).normalized.lower()
        except EmailNotValidError as exc:
            raise ValueError(str(exc)) from None


@router.post("/v1/suppressions", tags=["suppressions"], status_code=202)
async def change_suppression(request: Request, key: Key, change: SuppressionChange
                             ) -> JSONResponse:
    """Admin keys: suppress or lift an address; 202 once every sender can read it."""
    require_scope(key, "admin")
    ingestor = request.app.state.ingestor
    digest = topics.address_hash(change.address)
    record = {"event_id": str(uuid.uuid4()), "message_id": None,
              "occurred_at": datetime.now(UTC), "address": change.address,
              "address_hash": digest, "reason": "manual", "scope": change.scope,
              "active": change.active}
    try:
        await ingestor.producer.produce(
            _namespace(request) + topics.SUPPRESSIONS,
            ingestor.registry.encode(topics.SUPPRESSIONS, record), key=digest.encode())
    except UnavailableError as exc:
        raise unavailable(str(exc)) from exc
    return JSONResponse({"address": change.address, "scope": change.scope,
                         "active": change.active, "reason": "manual"}, status_code=202)
