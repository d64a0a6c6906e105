"""Refuse oversized request bodies before anything parses them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailbus.asgi import BodyTooLarge, read_capped, replaying
from mailbus.ingest.problems import Problem, field_path, invalid


class BodyLimit:
    """ASGI middleware: 413 when Content-Length, or the bytes actually sent, pass the cap.

    The body is read here, up to the cap, and replayed to the app: the app
    parses JSON from memory anyway, and a chunked upload without a length
    cannot make it read more than the cap.
    """

    def __init__(self, app: ASGIApp, default: int, per_path: dict[str, int] | None = None,
                 raw_paths: frozenset[str] | set[str] = frozenset()):
        self.app, self.default, self.per_path = app, default, per_path or {}
        # Paths whose body is a file's bytes, not JSON: no text check.
        self.raw_paths = raw_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.default)
        try:
            body = await read_capped(scope, receive, limit)
        except BodyTooLarge:
            await self._refuse(scope, send, limit)
            return
        if body is None:
            return  # client went away
        broken = None if scope["path"] in self.raw_paths else unpaired_surrogate(body)
        if broken is not None:
            problem = invalid([{"field": broken, "message": "must be text: an unpaired"
                                " UTF-16 surrogate escape has no character"}])
            response: Any = problem.response(scope["path"])
            await response(scope, _disconnect, send)
            return
        await self.app(scope, replaying(body, receive), send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, limit: int) -> None:
        problem = Problem(413, "too-large", "Request body too large",
                          f"the body may be at most {limit} bytes")
        response: Any = problem.response(scope["path"])
        await response(scope, _disconnect, send)


# A JSON escape of a UTF-16 surrogate (\\uD800 to \\uDFFF). Paired, two of them
# spell one character; alone, JSON parsers still give a string that no UTF-8
# encoder (Avro, PostgreSQL, the wire) accepts, deep inside the request's work.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def unpaired_surrogate(body: bytes) -> str | None:
    """The field (`to[0].name`, or `body`) holding an unpaired surrogate escape, else None.

    Only a body with a surrogate escape in it is parsed here, so the common
    request pays one scan of its bytes."""
    if _SURROGATE_ESCAPE.search(body) is None:
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the app's own parser says so, naming the body
    for loc, text in _strings(document, ()):
        try:
            text.encode()
        except UnicodeEncodeError:
            return field_path(loc)
    return None


def _strings(value: Any, loc: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
    """Every string of a JSON document with where it sits; an object's keys sit at
    the object itself (a broken key cannot name its own field)."""
    stack = [(value, loc)]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str):
            yield loc, value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield loc, key
                stack.append((item, (*loc, key)))
        elif isinstance(value, list):
            stack.extend((item, (*loc, i)) for i, item in enumerate(value))


async def _disconnect() -> Message:
    return {"type": "http.disconnect"}
