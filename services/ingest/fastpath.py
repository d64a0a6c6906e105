"""`POST /v1/messages` answered below FastAPI's routing: the single-message hot path.

An ASGI layer inside the Gate and the body cap (app.py mounts it as the
innermost middleware), so a request reaching it has had its key checked, its
rate counted and its body read under the cap by the same layers as every
other route. For exactly `POST /v1/messages` with a JSON body it then does
what the FastAPI route does (both call accept.one), without the framework's
request objects, routing and dependency solving (three fifths of a request's
time under load): the body validated by `MessageRequest.model_validate_json`,
the scope, the Idempotency-Key, the claim, cross-field rules and routing,
the group commit, and the same answer (202 with `Location`, or the Problem).

Whatever it does not answer goes to FastAPI unchanged, the body it read
replayed: every other route, a body whose Content-Type is not plainly
`application/json`, and every body that does not validate. So each
validation error is rendered by the route's own machinery, byte for byte
as before (FastAPI parses with `json.loads`, which accepts a few documents
pydantic's parser refuses, UTF-16 or a BOM; those are answered by FastAPI
too), and the fast path only ever accepts what the
route would accept. The route stays declared, so OpenAPI describes it.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailbus.asgi import replaying
from mailbus.ingest import accept
from mailbus.ingest.gate import STATE_KEY
from mailbus.ingest.handlers import ApiKey
from mailbus.ingest.models import MessageRequest
from mailbus.ingest.problems import Problem

PATH = "/v1/messages"
METHOD = "POST"
_IDEMPOTENCY_HEADER = b"idempotency-key"


class FastPath:
    """ASGI middleware: `POST /v1/messages` with a valid JSON body, without FastAPI."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._route: Any = None  # FastAPI's route of PATH, for the metrics' label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] != PATH or scope["method"] != METHOD):
            await self.app(scope, receive, send)
            return
        key = scope.get("state", {}).get(STATE_KEY)
        idempotency_key, json_body = _headers(scope["headers"])
        if not isinstance(key, ApiKey) or not json_body:
            await self.app(scope, receive, send)
            return
        body = await _body(receive)
        if body is None:
            return  # the client went away
        try:
            req = MessageRequest.model_validate_json(body)
        except ValidationError:
            # The route answers it (and every other error of its body) itself.
            await self.app(scope, replaying(body, receive), send)
            return
        scope["route"] = self._route or self._find_route(scope)
        try:
            state = scope["app"].state
            status, answer = await accept.one(state.ingestor, key, req, idempotency_key,
                                              state.templates)
        except Problem as exc:
            response: Any = exc.response(scope["path"])
        else:
            response = JSONResponse(answer, status_code=status,
                                    headers={"Location": f"{PATH}/{answer.get('id')}"})
        await response(scope, receive, send)

    def _find_route(self, scope: Scope) -> Any:
        for candidate in scope["app"].router.routes:
            if getattr(candidate, "path", None) == PATH and METHOD in getattr(
                    candidate, "methods", ()):
                self._route = candidate
                return candidate
        raise LookupError(f"no route {METHOD} {PATH} is declared")


def _headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, bool]:
    """(the Idempotency-Key, whether the body is declared JSON as FastAPI reads it).

    FastAPI parses a body as JSON only under a JSON Content-Type (strictly:
    none at all is not JSON); here only `application/json` (any parameters,
    any case) is taken, everything else is left to FastAPI, and so is a
    header given twice.
    """
    idempotency_key: str | None = None
    content_type: bytes | None = None
    seen_idem = seen_type = False
    for name, value in headers:
        if name == _IDEMPOTENCY_HEADER:
            if seen_idem:
                return None, False
            seen_idem, idempotency_key = True, value.decode("latin-1")
        elif name == b"content-type":
            if seen_type:
                return None, False
            seen_type, content_type = True, value
    json_body = content_type is not None and (
        content_type.split(b";", 1)[0].strip().lower() == b"application/json")
    return idempotency_key, json_body


async def _body(receive: Receive) -> bytes | None:
    """The whole body (the cap in front has read it already), None when the client left."""
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
