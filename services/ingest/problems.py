"""RFC 9457 problem details: every error the API answers, naming the field at fault."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"
# Problem types are relative URIs documented in docs/api.md.
TYPE_BASE = "/problems/"


class Problem(Exception):
    """An error answer: raised anywhere in a request, rendered as problem+json."""

    def __init__(
        self, status: int, slug: str, title: str, detail: str | None = None,
        errors: Sequence[dict[str, str]] = (), headers: dict[str, str] | None = None,
    ):
        super().__init__(title)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.errors = list(errors)
        self.headers = headers or {}

    def body(self, instance: str | None = None) -> dict[str, Any]:
        """The problem document."""
        doc: dict[str, Any] = {"type": TYPE_BASE + self.slug, "title": self.title,
                               "status": self.status}
        if self.detail:
            doc["detail"] = self.detail
        if instance:
            doc["instance"] = instance
        if self.errors:
            doc["errors"] = self.errors
        return doc

    def response(self, instance: str | None = None) -> JSONResponse:
        """The problem as an HTTP response."""
        return JSONResponse(self.body(instance), status_code=self.status,
                            media_type=MEDIA_TYPE, headers=self.headers)


def field_path(loc: Iterable[Any]) -> str:
    """Pydantic's location tuple as the client wrote it: `to[0].email`."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header"):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + ("from" if part == "from_" else str(part))
    return out or "body"


def invalid(errors: Sequence[dict[str, str]], detail: str | None = None) -> Problem:
    """422 for a request that breaks the contract; `errors` names each field."""
    first = errors[0]["field"] if errors else "body"
    return Problem(422, "validation", "Request is not valid",
                   detail or f"{first}: {errors[0]['message']}" if errors else detail, errors)


def from_pydantic(raw_errors: Sequence[Any], prefix: str = "") -> list[dict[str, str]]:
    """Pydantic errors as [{field, message}], messages free of the input echoed back."""
    out = []
    for err in raw_errors:
        path = field_path(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        out.append({"field": f"{prefix}{path}" if prefix else path, "message": msg})
    return out


def unavailable(detail: str, retry_after: int = 5) -> Problem:
    """503 with Retry-After: a dependency is down and nothing was accepted."""
    return Problem(503, "unavailable", "Service temporarily unavailable", detail,
                   headers={"Retry-After": str(retry_after)})


def rate_limited(retry_after: int) -> Problem:
    """429 with Retry-After: the key made more requests than its rate allows."""
    return Problem(429, "rate-limited", "Too many requests",
                   f"this API key's request rate is used up; retry in {retry_after} s",
                   headers={"Retry-After": str(retry_after)})


def unauthorized() -> Problem:
    """401 with the Bearer challenge: no key, or not a valid one."""
    return Problem(401, "unauthorized", "Unauthorized", "a valid API key is required",
                   headers={"WWW-Authenticate": 'Bearer realm="mailbus"'})


async def problem_handler(request: Request, exc: Exception) -> JSONResponse:
    """Render a raised Problem."""
    assert isinstance(exc, Problem)
    return exc.response(request.url.path)


async def validation_handler(request: Request, exc: Exception) -> JSONResponse:
    """Render FastAPI's own request validation failures as problem+json."""
    assert isinstance(exc, RequestValidationError)
    errors = from_pydantic(exc.errors())
    return invalid(errors).response(request.url.path)


async def http_handler(request: Request, exc: Exception) -> JSONResponse:
    """Render Starlette's HTTP errors (404 route, 405 method, 400 body) as problem+json."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # FastAPI's "error parsing the body" (not UTF-8, not JSON): the body is
        # what breaks the contract, as for any other invalid request.
        return invalid([{"field": "body", "message": "must be a JSON document in UTF-8"}]
                       ).response(request.url.path)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names the methods of the first route matching the path;
        # a path served by several routes allows all of theirs.
        given = {m.strip() for m in headers.get("Allow", "").split(",") if m.strip()}
        headers["Allow"] = ", ".join(sorted(given | allowed_methods(request)))
    slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    return Problem(exc.status_code, slug, str(exc.detail), headers=headers
                   ).response(request.url.path)


def _leaves(routes: Iterable[Any]) -> Iterator[Any]:
    for candidate in routes:
        included = getattr(candidate, "original_router", None)  # FastAPI's include_router
        if included is not None:
            yield from _leaves(included.routes)
        else:
            yield candidate


def allowed_methods(request: Request) -> set[str]:
    """Every method some route serves at the request's path."""
    methods: set[str] = set()
    for candidate in _leaves(request.app.router.routes):
        match, _ = candidate.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= set(getattr(candidate, "methods", None) or ())
    return methods


async def unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    """500 as problem+json; the cause goes to the log, never to the client."""
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Problem(500, "internal", "Internal error").response(request.url.path)
