"""Settings of the sender (`MAILBUS_` environment prefix)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from mailbus.settings import ServiceSettings


class SenderSettings(ServiceSettings):
    """The sender's one settings object."""

    service_name: str = "sender"
    group_id: str = "mailbus-sender"
    # Hand-over attempts before a transiently failing message is given up
    # and dead-lettered; retries wait retry_base * 2^(n-1) s (jittered, capped).
    max_attempts: int = Field(default=8, ge=1, le=100)
    retry_base_seconds: float = Field(default=30.0, gt=0)
    retry_cap_seconds: float = Field(default=3600.0, gt=0)
    # How often an idle account worker looks for due messages; new arrivals
    # wake it at once, so this only bounds how late a scheduled send starts.
    poll_seconds: float = Field(default=1.0, gt=0)
    # Public base URL of the hooks service, where action and unsubscribe links point.
    hooks_base_url: str = "http://127.0.0.1:8081"
    link_keys_file: Path | None = None
    link_ttl_days: int = Field(default=30, ge=1, le=365)
    unsubscribe_mailto: str | None = None
    # Add a 1x1 open-tracking image to html mail (the hooks service records
    # the loads as unreliable opens when its own open_tracking is on).
    open_tracking: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    # Gmail API endpoints: Google's unless overridden (the tests' emulator).
    gmail_api_endpoint: str | None = None
    gmail_token_uri: str | None = None

    @model_validator(mode="after")
    def _link_keys(self) -> SenderSettings:
        if self.link_keys_file is None:
            self.link_keys_file = self.var_dir / "secrets" / "link-keys.json"
        return self
