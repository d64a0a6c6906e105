"""Serve the ingest API for a benchmark: `serve.py mailbus|baseline|bare`."""

from __future__ import annotations

import sys
import uuid
from typing import Any

import uvicorn
from confluent_kafka import Message, Producer
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from mailbus.errors import UnavailableError
from mailbus.ingest.app import server_config
from mailbus.ingest.models import MessageRequest
from mailbus.ingest.settings import IngestSettings
from mailbus.ingest.workers import run
from mailbus.producer import PRODUCER_DEFAULTS


class PerRequestProducer:
    """The baseline: a new producer per event, flushed at once (connect, auth, send, close)."""

    def __init__(self, config: dict[str, Any]):
        self._config = {**PRODUCER_DEFAULTS, **config}

    async def produce(self, topic: str, value: bytes, key: bytes | None = None,
                      headers: Any = None) -> Message:
        import asyncio

        def send() -> Message:
            producer = Producer(self._config)
            out: list[tuple[Any, Message]] = []
            producer.produce(topic, value=value, key=key,
                             on_delivery=lambda err, msg: out.append((err, msg)))
            producer.flush(10)
            if not out or out[0][0] is not None:
                raise UnavailableError(f"kafka: {out[0][0] if out else 'no delivery report'}")
            return out[0][1]

        return await asyncio.to_thread(send)

    def reachable(self, timeout: float = 2.0) -> bool:
        return bool(Producer(self._config).list_topics(timeout=timeout))

    def close(self, timeout: float = 10.0) -> int:
        return 0


def bare_app() -> FastAPI:
    """The floor: parse and validate the same body with the same model, answer 202.

    No key, no rate, no database, no Kafka: what the framework and the
    request model cost on their own.
    """
    app = FastAPI()

    @app.post("/v1/messages", status_code=202)
    async def send_message(req: MessageRequest) -> JSONResponse:
        return JSONResponse({"id": str(uuid.uuid4()), "status": "queued"}, status_code=202)

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    variant = sys.argv[1]
    settings = IngestSettings()
    if variant == "bare":
        config = server_config(settings)
        # The same server settings as the service, around the bare app.
        config.app = bare_app()
        uvicorn.Server(config).run()
        return
    if variant == "baseline":
        uvicorn.Server(server_config(settings, PerRequestProducer)).run()  # type: ignore[arg-type]
        return
    run(settings)  # as `mailbus ingest` does: MAILBUS_INGEST_WORKERS processes


if __name__ == "__main__":
    main()
