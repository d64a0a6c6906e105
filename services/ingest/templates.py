"""Stored templates: create, list, read, update (a new version each time) and delete them,
and resolve the one a message names when it is accepted.

Scope `send` (admin keys hold every scope). A template belongs to the key
that created it: every statement is scoped to the asking key, so another
key's template answers 404 here and 422 in a message, like an unknown one.
A version is never changed once written. Before a version is stored its
parts are compiled in the sandbox the sender renders with
(`mailbus.templates.check`), so a template that cannot compile is refused
when it is written.

A message naming a template gets the version's source copied into its
email.requested event with the name and version (`resolved`): the event is
self-contained, a later update or delete never changes an accepted message,
and the sender needs no database. Lookups of the requests that arrive
together share one round trip (coalesce.py), and each answer is kept for
`key_cache_seconds` (as keys are): an update or delete made through one
worker process is seen by the others within that time, at once by its own.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mailbus import queries
from mailbus.deadline import DeadlinePool, Late, Unavailable
from mailbus.ingest.auth import Key
from mailbus.ingest.coalesce import Coalescer, Outcome
from mailbus.ingest.handlers import ApiKey, require_scope
from mailbus.ingest.models import (
    MAX_CONTENT_BYTES,
    MAX_SUBJECT,
    MAX_TEMPLATE_VERSION,
    TEMPLATE_NAME_PATTERN,
    MessageRequest,
    TemplateName,
    header_value,
)
from mailbus.ingest.problems import Problem, invalid, unavailable
from mailbus.templates import DEADLINE_SECONDS, check_job

SQL = queries.load_resource(__package__, "templates.sql")
router = APIRouter(tags=["templates"])
SCOPE = "send"
MAX_TEMPLATES = 100  # names per key
MAX_VERSIONS = 50  # versions per name; delete the name to start again
MAX_KEY_BYTES = 64 * 1024 * 1024  # subject + text + html of every version of a key
CACHE_ENTRIES = 4096
LOOKUPS_IN_FLIGHT = 2
# Compiling runs in a process of its own, killed past this: 512 KiB of
# expressions takes the parser seconds of CPU, which in the API's process
# would stall every request. The sender renders within the same time.
COMPILE_SECONDS = DEADLINE_SECONDS
COMPILE_MEMORY = 1 << 30  # address space of the compiling process
LOOKUP_GROUP_MAX = 500
_PARTS = ("subject", "text", "html")


class TemplateSource(BaseModel):
    """A version's source: a subject, and text or html or both (Jinja2, sandboxed)."""

    model_config = ConfigDict(extra="forbid")
    subject: str | None = Field(default=None, max_length=MAX_SUBJECT)
    text: str | None = None
    html: str | None = None

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return None if value is None else header_value(value)

    @model_validator(mode="after")
    def _whole(self) -> TemplateSource:
        if not (self.text or self.html):
            raise ValueError("give text, html or both")
        return self


class TemplateCreate(TemplateSource):
    """A new template and its version 1."""

    name: TemplateName = Field(description="Lower-case letters, digits, '_', '.', '-'; "
                               "at most 64, starting with a letter or digit.")


@dataclass(frozen=True)
class Stored:
    """One version of a template."""

    name: str
    version: int
    subject: str | None
    text: str | None
    html: str | None
    created_at: datetime


Lookup = tuple[str, str, int | None]  # key id, name, version (None: the latest)


class TemplateStore:
    """Versions as messages name them: grouped lookups, answers kept for `ttl` seconds."""

    def __init__(self, connection: Callable[[], Any], namespace: str, ttl: float,
                 clock: Callable[[], float] = time.monotonic):
        self.connection, self.namespace, self.ttl, self.clock = connection, namespace, ttl, clock
        self._kept: OrderedDict[Lookup, tuple[Stored, float]] = OrderedDict()
        self._lookups: Coalescer[Lookup, Stored | None] = Coalescer(
            self._find, max_in_flight=LOOKUPS_IN_FLIGHT, max_size=LOOKUP_GROUP_MAX)
        # One process, started when a template is first written; writes queue for it.
        self.compiler = DeadlinePool(check_job, deadline=COMPILE_SECONDS, processes=1,
                                     name="mailbus-template-check", setup=_limit_memory)

    def close(self) -> None:
        """Stop the compiling process."""
        self.compiler.close()

    async def find(self, key_id: str, name: str, version: int | None) -> Stored | None:
        """The version (None: the latest) of a key's template; None when there is none."""
        lookup = (key_id, name, version)
        kept = self._kept.get(lookup)
        if kept is not None and self.clock() - kept[1] < self.ttl:
            self._kept.move_to_end(lookup)
            return kept[0]
        asked_at = self.clock()  # a delete committed during the lookup is seen within the TTL
        stored = await self._lookups.submit(lookup)
        if stored is None:
            self._kept.pop(lookup, None)
        elif self.ttl > 0:
            self._kept[lookup] = (stored, asked_at)
            self._kept.move_to_end(lookup)
            while len(self._kept) > CACHE_ENTRIES:
                self._kept.popitem(last=False)
        return stored

    def forget(self, key_id: str, name: str) -> None:
        """Drop what is kept of a template (this process changed it)."""
        for lookup in [k for k in self._kept if k[0] == key_id and k[1] == name]:
            del self._kept[lookup]

    async def _find(self, lookups: Sequence[Lookup]) -> list[Outcome[Stored | None]]:
        params = {"namespace": self.namespace, "key_ids": [k for k, _, _ in lookups],
                  "names": [n for _, n, _ in lookups], "versions": [v for _, _, v in lookups]}
        try:
            async with self.connection() as conn:
                rows = await (await conn.execute(SQL["find"], params)).fetchall()
        except (Problem, psycopg.OperationalError):
            return [unavailable("database unavailable") for _ in lookups]
        found = {row["i"]: _stored(row) for row in rows}
        return [found.get(i) for i in range(1, len(lookups) + 1)]


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (COMPILE_MEMORY, COMPILE_MEMORY))
    except (ImportError, ValueError, OSError):  # not on this platform, or already lower
        pass


def _stored(row: Any) -> Stored:
    return Stored(row["name"], row["version"], row["subject"], row["text"], row["html"],
                  row["created_at"])


async def resolved(store: TemplateStore | None, key: ApiKey, req: MessageRequest,
                   prefix: str = "") -> MessageRequest:
    """The request with its stored template's source filled in; 422 naming
    `template.name` or `template.version` when the key has no such template."""
    template = req.template
    if template is None or template.name is None:
        return req
    version = None if template.version in (None, "latest") else int(template.version)
    stored = None if store is None else await store.find(key.id, template.name, version)
    if stored is None:
        field, what = (("template.name", f"this key has no template '{template.name}'")
                       if version is None else
                       ("template.version", f"this key's template '{template.name}' has no "
                        f"version {version}"))
        raise invalid([{"field": prefix + field, "message": what}])
    filled = template.model_copy(update={
        "subject": stored.subject, "text": stored.text, "html": stored.html,
        "version": stored.version})
    return req.model_copy(update={"template": filled})


async def resolved_batch(store: TemplateStore | None, key: ApiKey,
                         items: Sequence[dict[str, Any]]
                         ) -> list[MessageRequest | ValidationError | Problem]:
    """Each batch item validated, or why not; the stored templates they name are looked
    up together (one query for the lot, not one round trip per item)."""
    parsed: list[MessageRequest | ValidationError | Problem] = []
    for item in items:
        try:
            parsed.append(MessageRequest.model_validate(item))
        except ValidationError as exc:
            parsed.append(exc)

    async def one(i: int, req: MessageRequest) -> MessageRequest | Problem:
        try:
            return await resolved(store, key, req, f"messages[{i}].")
        except Problem as exc:
            return exc

    named = [(i, r) for i, r in enumerate(parsed) if isinstance(r, MessageRequest)
             and r.template is not None and r.template.name is not None]
    if named:
        for (i, _), outcome in zip(named, await asyncio.gather(*(one(i, r) for i, r in named)),
                                   strict=True):
            parsed[i] = outcome
    return parsed


# The API resource.

def _store(request: Request) -> TemplateStore:
    return request.app.state.templates  # type: ignore[no-any-return]


def _not_found() -> Problem:
    return Problem(404, "not-found", "No such template")


def _params(request: Request, key: ApiKey, name: str) -> dict[str, Any]:
    require_scope(key, SCOPE)
    return {"namespace": _store(request).namespace, "key_id": key.id, "name": name}


def version_body(stored: Stored) -> dict[str, Any]:
    """A version as the API shows it."""
    return {"name": stored.name, "version": stored.version, "subject": stored.subject,
            "text": stored.text, "html": stored.html,
            "created_at": stored.created_at.isoformat()}


async def _compiled(store: TemplateStore, source: TemplateSource) -> None:
    """422 naming the part that is too large or does not compile in the sandbox in time."""
    parts = {part: getattr(source, part) for part in _PARTS}
    if sum(len(v.encode()) for v in parts.values() if v) > MAX_CONTENT_BYTES:
        raise invalid([{"field": "text", "message": f"subject, text and html exceed "
                        f"{MAX_CONTENT_BYTES} bytes"}])
    try:
        outcome = await store.compiler.run(parts)
    except Unavailable as exc:
        raise unavailable("the template compiler could not start") from exc
    if isinstance(outcome, Late):
        raise invalid([{"field": "text", "message": f"does not compile in the sandbox within "
                        f"{COMPILE_SECONDS:g} s"}])
    if outcome is not None and not isinstance(outcome, str):  # the process died
        raise invalid([{"field": "text", "message": "does not compile in the sandbox: the "
                        "compiling process died"}])
    if outcome is not None:
        part, _, reason = outcome.partition(": ")
        raise invalid([{"field": part if part in _PARTS else "text",
                        "message": f"does not compile in the sandbox: {reason}"}])


async def _write(request: Request, key: ApiKey, name: str, source: TemplateSource,
                 new: bool) -> Stored:
    """Version 1 of a new template, or the next version of an existing one."""
    params = _params(request, key, name)
    await _compiled(_store(request), source)
    size = sum(len(getattr(source, p).encode()) for p in _PARTS if getattr(source, p))
    async with _store(request).connection() as conn:
        try:
            async with conn.transaction():
                await conn.execute(SQL["lock_key"], params)
                usage = await (await conn.execute(SQL["usage"], params)).fetchone()
                if new and usage["versions"]:
                    raise invalid([{"field": "name", "message": f"this key has a template "
                                    f"'{name}' already: add a version to it"}])
                if not new and not usage["versions"]:
                    raise _not_found()
                if new and usage["names"] >= MAX_TEMPLATES:
                    raise invalid([{"field": "name", "message": f"this key has "
                                    f"{MAX_TEMPLATES} templates, the most it may"}])
                if usage["versions"] >= MAX_VERSIONS:
                    raise invalid([{"field": "name", "message": f"'{name}' has {MAX_VERSIONS}"
                                    " versions, the most it may: delete it or use a new name"}])
                if usage["bytes"] + size > MAX_KEY_BYTES:
                    raise invalid([{"field": "text", "message": f"this key's templates would "
                                    f"exceed {MAX_KEY_BYTES} bytes"}])
                row = await (await conn.execute(SQL["insert"], params | {
                    "version": usage["latest"] + 1, "subject": source.subject,
                    "text": source.text, "html": source.html})).fetchone()
        except psycopg.OperationalError as exc:
            raise unavailable("database unavailable") from exc
    _store(request).forget(key.id, name)
    return _stored(row)


def _created(stored: Stored) -> JSONResponse:
    return JSONResponse(version_body(stored), status_code=201, headers={
        "Location": f"/v1/templates/{stored.name}/versions/{stored.version}"})


NamePath = Annotated[str, Path(max_length=64)]
VersionPath = Annotated[int, Path(ge=1, le=MAX_TEMPLATE_VERSION)]


def _name(name: str) -> str:
    # A name no template can have is as absent as an unknown one.
    if not re.fullmatch(TEMPLATE_NAME_PATTERN, name):
        raise _not_found()
    return name


@router.post("/v1/templates", status_code=201)
async def create_template(request: Request, body: TemplateCreate, key: Key) -> JSONResponse:
    """Store a new template as its version 1 (compiled in the sender's sandbox first)."""
    require_scope(key, SCOPE)
    return _created(await _write(request, key, body.name, body, new=True))


@router.get("/v1/templates")
async def list_templates(request: Request, key: Key) -> dict[str, Any]:
    """This key's templates by name, each with its latest version."""
    require_scope(key, SCOPE)
    async with _store(request).connection() as conn:
        rows = await (await conn.execute(SQL["list"], {
            "namespace": _store(request).namespace, "key_id": key.id})).fetchall()
    return {"templates": [{"name": r["name"], "latest_version": r["latest_version"],
                           "versions": r["versions"], "created_at": r["created_at"].isoformat(),
                           "updated_at": r["updated_at"].isoformat()} for r in rows]}


@router.get("/v1/templates/{name}")
async def get_template(request: Request, name: NamePath, key: Key) -> dict[str, Any]:
    """The latest version of one of this key's templates, and the list of its versions."""
    params = _params(request, key, _name(name))
    async with _store(request).connection() as conn:
        rows = await (await conn.execute(SQL["versions"], params)).fetchall()
        found = await (await conn.execute(SQL["find"], {
            "namespace": params["namespace"], "key_ids": [key.id], "names": [name],
            "versions": [None]})).fetchone()
    if found is None or not rows:
        raise _not_found()
    return version_body(_stored(found)) | {"versions": [
        {"version": r["version"], "created_at": r["created_at"].isoformat()} for r in rows]}


@router.get("/v1/templates/{name}/versions/{version}")
async def get_version(request: Request, name: NamePath, version: VersionPath, key: Key
                      ) -> dict[str, Any]:
    """One version of one of this key's templates."""
    params = _params(request, key, _name(name))
    async with _store(request).connection() as conn:
        found = await (await conn.execute(SQL["find"], {
            "namespace": params["namespace"], "key_ids": [key.id], "names": [name],
            "versions": [version]})).fetchone()
    if found is None:
        raise _not_found()
    return version_body(_stored(found))


@router.post("/v1/templates/{name}/versions", status_code=201)
async def add_version(request: Request, name: NamePath, body: TemplateSource, key: Key
                      ) -> JSONResponse:
    """Update a template: store its source as the next version; earlier ones stay usable."""
    return _created(await _write(request, key, _name(name), body, new=False))


@router.delete("/v1/templates/{name}", status_code=204)
async def delete_template(request: Request, name: NamePath, key: Key) -> Response:
    """Delete every version of the template; accepted messages keep the source they had."""
    params = _params(request, key, _name(name))
    async with _store(request).connection() as conn:
        cur = await conn.execute(SQL["delete"], params)
        if cur.rowcount == 0:
            raise _not_found()
    _store(request).forget(key.id, name)
    return Response(status_code=204)
