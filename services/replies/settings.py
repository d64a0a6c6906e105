"""Settings of the mailbox reader (`MAILBUS_` environment prefix)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from mailbus.settings import ServiceSettings


class RepliesSettings(ServiceSettings):
    """The replies service's one settings object; mailboxes come from the accounts file."""

    service_name: str = "replies"
    # Verifies the tokens that come back by mail (the unsubscribe mailto, reply tags).
    link_keys_file: Path | None = None
    # Inbound messages larger than this are recorded by their headers only.
    max_message_bytes: int = Field(default=10 * 1024 * 1024, ge=64 * 1024, le=100 * 1024 * 1024)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9105, ge=0, le=65535)
    # Gmail API endpoints: Google's unless overridden (the tests' emulator).
    gmail_api_endpoint: str | None = None
    gmail_token_uri: str | None = None

    @model_validator(mode="after")
    def _link_keys(self) -> RepliesSettings:
        if self.link_keys_file is None:
            self.link_keys_file = self.var_dir / "secrets" / "link-keys.json"
        return self
