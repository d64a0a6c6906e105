"""Refuse oversized request bodies before anything parses them."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await self._refuse(scope, send, limit)
                return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await self._refuse(scope, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, limit: int) -> None:
        problem = Problem(413, "too-large", "Request body too large",
                          f"the body may be at most {limit} bytes")
        response: Any = problem.response(scope["path"])
        await response(scope, _disconnect, send)


async def _disconnect() -> Message:
    return {"type": "http.disconnect"}
