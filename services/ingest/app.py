"""The ingest API: FastAPI routes, thin; decisions in handlers, I/O in service."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailbus import topics
from mailbus.accounts import load_accounts
from mailbus.codec import Registry
from mailbus.db import open_pool
from mailbus.ingest import accept, attachment_rules, attachments, metrics, openapi, problems
from mailbus.ingest.auth import Key
from mailbus.ingest.cancel import router as cancel_router
from mailbus.ingest.fastpath import FastPath
from mailbus.ingest.gate import Gate
from mailbus.ingest.handlers import (
    request_digest,
    require_scope,
)
from mailbus.ingest.limits import BodyLimit
from mailbus.ingest.models import BatchRequest, MessageRequest
from mailbus.ingest.problems import Problem, invalid
from mailbus.ingest.rates import KeyRates
from mailbus.ingest.responses import router as responses_router
from mailbus.ingest.retention import prune_forever
from mailbus.ingest.service import Ingestor, Planned
from mailbus.ingest.settings import IngestSettings
from mailbus.ingest.status import router as status_router
from mailbus.ingest.templates import TemplateStore, resolved_batch
from mailbus.ingest.templates import router as templates_router
from mailbus.ingest.webhooks import router as webhooks_router
from mailbus.ingest.workers import exposition, producer_config, server_options
from mailbus.producer import AsyncProducer
from mailbus.reload import AccountsReloader

log = logging.getLogger(__name__)


def server_config(settings: IngestSettings, producer_factory: ProducerFactory | None = None
                  ) -> uvicorn.Config:
    """How uvicorn serves the app in this process, for `mailbus ingest`, the tests and the
    benchmarks (several workers: workers.py)."""
    return uvicorn.Config(create_app(settings, producer_factory), **server_options(settings))


ProducerFactory = Callable[[dict[str, Any]], AsyncProducer]


def create_app(settings: IngestSettings, producer_factory: ProducerFactory | None = None
               ) -> FastAPI:
    """Build the app; connections open in its lifespan, not here.

    `producer_factory` lets a benchmark put another producer behind the same
    API; the service itself always uses one shared AsyncProducer.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        assert settings.accounts_file is not None
        directory = load_accounts(settings.accounts_file)
        registry = Registry.load()
        pool = open_pool(settings.postgres)
        await pool.open(wait=False)
        producer = (producer_factory or AsyncProducer)(producer_config(settings))
        app.state.ingestor = ingestor = Ingestor(
            pool, producer, registry, directory, settings.kafka.topic(topics.REQUESTED),
            settings.idempotency_retention_seconds, settings.group_commits_in_flight,
            settings.group_commit_max, settings.key_cache_seconds)
        # Stored templates a message names, looked up in groups and kept as keys are.
        app.state.templates = TemplateStore(ingestor.connection, settings.kafka.topic_prefix,
                                            settings.key_cache_seconds)
        pruner = asyncio.create_task(prune_forever(
            ingestor, settings.idempotency_prune_seconds, settings.idempotency_prune_batch))
        # A request routes with whichever directory is in force when it starts:
        # the swap is one assignment, never half an edit.
        reloader = AccountsReloader(settings.accounts_file, directory,
                                    partial(setattr, ingestor, "directory"), service="ingest",
                                    poll_seconds=settings.accounts_poll_seconds)
        reloader.start()
        log.info("ingest ready: %d account(s), topic %s", len(directory),
                 settings.kafka.topic(topics.REQUESTED))
        try:
            yield
        finally:
            await reloader.stop()
            pruner.cancel()
            app.state.templates.close()
            await ingestor.drain()
            left = producer.close()
            if left:
                log.error("shutdown: %d event(s) still unacknowledged", left)
            await pool.close()

    app = FastAPI(
        title="mailbus API", version="1", lifespan=lifespan,
        description="Send email through mailbus. Errors are RFC 9457 problem+json.",
    )
    app.add_exception_handler(Problem, problems.problem_handler)
    app.add_exception_handler(RequestValidationError, problems.validation_handler)
    app.add_exception_handler(StarletteHTTPException, problems.http_handler)
    app.add_exception_handler(Exception, problems.unexpected_handler)
    # Innermost: POST /v1/messages answered below FastAPI's routing (fastpath.py).
    app.add_middleware(FastPath)
    app.add_middleware(BodyLimit, default=settings.max_body_bytes, per_path={
        "/v1/messages/batch": settings.max_batch_body_bytes,
        # Files: inline (base64) in a message, raw to the upload (attachment_rules.py).
        "/v1/messages": settings.max_body_bytes + attachment_rules.INLINE_BODY_BYTES,
        attachments.PATH: attachment_rules.MAX_FILE_BYTES}, raw_paths={attachments.PATH})
    # Outside the body cap: a request without a valid key, or over its rate,
    # is answered before its body is read.
    app.add_middleware(Gate, rates=KeyRates(settings.rate_limit))
    app.add_middleware(Observe)
    # Timelines, listings and reports read the projection of this namespace.
    app.state.namespace = settings.kafka.topic_prefix
    app.state.webhooks_allow_http = settings.webhooks_allow_http
    app.state.webhooks_max_endpoints = settings.webhooks_max_endpoints
    _routes(app)
    app.include_router(status_router)
    app.include_router(responses_router)
    app.include_router(webhooks_router)
    app.include_router(cancel_router)
    app.include_router(templates_router)
    app.include_router(attachments.router)
    openapi.install(app)
    return app


class Observe:
    """ASGI middleware: request metrics by route, and headers every answer carries.

    A plain ASGI layer rather than `@app.middleware("http")`, whose task
    group and memory streams cost a tenth of a request's time under load.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *_EVERY_ANSWER]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(path, scope["method"], str(status)).inc()
            metrics.REQUEST_SECONDS.labels(path).observe(time.perf_counter() - start)


_EVERY_ANSWER = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))


def _ingestor(request: Request) -> Ingestor:
    return request.app.state.ingestor  # type: ignore[no-any-return]


IdemHeader = Annotated[str | None, Header(alias="Idempotency-Key")]


def _routes(app: FastAPI) -> None:
    @app.post("/v1/messages", status_code=202, tags=["messages"])
    async def send_message(request: Request, req: MessageRequest, key: Key,
                           idempotency_key: IdemHeader = None) -> JSONResponse:
        """Accept one message; 202 only once Kafka holds its event."""
        status, body = await accept.one(_ingestor(request), key, req, idempotency_key,
                                        request.app.state.templates)
        return JSONResponse(body, status_code=status,
                            headers={"Location": f"/v1/messages/{body.get('id')}"})

    @app.post("/v1/messages/batch", status_code=202, tags=["messages"])
    async def send_batch(request: Request, batch: BatchRequest, key: Key,
                         idempotency_key: IdemHeader = None) -> JSONResponse:
        """Accept up to 1,000 messages, each validated on its own; answers per item."""
        require_scope(key, "send")
        idem = accept.idempotency(idempotency_key)
        ing = _ingestor(request)
        digest = request_digest(batch.messages)
        generation = await ing.claim(key, idem, digest) if idem else None
        results: list[dict[str, Any]] = []
        planned: list[Planned] = []
        items = await resolved_batch(request.app.state.templates, key, batch.messages)
        for i, req in enumerate(items):
            prefix = f"messages[{i}]."
            try:
                if not isinstance(req, MessageRequest):
                    raise req
                planned.append(accept.plan(ing, key, req, idem, generation, i, prefix))
                results.append({"index": i, "id": planned[-1].message_id, "status": "queued"})
            except ValidationError as exc:
                errors = problems.from_pydantic(exc.errors(), prefix)
                results.append({"index": i, "status": "rejected", "error": invalid(errors).body()})
            except Problem as exc:
                results.append({"index": i, "status": "rejected", "error": exc.body()})
        if any(p.request.attachments for p in planned):
            planned = await _store_files(ing, key, planned, results)
        rejected = len(results) - len(planned)
        if rejected:
            metrics.REJECTED.labels("validation").inc(rejected)
        summary = {"accepted": len(planned), "rejected": rejected, "results": results}
        if not planned:
            return JSONResponse(summary, status_code=422)

        def respond(ids: list[str]) -> tuple[int, dict[str, Any]]:
            return 202, summary

        status, body = await ing.accept(key, planned, idem, digest, respond, generation)
        return JSONResponse(body, status_code=status)

    async def _store_files(ing: Ingestor, key: Any, planned: list[Planned],
                           results: list[dict[str, Any]]) -> list[Planned]:
        """A batch's files stored in one transaction (a file many items name, once); the
        items whose files were refused become rejected results."""
        by_id = {r["id"]: r for r in results if r["status"] == "queued"}
        kept = []
        refusals = await attachments.store(
            ing, key, planned, [f"messages[{by_id[p.message_id]['index']}]." for p in planned])
        for p, refused in zip(planned, refusals, strict=True):
            if refused is None:
                kept.append(p)
                continue
            result = by_id[p.message_id]
            result.pop("id")
            result.update(status="rejected", error=refused.body())
        return kept

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """Kafka and PostgreSQL both answer."""
        ing = _ingestor(request)
        kafka = await asyncio.to_thread(ing.producer.reachable, 2.0)
        db = await ing.database_ok()
        ok = kafka and db
        body = {"status": "ok" if ok else "unavailable", "kafka": kafka, "postgres": db}
        return JSONResponse(body, status_code=200 if ok else 503,
                            headers={} if ok else {"Retry-After": "5"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus exposition."""
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
