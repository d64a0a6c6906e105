"""Webhook endpoints as an API resource: register, change, rotate, test, rewind, inspect.

Scope `webhooks` (admin keys hold every scope). Each key sees only its own
endpoints: another key's id answers 404 like an unknown one. An endpoint
receives events of the messages its key sent; an admin key's endpoint
receives every message's, as the admin key reads every message. Delivery is
the webhooks service's (`mailbus webhooks`); the API writes only what it
asks for (a test event, a replay) into PostgreSQL.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, field_validator

from mailbus import queries, webhook_signing
from mailbus.ingest.auth import Key
from mailbus.ingest.handlers import ApiKey, require_scope
from mailbus.ingest.problems import Problem, invalid
from mailbus.ingest.status import _namespace, _rows, page_of, position
from mailbus.webhook_events import EVENT_TYPES, TEST_TYPE, ping_event
from mailbus.webhook_guard import Policy, Refused, check_url

SQL = queries.load_resource(__package__, "webhooks.sql")
router = APIRouter(tags=["webhooks"])
EventType = Literal["message.sent", "message.failed", "message.delivered", "message.bounced",
                    "message.response", "message.confirmed", "message.unconfirmed",
                    "message.cancelled"]
assert set(EventType.__args__) == set(EVENT_TYPES)  # type: ignore[attr-defined]
URL_PATTERN = r"^[hH][tT][tT][pP][sS]?://[^\s]+$"
DEFAULT_GRACE_SECONDS = 86_400
ATTEMPTS_START = {"t": "infinity", "id": "ffffffff-ffff-ffff-ffff-ffffffffffff", "n": "2147483647"}
SCOPE = "webhooks"


def _description(value: str) -> str:
    if any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in value):
        raise ValueError("must not contain control characters")
    return value


class EndpointCreate(BaseModel):
    """A new endpoint."""

    model_config = ConfigDict(extra="forbid")
    url: Annotated[str, Field(max_length=2048, pattern=URL_PATTERN)]
    event_types: Annotated[list[EventType], Field(min_length=1, max_length=len(EVENT_TYPES))]
    description: Annotated[str, Field(max_length=512)] = ""

    _check = field_validator("description")(_description)


class EndpointUpdate(BaseModel):
    """Fields to change; absent ones stay."""

    model_config = ConfigDict(extra="forbid")
    url: Annotated[str | None, Field(max_length=2048, pattern=URL_PATTERN)] = None
    event_types: Annotated[list[EventType] | None,
                           Field(min_length=1, max_length=len(EVENT_TYPES))] = None
    description: Annotated[str | None, Field(max_length=512)] = None
    enabled: StrictBool | None = None

    @field_validator("description")
    @classmethod
    def _plain(cls, value: str | None) -> str | None:
        return None if value is None else _description(value)


class Rotation(BaseModel):
    """How long the current secret stays valid beside the new one."""

    model_config = ConfigDict(extra="forbid")
    grace_seconds: Annotated[int, Field(ge=0, le=7 * 86_400)] = DEFAULT_GRACE_SECONDS


class Replay(BaseModel):
    """From when to deliver the endpoint's events again."""

    model_config = ConfigDict(extra="forbid")
    since: AwareDatetime


def endpoint_body(row: dict[str, Any], secret: bool = False) -> dict[str, Any]:
    """An endpoint as the API shows it; the secret only when just made."""
    body = {"id": str(row["id"]), "url": row["url"], "event_types": list(row["event_types"]),
            "description": row["description"], "enabled": row["enabled"],
            "disabled_reason": row["disabled_reason"], "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "previous_secret_valid_until": row["previous_secret_until"]}
    if secret:
        body["secret"] = row["secret"]
    return body


def _check(request: Request, url: str | None) -> None:
    if url is None:
        return
    try:
        check_url(url, Policy(allow_http=request.app.state.webhooks_allow_http))
    except Refused as exc:
        raise invalid([{"field": "url", "message": str(exc)}]) from None


def _endpoint_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise _not_found() from None


def _not_found() -> Problem:
    return Problem(404, "not-found", "No such webhook endpoint")


def _ids(request: Request, key: ApiKey, endpoint_id: str) -> dict[str, Any]:
    require_scope(key, SCOPE)
    return {"id": _endpoint_id(endpoint_id), "namespace": _namespace(request), "key_id": key.id}


async def _one(request: Request, statement: str, params: dict[str, Any]) -> dict[str, Any]:
    async with _rows(request) as cur:
        await cur.execute(SQL[statement], params)
        row = await cur.fetchone()
    if row is None:
        raise _not_found()
    return dict(row)


@router.post("/v1/webhooks/endpoints", status_code=201)
async def create_endpoint(request: Request, body: EndpointCreate, key: Key) -> JSONResponse:
    """Register an endpoint; the answer shows its signing secret, this once."""
    require_scope(key, SCOPE)
    _check(request, body.url)
    params = {"id": str(uuid.uuid4()), "namespace": _namespace(request), "key_id": key.id,
              "all_messages": key.is_admin, "url": body.url,
              "event_types": sorted(set(body.event_types)), "description": body.description,
              "secret": webhook_signing.new_secret()}
    limit = request.app.state.webhooks_max_endpoints
    async with _rows(request) as cur:
        await cur.execute(SQL["count_for_key"], params)
        count = await cur.fetchone()
        if count is not None and count["count"] >= limit:
            raise invalid([{"field": "url",
                            "message": f"this key has {limit} endpoints, the most it may"}])
        await cur.execute(SQL["insert"], params)
        row = await cur.fetchone()
    assert row is not None
    return JSONResponse(_json(endpoint_body(dict(row), secret=True)), status_code=201,
                        headers={"Location": f"/v1/webhooks/endpoints/{params['id']}"})


@router.get("/v1/webhooks/endpoints")
async def list_endpoints(request: Request, key: Key) -> dict[str, Any]:
    """This key's endpoints, oldest first."""
    require_scope(key, SCOPE)
    async with _rows(request) as cur:
        await cur.execute(SQL["list"], {"namespace": _namespace(request), "key_id": key.id})
        rows = await cur.fetchall()
    return {"endpoints": [endpoint_body(dict(r)) for r in rows]}


@router.get("/v1/webhooks/endpoints/{endpoint_id}")
async def get_endpoint(request: Request, endpoint_id: str, key: Key) -> dict[str, Any]:
    """One of this key's endpoints."""
    return endpoint_body(await _one(request, "get", _ids(request, key, endpoint_id)))


@router.patch("/v1/webhooks/endpoints/{endpoint_id}")
async def update_endpoint(request: Request, endpoint_id: str, body: EndpointUpdate, key: Key
                          ) -> dict[str, Any]:
    """Change the URL, event types or description; disable (enabled: false) or enable."""
    ids = _ids(request, key, endpoint_id)
    _check(request, body.url)
    types = sorted(set(body.event_types)) if body.event_types is not None else None
    params = ids | {"url": body.url, "event_types": types, "description": body.description,
                    "enabled": body.enabled}
    return endpoint_body(await _one(request, "update", params))


@router.delete("/v1/webhooks/endpoints/{endpoint_id}", status_code=204)
async def delete_endpoint(request: Request, endpoint_id: str, key: Key) -> Response:
    """Delete the endpoint, its pending deliveries and its attempts."""
    ids = _ids(request, key, endpoint_id)
    async with _rows(request) as cur:
        await cur.execute(SQL["delete"], ids)
        if cur.rowcount == 0:
            raise _not_found()
    return Response(status_code=204)


@router.post("/v1/webhooks/endpoints/{endpoint_id}/rotate-secret")
async def rotate_secret(request: Request, endpoint_id: str, key: Key,
                        body: Rotation | None = None) -> dict[str, Any]:
    """A new signing secret; the old one stays valid for `grace_seconds` (default a day)."""
    ids = _ids(request, key, endpoint_id)
    grace = (body or Rotation()).grace_seconds
    secret = webhook_signing.new_secret()
    row = await _one(request, "rotate", ids | {"secret": secret, "grace": grace})
    return endpoint_body(row, secret=True)


@router.post("/v1/webhooks/endpoints/{endpoint_id}/test", status_code=202)
async def send_test(request: Request, endpoint_id: str, key: Key) -> dict[str, Any]:
    """Queue a `webhook.test` event for this endpoint, whatever types it asked for."""
    ids = _ids(request, key, endpoint_id)
    await _one(request, "get", ids)
    event = ping_event(str(uuid.uuid4()), ids["id"], datetime.now(UTC))
    async with _rows(request) as cur:
        await cur.execute(SQL["queue_test"], ids | {
            "event_id": event.event_id, "event_type": TEST_TYPE,
            "occurred_at": event.occurred_at, "body": event.body})
    return {"event_id": event.event_id, "status": "queued"}


@router.post("/v1/webhooks/endpoints/{endpoint_id}/replay", status_code=202)
async def replay(request: Request, endpoint_id: str, body: Replay, key: Key
                 ) -> dict[str, Any]:
    """Deliver again, in order and under the same ids, every matching event since a time."""
    ids = _ids(request, key, endpoint_id)
    if body.since > datetime.now(UTC):
        raise invalid([{"field": "since", "message": "must not be in the future"}])
    await _one(request, "get", ids)
    replay_id = str(uuid.uuid4())
    await _one(request, "queue_replay", ids | {"replay_id": replay_id, "since": body.since})
    return {"replay_id": replay_id, "status": "queued", "since": body.since.isoformat()}


@router.get("/v1/webhooks/endpoints/{endpoint_id}/attempts")
async def list_attempts(
    request: Request, endpoint_id: str, key: Key,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    """Every attempt to deliver to this endpoint, newest first."""
    ids = _ids(request, key, endpoint_id)
    await _one(request, "get", ids)
    after = position(cursor, ATTEMPTS_START)
    try:
        after_attempt = int(after["n"])
    except ValueError:
        raise invalid([{"field": "cursor", "message": "not a cursor this API returned"}]
                      ) from None
    async with _rows(request) as cur:
        await cur.execute(SQL["attempts"], ids | {
            "after_at": after["t"], "after_id": after["id"], "after_attempt": after_attempt,
            "limit": limit + 1})
        rows = await cur.fetchall()
    page, next_cursor = page_of(rows, limit, lambda r: {
        "t": r["at"].isoformat(), "id": str(r["event_id"]), "n": str(r["attempt"])})
    return {"attempts": [_attempt_body(dict(r)) for r in page], "next_cursor": next_cursor}


def _attempt_body(row: dict[str, Any]) -> dict[str, Any]:
    lane = str(row["lane"])
    return {"event_id": str(row["event_id"]), "event_type": row["event_type"],
            "attempt": row["attempt"], "at": row["at"], "status_code": row["status_code"],
            "latency_ms": row["latency_ms"], "error": row["error"], "response": row["response"],
            "delivery_state": row["state"],
            "replay_id": None if lane == "00000000-0000-0000-0000-000000000000" else lane}


def _json(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in body.items()}
