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
    # Inbound messages larger than this are not downloaded: kept as unmatched with
    # their size and header (the first 64 KiB of it), the mark moves past them.
    max_message_bytes: int = Field(default=10 * 1024 * 1024, ge=64 * 1024, le=100 * 1024 * 1024)
    # Bodies one IMAP FETCH brings at most (one message over it comes alone).
    imap_fetch_budget_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024,
                                         le=1024 * 1024 * 1024)
    # Wall time one message may take to classify; past it the worker process is
    # killed and the message kept as unmatched with the reason.
    classify_deadline_seconds: float = Field(default=10.0, gt=0, le=600)
    # Classifier worker processes, shared by every mailbox.
    classify_workers: int = Field(default=2, ge=1, le=32)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9105, ge=0, le=65535)
    # How often a summary line says what was handled since the last one and which
    # mailboxes are failing; 0: never.
    log_summary_seconds: float = Field(default=300.0, ge=0)
    # Gmail API endpoints: Google's unless overridden (the tests' emulator).
    gmail_api_endpoint: str | None = None
    gmail_token_uri: str | None = None

    @model_validator(mode="after")
    def _link_keys(self) -> RepliesSettings:
        if self.link_keys_file is None:
            self.link_keys_file = self.var_dir / "secrets" / "link-keys.json"
        return self
