"""Reading a request body under a cap before the app sees it, shared by the HTTP services."""

from __future__ import annotations

from starlette.types import Message, Receive, Scope


class BodyTooLarge(Exception):
    """The request declared or sent more than the cap."""


async def read_capped(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, at most `limit` bytes; None when the client went away.

    Raises BodyTooLarge as soon as Content-Length or the bytes received pass
    the cap, so a chunked upload without a length cannot make anyone read more.
    """
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and (not value.isdigit() or int(value) > limit):
            raise BodyTooLarge
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A receive channel that hands the app the body already read, then the real one."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
