"""The ASGI layer every request passes: rate limit, body cap, security headers, metrics.

It sits around the whole app so that its headers are on every answer, the
framework's own errors and unexpected failures included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailbus.asgi import BodyTooLarge, read_capped, replaying
from mailbus.hooks import metrics, pages
from mailbus.hooks.limiter import Network, RateLimiter, limiter_key, retry_after, source_address

log = logging.getLogger(__name__)
_SECURITY = [(k.lower().encode(), v.encode()) for k, v in pages.SECURITY_HEADERS]
_DROPPED = {name for name, _ in _SECURITY} | {b"set-cookie", b"server"}
_CSP = b"content-security-policy"
_METHODS = frozenset({"GET", "HEAD", "POST"})
_UNLIMITED = frozenset({"/healthz", "/readyz"})


def route_label(path: str) -> str:
    """A bounded metrics label for a request path."""
    for prefix in ("/a/", "/u/", "/o/"):
        if path.startswith(prefix):
            return prefix + "{token}"
    return path if path in _UNLIMITED else "other"


async def send_page(send: Send, page: pages.Page) -> None:
    """Answer with a page straight from the ASGI layer."""
    body = page.html.encode()
    headers = [(b"content-type", b"text/html; charset=utf-8"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in page.headers.items()]
    await send({"type": "http.response.start", "status": page.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Wraps the app: refuses early what it can, and stamps every response."""

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter, proxies: Sequence[Network],
                 max_body: int, clock: Callable[[], float] = time.monotonic):
        self.app, self.limiter, self.proxies = app, limiter, list(proxies)
        self.max_body, self.clock = max_body, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = route_label(scope["path"])
        method = scope["method"] if scope["method"] in _METHODS else "other"
        status = 500
        started = False

        async def stamped(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                given = list(message.get("headers", ()))
                # A page may widen form-action to its signed redirect's origin
                # (pages.csp); every other security header is always the guard's.
                own = [(k, v) for k, v in given if k.lower() == _CSP and
                       v.decode("latin-1").startswith("default-src 'none'; form-action 'self'")]
                headers = [(k, v) for k, v in given if k.lower() not in _DROPPED]
                security = [(k, v) for k, v in _SECURITY if not (own and k == _CSP)]
                message = {**message, "headers": headers + own[:1] + security}
            await send(message)

        try:
            if route not in _UNLIMITED and not await self._allowed(scope, stamped):
                return
            try:
                body = await read_capped(scope, receive, self.max_body)
            except BodyTooLarge:
                await send_page(stamped, pages.error(413))
                return
            if body is None:
                return  # the client went away
            await self.app(scope, replaying(body, receive), stamped)
        except Exception:
            log.exception("unexpected error answering %s %s", method, route)
            if not started:
                await send_page(stamped, pages.error(500))
        finally:
            metrics.REQUESTS.labels(route, method, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - start)

    async def _allowed(self, scope: Scope, send: Send) -> bool:
        peer = scope.get("client")
        forwarded = [v.decode("latin-1") for k, v in scope.get("headers", ())
                     if k == b"x-forwarded-for"]
        source = source_address(peer[0] if peer else None, forwarded, self.proxies)
        wait = self.limiter.take(limiter_key(source), self.clock())
        metrics.TRACKED_ADDRESSES.set(len(self.limiter))
        if not wait:
            return True
        metrics.RATE_LIMITED.inc()
        await send_page(send, pages.rate_limited(retry_after(wait)))
        return False
