"""Settings of the public hooks service (`MAILBUS_` environment prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, IPvAnyNetwork, model_validator

from mailbus.settings import ServiceSettings


class HooksSettings(ServiceSettings):
    """The hooks service's one settings object."""

    service_name: str = "hooks"
    # Answers from signed links alone.
    uses_postgres: ClassVar[bool] = False
    # The hooks port faces the internet (usually behind a TLS proxy); metrics
    # stay on their own loopback port.
    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9104, ge=0, le=65535)
    # The keyring the sender signs links with (see SenderSettings.link_keys_file).
    link_keys_file: Path | None = None
    # Serve /o/<token> and record opens; off, the route answers 404.
    open_tracking: bool = False
    # Token bucket per source address: sustained requests per minute and the
    # burst allowed on top. Webmail image proxies fetch many pixels from few
    # addresses, so the defaults are generous.
    rate_per_minute: int = Field(default=120, ge=1, le=100_000)
    rate_burst: int = Field(default=60, ge=1, le=100_000)
    # Memory bound of the limiter: the least recently seen addresses beyond
    # this many are forgotten.
    rate_max_addresses: int = Field(default=100_000, ge=100, le=10_000_000)
    # Proxies whose X-Forwarded-For is believed (CIDRs); none by default.
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list, max_length=256)
    # Link pages carry no payload; RFC 8058 one-click bodies are a few bytes.
    max_body_bytes: int = Field(default=4096, ge=256, le=65536)
    # Retry-After of the 503 answered while Kafka does not take events.
    unavailable_retry_seconds: int = Field(default=10, ge=1, le=3600)

    @model_validator(mode="after")
    def _link_keys(self) -> HooksSettings:
        if self.link_keys_file is None:
            self.link_keys_file = self.var_dir / "secrets" / "link-keys.json"
        return self
