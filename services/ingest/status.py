"""Reading what happened to messages: status and timeline, listings, daily reports.

Routes over the projection the projector (`mailbus projector`) writes; every
query is scoped to this installation's namespace (its topic prefix) and, for
keys without the admin scope, to the asking key's own messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Query, Request
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from pydantic import AwareDatetime, BeforeValidator

from mailbus import queries
from mailbus.ingest.auth import Key
from mailbus.ingest.handlers import require_scope
from mailbus.ingest.problems import Problem, invalid, unavailable
from mailbus.search import NotAnAddress, search_address
from mailbus.timeline import COUNTED, Status

SQL = queries.load_resource(__package__, "status.sql")
router = APIRouter()
DEFAULT_LIMIT, MAX_LIMIT = 50, 500
# The first page starts after the newest possible row.
FIRST_PAGE = {"t": "infinity", "id": "ffffffff-ffff-ffff-ffff-ffffffffffff"}
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
# ISO 8601 with date and time: pydantic alone would also take a number as
# Unix seconds, which the document (format date-time) does not allow.
_ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


def _iso_only(value: object) -> object:
    if isinstance(value, str) and not _ISO_TIME.match(value):
        raise ValueError("must be an ISO 8601 time with an offset")
    return value


Since = Annotated[AwareDatetime, BeforeValidator(_iso_only)]
# Filters of the listing; each value is bound as a parameter, never spliced.
MAX_ADDRESS = 254  # RFC 5321's path limit, less the angle brackets
# One @, no space or control character: what an address of a request can be.
ADDRESS_PATTERN = r"^[^\s@\x00-\x1f\x7f]{1,64}@[^\s@\x00-\x1f\x7f]{1,253}$"
TAG_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"  # as a request's tags
ACCOUNT_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"  # as accounts.toml's ids
# (searched, admin) -> the named query of status.sql.
QUERIES = {(False, False): "list_for_key", (False, True): "list_all",
           (True, False): "search_for_key", (True, True): "search_all"}
# Counting a filter's messages stops here: enough to tell the smallest of
# two or three apart, cheap enough to do before every search.
TERM_SIZE_CAP = 10_000
# The times a listing takes: pydantic stops at year 9999; before 1970 no
# message was accepted, and such a bound only ever widens a scan.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
# Sorts before every real id at the same instant: (until, this) excludes `until` itself.
_LOWEST_ID = "00000000-0000-0000-0000-000000000000"
_MESSAGE_FIELDS = ("status", "pool", "subject", "recipients", "tags", "send_at",
                   "requested_at", "updated_at")


def encode_cursor(fields: dict[str, str]) -> str:
    """The opaque cursor after a row (its sort key): base64url of JSON, unpadded."""
    raw = json.dumps(fields, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, keys: tuple[str, ...]) -> dict[str, str]:
    """The fields of a cursor this API returned; 422 naming `cursor` otherwise.

    Every cursor has text fields only, `t` an aware ISO time and `id`, when
    present, a UUID.
    """
    try:
        doc = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(doc, dict) or set(doc) != set(keys):
            raise ValueError("wrong fields")
        if not all(isinstance(v, str) for v in doc.values()):
            raise ValueError("not text")
        if datetime.fromisoformat(doc["t"]).utcoffset() is None:
            raise ValueError("naive time")
        if "id" in doc:
            doc["id"] = str(uuid.UUID(doc["id"]))
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise invalid([{"field": "cursor", "message": "not a cursor this API returned"}]
                      ) from None
    return doc


def position(cursor: str | None, start: dict[str, str]) -> dict[str, str]:
    """Where a page starts: after the row a cursor names, or at a listing's `start`."""
    return decode_cursor(cursor, tuple(start)) if cursor else dict(start)


def start_of_page(after: dict[str, str], until: datetime | None) -> dict[str, str]:
    """The earlier of a page's start and `until` (excluded): pages never reach past it."""
    if until is None or (after["t"] != "infinity"
                         and datetime.fromisoformat(after["t"]) < until):
        return after
    return {"t": until.isoformat(), "id": _LOWEST_ID}


def check_range(since: datetime | None, until: datetime | None) -> None:
    """422 naming `since` or `until` when out of bounds, or `until` not after `since`."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and value < EARLIEST:
            raise invalid([{"field": name, "message": "must be 1970 or later"}])
    if since is not None and until is not None and until <= since:
        raise invalid([{"field": "until", "message": "must be later than since"}])


def search_terms(recipient: str | None, tag: str | None, account: str | None
                 ) -> list[tuple[str, str]]:
    """(field, value) of the filters served by message_search, as its rows hold them.

    The recipient is normalised as POST normalised the addresses it
    accepted, then case-folded; 422 naming it when POST would refuse it.
    """
    terms = [("tag", tag), ("account", account)]
    if recipient is not None:
        try:
            terms.insert(0, ("recipient", search_address(recipient)))
        except NotAnAddress as exc:
            raise invalid([{"field": "recipient", "message": str(exc)}]) from None
    return [(f, v) for f, v in terms if v is not None]


def driving_first(terms: list[tuple[str, str]], sizes: list[int]) -> list[tuple[str, str]]:
    """The filters, the one with the fewest messages first: it drives, the others are probed.

    Ties keep the given order (recipient, tag, account: usually the rarest first).
    """
    order = sorted(range(len(terms)), key=lambda i: sizes[i])
    return [terms[i] for i in order]


def page_of(rows: list[Any], limit: int, cursor_of: Callable[[Any], dict[str, str]]
            ) -> tuple[list[Any], str | None]:
    """The page of a query that asked for limit + 1 rows, and the cursor after it.

    The one row more than asked says whether another page exists; the cursor
    is None when it does not.
    """
    page = rows[:limit]
    return page, encode_cursor(cursor_of(page[-1])) if len(rows) > limit else None


def parse_day(value: str | None) -> date:
    """A UTC calendar day from YYYY-MM-DD; 422 naming `date` otherwise."""
    try:
        if value is None or not _DAY.fullmatch(value):
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise invalid([{"field": "date", "message": "a day as YYYY-MM-DD is required"}]
                      ) from None


def message_body(row: dict[str, Any]) -> dict[str, Any]:
    """A message as the API shows it."""
    return {"id": str(row["id"]), "account": row.get("account_id"),
            **{f: row.get(f) for f in _MESSAGE_FIELDS}}


def timeline_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One event of a message's timeline."""
    return {"kind": row["kind"], "at": row["occurred_at"], "account": row["account_id"],
            "detail": row["detail"]}


def report_row(row: dict[str, Any]) -> dict[str, Any]:
    """One account's counts for a day; quota_used is what it sent that day."""
    counts = {kind: int(row[kind]) for kind in COUNTED}
    return {"account": row["account_id"], **counts, "quota_used": counts["sent"]}


@asynccontextmanager
async def _rows(request: Request) -> AsyncIterator[psycopg.AsyncCursor[DictRow]]:
    """A dict-row cursor on the API's pool; PostgreSQL trouble becomes a 503."""
    pool: AsyncConnectionPool = request.app.state.ingestor.pool
    try:
        async with pool.connection() as conn:
            yield conn.cursor(row_factory=dict_row)
    except (PoolTimeout, psycopg.OperationalError) as exc:
        raise unavailable("database unavailable") from exc


def _namespace(request: Request) -> str:
    return str(request.app.state.namespace)


@router.get("/v1/messages/{message_id}", tags=["messages"])
async def get_message(request: Request, message_id: str, key: Key) -> dict[str, Any]:
    """A message this key sent (admin keys: any), its status and timeline, oldest first."""
    require_scope(key, "read")
    try:
        message_id = str(uuid.UUID(message_id))
    except ValueError:
        raise Problem(404, "not-found", "No such message") from None
    ids = {"id": message_id, "namespace": _namespace(request)}
    async with _rows(request) as cur:
        await cur.execute(SQL["message"], ids | {"key_id": None if key.is_admin else key.id})
        row = await cur.fetchone()
        if row is None and key.is_admin:
            await cur.execute(SQL["projected_message"], ids)
            row = await cur.fetchone()
        if row is None:
            raise Problem(404, "not-found", "No such message")
        await cur.execute(SQL["timeline"], ids)
        events = await cur.fetchall()
    return message_body(row) | {"timeline": [timeline_entry(e) for e in events]}


@router.get("/v1/messages", tags=["messages"])
async def list_messages(
    request: Request, key: Key,
    status: Status | None = None,
    recipient: Annotated[str | None, Query(
        max_length=MAX_ADDRESS, pattern=ADDRESS_PATTERN,
        description="An address of to, cc or bcc, normalised as POST normalises it and "
                    "compared without regard to case; found once the message is projected")
    ] = None,
    tag: Annotated[str | None, Query(
        pattern=TAG_PATTERN, description="A tag of the message, exact; found once projected")
    ] = None,
    account: Annotated[str | None, Query(
        pattern=ACCOUNT_PATTERN,
        description="The account the message was sent through; found once its send is projected")
    ] = None,
    since: Since | None = None,
    until: Annotated[Since | None, Query(description="Requested before this time")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    """This key's messages (admin keys: all), newest first, a page at a time, filtered."""
    require_scope(key, "read")
    check_range(since, until)
    terms = search_terms(recipient, tag, account)
    after = start_of_page(position(cursor, FIRST_PAGE), until)
    params = {"after_at": after["t"], "after_id": after["id"], "status": status,
              "since": since or "-infinity", "limit": limit + 1, "key_id": key.id,
              "namespace": _namespace(request), "field": None, "value": None,
              "also_fields": [], "also_values": []}
    async with _rows(request) as cur:
        if len(terms) > 1:
            sizes = []
            for field, value in terms:
                await cur.execute(SQL["term_size"], params | {
                    "field": field, "value": value, "cap": TERM_SIZE_CAP,
                    "key_id": None if key.is_admin else key.id})
                sizes.append((await cur.fetchone() or {"n": 0})["n"])
            terms = driving_first(terms, sizes)
        if terms:
            params |= {"field": terms[0][0], "value": terms[0][1],
                       "also_fields": [f for f, _ in terms[1:]],
                       "also_values": [v for _, v in terms[1:]]}
        await cur.execute(SQL[QUERIES[bool(terms), key.is_admin]], params)
        rows = await cur.fetchall()
    page, after_last = page_of(rows, limit, lambda r: {"t": r["requested_at"].isoformat(),
                                                       "id": str(r["id"])})
    return {"messages": [message_body(r) for r in page], "next_cursor": after_last}


@router.get("/v1/reports/daily", tags=["reports"])
async def daily_report(
    request: Request, key: Key,
    day: Annotated[str, Query(alias="date", description="UTC day, YYYY-MM-DD", max_length=10,
                              json_schema_extra={"format": "date"})],
) -> dict[str, Any]:
    """Per account, what happened on a UTC day (non-admin keys: over their own messages)."""
    require_scope(key, "read")
    when = parse_day(day)
    params = {"namespace": _namespace(request), "day": when, "key_id": key.id}
    async with _rows(request) as cur:
        await cur.execute(SQL["daily_all" if key.is_admin else "daily_for_key"], params)
        rows = await cur.fetchall()
    return {"date": when.isoformat(), "scope": "all" if key.is_admin else "key",
            "accounts": [report_row(r) for r in rows]}
