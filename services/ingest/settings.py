"""Settings of the ingest API (`MAILBUS_` environment prefix)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from mailbus.errors import ConfigError
from mailbus.ingest.rates import parse_rate
from mailbus.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    """The ingest API's one settings object."""

    service_name: str = "ingest"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    # Bodies larger than these are refused before parsing (413).
    max_body_bytes: int = 1024 * 1024
    max_batch_body_bytes: int = 16 * 1024 * 1024
    # Requests per API key, a moving window in the `limits` notation; a key's
    # own `rate_limit` overrides it. Counted per process (see rates.py).
    rate_limit: str = "100/second"
    # How long an Idempotency-Key is remembered (Stripe keeps them 24 h):
    # within it a retry replays the answer, after it the key is new again.
    idempotency_retention_seconds: int = Field(default=86_400, ge=1, le=90 * 86_400)
    # How often this process deletes expired records, and how many per
    # statement (short statements: a backlog never holds many row locks).
    idempotency_prune_seconds: float = Field(default=300.0, gt=0, le=86_400)
    idempotency_prune_batch: int = Field(default=1000, ge=1, le=100_000)
    # How long each process keeps an API key it read: a revocation, or a
    # changed scope or rate, takes effect within this time. 0 (the default):
    # every request reads its key, and changes take effect at once.
    key_cache_seconds: float = Field(default=0.0, ge=0, le=60)
    # Worker processes accepting on the one port (workers.py). Each keeps its
    # own request-rate windows: a key may make up to this many times its rate.
    ingest_workers: int = Field(default=1, ge=1, le=64)
    # Group commit of single-message requests: how many transactions may be
    # under way at once (each holds a pooled connection), and the most
    # requests one may carry. Requests arriving while all are busy wait and
    # go together in the next.
    group_commits_in_flight: int = Field(default=2, ge=1, le=64)
    group_commit_max: int = Field(default=256, ge=1, le=1000)
    # Webhook endpoints with a plain http:// URL (local use; production refuses it).
    webhooks_allow_http: bool = False
    # Endpoints one key may register.
    webhooks_max_endpoints: int = Field(default=20, ge=1, le=1000)

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str) -> str:
        parse_rate(value)
        return value

    @model_validator(mode="after")
    def _production(self) -> IngestSettings:
        if self.env == "production" and self.webhooks_allow_http:
            raise ConfigError(
                "webhooks_allow_http (MAILBUS_WEBHOOKS_ALLOW_HTTP) must be false in production")
        return self
