"""Attachments: storing files in PostgreSQL, naming them in messages, letting them expire.

`POST /v1/attachments` takes a file's raw bytes and answers its content address
(the hex SHA-256), which any number of messages of the same key then name as
`{"id": ...}`; a message may also carry a file inline (base64). Either way the
bytes are committed before the message's event is produced, so a 202 means
the sender will find them. Rules on names, types and sizes: attachment_rules.py.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from mailbus import queries
from mailbus.ingest import attachment_rules
from mailbus.ingest.auth import Key
from mailbus.ingest.handlers import ApiKey, require_scope
from mailbus.ingest.problems import Problem, invalid, unavailable

if TYPE_CHECKING:
    from mailbus.ingest.models import MessageRequest
    from mailbus.ingest.service import Ingestor, Planned

log = logging.getLogger(__name__)
SQL = queries.load_resource(__package__, "attachments.sql")
PATH = "/v1/attachments"
# An upload may be named by messages for this long; each message that names a
# file keeps it until its send_at (or acceptance) plus MESSAGE_RETENTION: the
# sender's ledger keeps a request 8 days (MAILBUS_LEDGER_RETENTION_HOURS'
# default), and a retried message must still find its files.
UPLOAD_RETENTION = timedelta(hours=24)
MESSAGE_RETENTION = timedelta(days=8)
UNKNOWN_ID = ("no file of this key has this id: upload it with POST /v1/attachments"
              " (an upload is kept 24 h, a file of a sent message 8 days)")

router = APIRouter()


class Uploaded(BaseModel):
    """The answer to an upload: the file's content address."""

    id: str = Field(pattern=attachment_rules.SHA256_HEX.pattern,
                    description="Hex SHA-256 of the bytes: name the file by it in messages")
    size: int = Field(ge=1, description="Length of the file in bytes")
    expires_at: datetime = Field(description="Until when this key may name it without a"
                                             " message doing so (each message extends it)")


@router.post(PATH, status_code=201, tags=["attachments"], response_model=Uploaded,
             summary="Upload an attachment", openapi_extra={"requestBody": {
    "required": True, "description": "The file's bytes, as they are (no base64).",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                     "minLength": 1}}}}})
async def upload(request: Request, key: Key) -> JSONResponse:
    """Store a file once; its id (the hex SHA-256) names it in this key's messages for 24 h."""
    require_scope(key, "send")
    data = await request.body()
    if not data:
        raise invalid([{"field": "body", "message": "must hold the file's bytes"}])
    problem = attachment_rules.bytes_problem(data)
    if problem:
        raise invalid([{"field": "body", "message": problem}])
    sha256 = hashlib.sha256(data).hexdigest()
    expires_at = datetime.now(UTC) + UPLOAD_RETENTION
    await _write(request.app.state.ingestor, key, {sha256: data}, {sha256: expires_at}, [])
    return JSONResponse({"id": sha256, "size": len(data), "expires_at": expires_at.isoformat()},
                        status_code=201)


async def store(ing: Ingestor, key: ApiKey, planned: Sequence[Planned],
                prefixes: Sequence[str]) -> list[Problem | None]:
    """Commit the planned messages' inline files and extend the references they name by
    id; per message, None or the 422 naming its field (`prefixes`: "messages[3]." in a
    batch). A message refused here has nothing produced; its files were kept all the same
    (until the expiry the message would have given them)."""
    now = datetime.now(UTC)
    outcome: list[Problem | None] = [None] * len(planned)
    inline: dict[str, bytes] = {}
    expiry: dict[str, datetime] = {}
    for n, p in enumerate(planned):
        files = p.request.attachments
        if all(a.size is not None for a in files):  # inline only: every size is known
            outcome[n] = _size_check(ing, p, prefixes[n])
            if outcome[n] is not None:
                continue
        until = max(p.request.send_at or now, now) + MESSAGE_RETENTION
        for a in files:
            assert a.id is not None  # set by validation, for inline files too
            if a.content is not None:
                inline[a.id] = a.content
            expiry[a.id] = max(expiry.get(a.id, until), until)
    named = sorted(sha for sha in expiry if sha not in inline)
    found = await _write(ing, key, inline, expiry, named)
    sizes = {**found, **{sha: len(data) for sha, data in inline.items()}}
    for n, p in enumerate(planned):
        if outcome[n] is not None:
            continue
        errors = []
        for i, a in enumerate(p.request.attachments):
            if a.id in sizes:
                a._size = sizes[a.id]
                a.content = None  # stored: the request no longer holds the bytes
            else:
                errors.append({"field": f"{prefixes[n]}attachments[{i}].id",
                               "message": UNKNOWN_ID})
        outcome[n] = invalid(errors) if errors else _size_check(ing, p, prefixes[n])
    return outcome


async def _write(ing: Ingestor, key: ApiKey, inline: dict[str, bytes],
                 expiry: dict[str, datetime], named: list[str]) -> dict[str, int]:
    """One transaction: store `inline`, reference it, extend `named`; the sizes of the named
    files this key may use."""
    for attempt in range(2):
        try:
            async with ing.connection() as conn, conn.transaction():
                for sha256, data in inline.items():
                    await conn.execute(SQL["store_blob"],
                                       {"sha256": sha256, "size": len(data), "content": data})
                    await conn.execute(SQL["reference"], {
                        "key_id": key.id, "sha256": sha256, "expires_at": expiry[sha256]})
                if not named:
                    return {}
                cur = await conn.execute(SQL["extend_references"], {
                    "key_id": key.id, "sha256s": named,
                    "expires": [expiry[sha] for sha in named]})
                return {row["sha256"]: row["size"] for row in await cur.fetchall()}
        except psycopg.errors.ForeignKeyViolation:
            # The pruner deleted a blob between our insert finding it and our
            # reference: store it anew, once.
            if attempt:
                raise unavailable("attachment storage changed, retry", 1) from None
        except psycopg.OperationalError as exc:
            raise unavailable("database unavailable") from exc
    raise AssertionError("unreachable")


def _size_check(ing: Ingestor, p: Planned, prefix: str) -> Problem | None:
    """Total size, and what every account the message may leave from accepts."""
    directory = ing.directory
    accounts = {p.account_id, *(directory.pools.get(p.pool, ()) if p.pool else ())}
    kinds = {directory.by_id[a].kind for a in accounts if a in directory.by_id}
    sizes = [a.size or 0 for a in p.request.attachments]
    problem = attachment_rules.size_problem(sizes, content_bytes(p.request), kinds)
    return invalid([{"field": f"{prefix}attachments", "message": problem}]) if problem else None


def content_bytes(req: MessageRequest) -> int:
    """UTF-8 bytes of the bodies and subjects a message composes from."""
    parts: list[str | None] = [req.subject, req.text, req.html]
    if req.template is not None:
        parts += [req.template.subject, req.template.text, req.template.html]
    return sum(len(x.encode()) for x in parts if x)


async def prune(ing: Ingestor, batch: int) -> tuple[int, int]:
    """Delete expired references, then blobs no reference names; (references, blobs)."""
    totals = [0, 0]
    for n, name in enumerate(("prune_references", "prune_blobs")):
        while True:
            try:
                async with ing.connection() as conn:
                    cur = await conn.execute(SQL[name], {"batch": batch})
            except psycopg.errors.ForeignKeyViolation:
                # A request referenced one of these blobs meanwhile: next round.
                log.info("attachment pruning met a file referenced meanwhile; next round")
                break
            totals[n] += cur.rowcount
            if cur.rowcount < batch:
                break
    return totals[0], totals[1]

