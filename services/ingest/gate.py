"""Who may send a body at all: authentication and the request rate, from the headers alone.

An ASGI layer in front of the body cap: a request to `/v1/...` without a
valid key, or over its key's rate, is answered before a byte of its body is
read, so a stranger cannot make the API read or parse megabytes. The key it
found travels on in the scope for the routes' `Key` dependency.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailbus.ingest.problems import Problem, rate_limited
from mailbus.ingest.rates import KeyRates

STATE_KEY = "api_key"


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    for name, value in headers:
        if name == b"authorization":
            text = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
            return None
    return None


class Gate:
    """ASGI middleware: 401 or 429 for `/v1/...` before the body is read."""

    def __init__(self, app: ASGIApp, rates: KeyRates):
        self.app, self.rates = app, rates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        ingestor = scope["app"].state.ingestor
        try:
            key = await ingestor.authenticate(bearer_token(scope.get("headers", [])))
            wait = self.rates.hit(key.id, key.rate_limit)
            if wait:
                raise rate_limited(wait)
        except Problem as exc:
            response: Any = exc.response(scope["path"])
            await response(scope, _disconnect, send)
            return
        scope.setdefault("state", {})[STATE_KEY] = key
        await self.app(scope, receive, send)


async def _disconnect() -> Message:
    return {"type": "http.disconnect"}
