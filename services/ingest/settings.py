"""Settings of the ingest API (`MAILBUS_` environment prefix)."""

from __future__ import annotations

from pydantic import Field

from mailbus.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    """The ingest API's one settings object."""

    service_name: str = "ingest"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    # Bodies larger than these are refused before parsing (413).
    max_body_bytes: int = 1024 * 1024
    max_batch_body_bytes: int = 16 * 1024 * 1024
