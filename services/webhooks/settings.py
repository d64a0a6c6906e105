"""Settings of the webhooks service (`MAILBUS_` environment prefix)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, IPvAnyNetwork, model_validator

from mailbus.errors import ConfigError
from mailbus.settings import ServiceSettings
from mailbus.webhook_guard import Policy
from mailbus.webhooks.rules import DEFAULT_SCHEDULE

DAY_SECONDS = 86400


class WebhooksSettings(ServiceSettings):
    """The webhooks service's one settings object."""

    service_name: str = "webhooks"
    group_id: str = "mailbus-webhooks"
    # Events read from Kafka per batch, and how long a poll waits.
    batch_size: int = Field(default=500, ge=1, le=10_000)
    poll_seconds: float = Field(default=0.5, gt=0)
    # How often the dispatcher looks for due deliveries.
    dispatch_seconds: float = Field(default=0.5, gt=0)
    # Endpoints delivered to at once; each has one delivery in flight at most.
    max_endpoints_in_flight: int = Field(default=64, ge=1, le=10_000)
    # Deliveries an endpoint's worker claims at once (oldest events first).
    claim_batch: int = Field(default=20, ge=1, le=1000)
    # Wall time of one attempt: resolve, connect, TLS, request, answer.
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Of the answer, at most this much is read (the rest is never downloaded).
    max_response_bytes: int = Field(default=65536, ge=1024, le=10_485_760)
    # Seconds to wait after each failed attempt; after the last, the delivery
    # has failed. Production refuses a schedule shorter than a day.
    retry_schedule_seconds: list[float] = Field(
        default_factory=lambda: list(DEFAULT_SCHEDULE), min_length=1, max_length=50)
    # Settled deliveries (delivered or given up) and their attempts are
    # deleted this many days after they settled, checked every prune_seconds.
    retention_days: int = Field(default=30, ge=1, le=3650)
    prune_seconds: float = Field(default=300.0, gt=0, le=86_400)
    # Plain http:// endpoints (local use; production refuses it).
    allow_http: bool = False
    # Non-public networks webhooks may reach anyway (JSON list of CIDRs);
    # the local stack allows loopback.
    allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list, max_length=256)
    # Extra CA to verify endpoints' certificates with (the system's CAs otherwise).
    ca_file: Path | None = None
    # Prometheus metrics on http://metrics_host:metrics_port/metrics; 0 disables.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9106, ge=0, le=65535)
    # How often the group's consumer lag and the pending deliveries are measured.
    lag_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _production(self) -> WebhooksSettings:
        if self.env == "production":
            if self.allow_http:
                raise ConfigError("allow_http (MAILBUS_ALLOW_HTTP) must be false in production")
            if sum(self.retry_schedule_seconds) < DAY_SECONDS:
                raise ConfigError("retry_schedule_seconds (MAILBUS_RETRY_SCHEDULE_SECONDS)"
                                  " must retry for at least a day in production")
        return self

    @property
    def lease_seconds(self) -> float:
        """How long a claimed delivery is another instance's to leave alone."""
        return self.timeout_seconds * 3

    def policy(self) -> Policy:
        """The SSRF guard's policy."""
        return Policy(self.allow_http, tuple(self.allowed_networks))
