"""Refuse oversized request bodies before anything parses them."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailbus.asgi import BodyTooLarge, read_capped, replaying
from mailbus.ingest.problems import Problem


class BodyLimit:
    """ASGI middleware: 413 when Content-Length, or the bytes actually sent, pass the cap.

    The body is read here, up to the cap, and replayed to the app: the app
    parses JSON from memory anyway, and a chunked upload without a length
    cannot make it read more than the cap.
    """

    def __init__(self, app: ASGIApp, default: int, per_path: dict[str, int] | None = None):
        self.app, self.default, self.per_path = app, default, per_path or {}

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
        await self.app(scope, replaying(body, receive), send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, limit: int) -> None:
        problem = Problem(413, "too-large", "Request body too large",
                          f"the body may be at most {limit} bytes")
        response: Any = problem.response(scope["path"])
        await response(scope, _disconnect, send)


async def _disconnect() -> Message:
    return {"type": "http.disconnect"}
