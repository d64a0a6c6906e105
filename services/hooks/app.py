"""The public hooks service: action links, one-click unsubscribe (RFC 8058), open pixel.

A GET never records anything (mail scanners fetch every link); a POST records
once Kafka acknowledged the event, and answers 503 when it did not.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailbus import runtime, tokens
from mailbus.codec import Registry
from mailbus.errors import UnavailableError
from mailbus.hooks import handlers, metrics, pages
from mailbus.hooks.guard import Guard
from mailbus.hooks.handlers import Record, Route
from mailbus.hooks.limiter import RateLimiter
from mailbus.hooks.settings import HooksSettings
from mailbus.producer import AsyncProducer
from mailbus.tokens import MAX_TOKEN, Claims, Keyring, TokenError, TokenInvalid, verify

log = logging.getLogger(__name__)
Clock = Callable[[], datetime]
# Only http(s) URLs without whitespace or control characters are followed after
# a click, whatever a token says (the sender signs https URLs only).
_REDIRECT = re.compile(r"https?://[^\s\x00-\x1f\x7f]+")
# Percent-encode what cannot travel in a Location header (non-ASCII, as UTF-8);
# printable ASCII, existing escapes included, stays as signed.
_LOCATION_SAFE = "".join(map(chr, range(0x21, 0x7f)))


def load_keyring(settings: HooksSettings) -> Keyring:
    """The sender's link keyring; the local stack makes it on first use, like the sender."""
    assert settings.link_keys_file is not None
    return tokens.load_keyring(settings.link_keys_file, create=settings.env == "local")


def server_config(settings: HooksSettings, keyring: Keyring) -> uvicorn.Config:
    """How uvicorn serves the app, shared by `mailbus hooks` and the tests."""
    return uvicorn.Config(
        create_app(settings, keyring), host=settings.host, port=settings.port,
        log_level=settings.log_level.lower(), access_log=False,
        # uvicorn's lines go through the process's handler: text or JSON as configured.
        log_config=None,
        # X-Forwarded-For is read by the Guard, from trusted proxies only; and
        # the access log would write bearer tokens and addresses.
        proxy_headers=False, server_header=False, lifespan="on",
    )


def create_app(settings: HooksSettings, keyring: Keyring, clock: Clock | None = None
               ) -> FastAPI:
    """Build the app; the producer opens in its lifespan, not here."""
    now = clock or (lambda: datetime.now(UTC))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.producer = AsyncProducer(runtime.producer_config(settings))
        app.state.registry = Registry.load()
        log.info("hooks ready: open tracking %s, %d trusted prox(ies)",
                 "on" if settings.open_tracking else "off", len(settings.trusted_proxies))
        try:
            yield
        finally:
            left = app.state.producer.close()
            if left:
                log.error("shutdown: %d event(s) still unacknowledged", left)

    app = FastAPI(title="mailbus hooks", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(Guard, limiter=RateLimiter(settings.rate_per_minute, settings.rate_burst,
                                                  settings.rate_max_addresses),
                       proxies=settings.trusted_proxies, max_body=settings.max_body_bytes)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return _html(pages.error(exc.status_code, dict(exc.headers or {})))

    async def invalid_request(request: Request, exc: Exception) -> Response:
        return _html(pages.error(400))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)

    def claims_of(token: str, route: Route) -> Claims | Response:
        try:
            if len(token) > MAX_TOKEN:
                raise TokenInvalid("token is too long")
            claims = verify(keyring, token, now=now())
            handlers.check_route(claims, route)
        except TokenError as exc:
            refusal = handlers.refusal(exc)
            reason = "too_long" if len(token) > MAX_TOKEN else refusal.reason
            metrics.REFUSED.labels(reason).inc()
            return _html(pages.refused(refusal.status))
        return claims

    async def record(request: Request, records: list[Record]) -> Response | None:
        """Produce and await every ack; a 503 page when Kafka did not take them all."""
        producer: AsyncProducer = request.app.state.producer
        registry: Registry = request.app.state.registry
        results = await asyncio.gather(
            *(producer.produce(settings.kafka.topic(r.topic), registry.encode(r.topic, r.value),
                               key=r.key) for r in records),
            return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for exc in failed:
            if not isinstance(exc, UnavailableError):
                raise exc
        if failed:
            metrics.UNAVAILABLE.inc()
            log.warning("not recorded, Kafka unavailable: %s", failed[0])
            return _html(pages.unavailable(settings.unavailable_retry_seconds))
        kind = records[-1].value["kind"]
        metrics.RECORDED.labels(kind).inc()
        log.debug("recorded %s for message %s", kind, records[-1].value["message_id"])
        return None

    @app.get("/a/{token}")
    async def action_page(token: str) -> Response:
        """The choice and a button; records nothing."""
        claims = claims_of(token, "action")
        if isinstance(claims, Response):
            return claims
        url = claims.url if claims.url is not None and _REDIRECT.fullmatch(claims.url) else None
        return _html(pages.confirm_action(token, claims.action, url))

    @app.post("/a/{token}")
    async def action_click(request: Request, token: str) -> Response:
        """Record the click, then follow the URL signed into the token, if any."""
        claims = claims_of(token, "action")
        if isinstance(claims, Response):
            return claims
        failed = await record(request, [handlers.response(claims, "action", now=now())])
        if failed is not None:
            return failed
        if claims.url is not None and _REDIRECT.fullmatch(claims.url):
            return Response(status_code=303,
                            headers={"Location": quote(claims.url, safe=_LOCATION_SAFE)})
        return _html(pages.action_recorded(claims.action))

    @app.get("/u/{token}")
    async def unsubscribe_page(token: str) -> Response:
        """The address and an unsubscribe button; records nothing."""
        claims = claims_of(token, "unsubscribe")
        if isinstance(claims, Response):
            return claims
        return _html(pages.confirm_unsubscribe(token, handlers.unsubscriber(claims)))

    @app.post("/u/{token}")
    async def unsubscribe(request: Request, token: str) -> Response:
        """RFC 8058 one-click (body List-Unsubscribe=One-Click) and the page's button alike."""
        claims = claims_of(token, "unsubscribe")
        if isinstance(claims, Response):
            return claims
        failed = await record(request, handlers.unsubscribe(claims, now=now()))
        return failed or _html(pages.unsubscribed(handlers.unsubscriber(claims)))

    @app.get("/o/{token}")
    async def open_pixel(request: Request, token: str) -> Response:
        """A 1x1 GIF; each load records an unreliable open (one event id per recipient)."""
        if not settings.open_tracking:
            return _html(pages.error(404))
        claims = claims_of(token, "open")
        if isinstance(claims, Response):
            return claims
        failed = await record(request, [handlers.response(claims, "open", now=now())])
        return failed or Response(pages.PIXEL, media_type="image/gif")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """The process is up."""
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """The broker answers this service's producer."""
        producer: AsyncProducer = request.app.state.producer
        kafka = await asyncio.to_thread(producer.reachable, 2.0)
        return JSONResponse({"status": "ok" if kafka else "unavailable", "kafka": kafka},
                            status_code=200 if kafka else 503,
                            headers={} if kafka else {"Retry-After": "5"})

    return app


def _html(page: pages.Page) -> HTMLResponse:
    return HTMLResponse(page.html, status_code=page.status, headers=page.headers)


def build(settings: HooksSettings) -> runtime.Service:
    """The hooks service wired from its settings; the producer opens when it serves."""
    keyring = load_keyring(settings)
    return runtime.Service(settings, {"producer": runtime.producer_config(settings)},
                           partial(_serve, settings, keyring))


def _serve(settings: HooksSettings, keyring: Keyring) -> None:
    runtime.metrics_server(settings.metrics_host, settings.metrics_port)
    # uvicorn turns SIGTERM into a graceful shutdown; the lifespan then flushes the producer.
    uvicorn.Server(server_config(settings, keyring)).run()


def main(settings: HooksSettings | None = None) -> None:
    """`mailbus hooks`: serve the links and the metrics until SIGTERM or SIGINT."""
    runtime.start(HooksSettings, build, settings)
